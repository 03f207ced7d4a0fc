"""``cryolike-dask demo``: the whole pipeline on a built-in example, in well under a minute.

1. Image parameters: 32-pixel images of 5 Å, 364 viewing directions, 64 in-plane angles.
2. Templates of two apoferritin structures shipped with the package (a deformed one, the
   truth, and a symmetric one), from their atomic models.
3. Synthetic particles, a 70/30 mixture of the two structures (``mixture``), from their
   atomic models at known continuous poses,
   as real particles (a viewing direction uniform on the sphere, an in-plane rotation uniform
   in [0, 2π), a shift uniform within ±1 pixel; none on the search grids), each with its
   own astigmatic CTF and white noise, written as an MRC stack with a RELION STAR file that
   also carries "refined" poses, as particles aligned by RELION or cryoSPARC do: the true
   pose perturbed by a refinement error (3° per axis of the rotation, 0.3 pixel per axis of
   the origin).
4. ``convert-particles`` on those files with their poses, as for real data.
5. ``likelihood`` of every image against both structures on a local Dask cluster: a local
   search within 20° of each refined pose, centred on the refined origin, with residual
   shifts of ±0.5 pixel.
6. Matrices (``stitch``), population weights (``reweight``), a summary and PNG plots. The
   summary sets the pose errors against the grid steps and against the quantisation floor
   (the error of the nearest grid pose, about half a step), which no search on these grids
   can beat.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from cryolike_dask.errors import OutputExistsError, ParameterError
from cryolike_dask.evaluation import (
    PoseErrors,
    Truth,
    chain_symmetry,
    image_centres,
    pose_errors,
)
from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.io.models import read_atoms
from cryolike_dask.io.mrc import write_images
from cryolike_dask.io.particle_metadata import write_star
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.pipeline.cluster import ClusterOptions
from cryolike_dask.preprocess.synthesis import (
    Poses,
    SyntheticParticles,
    synthesize_particles,
    synthesize_particles_at_poses,
)

#: The example structures shipped with the package (the demo's truth first).
MODELS = ("apoferritin_ca_apo_def.pdb", "apoferritin_ca_apo_sym.pdb")

logger = logging.getLogger(__name__)


@dataclass
class DemoSummary:
    """What the demo found."""

    n_images: int
    structures: list[str]
    prefer_true: float
    errors: PoseErrors
    seconds: dict[str, float]
    poses_per_second: float
    dashboard_link: str | None
    plots: list[Path]

    poses: str = "continuous"
    #: mixture: per structure (true share, recovered weight, 2.5 % and 97.5 % posterior)
    weights: dict[str, tuple[float, float, float, float]] | None = None
    #: the likelihood's search, in words
    search: str | None = None
    #: median error of the refined poses the search started from: angle (degrees), centre (Å)
    prior_error: tuple[float, float] | None = None
    #: per structure: share of best poses on the window's edge, for its own images and for
    #: the other structure's (whose best pose on a wrong structure need not lie near it)
    on_edge: dict[str, tuple[float, float]] | None = None

    def table(self) -> str:
        e = self.errors
        where = "continuous poses" if self.poses == "continuous" else "poses on the search grids"
        source = self.structures[0]
        if self.weights:
            source = " and ".join(f"{n} ({t:.0%})" for n, (t, _w, _a, _b) in self.weights.items())
        rows = [
            ("images", f"{self.n_images} (synthetic, from {source}, {where})"),
            ("structures compared", ", ".join(self.structures)),
            ("images preferring their true structure", f"{self.prefer_true:.1%}"),
        ]
        if self.search:
            rows.append(("search", self.search))
        if self.prior_error:
            a, d = self.prior_error
            rows.append(("refined poses (search start)", f"median error {a:.1f}°, {d:.2f} Å"))
        for n, (mine, other) in (self.on_edge or {}).items():
            rows.append(
                (
                    f"best pose on window edge, {n}",
                    f"{mine:.0%} of its images, {other:.0%} of the other's",
                )
            )
        for n, (t, w, lo, hi) in (self.weights or {}).items():
            inside = "inside" if lo <= t <= hi else "OUTSIDE"
            rows.append(
                (f"weight of {n}", f"{w:.3f}, 95 % interval {lo:.3f}–{hi:.3f} (true {t:.3f}, "
                 f"{inside})")
            )  # fmt: skip
        if self.weights:
            rows.append(("pose errors below", f"for the images of {self.structures[0]}"))
        rows += _error_rows(e, "pose errors against the truth")
        if e.modulo_symmetry is not None:
            rows += _error_rows(
                e.modulo_symmetry, f"... up to the structure's {e.n_symmetry}-fold symmetry"
            )
        rows += [("likelihood throughput", f"{self.poses_per_second:.3g} pose evaluations / s")]
        rows += [(f"time: {k}", f"{v:.1f} s") for k, v in self.seconds.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _error_rows(e: PoseErrors, title: str) -> list[tuple[str, str]]:
    """Table rows of pose errors: median / 90th percentile, share within one grid step, and
    the same for the nearest grid pose (the floor set by the grids, about half a step)."""

    def f(v: float, unit: str) -> str:
        return f"{v:.2f} {unit}" if unit == "Å" else f"{v:.1f}{unit}"

    stats = e.stats()
    half = ", ".join(f(st.half_step, st.unit) for st in stats)
    rows = [
        (
            title,
            f"median / p90, share within one grid step; nearest grid pose (half a step: {half})",
        )
    ]
    for st in stats:
        rows.append(
            (
                f"  {st.name}",
                f"{f(st.median, st.unit)} / {f(st.p90, st.unit)}, {st.within_step:.0%} within "
                f"{f(st.step, st.unit)}; nearest grid pose {f(st.floor_median, st.unit)} / "
                f"{f(st.floor_p90, st.unit)}",
            )
        )
    rows.append(("  all three within one step", f"{e.within_one_step.mean():.1%}"))
    return rows


def model_path(name: str) -> Path:
    """Path of a model shipped in ``cryolike_dask/data``."""
    return Path(str(resources.files("cryolike_dask") / "data" / name))


def demo_displacements(params: ImageParameters) -> DisplacementGrid:
    """The range of the simulated particles' shifts, as a displacement search: 3 × 3 within
    ±1 pixel (the former global search's grid)."""
    return DisplacementGrid.from_search(1, 3, 3, params.pixel_size[0])


#: The demo's search parameters: 32-pixel images of 5 Å, ``VIEWING_DISTANCE`` (364 viewing
#: directions, about 10° apart) and ``N_INPLANES`` rotations (5.6° apart).
VIEWING_DISTANCE = 3 / (4 * np.pi)
N_INPLANES = 64
#: The "refined" poses' errors: standard deviation per axis of the rotation vector
#: (degrees) and of the origin (pixels).
POSE_ERROR = (3.0, 0.3)
#: The local search: half-width of the window around each refined pose (degrees), and the
#: residual displacements around the refined origin (3 × 3 within ± this many pixels).
WINDOW_DEGREES = 20.0
RESIDUAL_PIXELS = 0.5


@dataclass(frozen=True)
class SimulatedParticles:
    """Files of :func:`simulate_particles` and the truth they were made from."""

    mrcs: Path
    star: Path
    truth_file: Path
    truth: Truth
    labels: np.ndarray | None = None  # structure of each image, for a mixture
    #: with ``pose_error``: the refined poses written to the STAR file
    refined: RefinedPoses | None = None


@dataclass(frozen=True)
class RefinedPoses:
    """The "refined" poses of :func:`simulate_particles`, per image: the angle between the
    refined and the true orientation (degrees), the distance between the refined and the true
    particle centre (Å), and the refined particle offset ``[M, 2]`` (Å, image frame: row,
    column; minus RELION's origin (Y, X))."""

    angle_error_deg: np.ndarray
    shift_error: np.ndarray
    offset: np.ndarray


def simulate_particles(
    output: str | Path,
    params: ImageParameters,
    n_images: int,
    *,
    snr: float = 0.1,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    poses: str = "continuous",
    templates: str | Path | None = None,
    mixture: float | None = None,
    pose_error: tuple[float, float] | None = None,
) -> SimulatedParticles:
    """Particles of the demo's true structure (the deformed apoferritin model shipped with
    the package), written as real data: ``OUTPUT/particles.mrcs`` (float32 ``[M, n, n]``),
    a RELION ``particles.star`` with each image's astigmatic CTF (defocus 8–16 µm), and
    ``truth.npz`` (their poses: viewing direction, rotation in rad, shift in Å).

    ``poses="continuous"``: directions uniform on the sphere, rotations uniform in [0, 2π),
    shifts uniform within the demo's displacement search (±1 pixel), none on the search
    grids; ``"grid"``: at poses of the grids (needs ``templates``, the true structure's
    template file). White noise at ``snr``.

    ``mixture`` (continuous poses): each image comes from the true structure with this
    probability, else from the other example structure (the symmetric model); ``labels``
    says which, and the truth holds the poses of the true structure's images only
    (``truth.images``).

    ``pose_error`` ``(degrees, pixels)``: the STAR file also carries "refined" poses, as
    particles aligned by RELION or cryoSPARC do (``rlnAngleRot``/``Tilt``/``Psi``,
    ``rlnOriginXAngst``/``YAngst``, in the frame of the atomic models: read them with
    ``pose_frame="model"``): each image's true pose turned by a random rotation whose
    rotation vector has this standard deviation per axis, and its origin moved by this
    standard deviation per axis (``refined``). The particles are the same as without them.
    """
    if poses not in ("continuous", "grid"):
        raise ParameterError(f"poses must be 'continuous' or 'grid', not {poses!r}")
    if poses == "grid" and templates is None:
        raise ParameterError("poses='grid' needs the true structure's templates")
    rng = rng if rng is not None else np.random.default_rng(seed)
    m = int(n_images)
    defocus = rng.uniform(8000, 16000, m)
    astig = rng.uniform(0, 1000, m)
    lens = LensParameters(
        defocus + astig / 2,
        defocus - astig / 2,
        rng.uniform(-np.pi / 2, np.pi / 2, m),
        np.zeros(m),
        2.7,
        300.0,
        0.1,
        astigmatism_convention="relion",
    )
    disp = demo_displacements(params)
    labels = None
    if mixture is None:
        truth, synthetic = _synthesize(poses, templates, params, disp, lens, snr, rng)
        images = synthetic.images
        parts = [(np.arange(m), truth)]
    else:
        if poses != "continuous":
            raise ParameterError("a mixture is simulated at continuous poses only")
        labels = (rng.random(m) >= float(mixture)).astype(np.int64)  # 0: the true structure
        images, parts = None, []
        for k in (0, 1):
            idx = np.flatnonzero(labels == k)
            if idx.size == 0:
                continue
            t_k, syn = _synthesize(
                poses, None, params, disp, lens.subset(idx), snr, rng, model=MODELS[k]
            )
            if images is None:
                images = np.empty((m, *syn.images.shape[1:]), syn.images.dtype)
            images[idx] = syn.images
            parts.append((idx, t_k))
            if k == 0:
                truth = replace(t_k, images=idx)
    raw = Path(output)
    raw.mkdir(parents=True, exist_ok=True)
    write_images(raw / "particles.mrcs", images, params.pixel_size[0], overwrite=True)
    write_star(raw / "particles.star", lens)
    refined = None
    if pose_error is not None:
        rotations, offsets = np.empty((m, 3, 3)), np.empty((m, 2))
        for idx, t in parts:
            rotations[idx] = t.orientations(params.viewing_angles)
            offsets[idx] = image_centres(t.displacement_x, t.displacement_y, t.rotation)
        refined = _write_refined_poses(
            raw / "particles.star", rotations, offsets, pose_error, params.pixel_size[0], rng
        )
    truth.save(raw / "truth.npz")
    return SimulatedParticles(
        raw / "particles.mrcs", raw / "particles.star", raw / "truth.npz", truth, labels, refined
    )


def _write_refined_poses(
    star: Path,
    rotations: np.ndarray,
    offsets: np.ndarray,
    error: tuple[float, float],
    pixel_size: float,
    rng: np.random.Generator,
) -> RefinedPoses:
    """Add "refined" RELION poses to ``star``: each true pose (``rotations`` ``[M, 3, 3]``,
    model frame; image-frame particle ``offsets`` ``[M, 2]`` Å, row and column) turned by a
    random rotation whose rotation vector has a standard deviation of ``error[0]`` degrees
    per axis, and its origin moved by ``error[1]`` pixels per axis.

    RELION's rotation of a template-frame pose ``R`` of an atomic model is
    ``R·diag(1, 1, −1)·Σ`` (the model frame is RELION's; ``Σ`` swaps RELION's image x, our
    column, with y, our row): the inverse of the ``pose_frame="model"`` conversion. RELION's
    origin is minus the particle's offset, ``(X, Y) = −(column, row)``.
    """
    from scipy.spatial.transform import Rotation

    m = rotations.shape[0]
    turn = Rotation.from_rotvec(rng.normal(0.0, np.radians(error[0]), (m, 3)))
    refined = rotations @ turn.as_matrix()
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    relion = refined @ np.diag([1.0, 1.0, -1.0]) @ swap
    euler = Rotation.from_matrix(relion).as_euler("ZYZ", degrees=True)
    moved = rng.normal(0.0, error[1] * pixel_size, (m, 2))
    origin = -(offsets + moved)[:, ::-1]  # (X, Y) = -(column, row)
    columns = {
        "rlnAngleRot": euler[:, 0],
        "rlnAngleTilt": euler[:, 1],
        "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
    }
    lines = star.read_text().splitlines()
    names = [k for k, line in enumerate(lines) if line.startswith("_rln")]
    header = [f"_{c} #{len(names) + j + 1}" for j, c in enumerate(columns)]
    rows = [line for line in lines[names[-1] + 1 :] if line.strip()]
    values = np.stack(list(columns.values()), axis=1)
    rows = [
        f"{r} " + " ".join(f"{v:.6f}" for v in vals) for r, vals in zip(rows, values, strict=True)
    ]
    star.write_text("\n".join(lines[: names[-1] + 1] + header + rows) + "\n")
    return RefinedPoses(
        np.degrees(turn.magnitude()), np.linalg.norm(moved, axis=1), offsets + moved
    )


def _synthesize(
    poses: str,
    true_pt: Path | None,
    params: ImageParameters,
    disp: DisplacementGrid,
    lens: LensParameters,
    snr: float,
    rng: np.random.Generator,
    model: str = MODELS[0],
) -> tuple[Truth, SyntheticParticles]:
    """The particles (one per image of ``lens``) of the true structure, MODELS[0] (its
    atomic model, or its templates ``true_pt`` for grid poses), and their truth.

    Apoferritin is 432-symmetric, and the deformed truth nearly so at this resolution (a
    deformed copy of the symmetric structure, in its frame): the truth carries the symmetric
    structure's 24 rotations, so that errors are also given up to them.
    """
    m = lens.defocus_u.size
    symmetry = chain_symmetry(model_path(MODELS[1]))
    if poses == "continuous":
        atoms = read_atoms(model_path(model), params)
        p = Poses.random(m, float(np.max(np.abs(disp.x))), rng)
        synthetic = synthesize_particles_at_poses(
            atoms.coordinates, atoms.radii, params, p, lens, snr, rng
        )
        truth = Truth.continuous(
            0, p.azimuth, p.polar, p.rotation, p.displacement_x, p.displacement_y, symmetry
        )
        return truth, synthetic
    from cryolike_dask.io.torch_files import load_tensor

    true_templates = load_tensor(true_pt)
    w = params.n_inplanes
    t_idx = rng.integers(0, true_templates.shape[0], m)
    d_idx = rng.integers(0, disp.n_displacements, m)
    truth = Truth(
        0,
        t_idx,
        disp.x[d_idx].astype(float),
        disp.y[d_idx].astype(float),
        2 * np.pi * rng.integers(0, w, m) / w,
        symmetry=symmetry,
    )
    synthetic = synthesize_particles(
        true_templates,
        params,
        truth.template_index,
        truth.displacement_x,
        truth.displacement_y,
        truth.rotation,
        lens,
        snr,
        rng,
    )
    return truth, synthetic


def run_demo(
    output: str | Path = "demo_output",
    *,
    n_images: int = 300,
    snr: float = 0.1,
    seed: int = 0,
    cluster: ClusterOptions | None = None,
    progress: bool = True,
    overwrite: bool = True,
    poses: str = "continuous",
    mixture: float | None = 0.7,
) -> DemoSummary:
    """Run the demo into ``output`` and return its summary (also written to summary.txt).

    ``mixture``: the share of particles from the deformed structure (the rest from the
    symmetric one; None: all from the deformed one); the summary reports the population
    weights recovered by ``reweight`` with their 95 % intervals against the true shares.

    The particles come, as real ones usually do, with poses refined by another program: the
    STAR file carries each particle's true pose perturbed by a refinement error
    (:data:`POSE_ERROR`: a random rotation of 3° per axis, a median 4.4°, and 0.3 pixel per
    axis on the origin), converted with ``pose_source="refined"``. The likelihood is a local
    search (``pose_prior="window"``, ``pose_frame="model"``): the viewing directions and
    rotations within :data:`WINDOW_DEGREES` of each refined pose, on a template grid of 364
    directions (:data:`VIEWING_DISTANCE`; the particles are sorted by their refined
    direction, so that each block of images needs few blocks of templates), with each image
    centred on its refined origin (``use_prior_origin``) and residual shifts of
    ±:data:`RESIDUAL_PIXELS` pixel.

    It uses the public API only (``import cryolike_dask as cd``), as a user would; steps are
    reported through ``logging`` (the ``demo`` command shows them). The likelihood runs on
    the active Dask client, else on ``cluster`` (default: a new LocalCluster).

    ``poses="continuous"`` (default): particles at continuous poses, off the search grids, as
    real particles; ``"grid"``: at poses of the search grids (a template, a displacement and a
    rotation of the grids; the refined poses are still perturbed).
    """
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty; pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    cluster = cluster or ClusterOptions()
    rng = np.random.default_rng(seed)
    seconds: dict[str, float] = {}
    import cryolike_dask as cd

    log = logger.info

    t0 = time.perf_counter()
    params = cd.ImageParameters.from_values(
        32, 5.0, n_inplanes=N_INPLANES, viewing_distance=VIEWING_DISTANCE
    )
    params.save(out / "parameters.npz", overwrite=True)
    log(
        f"[1/5] parameters: 32 px × 5 Å, {params.polar_grid.n_shells} shells × {N_INPLANES} "
        f"angles, {params.viewing_angles.n_angles} viewing directions"
    )
    pts = cd.make_templates(
        [model_path(m) for m in MODELS],
        params,
        out / "templates",
        overwrite=True,
        cluster=ClusterOptions(scheduler="threads"),
        progress=False,
    )
    seconds["templates"] = time.perf_counter() - t0
    log(
        f"[2/5] templates of {', '.join(p.stem.removeprefix('templates_fourier_') for p in pts)}"
        f" ({seconds['templates']:.1f} s)"
    )

    t0 = time.perf_counter()
    m, w = n_images, params.n_inplanes
    raw = out / "raw"
    mixture = mixture if poses == "continuous" else None
    sim = simulate_particles(
        raw,
        params,
        m,
        snr=snr,
        rng=rng,
        poses=poses,
        templates=pts[0],
        mixture=mixture,
        pose_error=POSE_ERROR,
    )
    truth, refined = sim.truth, sim.refined
    assert refined is not None
    labels = sim.labels if sim.labels is not None else np.zeros(m, np.int64)
    particles = cd.gather_paired(
        [raw / "particles.mrcs"],
        [raw / "particles.star"],
        batch_size=100,
        pose_source="refined",
        sort_by_pose=True,
    )
    store = cd.convert_particles(
        particles,
        params,
        out / "particles",
        overwrite=True,
        cluster=ClusterOptions(scheduler="sync"),
        progress=False,
    )
    seconds["particles"] = time.perf_counter() - t0
    log(
        f"[3/5] {m} particles at {poses} poses, SNR {snr:g}, with refined poses "
        f"(median error {np.median(refined.angle_error_deg):.1f}°, "
        f"{np.median(refined.shift_error):.2f} Å), written as MRC + STAR and converted "
        f"({seconds['particles']:.1f} s)"
    )

    t0 = time.perf_counter()
    search = (
        f"local: within {WINDOW_DEGREES:g}° of each image's refined pose "
        f"({params.viewing_angles.n_angles} directions, {w} rotations), centred on its refined "
        f"origin, residual shifts 3 × 3 within ±{RESIDUAL_PIXELS:g} px"
    )
    log(f"[4/5] likelihood of every image against both structures, {search}:")
    report = cd.write_likelihood(
        store,
        out / "templates" / "templates.zarr",
        out / "likelihood",
        max_displacement_pixels=RESIDUAL_PIXELS,
        n_displacements_x=3,
        n_displacements_y=3,
        pose_prior="window",
        window_degrees=WINDOW_DEGREES,
        use_prior_origin=True,
        pose_frame="model",
        templates_per_block=64,
        integrated_likelihood=True,
        optimal_pose_likelihood=True,
        overwrite=True,
        cluster=cluster,
        progress=progress,
    )
    seconds["likelihood (incl. cluster start)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cd.stitch(out / "likelihood")
    import xarray as xr

    results = xr.open_zarr(out / "likelihood" / "results.zarr").compute()
    # sorted by pose: result image i is row source_row[i] of the STAR file
    rows = results["source_row"].values
    labels = labels[rows]
    ll = results["log_likelihood_integrated_fourier"].values
    edge = results["optimal_pose_on_window_edge"].values.astype(bool)
    own = np.argsort(rows)[truth.images if truth.images is not None else np.arange(m)]
    errors = _residual_pose_errors(params, results, truth, refined.offset[rows[own]], own)
    # the truth in input order (STAR rows): the plots pair it with the results by source row
    truth.save(out / "likelihood" / "truth.npz")
    names = [p.stem.removeprefix("templates_fourier_") for p in pts]
    weights = None
    if sim.labels is not None:
        shares = {n: float(np.mean(labels == k)) for k, n in enumerate(names)}
        fit = cd.reweight_folder(
            out / "likelihood",
            {"truth": shares, "chains": 4, "samples": 300, "warmup": 100, "plots": False},
            overwrite=True,
        )
        weights = {
            n: (
                shares[n],
                float(fit.map_weights[k]),
                float(fit.intervals[0.025][k]),
                float(fit.intervals[0.975][k]),
            )
            for k, n in enumerate(fit.components)
        }
    plots = cd.plot_output_folder(
        out / "likelihood", out / "plots", out / "likelihood" / "truth.npz"
    )
    seconds["matrices and plots"] = time.perf_counter() - t0
    summary = DemoSummary(
        m,
        names,
        float(np.mean(ll[labels, np.arange(m)] > ll[1 - labels, np.arange(m)])),
        errors,
        seconds,
        report.poses_per_second,
        report.dashboard_link,
        plots,
        poses,
        weights,
        search,
        (float(np.median(refined.angle_error_deg)), float(np.median(refined.shift_error))),
        {
            n: (
                float(edge[k, labels == k].mean()) if np.any(labels == k) else float("nan"),
                float(edge[k, labels != k].mean()) if np.any(labels != k) else float("nan"),
            )
            for k, n in enumerate(names)
        },
    )
    text = summary.table()
    (out / "summary.txt").write_text(text + "\n")
    log("[5/5] summary:\n" + text)
    log(f"plots: {', '.join(str(p) for p in plots)}")
    return summary


def _residual_pose_errors(
    params: ImageParameters, results, truth: Truth, offset: np.ndarray, own: np.ndarray
) -> PoseErrors:
    """Pose errors of the true structure's images (``own``, in the order of ``truth``) in
    the frame of the images centred on their refined ``offset`` ``[n, 2]`` (Å): the truth's
    centre and the found total displacement both less that offset, so that the shift errors
    are those of the total displacement and the floor is that of the residual grid."""
    c, s = np.cos(truth.rotation), np.sin(truth.rotation)
    centre = image_centres(truth.displacement_x, truth.displacement_y, truth.rotation) - offset
    centred = replace(  # d = Rot(γ)·(centre − offset), the template-frame residual
        truth,
        displacement_x=c * centre[:, 0] - s * centre[:, 1],
        displacement_y=s * centre[:, 0] + c * centre[:, 1],
    )
    rot = results["optimal_inplane_rotation"][0].values[own].astype(np.float64)
    cf, sf = np.cos(rot), np.sin(rot)
    dx = results["optimal_displacement_x"][0].values[own] - (cf * offset[:, 0] - sf * offset[:, 1])
    dy = results["optimal_displacement_y"][0].values[own] - (sf * offset[:, 0] + cf * offset[:, 1])
    grid = np.asarray(results.attrs["displacements"], dtype=np.float64)
    return pose_errors(
        params.viewing_angles,
        params.n_inplanes,
        grid,
        centred,
        results["optimal_template"][0].values[own],
        dx,
        dy,
        rot,
    )
