"""Templates from atoms and maps (spec §5), against CryoLike and independent constructions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolike_dask.grids import PolarGrid, ViewingAngles
from cryolike_dask.io.models import read_atoms
from cryolike_dask.params import ImageParameters
from cryolike_dask.preprocess.nufft import images_to_polar, volume_at_points
from cryolike_dask.preprocess.templates import (
    normalize_templates,
    slice_directions,
    slice_points,
    templates_from_atoms,
    templates_from_volume,
)


@pytest.fixture(scope="module")
def ref(reference_dir):
    params = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    atoms = read_atoms(reference_dir / "inputs_pdb" / "1uao.pdb", params)
    expected = torch.load(reference_dir / "templates" / "templates_fourier_1uao.pt").numpy()
    return params, atoms, expected


def test_gaussian_atoms_match_cryolike(ref) -> None:
    params, atoms, expected = ref
    grid = params.polar_grid
    t = templates_from_atoms(
        atoms.coordinates,
        atoms.radii,
        params.viewing_angles,
        grid,
        48.0,
        "gaussian",
        "single",
        work_bytes=2**20,
    )  # forces chunking
    t = normalize_templates(t, grid)
    assert t.dtype == np.complex64 and t.shape == expected.shape
    assert np.abs(t - expected).max() / np.abs(expected).max() < 1e-5  # measured 2.8e-7


def _gaussian_map(atoms, n: int, voxel: float) -> np.ndarray:
    """Each atom a Gaussian of std = its radius, mass ∝ radius⁻³ (CryoLike's atom weights)."""
    axis = (np.arange(n) - n // 2) * voxel
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    density = np.zeros((n, n, n))
    for (ax, ay, az), r in zip(atoms.coordinates.astype(float), atoms.radii, strict=True):
        d2 = (x - ax) ** 2 + (y - ay) ** 2 + (z - az) ** 2
        density += r**-6 * np.exp(-d2 / (2 * r * r))
    return density


@pytest.mark.parametrize(
    ("n", "voxel", "tol"), [(32, 1.5, 2e-5), (64, 0.75, 1e-7), (40, 1.5, 2e-5)]
)
def test_map_of_the_atoms_gives_the_same_templates(ref, n: int, voxel: float, tol: float) -> None:
    """A sampled map of the Gaussian atoms, at the image box (32³ × 1.5 Å = 48 Å), finer voxels,
    or a larger box (40³ × 1.5 Å = 60 Å, placed by its voxel size): the analytic templates."""
    params, atoms, _ = ref
    grid, angles = params.polar_grid, params.viewing_angles
    analytic = normalize_templates(
        templates_from_atoms(
            atoms.coordinates, atoms.radii, angles, grid, 48.0, "gaussian", "double"
        ),
        grid,
    )
    scale = (voxel / 48.0,) * 3
    sampled = normalize_templates(
        templates_from_volume(_gaussian_map(atoms, n, voxel), angles, grid, scale, "double"), grid
    )
    assert np.abs(sampled - analytic).max() / np.abs(analytic).max() < tol


def test_fourier_slice_of_a_map_is_the_transform_of_its_projection(rng) -> None:
    """Viewing direction z (α = β = 0): the template is the 2-D FT of the projection along
    axis 2, by the 2-D NUFFT of the particle path (an independent transform)."""
    n = 24
    grid = PolarGrid.from_image_size(n, n_inplanes=32)
    volume = rng.normal(size=(n, n, n))
    angles = ViewingAngles.uniform_weights(np.zeros(1), np.zeros(1))
    pts = slice_points(angles, grid).reshape(-1, 3)
    raw = volume_at_points(volume, pts, np.full(3, 1.0 / n), "double").reshape(grid.shape)
    projection = volume.sum(axis=2)
    expected = images_to_polar(projection[None], grid, "double")[0] / (4 * np.pi / n)
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


def test_slice_geometry() -> None:
    angles = ViewingAngles.from_viewing_distance(4 / (4 * np.pi))
    grid = PolarGrid(4.0, 0.25, 16)
    u = slice_directions(angles, grid)
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, atol=1e-6)
    view = angles.directions()  # the projection direction R·z must be orthogonal to the slice
    np.testing.assert_allclose(np.einsum("swk,sk->sw", u, view), 0.0, atol=1e-6)
    # θ = 0, γ = 0: u = Rz(α) Ry(β) x̂ = (cos α cos β, sin α cos β, −sin β)
    a, b = angles.azimus.astype(float), angles.polars.astype(float)
    np.testing.assert_allclose(
        u[:, 0],
        np.stack([np.cos(a) * np.cos(b), np.sin(a) * np.cos(b), -np.sin(b)], axis=1),
        atol=1e-6,
    )


def test_hard_sphere_is_the_ball_transform() -> None:
    """One atom at the origin: (sin κ − κ cos κ) r⁻³ 3/(8π²) = ball FT × π ρ³ (spec §5.3)."""
    grid = PolarGrid(8.0, 0.25, 16)
    angles = ViewingAngles.uniform_weights(np.array([0.3]), np.array([1.1]))
    radius, box = 3.0, 48.0
    t = templates_from_atoms(
        np.zeros((1, 3)), np.array([radius]), angles, grid, box, "hard-sphere", "double"
    )[0]
    rho = 2 * radius / box
    x = 2 * np.pi * grid.radii * rho
    ball = 3 * (np.sin(x) - x * np.cos(x)) / x**3  # unit-mass ball
    np.testing.assert_allclose(t, (ball * np.pi * rho**3)[:, None] * np.ones(16), rtol=1e-12)
    with pytest.raises(ValueError, match="atom_shape"):
        templates_from_atoms(np.zeros((1, 3)), np.ones(1), angles, grid, box, "cube")


@pytest.mark.parametrize("shape", ["gaussian", "hard-sphere"])
def test_nufft_atom_sums_equal_the_direct_sums(data_dir, shape: str) -> None:
    """Grouping atoms by radius and using one type-3 NUFFT per group changes nothing."""
    params = ImageParameters.from_values(32, 5.0, n_inplanes=32, viewing_distance=2.0)
    atoms = read_atoms(data_dir / "models" / "apoferritin_ca_apo_def.pdb", params)
    keep = slice(0, 600)  # several residue radii, quick
    args = (
        atoms.coordinates[keep],
        atoms.radii[keep],
        params.viewing_angles,
        params.polar_grid,
        160.0,
        shape,
        "double",
    )
    direct = templates_from_atoms(*args, method="direct")
    fast = templates_from_atoms(*args, method="nufft", work_bytes=2**20)  # several chunks
    assert np.unique(atoms.radii[keep]).size > 5
    assert np.abs(fast - direct).max() / np.abs(direct).max() < 1e-10  # measured 4e-13
