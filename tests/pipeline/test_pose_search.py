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
    cs = _cs(tmp / "particles.cs", "particles.mrcs", lens, eul, ox, oy, PIXEL)
    from_cs = cp.gather_cs(cs, tmp, batch_size=16, sort_by_pose=True)
    cs_store = cp.convert_particles(from_cs, params, tmp / "cs", cluster=SYNC, progress=False)
    return dict(
        tmp=tmp, params=params, store=store, cs_store=cs_store, poses=poses, offset=offset,
        euler=eul,
    )  # fmt: skip


def _cs(path: Path, mrcs: str, lens: LensParameters, eul: np.ndarray, ox, oy, pixel) -> Path:
    """A cryoSPARC particle file: ``alignments3D/pose`` the rotation vector of RELION's
    rotation (SciPy), ``alignments3D/shift`` RELION's origin in pixels."""
    m = eul.shape[0]
    dtype = [
        ("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
        ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
        ("alignments3D/psize_A", "<f4"),
    ]  # fmt: skip
    rec = np.zeros(m, dtype=dtype)
    rec["uid"] = np.arange(m) + 1000
    rec["blob/path"] = mrcs.encode()
    rec["blob/idx"] = np.arange(m)
    rec["blob/shape"] = N
    rec["blob/psize_A"] = pixel
    rec["ctf/accel_kv"], rec["ctf/cs_mm"], rec["ctf/amp_contrast"] = 300.0, 2.7, 0.1
    rec["ctf/df1_A"], rec["ctf/df2_A"] = lens.defocus_u, lens.defocus_v
    rec["ctf/df_angle_rad"] = lens.defocus_angle
    rec["alignments3D/pose"] = Rotation.from_euler("ZYZ", eul, degrees=True).as_rotvec()
    rec["alignments3D/shift"] = np.stack([ox, oy], 1) / pixel
    rec["alignments3D/psize_A"] = pixel
    with open(path, "wb") as f:
        np.save(f, rec)
    return path


def _run(case, name, displacements, prior=None, request=None, store="store"):
    run = LikelihoodRun(
        ZarrTemplates.open(case["tmp"] / "templates" / "templates.zarr"),
        ZarrImages.open(case[store]),
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


def test_cryosparc_poses_give_the_same_local_search(case) -> None:
    """The same particles described by a ``.cs`` file (rotation vectors and pixel shifts
    written by SciPy from the RELION poses): the stored priors are the STAR file's rotations
    and origins, and the local search finds the global search's best template and rotation."""
    from cryolike_dask.io.zarr_stores import ImageStore

    star = ImageStore.open(case["store"]).prior_poses()
    cs = ImageStore.open(case["cs_store"]).prior_poses()
    assert (cs.source, star.source) == ("cryosparc", "star-refined")
    np.testing.assert_allclose(cs.rotations().as_matrix(), star.rotations().as_matrix(), atol=1e-6)
    np.testing.assert_allclose(cs.origin_x, star.origin_x, atol=1e-5)
    np.testing.assert_allclose(cs.origin_y, star.origin_y, atol=1e-5)

    grid = DisplacementGrid.from_search(2, 5, 5, PIXEL)
    glob = _run(case, "global-cs", grid, store="cs_store")
    spec = PosePriorSpec(
        "window", half_width=math.radians(30), shift_radius=1.5 * PIXEL, use_origin=True,
        frame="model",
    )  # fmt: skip
    local = _run(case, "local-cs", grid, spec, store="cs_store")
    same = (local["optimal_template"] == glob["optimal_template"]) & np.isclose(
        local["optimal_inplane_rotation"], glob["optimal_inplane_rotation"]
    )
    assert same.mean() >= 0.85, same.mean()
    # and the same numbers as the search on the STAR file's particles (same images and poses,
    # float32 in the .cs file)
    from_star = _run(case, "local-star", grid, spec)
    agree = local["optimal_template"] == from_star["optimal_template"]
    assert agree.mean() >= 0.95, agree.mean()
    np.testing.assert_allclose(
        local["cross_correlation"][agree], from_star["cross_correlation"][agree], atol=1e-4
    )


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


def test_the_lazy_api_searches_around_the_priors(case) -> None:
    """``cd.likelihood(..., pose_prior=...)``: the lazy dataset holds what the executor
    writes for the same local search, with the pose-prior outputs."""
    import dask

    import cryolike_dask as cd

    grid = DisplacementGrid.from_search(2, 5, 5, PIXEL)
    spec = PosePriorSpec(
        "window", half_width=math.radians(30), shift_radius=1.5 * PIXEL, use_origin=True,
        frame="model",
    )  # fmt: skip
    ref = _run(case, "local-api-ref", grid, spec)
    ds = cd.likelihood(
        case["store"], case["tmp"] / "templates" / "templates.zarr",
        max_displacement_pixels=2, n_displacements_x=5, n_displacements_y=5,
        integrated_likelihood=True, pose_prior="window", window_degrees=30,
        window_shift_pixels=1.5, use_prior_origin=True, pose_frame="model",
    )  # fmt: skip
    assert ds["cross_correlation"].chunks is not None  # lazy until computed
    with dask.config.set(scheduler="sync"):
        got = ds.compute()
    for q in ("optimal_template", "evaluated_poses", "optimal_pose_on_window_edge"):
        np.testing.assert_array_equal(got[q].values[0], ref[q], err_msg=q)
    for q in QUANTITIES[1:5]:
        np.testing.assert_allclose(got[q].values[0], ref[q], atol=1e-5, err_msg=q)
    np.testing.assert_allclose(
        got["cross_correlation"].values[0], ref["cross_correlation"], atol=1e-6
    )
    np.testing.assert_allclose(
        got["log_likelihood_integrated_fourier"].values[0],
        ref["log_likelihood_integrated_fourier"],
        rtol=1e-6,
    )


def test_the_graph_leaves_out_pairs_no_window_reaches(case) -> None:
    """Only (template block, image block) pairs that some image's window reaches are built;
    each image's allowed (image, template) pairs (the kernel's own test, from the full
    relative pose) lie in built pairs; the results equal a graph that builds every pair."""
    import dask

    from cryolike_dask.kernels.pose_prior import block_pairs as pairs_of
    from cryolike_dask.pipeline import tasks
    from cryolike_dask.pipeline.graph import build_batch_graph
    from cryolike_dask.pipeline.pose_search import block_prior, kernel_factors
    from cryolike_dask.pipeline.tasks import BlockOutputs, KernelSettings

    params = case["params"]
    grid = DisplacementGrid.from_search(2, 5, 5, PIXEL)
    spec = PosePriorSpec(
        "window", half_width=math.radians(30), shift_radius=1.5 * PIXEL, use_origin=True,
        frame="model",
    )  # fmt: skip
    kept = spec.restrict(grid)
    settings = KernelSettings(
        params, tuple(zip(kept.x.tolist(), kept.y.tolist(), strict=True)), "single", "cpu",
        BlockOutputs(integrated_likelihood=True), pose_prior=spec,
    )  # fmt: skip
    templates = ZarrTemplates.open(case["tmp"] / "templates" / "templates.zarr")
    images = ZarrImages.open(case["store"])
    i_ranges = [(a, min(40, a + 8)) for a in range(0, 40, 8)]
    t_ranges = [(a, min(96, a + 8)) for a in range(0, 96, 8)]
    request = OutputRequest(integrated=True, pose_prior=True)
    g = build_batch_graph(settings, templates, 0, images, i_ranges, t_ranges, request)
    assert g.n_kernel_tasks < 0.7 * len(i_ranges) * len(t_ranges), g.n_kernel_tasks

    # the kernel's own allowed pairs, from the full prior of all 40 images at once
    angles = templates.viewing_angles(0)
    az, po = np.asarray(angles.azimus, float), np.asarray(angles.polars, float)
    d = settings.displacement_array.astype(float)
    theta = params.polar_grid.theta
    prior = block_prior(spec, images.prior_poses(0, 40), az, po,
                        np.asarray(angles.log_normalized_weights, float), theta, d)  # fmt: skip
    needed = pairs_of(kernel_factors(spec, prior, 0, 96, theta, d), t_ranges, i_ranges)
    built = np.zeros_like(needed)
    for key in g.graph.layers[g.kernel_name]:
        built[key[1], key[2]] = True
    assert needed.any(axis=0).all()
    assert np.all(built[needed]), "a pair with allowed poses was left out"

    # every pair built (the kernel skips the empty ones itself): the same numbers
    every = np.ones_like(needed)
    original = tasks.pose_block_pairs
    try:
        tasks.pose_block_pairs = lambda *a, **k: every.copy()
        g_all = build_batch_graph(settings, templates, 0, images, i_ranges, t_ranges, request)
    finally:
        tasks.pose_block_pairs = original
    assert g_all.n_kernel_tasks == every.size
    with dask.config.set(scheduler="sync"):
        got, ref = dask.compute(g.outputs, g_all.outputs)
    for q in (*QUANTITIES, "evaluated_poses", "optimal_pose_on_window_edge"):
        np.testing.assert_array_equal(got[q], ref[q], err_msg=q)


def test_per_template_outputs_of_a_local_search(case) -> None:
    """Per-template outputs need every pair: the left-out ones give −inf (no allowed pose),
    the others the best over the window, whose maximum is the optimal pose's score."""
    grid = DisplacementGrid.from_search(2, 5, 5, PIXEL)
    spec = PosePriorSpec(
        "window", half_width=math.radians(30), shift_radius=1.5 * PIXEL, use_origin=True,
        frame="model",
    )  # fmt: skip
    request = OutputRequest(integrated=True, per_template=True, pose_prior=True)
    run = LikelihoodRun(
        ZarrTemplates.open(case["tmp"] / "templates" / "templates.zarr"),
        ZarrImages.open(case["store"]),
        case["tmp"] / "per-template",
        (0,),
        spec.restrict(grid),
        request,
        pose_prior=spec,
        templates_per_block=8,
        images_per_block=8,
    )
    execute(run, scheduler="sync", progress=False)
    g = ResultsStore.open(case["tmp"] / "per-template" / "results.zarr", mode="r").group
    per = np.asarray(g["structure_0/per_template/cross_correlation"])  # [M, S]
    best = np.asarray(g["cross_correlation"][0])
    assert per.shape == (40, 96)
    allowed = np.isfinite(per)
    assert allowed.any(axis=1).all() and (~allowed).mean() > 0.5  # most templates excluded
    np.testing.assert_allclose(np.max(per, axis=1), best, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(per, axis=1), g["optimal_template"][0])


def test_the_pose_frame_is_read_from_the_templates(case, ref_inputs) -> None:
    """``pose_frame`` auto (the default): ``model`` for templates made from an atomic model,
    ``map`` for CryoLike template files (which do not say); structures of both kinds in one
    run are refused naming them."""
    from cryolike_dask.pipeline.spec import LikelihoodOptions, RunConfigurationError

    local = dict(pose_prior="window", window_degrees=30, use_prior_origin=True)
    templates = ZarrTemplates.open(case["tmp"] / "templates" / "templates.zarr")
    assert templates.structure_kind(0) == "model"
    run = LikelihoodOptions.parse(**local).build(
        templates, ZarrImages.open(case["store"]), case["params"], None
    )
    assert run.pose_prior.frame == "model"
    given = LikelihoodOptions.parse(**local, pose_frame="map").build(
        templates, ZarrImages.open(case["store"]), case["params"], None
    )
    assert given.pose_prior.frame == "map"
    assert ref_inputs["templates"].structure_kind(0) is None  # CryoLike's files: map
    from types import SimpleNamespace

    from cryolike_dask.pipeline.spec import structure_frame

    mixed = SimpleNamespace(names=("a", "b"), structure_kind=lambda k: ("model", "map")[k])
    with pytest.raises(RunConfigurationError, match=r"a \(model\), b \(map\)"):
        structure_frame(mixed, (0, 1))
    assert structure_frame(mixed, (1,)) == "map"
