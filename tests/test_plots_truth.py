"""Pose errors drawn by ``plot_output_folder``: the truth paired with each result by its
source row (results sorted by prior pose), and the shift floor of a search centred on each
image's prior origin.

Independent references: the pairing is checked against hand-made permutations; the floor
against distances worked out by hand; the errors of a small end-to-end run (particles sorted
by prior direction, searched around their prior origins) against plain vector formulas
applied to the truth by source row, and against the same floor computed in the frame of the
images recentred on the origins written to the STAR file (the residual frame).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryolike_dask.evaluation import Truth, pose_errors
from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.io.models import read_atoms
from cryolike_dask.io.mrc import write_images
from cryolike_dask.io.sources import ZarrImages, ZarrTemplates
from cryolike_dask.io.zarr_stores import ResultsStore, TemplateStore
from cryolike_dask.params import ImageParameters, LensParameters
from cryolike_dask.pipeline import LikelihoodRun, execute
from cryolike_dask.pipeline import convert_particles as cp
from cryolike_dask.pipeline.cluster import ClusterOptions
from cryolike_dask.pipeline.make_templates import make_templates
from cryolike_dask.pipeline.pose_search import PosePriorSpec
from cryolike_dask.pipeline.spec import OutputRequest
from cryolike_dask.plots import (
    _folder_pose_errors,
    _search_offsets,
    _truth_positions,
    plot_output_folder,
)
from cryolike_dask.preprocess.synthesis import Poses, synthesize_particles_at_poses


def _truth(n: int, images=None) -> Truth:
    z = np.zeros(n)
    return Truth(0, np.zeros(n, np.int64), z, z, z, images=images)


# ------------------------------------------------------------------------------ pairing
def test_truth_is_paired_with_the_result_of_its_source_row() -> None:
    rows = np.array([4, 0, 3, 1, 2])  # result i holds row rows[i] of the input stack
    np.testing.assert_array_equal(_truth_positions(_truth(5), rows, 5), [1, 3, 4, 2, 0])
    # a mixture's share: the truth of rows 3 and 1 only, in that order
    np.testing.assert_array_equal(_truth_positions(_truth(2, [3, 1]), rows, 5), [2, 3])
    # a run on part of the images: every truth row must have a result
    part = np.array([2, 0, -1])
    np.testing.assert_array_equal(_truth_positions(_truth(2, [0, 2]), part, 3), [1, 0])
    with pytest.raises(ValueError, match="in no result"):
        _truth_positions(_truth(3), part, 3)
    with pytest.raises(ValueError, match="more than once"):
        _truth_positions(_truth(2), np.array([0, 1, 1]), 3)


def test_results_without_source_rows_are_paired_by_position(caplog) -> None:
    for rows in (None, np.full(4, -1)):
        with caplog.at_level(logging.WARNING, logger="cryolike_dask.plots"):
            caplog.clear()
            np.testing.assert_array_equal(_truth_positions(_truth(4), rows, 4), [0, 1, 2, 3])
            np.testing.assert_array_equal(_truth_positions(_truth(2, [3, 0]), rows, 4), [3, 0])
        assert "record no source rows" in caplog.text and "by position" in caplog.text
    with pytest.raises(ValueError, match="outside"):
        _truth_positions(_truth(5), None, 4)


# ------------------------------------------------------------------------------ floor
def test_shift_floor_around_the_prior_origin_by_hand() -> None:
    """Two images on the grid's direction and rotations (so the floor's rotation is theirs),
    each searched on the residual grid g ∈ {(0, 0), (1, 0), (0, 0.5)} Å around its prior
    origin p; the attainable centres are p + Rot(−γ) g, Rot(−γ) = [[cos, sin], [−sin, cos]]."""
    angles = ViewingAngles.uniform_weights(np.array([0.0, 0.0]), np.array([0.0, np.pi / 2]))
    w = 4  # rotation step 90°
    grid = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    offset = np.array([[3.0, -1.0], [-2.0, 1.0]])
    # image 0, γ = 0: true centre (3.3, −1.2) = d; centres (3, −1), (4, −1), (3, −0.5):
    # the nearest (3, −1), at √(0.3² + 0.2²)
    # image 1, γ = 90°: Rot(−γ)·(1, 0) = (0, −1), Rot(−γ)·(0, 0.5) = (0.5, 0); centres
    # (−2, 1), (−2, 0), (−1.5, 1); true centre (−2, 0.1), i.e. d = Rot(γ)·c = (−0.1, −2):
    # the nearest (−2, 0), at 0.1
    truth = Truth(
        0,
        np.array([0, 0]),
        np.array([3.3, -0.1]),
        np.array([-1.2, -2.0]),
        np.array([0, 0.5]) * np.pi,
    )
    expected = [math.sqrt(0.13), 0.1]
    # found: template 0 at the true rotation, total displacement Rot(γ)·p (the prior origin)
    dx, dy = np.array([3.0, -1.0]), np.array([-1.0, -2.0])
    e = pose_errors(angles, w, grid, truth, [0, 0], dx, dy, truth.rotation, offset=offset)
    np.testing.assert_allclose(e.shift_floor_angstrom, expected, atol=1e-12)
    np.testing.assert_allclose(e.rotation_floor_deg, 0.0, atol=1e-5)
    np.testing.assert_allclose(e.direction_floor_deg, 0.0, atol=1e-5)
    # the found shift error: |p − c|, that is (0.3, 0.2) and (0, 0.9) off
    np.testing.assert_allclose(e.shift_angstrom, [math.sqrt(0.13), 0.9], atol=1e-12)
    # around zero instead (the grid as if centred at the box centre): |c − nearest g|
    plain = pose_errors(angles, w, grid, truth, [0, 0], dx, dy, truth.rotation)
    np.testing.assert_allclose(
        plain.shift_floor_angstrom, [math.hypot(2.3, 1.2), math.hypot(2.0, 0.1)], atol=1e-12
    )
    # up to a symmetry (here two copies of the identity) the same floor
    sym = pose_errors(
        angles, w, grid, truth, [0, 0], dx, dy, truth.rotation, np.stack([np.eye(3)] * 2), offset
    )
    np.testing.assert_allclose(sym.modulo_symmetry.shift_floor_angstrom, expected, atol=1e-12)


# ------------------------------------------------------------------------------ end to end
SYNC = ClusterOptions(scheduler="sync")
N, PIXEL, W, M = 32, 4.0, 64, 24
SIGMA = np.diag([0.0, 0.0, 1.0]) + np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]])  # row/col swap
FLIP_Z = np.diag([1.0, 1.0, -1.0])


def _star(path: Path, lens: LensParameters, euler: np.ndarray, ox, oy) -> Path:
    cols = [
        "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
        "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnAngleRot", "rlnAngleTilt",
        "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
    ]  # fmt: skip
    lines = ["data_particles", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for k in range(lens.defocus_u.size):
        lines.append(
            f"{lens.defocus_u[k]:.3f} {lens.defocus_v[k]:.3f} "
            f"{math.degrees(lens.defocus_angle[k]):.6f} 300 2.7 0.1 "
            f"{euler[k, 0]:.8f} {euler[k, 1]:.8f} {euler[k, 2]:.8f} {ox[k]:.8f} {oy[k]:.8f}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """24 particles of an asymmetric model at continuous poses, with true origins of up to
    1.5 px and prior origins up to 0.5 px off them (the prior angles exact), converted sorted
    by prior direction and searched in a 30° window on a ±1 px residual grid (3 × 3, one
    pixel apart) around each prior origin."""
    tmp = tmp_path_factory.mktemp("plots_truth")
    model = data_dir / "real" / "8zpm.cif"
    rng = np.random.default_rng(11)
    params = ImageParameters.from_values(N, PIXEL, n_inplanes=W, viewing_distance=8 / (4 * np.pi))
    make_templates([model], params, tmp / "templates", cluster=SYNC, progress=False)
    atoms = read_atoms(model, params)
    free = Poses.random(M, 0.0, rng)
    g = free.rotation
    centre = rng.uniform(-1.5, 1.5, (M, 2)) * PIXEL  # true image-frame offsets (row, col), Å
    dx = np.cos(g) * centre[:, 0] - np.sin(g) * centre[:, 1]  # d = Rot(γ)·centre
    dy = np.sin(g) * centre[:, 0] + np.cos(g) * centre[:, 1]
    poses = Poses(free.azimuth, free.polar, g, dx, dy)
    lens = LensParameters(
        rng.uniform(8000, 12000, M), rng.uniform(8000, 12000, M),
        rng.uniform(-np.pi / 2, np.pi / 2, M), np.zeros(M), 2.7, 300.0, 0.1,
        astigmatism_convention="relion",
    )  # fmt: skip
    syn = synthesize_particles_at_poses(
        atoms.coordinates, atoms.radii, params, poses, lens, snr=1.0, rng=rng
    )
    write_images(tmp / "particles.mrcs", syn.images, PIXEL)
    # RELION angles of the template-frame rotation (atomic model frame = RELION's; RELION's
    # image x is our column, y our row) and origin = minus the prior offset (column, row)
    q = Rotation.from_euler("ZYZ", np.stack([poses.azimuth, poses.polar, g], 1))
    euler = Rotation.from_matrix(q.as_matrix() @ FLIP_Z @ SIGMA).as_euler("ZYZ", degrees=True)
    prior = centre + rng.uniform(-0.5, 0.5, (M, 2)) * PIXEL
    star = _star(tmp / "particles.star", lens, euler, -prior[:, 1], -prior[:, 0])
    particles = cp.gather_paired([tmp / "particles.mrcs"], [star], batch_size=8, sort_by_pose=True)
    store = cp.convert_particles(particles, params, tmp / "particles", cluster=SYNC, progress=False)
    spec = PosePriorSpec("window", half_width=math.radians(30), use_origin=True, frame="model")
    out = tmp / "likelihood"
    execute(
        LikelihoodRun(
            ZarrTemplates.open(tmp / "templates" / "templates.zarr"),
            ZarrImages.open(store),
            out,
            (0,),
            DisplacementGrid.from_search(1, 3, 3, PIXEL),
            OutputRequest(integrated=True, pose_prior=True),
            pose_prior=spec,
            templates_per_block=24,
            images_per_block=8,
        ),
        scheduler="sync",
        progress=False,
    )
    truth = Truth.continuous(0, poses.azimuth, poses.polar, g, dx, dy)  # in STAR order
    angles = TemplateStore.open(tmp / "templates" / "templates.zarr").viewing_angles(0)
    return dict(
        tmp=tmp, out=out, truth=truth, truth_path=truth.save(out / "truth.npz"), prior=prior,
        centre=centre, angles=angles, params=params,
    )  # fmt: skip


def _results(out: Path) -> tuple[ResultsStore, dict[str, np.ndarray]]:
    store = ResultsStore.open(out / "results.zarr", mode="r")
    g = store.group
    names = ("source_row", "optimal_template", "optimal_displacement_x")
    names += ("optimal_displacement_y", "optimal_inplane_rotation")
    return store, {n: np.asarray(g[n][:] if n == "source_row" else g[n][0]) for n in names}


def _direction(azimuth, polar) -> np.ndarray:
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], -1
    )


def _centre(dx, dy, gamma) -> np.ndarray:
    """Rot(−γ)·d."""
    return np.stack(
        [np.cos(gamma) * dx + np.sin(gamma) * dy, -np.sin(gamma) * dx + np.cos(gamma) * dy], -1
    )


def test_sorted_results_meet_their_own_truth(run) -> None:
    store, r = _results(run["out"])
    rows = r["source_row"]
    assert sorted(rows.tolist()) == list(range(M)) and rows.tolist() != list(range(M))
    e = _folder_pose_errors(store, Truth.load(run["truth_path"]))
    t, a = run["truth"], run["angles"]
    # brute force, result by result: truth entry rows[i] against result i
    want_dir = np.empty(M)
    want_shift = np.empty(M)
    for i, j in enumerate(rows):
        s = r["optimal_template"][i]
        u = _direction(t.azimuth[j], t.polar[j])
        v = _direction(float(a.azimus[s]), float(a.polars[s]))
        want_dir[j] = math.degrees(math.acos(min(1.0, float(u @ v))))
        found = _centre(
            r["optimal_displacement_x"][i],
            r["optimal_displacement_y"][i],
            r["optimal_inplane_rotation"][i],
        )
        want_shift[j] = np.linalg.norm(
            found - _centre(t.displacement_x[j], t.displacement_y[j], t.rotation[j])
        )
    np.testing.assert_allclose(e.direction_deg, want_dir, atol=1e-3)
    np.testing.assert_allclose(e.shift_angstrom, want_shift, atol=1e-4)
    # the search sits in a 30° window around the exact prior directions: paired right, every
    # image is within the window; paired by position, most would not be
    assert np.max(e.direction_deg) < 30 + 20
    by_position = pose_errors(
        a, W, store.displacements, t, r["optimal_template"], r["optimal_displacement_x"],
        r["optimal_displacement_y"], r["optimal_inplane_rotation"],
    )  # fmt: skip
    assert np.median(by_position.direction_deg) > 45


def test_the_shift_floor_is_that_of_the_grid_around_each_prior_origin(run) -> None:
    store, r = _results(run["out"])
    t, a = run["truth"], run["angles"]
    centred, offset = _search_offsets(store)
    assert centred
    # read back from the image store in result order: the STAR file's prior of each row
    np.testing.assert_allclose(offset, run["prior"][r["source_row"]], atol=1e-6)
    e = _folder_pose_errors(store, Truth.load(run["truth_path"]))
    # residual frame: the truth's centre less its prior origin (STAR order), d' = Rot(γ)·c'
    c = run["centre"] - run["prior"]
    g = t.rotation
    residual = replace(
        t,
        displacement_x=np.cos(g) * c[:, 0] - np.sin(g) * c[:, 1],
        displacement_y=np.sin(g) * c[:, 0] + np.cos(g) * c[:, 1],
    )
    at = np.argsort(r["source_row"])  # result position of each STAR row
    ref = pose_errors(
        a, W, store.displacements, residual, r["optimal_template"][at],
        r["optimal_displacement_x"][at], r["optimal_displacement_y"][at],
        r["optimal_inplane_rotation"][at],
    )  # fmt: skip
    np.testing.assert_allclose(e.shift_floor_angstrom, ref.shift_floor_angstrom, atol=1e-4)
    # a lower bound by brute force: the nearest of the centres p + Rot(−θ_w)·g over every
    # rotation θ_w and residual g
    theta = 2 * np.pi * np.arange(W) / W
    grid = np.asarray(store.displacements, dtype=np.float64)
    every = _centre(grid[0][None, :], grid[1][None, :], theta[:, None])  # [W, D, 2]
    true_c = _centre(t.displacement_x, t.displacement_y, t.rotation)
    gap = np.linalg.norm(
        run["prior"][:, None, None, :] + every[None] - true_c[:, None, None, :], axis=-1
    )
    assert np.all(e.shift_floor_angstrom >= gap.min(axis=(1, 2)) - 1e-6)
    # and an upper bound: the zero residual, at the prior origin, is attainable at any rotation
    assert np.all(e.shift_floor_angstrom <= np.linalg.norm(c, axis=1) + 1e-6)
    # the grid taken as centred at zero (the prior origins ignored) gives another floor
    plain = pose_errors(
        a, W, store.displacements, t, r["optimal_template"][at],
        r["optimal_displacement_x"][at], r["optimal_displacement_y"][at],
        r["optimal_inplane_rotation"][at],
    )  # fmt: skip
    assert np.mean(np.abs(plain.shift_floor_angstrom - e.shift_floor_angstrom) > 0.5) > 0.5


def test_the_plot_is_drawn_and_unreadable_origins_drop_the_floor(run, caplog) -> None:
    made = plot_output_folder(run["out"], run["tmp"] / "plots", run["truth_path"])
    assert [p.name for p in made][-1] == "pose_errors.png"
    assert made[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    store, _ = _results(run["out"])
    fp = store.fingerprint
    store.fingerprint = {**fp, "images": {**fp["images"], "path": str(run["tmp"] / "gone")}}
    with caplog.at_level(logging.WARNING, logger="cryolike_dask.plots"):
        e = _folder_pose_errors(store, Truth.load(run["truth_path"]))
    assert "cannot be read back" in caplog.text
    assert e.shift_floor_angstrom is None and e.direction_floor_deg is not None
