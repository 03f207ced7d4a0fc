"""The same kernel code on CuPy arrays gives NumPy's results (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    array_module,
    correlate_block,
    optimal_pose_log_likelihood,
    prepare_images,
    prepare_templates,
    to_host,
)
from tests.kernels.device_inputs import DEVICE_BOX, device_inputs

pytestmark = pytest.mark.gpu
BOX = DEVICE_BOX


@pytest.mark.parametrize(("precision", "tol"), [("single", 2e-6), ("double", 1e-12)])
def test_cupy_equals_numpy(precision: str, tol: float) -> None:
    cupy = pytest.importorskip("cupy")
    outputs = BlockOutputs(
        full=True, per_rotation=True, per_displacement=True, integrated_likelihood=True
    )
    results = {}
    for xp in (np, cupy):
        grid, _disp, t, y, ctf, kernel = device_inputs(xp)
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
        grid, disp, t, y, ctf, _ = device_inputs(xp)
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
