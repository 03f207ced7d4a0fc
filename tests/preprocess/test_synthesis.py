"""Synthetic particles at continuous poses: the atom templates, the forward model, recovery.

References: ``templates_from_atoms`` (the direct atom sum) for the quadrature; the likelihood's
own ``model_at_pose`` for the forward model at on-grid poses; and, off the grids, the search
itself on a fine grid, scored with the independent geometry of ``evaluation``.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.evaluation import Truth, pose_errors
from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.kernels import (
    BlockOutputs,
    correlate_block,
    decode_pose,
    prepare_images,
    prepare_templates,
    translation_kernel,
)
from cryolike_dask.kernels.ctf import ctf_from_lens
from cryolike_dask.kernels.likelihood import model_at_pose
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.preprocess.particles import images_to_fourier
from cryolike_dask.preprocess.synthesis import (
    Poses,
    atom_templates,
    model_at_continuous_pose,
    synthesize_particles,
    synthesize_particles_at_poses,
)
from cryolike_dask.preprocess.templates import normalize_templates, templates_from_atoms


def _atoms(rng: np.random.Generator, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric blob of atoms within ±18 Å, radii 2.5–3.4 Å."""
    x = rng.uniform(-18, 18, (n, 3))
    return x - x.mean(axis=0), rng.choice([2.5, 2.8, 3.1, 3.4], n)


def _lens(m: int, rng: np.random.Generator) -> LensParameters:
    return LensParameters(
        rng.uniform(9000, 11000, m),
        rng.uniform(8000, 9000, m),
        rng.uniform(-np.pi / 2, np.pi / 2, m),
        np.zeros(m),
        2.7,
        300.0,
        0.1,
        astigmatism_convention="relion",
    )


def test_random_poses_are_continuous_and_in_range() -> None:
    rng = np.random.default_rng(0)
    p = Poses.random(4000, 5.0, rng)
    assert p.n_poses == 4000
    assert np.all((p.rotation >= 0) & (p.rotation < 2 * np.pi))
    assert np.all(np.abs(p.displacement_x) <= 5) and np.all(np.abs(p.displacement_y) <= 5)
    # uniform on the sphere: cos β uniform in [−1, 1] (mean 0, variance 1/3); z up and down
    z = np.cos(p.polar)
    assert abs(z.mean()) < 0.05 and abs(z.var() - 1 / 3) < 0.03
    # not on any grid: rotations are not multiples of 2π/64
    assert np.mean(np.isclose(np.mod(p.rotation * 64 / (2 * np.pi), 1), 0, atol=1e-6)) < 0.01
    # float32-exact, as ViewingAngles holds them
    va = p.viewing_angles()
    np.testing.assert_array_equal(va.azimus.astype(float), p.azimuth)
    np.testing.assert_array_equal(va.gammas.astype(float), p.rotation)
    disk = Poses.random(2000, 5.0, rng, region="disk")
    assert np.all(np.hypot(disk.displacement_x, disk.displacement_y) <= 5 + 1e-12)
    with pytest.raises(ValueError, match="region"):
        Poses.random(3, 1.0, rng, region="triangle")


def test_quadrature_equals_direct_atom_sum() -> None:
    rng = np.random.default_rng(1)
    params = ImageParameters.from_values(32, 2.5, n_inplanes=48)
    x, r = _atoms(rng)
    angles = Poses.random(12, 0.0, rng).viewing_angles()
    quad = atom_templates(x, r, angles, params, method="quadrature")
    ref = normalize_templates(
        templates_from_atoms(
            x, r, angles, params.polar_grid, 80.0, "gaussian", "double", method="direct"
        ),
        params.polar_grid,
    )
    assert np.max(np.abs(quad - ref)) < 1e-7 * np.max(np.abs(ref))
    # hard spheres: no quadrature, the direct sum
    hs = atom_templates(x, r, angles, params, atom_shape="hard-sphere")
    ref_hs = templates_from_atoms(x, r, angles, params.polar_grid, 80.0, "hard-sphere", "double")
    np.testing.assert_allclose(hs, normalize_templates(ref_hs, params.polar_grid), rtol=1e-12)
    # without the box term: the same either way, and the box term is what tells them apart
    bare = atom_templates(x, r, angles, params, method="quadrature", dc_offset=False)
    bare_direct = atom_templates(x, r, angles, params, method="atoms", dc_offset=False)
    assert np.max(np.abs(bare - bare_direct)) < 1e-7 * np.max(np.abs(bare_direct))
    assert np.max(np.abs(bare - quad)) > 1e-2 * np.max(np.abs(quad))
    with pytest.raises(ValueError, match="Gaussian"):
        atom_templates(x, r, angles, params, atom_shape="hard-sphere", method="quadrature")


@pytest.mark.parametrize("atom_shape", ["hard-sphere", "gaussian"])
def test_continuous_model_is_the_grid_model_at_grid_poses(atom_shape: str) -> None:
    """At a grid direction, a grid rotation and any shift, the continuous forward model is the
    likelihood's own (``model_at_pose`` of the γ = 0 projection), and so are the images.

    (Without the Gaussian templates' box term, which sits in the template's frame and turns
    with it; the particles leave it out, their mean is removed in the image's frame.)"""
    rng = np.random.default_rng(2)
    params = ImageParameters.from_values(32, 2.5, n_inplanes=48, viewing_distance=4 / (4 * np.pi))
    grid = params.polar_grid
    x, r = _atoms(rng)
    va = params.viewing_angles
    s = rng.integers(0, va.n_angles, 6)
    w = rng.integers(0, params.n_inplanes, 6)
    poses = Poses(
        va.azimus[s],
        va.polars[s],
        2 * np.pi * w / params.n_inplanes,
        rng.uniform(-3, 3, 6),
        rng.uniform(-3, 3, 6),
    )
    lens = _lens(6, rng)
    ctf = ctf_from_lens(lens, grid.radii, grid.theta, params.box_size[0])
    t0 = atom_templates(x, r, va.subset(s), params, atom_shape, dc_offset=False)
    grid_model = model_at_pose(
        t0, ctf, poses.displacement_x, poses.displacement_y, poses.rotation, grid, params.box_size
    )
    tg = atom_templates(x, r, poses.viewing_angles(), params, atom_shape, dc_offset=False)
    cont_model = model_at_continuous_pose(tg, ctf, poses, params)
    # γ is float32-rounded in the continuous templates (≈1e-7 rad)
    assert np.max(np.abs(cont_model - grid_model)) < 1e-5 * np.max(np.abs(grid_model))
    a = synthesize_particles(
        t0, params, np.arange(6), poses.displacement_x, poses.displacement_y,
        poses.rotation, lens, None, rng,
    )  # fmt: skip
    b = synthesize_particles_at_poses(x, r, params, poses, lens, None, rng, atom_shape=atom_shape)
    assert np.max(np.abs(a.images - b.images)) < 1e-4 * np.max(np.abs(a.images))
    assert b.template_index is None
    np.testing.assert_array_equal(b.azimuth, poses.azimuth)
    np.testing.assert_array_equal(b.rotation, poses.rotation)


def test_continuous_poses_recovered_within_one_grid_step() -> None:
    """Noise-free particles at random continuous poses, as real-space images, transformed back
    as particles are and searched on a fine grid: the best pose is within one step of the
    truth in direction, rotation and shift, and about as close as the nearest grid pose."""
    rng = np.random.default_rng(3)
    params = ImageParameters.from_values(
        32, 2.5, n_inplanes=64, viewing_distance=2 / (4 * np.pi), precision="double"
    )
    grid = params.polar_grid
    x, r = _atoms(rng)
    va = params.viewing_angles  # 690 directions
    disp = DisplacementGrid.from_search(1, 5, 5, 2.5)  # ±2.5 Å in steps of 1.25 Å
    m = 8
    poses = Poses.random(m, 2.5, rng)
    lens = _lens(m, rng)
    synthetic = synthesize_particles_at_poses(x, r, params, poses, lens, None, rng)
    images, _ = images_to_fourier(synthetic.images, grid, "double")  # as convert-particles
    ctf = ctf_from_lens(lens, grid.radii, grid.theta, params.box_size[0])
    templates = atom_templates(x, r, va, params)
    kernel = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, params.box_size)
    result = correlate_block(
        prepare_templates(templates, kernel, grid, "double"),
        prepare_images(images, ctf, grid, "double"),
        BlockOutputs(),
    )
    s, d, w = decode_pose(result.best_pose, disp.n_displacements, grid.n_inplanes)
    truth = Truth.continuous(
        0, poses.azimuth, poses.polar, poses.rotation, poses.displacement_x, poses.displacement_y
    )
    e = pose_errors(
        va,
        grid.n_inplanes,
        disp.as_array(),
        truth,
        np.asarray(s),
        disp.x[np.asarray(d)],
        disp.y[np.asarray(d)],
        2 * np.pi * np.asarray(w) / grid.n_inplanes,
    )
    assert e.within_one_step.all(), (e.direction_deg, e.rotation_deg, e.shift_angstrom)
    # off the grids for real: the nearest grid pose itself is not exact
    assert np.median(e.direction_floor_deg) > 0.5 and np.median(e.rotation_floor_deg) > 0.1
    # the search finds the nearest grid pose itself (measured: all 8 in direction and rotation,
    # shifts within 0.002 Å), and is never more than half a step worse than it
    nearest = np.isclose(e.direction_deg, e.direction_floor_deg, atol=1e-6) & np.isclose(
        e.rotation_deg, e.rotation_floor_deg, atol=1e-6
    )
    assert nearest.sum() >= m - 2, nearest
    assert np.all(e.direction_deg <= e.direction_floor_deg + e.direction_step_deg / 2)
    assert np.all(e.rotation_deg <= e.rotation_floor_deg + e.rotation_step_deg / 2)
    assert np.all(e.shift_angstrom <= e.shift_floor_angstrom + e.shift_step_angstrom / 2)
    assert np.all(result.best_cross_correlation > 0.9)
