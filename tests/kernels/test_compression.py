"""The bounded-error compressed kernel (``prepare_templates(tolerance=...)``).

Every reported cross-correlation is within the tolerance of the exact kernel's, the bound the
kernel reports holds for every pose, and pairs it cannot certify are recomputed exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    correlate_block,
    ctf_polar,
    prepare_images,
    prepare_templates,
    to_host,
    translation_kernel,
)
from cryolike_dask.kernels.compression import order_weights
from tests.conftest import random_hermitian_stack
from tests.kernels.device_inputs import device_inputs
from tests.kernels.reference import direct_correlation
from tests.standin import cupy_standin_fixture  # noqa: F401 - the fixture ``cupy_standin``

MAP = Path(__file__).resolve().parents[1] / "data" / "real" / "emd_1832.map"
FULL = BlockOutputs(full=True, integrated_likelihood=True)


def _ctf(rng, grid, n, box):
    u = rng.uniform(8e3, 2e4, n)
    return ctf_polar(
        u,
        u * 0.95,
        rng.uniform(0, 3, n),
        np.zeros(n),
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=box,
    )


@pytest.fixture(scope="module")
def real_inputs():
    """Templates of emd_1832 at 32 px (12 views), 3×3 displacements, 10 noisy images made
    from displaced, rotated templates with CTFs."""
    from cryolike_dask.io.mrc import read_volume
    from cryolike_dask.params.image import ImageParameters
    from cryolike_dask.preprocess.templates import normalize_templates, templates_from_volume

    npx = 32
    vol = np.asarray(read_volume(str(MAP))[0], dtype=np.float64)
    params = ImageParameters.from_values(
        npx, 5.7 * 64 / npx, n_inplanes=2 * npx, viewing_distance=8 / (4 * np.pi)
    )
    grid, angles = params.polar_grid, params.viewing_angles
    rng = np.random.default_rng(3)
    idx = rng.choice(angles.n_angles, 12, replace=False)
    sub = ViewingAngles(angles.azimus[idx], angles.polars[idx], angles.gammas[idx],
                        angles.weights[idx])  # fmt: skip
    t = normalize_templates(templates_from_volume(vol, sub, grid, precision="double"), grid)
    box = float(params.box_size[0])
    disp = DisplacementGrid.from_search(1.0, 3, 3, float(params.pixel_size[0]))
    kernel = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, box)
    n_m = 10
    s_true = rng.integers(0, 12, n_m)
    d_true = rng.integers(0, disp.n_displacements, n_m)
    w_true = rng.integers(0, grid.n_inplanes, n_m)
    ctf = _ctf(rng, grid, n_m, box)
    clean = np.stack([np.roll(t[s] * kernel[d], w, axis=-1)
                      for s, d, w in zip(s_true, d_true, w_true, strict=True)])  # fmt: skip
    scale = np.sqrt(np.mean(np.abs(clean) ** 2))
    noise = random_hermitian_stack(rng, n_m, grid.n_shells, grid.n_inplanes)
    y = clean * ctf + 0.5 * scale * noise
    return grid, t, y, ctf, kernel


def _random_inputs():
    """Smooth random Hermitian templates (a decaying radial profile: compressible)."""
    grid, _disp, t, y, ctf, kernel = device_inputs(np)
    profile = np.exp(-np.arange(grid.n_shells) / 6.0)
    return grid, t * profile[None, :, None], y, ctf, kernel


def _pair(inputs, tolerance, precision="double", **kw):
    grid, t, y, ctf, kernel = inputs
    consts = LikelihoodConstants.for_grid(grid, 1024)
    pi = prepare_images(y, ctf, grid, precision)
    exact = correlate_block(prepare_templates(t, kernel, grid, precision), pi, FULL,
                            likelihood=consts)  # fmt: skip
    pc = prepare_templates(t, kernel, grid, precision, tolerance=tolerance, **kw)
    comp = correlate_block(pc, pi, FULL, likelihood=consts)
    return exact, comp, pc


@pytest.mark.parametrize("tolerance", [3e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("make", [_random_inputs, "real"])
def test_bound_holds(make, tolerance, real_inputs) -> None:
    inputs = real_inputs if make == "real" else make()
    exact, comp, pc = _pair(inputs, tolerance)
    stats = comp.compression
    assert stats is not None and pc.spectrum is None
    err = np.abs(comp.cross_correlation_msdw - exact.cross_correlation_msdw)
    per_pair = err.max(axis=(2, 3))
    assert np.all(per_pair <= stats.bound + 1e-12)
    assert stats.max_bound <= tolerance
    assert err.max() <= tolerance
    assert stats.pairs == per_pair.size and 0 < stats.work_fraction <= 1.0


def test_bound_matches_its_formula(real_inputs) -> None:
    """Pose by pose, ``|Δcc| ≤ a_m ρ_{s,d} / sqrt(Ixx[m,s,w] Iyy[m])`` (Ixx, Iyy by direct
    sums), and the bound is not loose by orders of magnitude on real templates."""
    grid, t, y, ctf, kernel = real_inputs
    exact, comp, pc = _pair(real_inputs, 3e-2)
    pi = prepare_images(y, ctf, grid, "double")
    c = order_weights(pi.spectrum.shape[0], grid.n_inplanes)
    a_m = np.sqrt(np.einsum("q,qmn->m", c, np.abs(pi.spectrum) ** 2))
    _x, ixx, iyy = direct_correlation(t, y, ctf, kernel, grid.integration_weights)
    rho = pc.compressed.residual  # [S, D]
    pose_bound = (a_m[:, None, None, None] * rho[None, :, :, None]
                  / np.sqrt(ixx[:, :, None, :] * iyy[:, None, None, None]))  # fmt: skip
    err = np.abs(comp.cross_correlation_msdw - exact.cross_correlation_msdw)
    kept = comp.compression.bound > 0  # pairs not recomputed
    assert kept.any()
    assert np.all(err[kept] <= pose_bound[kept] * (1 + 1e-9) + 1e-13)
    np.testing.assert_allclose(pose_bound.max(axis=(2, 3))[kept], comp.compression.bound[kept],
                               rtol=1e-6)  # fmt: skip
    assert err[kept].max() >= 1e-3 * comp.compression.bound[kept].max()  # reasonably tight


def test_tiny_tolerance_is_exact(real_inputs) -> None:
    exact, comp, _ = _pair(real_inputs, 1e-7)
    np.testing.assert_allclose(comp.cross_correlation_msdw, exact.cross_correlation_msdw,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(comp.best_pose, exact.best_pose)
    np.testing.assert_allclose(comp.log_likelihood_ms, exact.log_likelihood_ms, rtol=1e-9)


def test_fallback_recomputes_exactly(real_inputs) -> None:
    """A large ``β`` gives ranks too small for the tolerance: the pairs the bound cannot
    certify are recomputed exactly, and only those."""
    tolerance = 1e-3
    exact, comp, _ = _pair(real_inputs, tolerance, safety=200.0)
    stats = comp.compression
    assert 0 < stats.fallback_pairs <= stats.pairs
    assert stats.max_bound_before_fallback > tolerance >= stats.max_bound
    redone = stats.bound == 0
    assert redone.sum() >= stats.fallback_pairs
    err = np.abs(comp.cross_correlation_msdw - exact.cross_correlation_msdw).max(axis=(2, 3))
    assert err[redone].max() <= 1e-12
    assert err.max() <= tolerance
    np.testing.assert_allclose(comp.log_likelihood_ms[redone], exact.log_likelihood_ms[redone],
                               rtol=1e-12)  # fmt: skip


@pytest.mark.parametrize("rectangle", [0.0, 2.0])
def test_fallback_grouping(real_inputs, rectangle, monkeypatch) -> None:
    """Both fallback groupings (one rectangle, template by template) give the exact pairs."""
    from cryolike_dask.kernels import cross_correlation

    monkeypatch.setattr(cross_correlation, "FALLBACK_RECTANGLE", rectangle)
    exact, comp, _ = _pair(real_inputs, 1e-3, safety=200.0)
    redone = comp.compression.bound == 0
    err = np.abs(comp.cross_correlation_msdw - exact.cross_correlation_msdw).max(axis=(2, 3))
    assert err[redone].max() <= 1e-12 and err.max() <= 1e-3


@pytest.mark.parametrize("precision", ["single", "double"])
def test_optimal_poses_agree(real_inputs, precision) -> None:
    grid, t, y, ctf, kernel = real_inputs
    pi = prepare_images(y, ctf, grid, precision)
    consts = LikelihoodConstants.for_grid(grid, 1024)
    outputs = BlockOutputs(integrated_likelihood=True, per_rotation=True)
    pe = prepare_templates(t, kernel, grid, precision)
    pc = prepare_templates(t, kernel, grid, precision, tolerance=1e-3)
    a = correlate_block(pe, pi, outputs, likelihood=consts, log_prior=np.full(12, -np.log(12)))
    b = correlate_block(pc, pi, outputs, likelihood=consts, log_prior=np.full(12, -np.log(12)))
    np.testing.assert_array_equal(b.best_pose, a.best_pose)
    np.testing.assert_allclose(b.best_cross_correlation, a.best_cross_correlation, atol=1e-3)
    assert np.all(np.isfinite(b.log_likelihood_sum))
    assert b.cross_correlation_msw.shape == a.cross_correlation_msw.shape


def test_reduced_outputs_and_pose_prior(real_inputs) -> None:
    """The reduced-only path, the isotropic-CTF path and a pose prior that leaves some
    templates out work on compressed templates."""
    from cryolike_dask.kernels.pose_prior import PriorFactors  # noqa: F401 - documented type

    grid, t, y, ctf, kernel = real_inputs
    n_m, n_s, n_w = y.shape[0], t.shape[0], grid.n_inplanes
    pe = prepare_templates(t, kernel, grid, "double")
    pc = prepare_templates(t, kernel, grid, "double", tolerance=1e-3)
    iso = ctf[:, :, :1]
    for c in (ctf, iso):
        pi = prepare_images(y, c, grid, "double")
        a, b = correlate_block(pe, pi), correlate_block(pc, pi)
        np.testing.assert_array_equal(b.best_pose, a.best_pose)
        assert np.all(np.abs(b.cross_correlation_ms - a.cross_correlation_ms) <= 1e-3)

    class Prior:
        log_template = np.zeros((n_m, n_s))
        log_template[:, ::3] = -np.inf  # a third of the templates: no image may take them
        log_rotation = np.zeros((n_m, n_s, n_w))
        log_displacement = np.zeros(kernel.shape[0])

    pi = prepare_images(y, ctf, grid, "double")
    consts = LikelihoodConstants.for_grid(grid, 1024)
    out = BlockOutputs(integrated_likelihood=True)
    a = correlate_block(pe, pi, out, likelihood=consts, pose_prior=Prior())
    b = correlate_block(pc, pi, out, likelihood=consts, pose_prior=Prior())
    allowed = np.isfinite(a.cross_correlation_ms)
    assert np.all(np.abs(b.cross_correlation_ms[allowed] - a.cross_correlation_ms[allowed]) <= 1e-3)
    assert np.all(np.isneginf(b.cross_correlation_ms[~allowed]))
    assert b.compression is not None and b.compression.pairs == n_m * n_s
    # with a fallback under the prior too
    c = correlate_block(
        prepare_templates(t, kernel, grid, "double", tolerance=1e-3, safety=200.0),
        pi,
        out,
        likelihood=consts,
        pose_prior=Prior(),
    )
    assert c.compression.fallback_pairs > 0
    assert np.all(np.abs(c.cross_correlation_ms[allowed] - a.cross_correlation_ms[allowed]) <= 1e-3)
    np.testing.assert_allclose(c.log_likelihood_ms[allowed], a.log_likelihood_ms[allowed],
                               rtol=1e-6)  # fmt: skip


def test_exact_path_has_no_stats() -> None:
    grid, t, y, ctf, kernel = _random_inputs()
    r = correlate_block(prepare_templates(t, kernel, grid), prepare_images(y, ctf, grid))
    assert r.compression is None


def test_rejects_bad_tolerance() -> None:
    grid, t, _y, _ctf, kernel = _random_inputs()
    with pytest.raises(ValueError, match="tolerance"):
        prepare_templates(t, kernel, grid, tolerance=0.0)


def test_cupy_standin(cupy_standin) -> None:
    """The compressed path on the strict CuPy stand-in gives NumPy's results."""
    cp = cupy_standin
    results = {}
    for xp in (np, cp):
        grid, _disp, t, y, ctf, kernel = device_inputs(xp)
        profile = xp.asarray(np.exp(-np.arange(grid.n_shells) / 6.0))
        t = t * profile[None, :, None]
        pc = prepare_templates(t, kernel, grid, "double", tolerance=3e-2, safety=4.0)
        pi = prepare_images(y, ctf, grid, "double")
        consts = LikelihoodConstants.for_grid(grid, 1024)
        results[xp.__name__] = correlate_block(pc, pi, FULL, likelihood=consts)
    a, b = results["numpy"], results["cupy"]
    assert isinstance(b.cross_correlation_msdw, cp.ndarray)
    np.testing.assert_allclose(to_host(b.cross_correlation_msdw), a.cross_correlation_msdw,
                               atol=1e-12)  # fmt: skip
    np.testing.assert_array_equal(to_host(b.best_pose), a.best_pose)
    assert b.compression.fallback_pairs == a.compression.fallback_pairs
    np.testing.assert_allclose(to_host(b.compression.bound), a.compression.bound, rtol=1e-9)
