"""The same kernel code on CuPy arrays gives NumPy's results (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import DisplacementGrid, PolarGrid
from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    array_module,
    correlate_block,
    ctf_polar,
    optimal_pose_log_likelihood,
    prepare_images,
    prepare_templates,
    to_host,
    translation_kernel,
)
from tests.conftest import random_hermitian_stack

pytestmark = pytest.mark.gpu
BOX = 48.0


def _inputs(xp):
    rng = np.random.default_rng(5)
    grid = PolarGrid.from_image_size(32, n_inplanes=64)
    t = random_hermitian_stack(rng, 12, grid.n_shells, 64)
    y = random_hermitian_stack(rng, 9, grid.n_shells, 64)
    disp = DisplacementGrid.from_search(1.5, 3, 3, 1.5)
    u = xp.asarray(rng.uniform(8e3, 2e4, 9))
    ctf = ctf_polar(
        u,
        u * 0.95,
        xp.asarray(rng.uniform(0, 3, 9)),
        xp.zeros(9),
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=BOX,
    )
    kernel = translation_kernel(
        xp.asarray(grid.x_points),
        xp.asarray(grid.y_points),
        xp.asarray(disp.x),
        xp.asarray(disp.y),
        BOX,
    )
    return grid, disp, xp.asarray(t), xp.asarray(y), ctf, kernel


@pytest.mark.parametrize(("precision", "tol"), [("single", 2e-6), ("double", 1e-12)])
def test_cupy_equals_numpy(precision: str, tol: float) -> None:
    cupy = pytest.importorskip("cupy")
    outputs = BlockOutputs(
        full=True, per_rotation=True, per_displacement=True, integrated_likelihood=True
    )
    results = {}
    for xp in (np, cupy):
        grid, _disp, t, y, ctf, kernel = _inputs(xp)
        assert array_module(ctf) is xp
        pt = prepare_templates(t, kernel, grid, precision)
        pi = prepare_images(y, ctf, grid, precision)
        consts = LikelihoodConstants.for_grid(grid, 1024)
        results[xp.__name__] = correlate_block(
            pt, pi, outputs, likelihood=consts, log_prior=xp.full(12, -np.log(12))
        )
    a, b = results["numpy"], results["cupy"]
    assert array_module(b.best_cross_correlation) is cupy
    np.testing.assert_allclose(
        to_host(b.cross_correlation_msdw), a.cross_correlation_msdw, atol=tol
    )
    np.testing.assert_array_equal(to_host(b.best_pose), a.best_pose)
    np.testing.assert_allclose(
        to_host(b.log_likelihood_ms),
        a.log_likelihood_ms,
        rtol=1e-6 if precision == "single" else 1e-12,
    )
    np.testing.assert_allclose(to_host(b.cross_correlation_msw), a.cross_correlation_msw, atol=tol)
    np.testing.assert_array_equal(to_host(b.rotation_index_msd), a.rotation_index_msd)


def test_cupy_optimal_pose_likelihood() -> None:
    cupy = pytest.importorskip("cupy")
    outs = []
    for xp in (np, cupy):
        grid, disp, t, y, ctf, _ = _inputs(xp)
        idx = xp.arange(9) % 12
        outs.append(
            optimal_pose_log_likelihood(
                t[idx],
                y,
                ctf,
                xp.asarray(disp.x[:9]),
                xp.asarray(disp.y[:9]),
                xp.asarray(grid.theta[:9]),
                grid,
                BOX,
                1024,
                "double",
            )
        )
    np.testing.assert_allclose(to_host(outs[1].log_likelihood), outs[0].log_likelihood, rtol=1e-12)
