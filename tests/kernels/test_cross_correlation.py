"""The block kernel against an independent direct sum of spec §10.1 (tests/kernels/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import DisplacementGrid, PolarGrid
from cryolike_dask.kernels import (
    BlockOutputs,
    NonFiniteCrossCorrelationError,
    correlate_block,
    ctf_polar,
    decode_pose,
    encode_pose,
    prepare_images,
    prepare_templates,
    translation_kernel,
)
from tests.conftest import random_hermitian_stack
from tests.kernels.reference import direct_correlation, first_argmax_dw, normalized

BOX = 40.0


@pytest.fixture(scope="module")
def case():
    """7 templates × 6 images, 9 shells × 16 angles, 5 displacements, anisotropic CTFs."""
    rng = np.random.default_rng(7)
    grid = PolarGrid(2.0, 0.25, 16)  # N = 9
    templates = random_hermitian_stack(rng, 7, grid.n_shells, grid.n_inplanes)
    images = random_hermitian_stack(rng, 6, grid.n_shells, grid.n_inplanes)
    ctf = ctf_polar(
        rng.uniform(8000, 20000, 6),
        rng.uniform(8000, 20000, 6),
        rng.uniform(-np.pi, np.pi, 6),
        np.zeros(6),
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=BOX,
    )
    disp = DisplacementGrid(
        np.array([0.0, 1.5, -2.0, 0.7, 3.0]), np.array([0.0, -1.0, 2.5, 0.3, 0])
    )
    kernel = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, BOX)
    x, ixx, iyy = direct_correlation(templates, images, ctf, kernel, grid.integration_weights)
    return dict(
        grid=grid,
        templates=templates,
        images=images,
        ctf=ctf,
        kernel=kernel,
        cc=normalized(x, ixx, iyy),
        x=x,
        ixx=ixx,
        iyy=iyy,
    )


FULL = BlockOutputs(full=True)


def _run(case, precision, outputs=FULL, **kw):
    pt = prepare_templates(case["templates"], case["kernel"], case["grid"], precision, **kw)
    pi = prepare_images(case["images"], case["ctf"], case["grid"], precision)
    return correlate_block(pt, pi, outputs, **kw)


@pytest.mark.parametrize(("precision", "tol"), [("single", 1e-5), ("double", 1e-10)])
def test_full_tensor_equals_direct_sum(case, precision: str, tol: float) -> None:
    result = _run(case, precision)
    ref = case["cc"]
    assert result.cross_correlation_msdw.shape == ref.shape
    assert result.cross_correlation_msdw.dtype == (
        np.float32 if precision == "single" else np.float64
    )
    err = np.abs(result.cross_correlation_msdw - ref).max() / np.abs(ref).max()
    assert err <= tol, err


def test_reductions_equal_direct_sum(case) -> None:
    result = _run(case, "double", BlockOutputs(per_rotation=True, per_displacement=True))
    ref = case["cc"]
    assert result.cross_correlation_msdw is None  # not built unless asked for
    best, arg = first_argmax_dw(ref)
    np.testing.assert_allclose(result.cross_correlation_ms, best, rtol=1e-10)
    np.testing.assert_array_equal(result.pose_ms, arg)
    np.testing.assert_allclose(result.cross_correlation_msw, ref.max(axis=2), rtol=1e-10)
    np.testing.assert_array_equal(result.displacement_index_msw, ref.argmax(axis=2))
    np.testing.assert_allclose(result.cross_correlation_msd, ref.max(axis=3), rtol=1e-10)
    np.testing.assert_array_equal(result.rotation_index_msd, ref.argmax(axis=3))
    n_m, _n_s, n_d, n_w = ref.shape
    flat = ref.reshape(n_m, -1)
    np.testing.assert_allclose(result.best_cross_correlation, flat.max(axis=1), rtol=1e-10)
    np.testing.assert_array_equal(result.best_pose, flat.argmax(axis=1))  # flat order s, d, w
    s, d, w = decode_pose(result.best_pose, n_d, n_w)
    np.testing.assert_array_equal(encode_pose(s, d, w, n_d, n_w), result.best_pose)
    assert result.best_pose.dtype == np.int64


def test_isotropic_ctf_gives_exact_template_norms(case) -> None:
    """A [M, N, 1] CTF is broadcast over angles: norms are Σ_n C² Σ_w |T|² (§17.4)."""
    grid = case["grid"]
    ctf_iso = case["ctf"].mean(axis=2, keepdims=True)
    pt = prepare_templates(case["templates"], case["kernel"], grid, "double")
    result = correlate_block(
        pt, prepare_images(case["images"], ctf_iso, grid, "double"), BlockOutputs(full=True)
    )
    x, ixx, iyy = direct_correlation(
        case["templates"],
        case["images"],
        np.broadcast_to(ctf_iso, case["images"].shape),
        case["kernel"],
        grid.integration_weights,
    )
    np.testing.assert_allclose(result.cross_correlation_msdw, normalized(x, ixx, iyy), atol=1e-12)
    np.testing.assert_allclose(ixx, np.broadcast_to(ixx[..., :1], ixx.shape), rtol=1e-12)


def test_internal_batching_does_not_change_results(case) -> None:
    whole = _run(case, "double", BlockOutputs(full=True, integrated_likelihood=False))
    tiny = _run(
        case, "double", BlockOutputs(full=True), work_bytes=1
    )  # one template/image at a time
    # equal to rounding: BLAS may block a GEMM of another shape differently
    np.testing.assert_allclose(
        whole.cross_correlation_msdw, tiny.cross_correlation_msdw, rtol=0, atol=1e-14
    )
    np.testing.assert_array_equal(whole.best_pose, tiny.best_pose)


@pytest.mark.parametrize("budget", [1, 9 * 16 * 16 * 2 * 2, 2**30])
@pytest.mark.parametrize("workers", [1, 2])
def test_host_preparation_pieces_do_not_change_results(case, monkeypatch, budget, workers) -> None:
    """Templates prepared a few displacements, one template or all at once, on 1-2 threads."""
    from cryolike_dask.kernels import cross_correlation

    monkeypatch.setattr(cross_correlation, "HOST_PREPARE_BYTES", budget)
    result = _run(case, "double", workers=workers)
    np.testing.assert_allclose(result.cross_correlation_msdw, case["cc"], rtol=0, atol=1e-10)


def test_prepare_units_cover_every_template_and_displacement() -> None:
    from cryolike_dask.kernels.cross_correlation import _prepare_units

    for n_s, n_d, per, budget in [(7, 5, 100, 1), (7, 5, 100, 40), (7, 5, 100, 250), (3, 1, 8, 1)]:
        covered = np.zeros((n_s, n_d), int)
        for s0, s1, d0, d1 in _prepare_units(n_s, n_d, per, budget):
            covered[s0:s1, d0:d1] += 1
        np.testing.assert_array_equal(covered, 1)


def test_ties_go_to_the_first_index(case) -> None:
    grid = case["grid"]
    templates = case["templates"][[0, 1, 0, 2]]  # template 2 duplicates template 0
    disp = translation_kernel(grid.x_points, grid.y_points, [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], BOX)
    # duplicated displacement 0 == 1; images equal to a model at (s=0, d=0, w=3) → exact ties
    model = np.roll(templates[0] * disp[0], -3, axis=-1) * case["ctf"][0]
    images = np.stack([model, case["images"][1]])
    ctf = case["ctf"][[0, 1]]
    pt = prepare_templates(templates, disp, grid, "double")
    result = correlate_block(
        pt, prepare_images(images, ctf, grid, "double"), BlockOutputs(full=True)
    )
    cc = result.cross_correlation_msdw
    np.testing.assert_array_equal(cc[:, 0], cc[:, 2])  # exact ties between templates...
    np.testing.assert_array_equal(cc[:, :, 0], cc[:, :, 1])  # ...and between displacements
    s, d, w = decode_pose(result.best_pose, 3, grid.n_inplanes)
    assert (s[0], d[0], w[0]) == (0, 0, 3)
    assert result.best_cross_correlation[0] == pytest.approx(1.0, abs=1e-12)
    assert s[1] != 2 and d[1] != 1  # never the later copy


def test_zero_template_raises(case) -> None:
    templates = case["templates"].copy()
    templates[3] = 0
    with pytest.raises(NonFiniteCrossCorrelationError, match="template 3"):
        _run(dict(case, templates=templates), "single", BlockOutputs())


def test_shape_errors(case) -> None:
    grid = case["grid"]
    with pytest.raises(ValueError, match="templates must have shape"):
        prepare_templates(case["templates"][:, :5], case["kernel"], grid)
    with pytest.raises(ValueError, match="ctf must have shape"):
        prepare_images(case["images"], case["ctf"][:, :4], grid)
    with pytest.raises(ValueError, match="translation kernel"):
        prepare_templates(case["templates"], case["kernel"][:, :3], grid)
    pt = prepare_templates(case["templates"], case["kernel"], grid)
    pi = prepare_images(case["images"], case["ctf"], grid)
    with pytest.raises(ValueError, match="LikelihoodConstants"):
        correlate_block(pt, pi, BlockOutputs(integrated_likelihood=True))
