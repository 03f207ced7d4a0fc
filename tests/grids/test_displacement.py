"""Displacement search grid (spec §8.2)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import DisplacementGrid, NoTranslationalSearchWarning


def test_example_of_the_spec() -> None:
    grid = DisplacementGrid.from_search(8, 16, 16, 1.346)
    assert grid.n_displacements == 257
    assert grid.x.min() == pytest.approx(-10.768, abs=1e-5)
    assert grid.x.max() == pytest.approx(10.768, abs=1e-5)
    assert grid.y.min() == pytest.approx(-10.768, abs=1e-5)
    assert (grid.x[-1], grid.y[-1]) == (0.0, 0.0)
    assert grid.as_array().dtype == np.float32 and grid.as_array().shape == (2, 257)


def test_x_fastest_and_reference(reference_dir) -> None:
    grid = DisplacementGrid.from_search(1.5, 3, 3, 1.5)
    ref = np.load(reference_dir / "numpy" / "outputs.npz")["displacements_set"]
    np.testing.assert_array_equal(grid.as_array(), ref)
    # entry k = iy * nx + ix
    grid2 = DisplacementGrid.from_search(1.0, 3, 2, 2.0)
    xs, ys = np.linspace(-2, 2, 3), np.linspace(-2, 2, 2)
    for iy in range(2):
        for ix in range(3):
            k = iy * 3 + ix
            assert (grid2.x[k], grid2.y[k]) == (np.float32(xs[ix]), np.float32(ys[iy]))
    assert grid2.n_displacements == 7  # an even count appends (0, 0)
    assert (grid2.x[-1], grid2.y[-1]) == (0.0, 0.0)


def test_odd_counts_contain_zero_without_appending() -> None:
    grid = DisplacementGrid.from_search(4, 5, 5, 1.0)
    assert grid.n_displacements == 25
    assert np.sum((grid.x == 0) & (grid.y == 0)) == 1


def test_minus_one_warns_and_means_one() -> None:
    with pytest.warns(NoTranslationalSearchWarning, match="no translational search.*along x"):
        grid = DisplacementGrid.from_search(8, -1, 3, 1.0)
    assert grid.n_displacements == 3
    np.testing.assert_array_equal(grid.x, 0.0)
    np.testing.assert_array_equal(grid.y, [-8, 0, 8])
    with pytest.warns(NoTranslationalSearchWarning) as record:
        both = DisplacementGrid.from_search(8, -1, -1, 1.0)
    assert len(record) == 1  # one warning for both axes
    assert "along x and y" in str(record[0].message)
    assert both.n_displacements == 1 and both.x[0] == 0 and both.y[0] == 0


def test_bad_counts_and_arrays() -> None:
    with pytest.raises(ValueError, match="n_displacements_y"):
        DisplacementGrid.from_search(8, 3, -2, 1.0)
    with pytest.raises(ValueError, match="pixel_size"):
        DisplacementGrid.from_search(8, 3, 3, 0.0)
    with pytest.raises(ValueError, match=r"\[2, D\]"):
        DisplacementGrid.from_array(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite"):
        DisplacementGrid(np.array([np.nan]), np.array([0.0]))
