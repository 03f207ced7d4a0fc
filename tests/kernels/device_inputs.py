"""Small random inputs of the block kernel on any array module (NumPy, CuPy, the CuPy
stand-in), shared by the CuPy tests and the stand-in tests."""

from __future__ import annotations

import numpy as np

from cryolike_dask.grids import DisplacementGrid, PolarGrid
from cryolike_dask.kernels import ctf_polar, translation_kernel
from tests.conftest import random_hermitian_stack

DEVICE_BOX = 48.0


def device_inputs(xp):
    """Small random inputs of the block kernel on the array module ``xp`` (NumPy, CuPy or the
    CuPy stand-in): grid, displacements, templates ``[12, N, W]``, images ``[9, N, W]``,
    their CTFs and the translation kernel (box :data:`DEVICE_BOX` Å)."""
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
        box_size=DEVICE_BOX,
    )
    kernel = translation_kernel(
        xp.asarray(grid.x_points),
        xp.asarray(grid.y_points),
        xp.asarray(disp.x),
        xp.asarray(disp.y),
        DEVICE_BOX,
    )
    return grid, disp, xp.asarray(t), xp.asarray(y), ctf, kernel
