"""``cryolike-dask demo``: the whole pipeline on a built-in example, in a few minutes.

1. Image parameters: 32-pixel images of 5 Å, 96 viewing directions, 64 in-plane angles.
2. Templates of two apoferritin structures shipped with the package (a deformed one, the
   truth, and a symmetric one), from their atomic models.
3. Synthetic particles, a 70/30 mixture of the two structures (``mixture``), from their
   atomic models at known continuous poses,
   as real particles (a viewing direction uniform on the sphere, an in-plane rotation uniform
   in [0, 2π), a shift uniform in the search range; none on the search grids), each with its
   own astigmatic CTF and white noise, written as an MRC stack with a RELION STAR file.
4. ``convert-particles`` on those files, as for real data.
5. ``likelihood`` of every image against both structures on a local Dask cluster.
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
from cryolike_dask.evaluation import PoseErrors, Truth, chain_symmetry, pose_errors
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
    """The demo's displacement search: 3 × 3 within ±1 pixel."""
    return DisplacementGrid.from_search(1, 3, 3, params.pixel_size[0])


@dataclass(frozen=True)
class SimulatedParticles:
    """Files of :func:`simulate_particles` and the truth they were made from."""

    mrcs: Path
    star: Path
    truth_file: Path
    truth: Truth
    labels: np.ndarray | None = None  # structure of each image, for a mixture


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
    else:
        if poses != "continuous":
            raise ParameterError("a mixture is simulated at continuous poses only")
        labels = (rng.random(m) >= float(mixture)).astype(np.int64)  # 0: the true structure
        images = None
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
            if k == 0:
                truth = replace(t_k, images=idx)
    raw = Path(output)
    raw.mkdir(parents=True, exist_ok=True)
    write_images(raw / "particles.mrcs", images, params.pixel_size[0], overwrite=True)
    write_star(raw / "particles.star", lens)
    truth.save(raw / "truth.npz")
    return SimulatedParticles(
        raw / "particles.mrcs", raw / "particles.star", raw / "truth.npz", truth, labels
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

    It uses the public API only (``import cryolike_dask as cd``), as a user would; steps are
    reported through ``logging`` (the ``demo`` command shows them). The likelihood runs on
    the active Dask client, else on ``cluster`` (default: a new LocalCluster).

    ``poses="continuous"`` (default): particles at continuous poses, off the search grids, as
    real particles; ``"grid"``: at poses of the search grids (a template, a displacement and a
    rotation of the grids), where a perfect search makes no error at all.
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
    params = ImageParameters.from_values(32, 5.0, n_inplanes=64, viewing_distance=8 / (4 * np.pi))
    params.save(out / "parameters.npz", overwrite=True)
    log(
        f"[1/5] parameters: 32 px × 5 Å, {params.polar_grid.n_shells} shells × 64 angles, "
        f"{params.viewing_angles.n_angles} viewing directions"
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
    disp = demo_displacements(params)
    m, w = n_images, params.n_inplanes
    raw = out / "raw"
    mixture = mixture if poses == "continuous" else None
    sim = simulate_particles(
        raw, params, m, snr=snr, rng=rng, poses=poses, templates=pts[0], mixture=mixture
    )
    truth = sim.truth
    labels = sim.labels if sim.labels is not None else np.zeros(m, np.int64)
    particles = cd.gather_paired([raw / "particles.mrcs"], [raw / "particles.star"], batch_size=100)
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
        f"[3/5] {m} particles at {poses} poses, SNR {snr:g}, written as MRC + STAR and converted "
        f"({seconds['particles']:.1f} s)"
    )

    t0 = time.perf_counter()
    log("[4/5] likelihood of every image against both structures:")
    report = cd.write_likelihood(
        store,
        out / "templates" / "templates.zarr",
        out / "likelihood",
        max_displacement_pixels=1,
        n_displacements_x=3,
        n_displacements_y=3,
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
    ll = results["log_likelihood_integrated_fourier"].values
    own = np.flatnonzero(labels == 0)  # the images of the true structure: their poses
    errors = pose_errors(
        params.viewing_angles,
        w,
        disp.as_array(),
        truth,
        results["optimal_template"][0].values[own],
        results["optimal_displacement_x"][0].values[own],
        results["optimal_displacement_y"][0].values[own],
        results["optimal_inplane_rotation"][0].values[own],
    )
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
    plots = cd.plot_output_folder(out / "likelihood", out / "plots", raw / "truth.npz")
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
    )
    text = summary.table()
    (out / "summary.txt").write_text(text + "\n")
    log("[5/5] summary:\n" + text)
    log(f"plots: {', '.join(str(p) for p in plots)}")
    return summary
