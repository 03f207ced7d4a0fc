"""Cartesian grid (spec §2)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import CartesianGrid2D


def test_axes_and_box() -> None:
    grid = CartesianGrid2D(4, 1.5)
    assert grid.n_pixels == (4, 4) and grid.box_size == (6.0, 6.0)
    np.testing.assert_allclose(grid.axis(0), [-3.0, -1.5, 0.0, 1.5])
    assert grid.n_pixels_total == 16
    assert grid.x_pixels.shape == (4, 4)
    np.testing.assert_allclose(grid.x_pixels[:, 0], grid.axis(0))  # 'ij' indexing
    np.testing.assert_allclose(grid.y_pixels[0, :], grid.axis(1))


def test_rectangular_and_validation() -> None:
    grid = CartesianGrid2D((4, 6), (1.0, 2.0))
    assert grid.box_size == (4.0, 12.0)
    with pytest.raises(ValueError, match="pixel_size"):
        CartesianGrid2D(4, -1.0)
    with pytest.raises(ValueError, match="n_pixels"):
        CartesianGrid2D(4.5, 1.0)
    with pytest.raises(ValueError, match="n_pixels"):
        CartesianGrid2D((1, 2, 3), 1.0)
