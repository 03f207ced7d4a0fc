"""Translation kernel: multiplying by K moves real-space content by +(dx, dy) (spec §8.1)."""

from __future__ import annotations

import numpy as np

from cryolike_dask.grids import PolarGrid
from cryolike_dask.kernels.translation import translation_kernel


def _polar_dft(image: np.ndarray, grid: PolarGrid) -> np.ndarray:
    """Spec §3.1 by a direct non-uniform DFT (axis 0 paired with x, origin at n//2)."""
    n = image.shape[0]
    idx = np.arange(n) - n // 2
    k1 = 2 * np.pi * 2 * grid.x_points / n
    k2 = 2 * np.pi * 2 * grid.y_points / n
    phase = np.exp(-1j * (k1[..., None, None] * idx[:, None] + k2[..., None, None] * idx[None, :]))
    return (4 * np.pi / n) * np.einsum("nwij,ij->nw", phase, image)


def test_shift_moves_content_towards_increasing_index() -> None:
    n, pixel = 16, 2.0
    grid = PolarGrid.from_image_size(n, n_inplanes=24)
    rng = np.random.default_rng(1)
    image = np.zeros((n, n))
    image[5:9, 6:10] = rng.normal(size=(4, 4))  # compact support: rolling is a true shift
    moved = np.roll(np.roll(image, 2, axis=0), -1, axis=1)  # +2 px along axis 0, −1 px along 1
    kernel = translation_kernel(grid.x_points, grid.y_points, [2 * pixel], [-1 * pixel], n * pixel)
    np.testing.assert_allclose(
        _polar_dft(image, grid) * kernel[0], _polar_dft(moved, grid), rtol=1e-10, atol=1e-10
    )


def test_shape_dtype_and_unit_modulus() -> None:
    grid = PolarGrid(4.0, 0.25, 16)
    k = translation_kernel(
        grid.x_points,
        grid.y_points,
        [0.0, 1.0, 2.5],
        [0.0, -1.0, 3.0],
        (20.0, 30.0),
        dtype=np.complex64,
    )
    assert k.shape == (3, grid.n_shells, 16) and k.dtype == np.complex64
    np.testing.assert_allclose(np.abs(k), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(k[0], 1.0)
