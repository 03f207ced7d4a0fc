"""An image made analytically from a template by a known shift, rotation and CTF is found again.

The image is the exact Fourier transform of Gaussian blobs moved in real space (shifted by
+d, then rotated by −γ about the box centre), not something built with the kernel's own
translation or rotation code, so this checks the sign conventions of spec §9.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import DisplacementGrid, PolarGrid
from cryolike_dask.kernels import (
    BlockOutputs,
    correlate_block,
    ctf_polar,
    decode_pose,
    prepare_images,
    prepare_templates,
    translation_kernel,
)

BOX = 64.0  # Å (32 px of 2 Å)


def _blobs_ft(grid: PolarGrid, positions: np.ndarray, sigma: float = 2.5) -> np.ndarray:
    """FT on the polar grid of Gaussian blobs at ``positions`` ``[A, 2]`` (Å, axes 0 and 1)."""
    nu = 2 * grid.radii / BOX
    envelope = np.exp(-2 * np.pi**2 * sigma**2 * nu**2)[:, None]
    phase = grid.x_points[..., None] * positions[:, 0] + grid.y_points[..., None] * positions[:, 1]
    return envelope * np.exp(-2j * np.pi * (2 / BOX) * phase).sum(axis=-1)


@pytest.mark.parametrize("precision", ["single", "double"])
def test_known_pose_is_recovered(precision: str) -> None:
    rng = np.random.default_rng(3)
    grid = PolarGrid.from_image_size(32, n_inplanes=64)
    atoms = [rng.uniform(-12, 12, size=(6, 2)) for _ in range(5)]
    templates = np.stack([_blobs_ft(grid, a) for a in atoms])
    disp = DisplacementGrid.from_search(2, 5, 5, 2.0)  # ±4 Å, 25 displacements
    s_true, d_true, w_true = 3, 17, 11
    gamma = 2 * np.pi * w_true / grid.n_inplanes
    dx, dy = float(disp.x[d_true]), float(disp.y[d_true])
    rot = np.array([[np.cos(gamma), np.sin(gamma)], [-np.sin(gamma), np.cos(gamma)]])  # R(−γ)
    moved = (atoms[s_true] + [dx, dy]) @ rot.T
    ctf = ctf_polar(
        [14000.0],
        [12000.0],
        [0.6],
        [0.0],
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=BOX,
    )
    image = (_blobs_ft(grid, moved) * ctf[0])[None]
    kernel = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, BOX)
    result = correlate_block(
        prepare_templates(templates, kernel, grid, precision),
        prepare_images(image, ctf, grid, precision),
        BlockOutputs(full=True),
    )
    s, d, w = decode_pose(result.best_pose, disp.n_displacements, grid.n_inplanes)
    assert (int(s[0]), int(d[0]), int(w[0])) == (s_true, d_true, w_true)
    tol = 1e-5 if precision == "single" else 1e-10
    assert result.best_cross_correlation[0] == pytest.approx(1.0, abs=tol)
    # the match is clearly separated from every other pose
    cc = result.cross_correlation_msdw[0].copy()
    cc[s_true, d_true, w_true] = -np.inf
    assert cc.max() < 0.99
