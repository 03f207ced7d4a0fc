"""Polar grid: golden values of spec §19, quadrature accuracy, agreement with CryoLike's arrays."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import PolarGrid


@pytest.fixture
def grid8() -> PolarGrid:
    return PolarGrid(8.0, 0.25, 64)


def test_golden_radii_and_weights(grid8: PolarGrid) -> None:
    assert grid8.n_shells == 33
    np.testing.assert_allclose(
        grid8.radii[:4],
        [0.025374459019473772, 0.08485132737442225, 0.17773271401500068, 0.3032188976789021],
        rtol=1e-14,
    )
    np.testing.assert_allclose(
        grid8.weight_shells[:4],
        [
            0.00017192458358042986,
            0.001030260458447985,
            0.003092895897837178,
            0.006826394883561097,
        ],
        rtol=1e-13,
    )
    assert grid8.radii[-1] == pytest.approx(7.989997, abs=5e-7)
    assert grid8.integration_weights.sum() == pytest.approx(64 * np.pi, rel=1e-13)
    assert grid8.mask_integral == pytest.approx(3.959320140107695, rel=1e-13)


def test_golden_132_pixels() -> None:
    grid = PolarGrid.from_image_size(132, n_inplanes=256)
    assert grid.n_shells == 133
    assert grid.mask_integral == pytest.approx(3.990640615133034, rel=1e-13)
    box = 132 * 1.346
    assert box == pytest.approx(177.672)
    # the grid's band limit 2R/box is Nyquist, 1/(2 pixel)
    assert 2 * grid.radius_max / box == pytest.approx(0.371471, abs=1e-6)
    assert 2 * grid.radius_max / box == pytest.approx(1 / (2 * 1.346), rel=1e-14)


@pytest.mark.parametrize(("n_pixels", "n_shells"), [(32, 33), (128, 129), (132, 133), (256, 257)])
def test_shell_counts(n_pixels: int, n_shells: int) -> None:
    grid = PolarGrid.from_image_size(n_pixels)
    assert grid.n_shells == n_shells
    assert grid.n_inplanes == 2 * n_pixels
    assert grid.shape == (n_shells, 2 * n_pixels)


def test_quadrature_integrates_gaussians(grid8: PolarGrid) -> None:
    """Radial and angle-modulated Gaussians over the disk against closed forms."""
    a = 0.3
    r2 = grid8.x_points**2 + grid8.y_points**2
    exact = np.pi / a * (1 - np.exp(-a * 64.0))
    assert grid8.integrate(np.exp(-a * r2)) == pytest.approx(exact, rel=1e-10)
    # ∫ x² e^{-a r²} d²k = π ∫ r³ e^{-a r²} dr = π/(2a²) (1 − (1 + aR²) e^{−aR²})
    exact_x2 = np.pi / (2 * a**2) * (1 - (1 + a * 64.0) * np.exp(-a * 64.0))
    assert grid8.integrate(grid8.x_points**2 * np.exp(-a * r2)) == pytest.approx(
        exact_x2, rel=1e-10
    )
    assert grid8.integrate(np.ones(grid8.shape)) == pytest.approx(np.pi * 64.0, rel=1e-13)


def test_points_and_weights_match_cryolike(reference_dir, grid8: PolarGrid) -> None:
    ref = np.load(reference_dir / "numpy" / "inputs.npz")
    np.testing.assert_allclose(grid8.radii, ref["grid__radius_shells"], rtol=1e-15)
    np.testing.assert_allclose(grid8.weight_shells, ref["grid__weight_shells"], rtol=1e-15)
    np.testing.assert_allclose(grid8.theta, ref["grid__theta_shell"], rtol=1e-15)
    np.testing.assert_allclose(
        grid8.integration_weights, ref["grid__integration_weight_points"], rtol=1e-14
    )
    np.testing.assert_allclose(grid8.x_points, ref["grid__x_points"], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(grid8.y_points, ref["grid__y_points"], rtol=1e-14, atol=1e-15)


def test_equality_and_validation() -> None:
    assert PolarGrid(8, 0.25, 64) == PolarGrid(8.0, 0.25, 64)
    assert PolarGrid(8, 0.25, 64) != PolarGrid(8, 0.25, 32)
    assert len({PolarGrid(8, 0.25, 64), PolarGrid(8.0, 0.25, 64)}) == 1
    with pytest.raises(ValueError, match="radius_max"):
        PolarGrid(-1, 0.25, 64)
    with pytest.raises(ValueError, match="n_inplanes"):
        PolarGrid(8, 0.25, 1)
    with pytest.raises(ValueError, match="dist_radii"):
        PolarGrid(8, float("nan"), 64)


def test_arrays_are_read_only(grid8: PolarGrid) -> None:
    with pytest.raises(ValueError):
        grid8.radii[0] = 1.0
