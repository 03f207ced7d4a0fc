"""Searches around prior poses, end to end: synthetic particles at known continuous poses and
origins, written with RELION angles and origins to a STAR file, converted with their poses,
searched globally and locally.

Independent references: the particles are made by the synthesis module in the template
frame and their RELION angles written by SciPy (``Rotation.as_euler('ZYZ')`` of the
template-frame rotation carried into RELION's frame); the fixed-pose likelihood is computed
here by direct sums (``tests/kernels/reference.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.io.models import read_atoms
from cryolike_dask.io.mrc import write_images
from cryolike_dask.io.sources import ZarrImages, ZarrTemplates
from cryolike_dask.io.zarr_stores import ResultsStore
from cryolike_dask.params import ImageParameters, LensParameters
from cryolike_dask.pipeline import LikelihoodRun, execute
from cryolike_dask.pipeline import convert_particles as cp
from cryolike_dask.pipeline.cluster import ClusterOptions
from cryolike_dask.pipeline.make_templates import make_templates
from cryolike_dask.pipeline.pose_search import PosePriorSpec
from cryolike_dask.pipeline.spec import OutputRequest
from cryolike_dask.preprocess.synthesis import Poses, synthesize_particles_at_poses

SYNC = ClusterOptions(scheduler="sync")
N, PIXEL, W = 32, 4.0, 64
SIGMA = np.diag([0.0, 0.0, 1.0]) + np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]])  # row/col swap
FLIP_Z = np.diag([1.0, 1.0, -1.0])


def _relion_pose(poses: Poses) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RELION (rot, tilt, psi) degrees and origin (X, Y) Å of template-frame poses of an
    atomic model: M = Q·diag(1,1,-1)·Σ (model frame = RELION frame; RELION's image x is our
    column, y our row), origin = minus the particle's offset (column, row)."""
    q = Rotation.from_euler("ZYZ", np.stack([poses.azimuth, poses.polar, poses.rotation], 1))
    m = q.as_matrix() @ FLIP_Z @ SIGMA
    eul = Rotation.from_matrix(m).as_euler("ZYZ", degrees=True)
    g = poses.rotation
    dx, dy = poses.displacement_x, poses.displacement_y
    p0 = np.cos(g) * dx + np.sin(g) * dy  # Rot(-γ)·d: the particle's offset (row, col), Å
    p1 = -np.sin(g) * dx + np.cos(g) * dy
    return eul, -p1, -p0, np.stack([p0, p1], 1)


def _star(path: Path, lens: LensParameters, eul: np.ndarray, ox, oy) -> Path:
    cols = [
        "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
        "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnAngleRot", "rlnAngleTilt",
        "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
    ]  # fmt: skip
    rows = ["data_particles", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for k in range(lens.defocus_u.size):
        rows.append(
            f"{lens.defocus_u[k]:.3f} {lens.defocus_v[k]:.3f} "
            f"{math.degrees(lens.defocus_angle[k]):.6f} 300 2.7 0.1 "
            f"{eul[k, 0]:.8f} {eul[k, 1]:.8f} {eul[k, 2]:.8f} {ox[k]:.8f} {oy[k]:.8f}"
        )
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory, data_dir):
    """40 particles of an asymmetric model (8zpm's CA atoms) at continuous directions and
    rotations, with origins of up to 1.4 px. (A symmetric structure would not do: the global
    search's best pose may be any symmetry mate, far from the prior.)"""
    tmp = tmp_path_factory.mktemp("pose_search")
    model = data_dir / "real" / "8zpm.cif"
    rng = np.random.default_rng(5)
    params = ImageParameters.from_values(N, PIXEL, n_inplanes=W, viewing_distance=8 / (4 * np.pi))
    make_templates([model], params, tmp / "templates", cluster=SYNC, progress=False)
    atoms = read_atoms(model, params)
    m = 40
    # continuous directions and rotations; displacements on the global search's grid (in the
    # template frame), so that both searches can reach the same pose
    free = Poses.random(m, 0.0, rng)
    dx, dy = rng.integers(-1, 2, (2, m)) * PIXEL
    poses = Poses(free.azimuth, free.polar, free.rotation, dx, dy)
    lens = LensParameters(
        rng.uniform(8000, 12000, m), rng.uniform(8000, 12000, m),
        rng.uniform(-np.pi / 2, np.pi / 2, m), np.zeros(m), 2.7, 300.0, 0.1,
        astigmatism_convention="relion",
    )  # fmt: skip
    syn = synthesize_particles_at_poses(
        atoms.coordinates, atoms.radii, params, poses, lens, snr=1.0, rng=rng
    )
    write_images(tmp / "particles.mrcs", syn.images, PIXEL)
    eul, ox, oy, offset = _relion_pose(poses)
    star = _star(tmp / "particles.star", lens, eul, ox, oy)
    particles = cp.gather_paired([tmp / "particles.mrcs"], [star], batch_size=16, sort_by_pose=True)
    store = cp.convert_particles(particles, params, tmp / "particles", cluster=SYNC, progress=False)
    return dict(tmp=tmp, params=params, store=store, poses=poses, offset=offset)


def _run(case, name, displacements, prior=None, request=None):
    run = LikelihoodRun(
        ZarrTemplates.open(case["tmp"] / "templates" / "templates.zarr"),
        ZarrImages.open(case["store"]),
        case["tmp"] / name,
        (0,),
        prior.restrict(displacements) if prior is not None else displacements,
        request or OutputRequest(integrated=True, pose_prior=prior is not None),
        pose_prior=prior,
        templates_per_block=24,
        images_per_block=16,
    )
    execute(run, scheduler="sync", progress=False)
    g = ResultsStore.open(case["tmp"] / name / "results.zarr", mode="r").group
    return {k: g[k][0] for k in g.array_keys() if k not in ("done",) and g[k].ndim == 2}


QUANTITIES = (
    "cross_correlation",
    "optimal_template",
    "optimal_displacement_x",
    "optimal_displacement_y",
    "optimal_inplane_rotation",
    "log_likelihood_integrated_fourier",
)


def test_window_covering_everything_is_the_global_search_bit_for_bit(case) -> None:
    grid = DisplacementGrid.from_search(1, 3, 3, PIXEL)
    glob = _run(case, "global", grid)
    wide = _run(case, "wide", grid, PosePriorSpec("window", half_width=math.pi))
    for q in QUANTITIES:
        np.testing.assert_array_equal(wide[q], glob[q], err_msg=q)
    n_poses = 96 * grid.n_displacements * W
    assert np.all(wide["evaluated_poses"] == n_poses)
    assert not wide["optimal_pose_on_window_edge"].any()


def test_huge_gaussian_equals_the_uniform_prior(case) -> None:
    grid = DisplacementGrid.from_search(1, 3, 3, PIXEL)
    glob = _run(case, "global-g", grid)
    wide = _run(case, "gauss", grid, PosePriorSpec("gaussian", sigma=1e4))
    for q in QUANTITIES[:-1]:
        np.testing.assert_array_equal(wide[q], glob[q], err_msg=q)
    np.testing.assert_allclose(
        wide["log_likelihood_integrated_fourier"],
        glob["log_likelihood_integrated_fourier"],
        rtol=0,
        atol=1e-3,  # float32 values ~ -1e3..-1e4: a few ulps
    )


def test_local_search_finds_the_global_best_pose(case) -> None:
    """A 30° window and ±1.5 px residual around the STAR poses, centred on the STAR origins,
    finds the global search's best template and rotation; the total displacement matches the
    global search's (whose grid covers the origins)."""
    glob = _run(case, "global-wide", DisplacementGrid.from_search(2, 5, 5, PIXEL))
    spec = PosePriorSpec(
        "window", half_width=math.radians(30), shift_radius=1.5 * PIXEL, use_origin=True,
        frame="model",
    )  # fmt: skip
    local = _run(case, "local", DisplacementGrid.from_search(2, 5, 5, PIXEL), spec)
    same = (local["optimal_template"] == glob["optimal_template"]) & np.isclose(
        local["optimal_inplane_rotation"], glob["optimal_inplane_rotation"]
    )
    assert same.mean() >= 0.85, same.mean()  # measured: 0.9
    # the total displacement (prior origin + residual, template frame) is the global one, up
    # to carrying the exact origin by the grid rotation instead of the true one (|d|·Δγ)
    shift = np.hypot(
        local["optimal_displacement_x"] - glob["optimal_displacement_x"],
        local["optimal_displacement_y"] - glob["optimal_displacement_y"],
    )
    assert np.all(shift[same] <= PIXEL / 2), shift[same]  # measured: max 1.1 Å
    n_global = 96 * 25 * W
    assert np.all(local["evaluated_poses"] < 0.05 * n_global), local["evaluated_poses"].max()


def test_fixed_pose_equals_a_direct_likelihood(case) -> None:
    """Priors at grid poses (a template's direction, a grid rotation) with continuous
    origins: ``fixed`` gives the likelihood of that one pose on the image centred on its
    origin, computed here by direct sums."""
    from cryolike_dask.io.poses import PriorPoses
    from cryolike_dask.io.zarr_stores import ImageStore
    from cryolike_dask.kernels.ctf import ctf_polar
    from cryolike_dask.preprocess.particles import images_to_fourier
    from cryolike_dask.preprocess.synthesis import synthesize_particles
    from tests.kernels.reference import bioem_per_pose

    tmp, params = case["tmp"], case["params"]
    grid = params.polar_grid
    tsrc = ZarrTemplates.open(tmp / "templates" / "templates.zarr")
    angles = tsrc.viewing_angles(0)
    templates = tsrc.read(0, 0, tsrc.n_templates(0))
    rng = np.random.default_rng(9)
    m = 12
    s_idx = rng.integers(0, templates.shape[0], m)
    w_idx = rng.integers(0, W, m)
    gamma = grid.theta[w_idx]
    p = rng.uniform(-1.5 * PIXEL, 1.5 * PIXEL, (m, 2))  # image-frame offsets, Å
    d = np.stack(  # the template-frame displacement Rot(γ)·p
        [np.cos(gamma) * p[:, 0] - np.sin(gamma) * p[:, 1],
         np.sin(gamma) * p[:, 0] + np.cos(gamma) * p[:, 1]], 1,
    )  # fmt: skip
    lens = LensParameters(
        rng.uniform(8000, 12000, m), rng.uniform(8000, 12000, m),
        rng.uniform(-np.pi / 2, np.pi / 2, m), np.zeros(m), 2.7, 300.0, 0.1,
        astigmatism_convention="relion",
    )  # fmt: skip
    syn = synthesize_particles(templates, params, s_idx, d[:, 0], d[:, 1], gamma, lens, 0.5, rng)
    poses = Poses(angles.azimus[s_idx], angles.polars[s_idx], gamma, d[:, 0], d[:, 1])
    eul, ox, oy, _ = _relion_pose(poses)
    store = ImageStore.create(tmp / "fixed.zarr", params, m, astigmatism_convention="relion")
    fourier, _ = images_to_fourier(syn.images, grid, "single")
    store.write(0, fourier, lens)
    store.write_prior_poses(
        PriorPoses(*eul.T, ox, oy, np.ones(m, bool), np.ones(m, bool), "star-refined")
    )
    store.mark_complete()
    spec = PosePriorSpec("fixed", use_origin=True, frame="model")
    run = LikelihoodRun(
        tsrc,
        ZarrImages.open(tmp / "fixed.zarr"),
        tmp / "fixed-out",
        (0,),
        spec.restrict(DisplacementGrid.from_search(1, 3, 3, PIXEL)),
        OutputRequest(integrated=True, pose_prior=True),
        pose_prior=spec,
    )
    execute(run, scheduler="sync", progress=False)
    g = ResultsStore.open(tmp / "fixed-out" / "results.zarr", mode="r").group
    np.testing.assert_array_equal(g["optimal_template"][0], s_idx)
    np.testing.assert_allclose(g["optimal_inplane_rotation"][0], gamma, atol=1e-6)
    np.testing.assert_allclose(g["optimal_displacement_x"][0], d[:, 0], atol=1e-3)
    np.testing.assert_allclose(g["optimal_displacement_y"][0], d[:, 1], atol=1e-3)
    assert np.all(g["evaluated_poses"][0] == 1)

    # the direct likelihood: centre each image on its offset, correlate with its template
    images, stored = ImageStore.open(tmp / "fixed.zarr").read(0, m)
    bx, by = params.box_size
    ramp = np.exp(
        2j * np.pi * (grid.x_points[None] * 2 * p[:, 0, None, None] / bx
                      + grid.y_points[None] * 2 * p[:, 1, None, None] / by)
    )  # fmt: skip
    y = images.astype(np.complex128) * ramp
    ctf = ctf_polar(
        stored["defocus_u"], stored["defocus_v"], stored["defocus_angle"],
        stored["phase_shift"], voltage_kv=stored["voltage"],
        spherical_aberration_mm=stored["spherical_aberration"],
        amplitude_contrast=stored["amplitude_contrast"], radii=grid.radii, theta=grid.theta,
        box_size=bx, convention="relion",
    )  # fmt: skip
    w = grid.integration_weights
    t = np.stack([np.roll(templates[s], -k, axis=-1) for s, k in zip(s_idx, w_idx, strict=True)])
    x = np.einsum("nw,mnw,mnw,mnw->m", w, ctf, np.conj(y), t).real
    ixx = np.einsum("nw,mnw,mnw->m", w, ctf**2, np.abs(t) ** 2)
    iyy = np.einsum("nw,mnw->m", w, np.abs(y) ** 2)
    isx = np.einsum("nw,mnw,mnw->m", w * grid.mask, ctf, templates[s_idx])
    isy = np.einsum("nw,mnw->m", w * grid.mask, y)
    ll = bioem_per_pose(
        x[:, None, None, None], ixx[:, None, None], iyy, isx[:, None], isy,
        grid.mask_integral, params.cartesian_grid.n_pixels_total,
    ).ravel()  # fmt: skip
    ill = g["log_likelihood_integrated_fourier"][0]
    # the marginal over a one-pose prior is that pose's likelihood (the spec §11 per-pose
    # formula; the optimal-pose likelihood of spec §12 is another formula, not compared here)
    np.testing.assert_allclose(ill, ll, rtol=2e-5)


def test_a_frame_mismatch_is_reported(case) -> None:
    """Poses read in the wrong frame (a map's, for templates of an atomic model) put the
    best poses on the window's edge, and the run warns."""
    spec = PosePriorSpec(
        "window", half_width=math.radians(30), shift_radius=1.5 * PIXEL, use_origin=True,
        frame="map",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="edge of the prior's window"):
        wrong = _run(case, "wrong-frame", DisplacementGrid.from_search(2, 5, 5, PIXEL), spec)
    assert wrong["optimal_pose_on_window_edge"].mean() > 0.25


def test_a_window_narrower_than_the_grid_keeps_the_nearest_template() -> None:
    from cryolike_dask.io.poses import PriorPoses
    from cryolike_dask.pipeline.pose_search import block_prior

    params = ImageParameters.from_values(N, PIXEL, n_inplanes=W, viewing_distance=8 / (4 * np.pi))
    angles = params.viewing_angles
    rng = np.random.default_rng(2)
    m = 50
    poses = PriorPoses(
        rng.uniform(0, 360, m), np.degrees(np.arccos(rng.uniform(-1, 1, m))),
        rng.uniform(-180, 180, m), np.zeros(m), np.zeros(m), np.ones(m, bool),
        np.ones(m, bool), "star-refined",
    )  # fmt: skip
    az, po = angles.azimus.astype(float), angles.polars.astype(float)
    prior = block_prior(
        PosePriorSpec("window", half_width=math.radians(1.0)),
        poses,
        az,
        po,
        np.log(angles.weights / angles.weights.sum()),
        params.polar_grid.theta,
        np.zeros((2, 1)),
    )
    assert np.all(prior.n_poses >= 1) and np.all(np.isfinite(prior.log_normaliser))
    # the one template each image keeps is the nearest to its prior direction
    d_prior = Rotation.from_euler("ZYZ", np.stack([poses.rot, poses.tilt, poses.psi], 1),
                                  degrees=True).as_matrix()[:, :, 2]  # fmt: skip
    d_tpl = np.stack([np.cos(az) * np.sin(po), np.sin(az) * np.sin(po), np.cos(po)], 1)
    nearest = np.argmax(d_prior @ d_tpl.T, axis=1)
    kept = np.isfinite(prior.direction)[np.arange(m), nearest]
    assert kept.all()


@pytest.mark.parametrize(("frame", "warns"), [("model", False), ("map", True)])
def test_check_frame_compares_with_a_global_search(case, frame, warns) -> None:
    """``check_frame``: a global search on a sample of the images; in the structure's frame
    its optimum lies within the window, in the wrong frame outside, and the run says so."""
    import warnings as w

    spec = PosePriorSpec(
        "window", half_width=math.radians(40), shift_radius=1.5 * PIXEL, use_origin=True,
        frame=frame,
    )  # fmt: skip
    run = LikelihoodRun(
        ZarrTemplates.open(case["tmp"] / "templates" / "templates.zarr"),
        ZarrImages.open(case["store"]),
        case["tmp"] / f"check-{frame}",
        (0,),
        spec.restrict(DisplacementGrid.from_search(2, 5, 5, PIXEL)),
        OutputRequest(pose_prior=True),
        pose_prior=spec,
        check_frame=12,
    )
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        execute(run, scheduler="sync", progress=False)
    messages = [str(c.message) for c in caught if "check-frame" in str(c.message)]
    assert bool(messages) == warns, messages


def test_pose_prior_options_are_checked_before_any_work(ref_inputs) -> None:
    """Refused while the run is described (before a cluster starts), naming the options."""
    from cryolike_dask.pipeline.spec import LikelihoodOptions, RunConfigurationError

    def build(**kw):
        opts = LikelihoodOptions.parse(**kw)
        return opts.build(ref_inputs["templates"], ref_inputs["images"], ref_inputs["params"], None)

    with pytest.raises(RunConfigurationError, match="images hold no prior poses"):
        build(pose_prior="window", window_degrees=10)  # CryoLike stacks carry no poses
    with pytest.raises(RunConfigurationError, match="needs window_degrees"):
        build(pose_prior="window")
    with pytest.raises(RunConfigurationError, match="sigma_degrees belong"):
        build(pose_prior="window", window_degrees=10, sigma_degrees=3)
    with pytest.raises(RunConfigurationError, match="use_prior_origin needs a pose_prior"):
        build(use_prior_origin=True)
    with pytest.raises(RunConfigurationError, match="window_degrees"):
        build(pose_prior="window", window_degrees=200)  # beyond 180
