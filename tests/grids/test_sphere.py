"""Viewing directions: counts and weights of spec §4, agreement with CryoLike's angles."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import ViewingAngles


@pytest.mark.parametrize(("k", "count"), [(1, 2370), (2, 690), (4, 239), (8, 96)])
def test_counts(k: int, count: int) -> None:
    angles = ViewingAngles.from_viewing_distance(k / (4 * np.pi))
    assert angles.n_angles == count
    assert angles.weights.sum() == pytest.approx(4 * np.pi, rel=1e-12)


def test_circles_of_the_example() -> None:
    angles = ViewingAngles.from_viewing_distance(8 / (4 * np.pi))
    _, counts = np.unique(angles.polars, return_counts=True)
    # circles run from polar ≈ π down to ≈ 0; np.unique sorts ascending, so reverse
    assert list(counts[::-1]) == [5, 8, 10, 12, 13, 13, 12, 10, 8, 5]
    assert angles.azimus.dtype == np.float32 and angles.polars.dtype == np.float32
    assert angles.polars[0] > angles.polars[-1]


def test_matches_cryolike(reference_dir) -> None:
    ref = np.load(reference_dir / "numpy" / "inputs.npz")
    angles = ViewingAngles.from_viewing_distance(8 / (4 * np.pi))
    np.testing.assert_array_equal(angles.azimus, ref["viewing__azimus"])
    np.testing.assert_array_equal(angles.polars, ref["viewing__polars"])
    np.testing.assert_array_equal(angles.gammas, ref["viewing__gammas"])
    np.testing.assert_allclose(angles.weights, ref["viewing__weights_viewing"], rtol=1e-14)


def test_log_normalized_weights() -> None:
    angles = ViewingAngles.from_viewing_distance(4 / (4 * np.pi))
    lw = angles.log_normalized_weights
    assert np.exp(lw).sum() == pytest.approx(1.0, rel=1e-13)
    np.testing.assert_allclose(np.exp(lw), angles.weights / angles.weights.sum(), rtol=1e-13)


def test_directions_are_unit_and_validation() -> None:
    angles = ViewingAngles.from_viewing_distance(2 / (4 * np.pi))
    np.testing.assert_allclose(np.linalg.norm(angles.directions(), axis=1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="viewing_distance"):
        ViewingAngles.from_viewing_distance(0.0)
    with pytest.raises(ValueError, match="same length"):
        ViewingAngles(np.zeros(3), np.zeros(2), np.zeros(3), np.ones(3))
