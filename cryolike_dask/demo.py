"""``cryolike-dask demo``: the whole pipeline on a built-in example, in a few minutes.

1. Image parameters: 32-pixel images of 5 Å, 96 viewing directions, 64 in-plane angles.
2. Templates of two apoferritin structures shipped with the package (a deformed one, the
   truth, and a symmetric one), from their atomic models.
3. Synthetic particles from the deformed structure at known poses (a template, a shift on
   the search grid, an in-plane rotation), each with its own astigmatic CTF and white noise,
   written as an MRC stack with a RELION STAR file.
4. ``convert-particles`` on those files, as for real data.
5. ``likelihood`` of every image against both structures on a local Dask cluster.
6. Matrices (``stitch``), a summary and PNG plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from cryolike_dask.evaluation import PoseErrors, Truth, pose_errors
from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.io.exports import OutputRequest
from cryolike_dask.io.mrc import write_images
from cryolike_dask.io.particle_metadata import write_star
from cryolike_dask.io.sources import ZarrImages, ZarrTemplates
from cryolike_dask.io.stitch import stitch
from cryolike_dask.io.torch_files import load_tensor
from cryolike_dask.io.zarr_stores import ResultsStore
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.pipeline import convert_particles as cp
from cryolike_dask.pipeline.cluster import ClusterOptions
from cryolike_dask.pipeline.driver import LikelihoodRun, run_likelihood
from cryolike_dask.pipeline.make_templates import make_templates
from cryolike_dask.plots import plot_output_folder
from cryolike_dask.preprocess.synthesis import synthesize_particles

MODELS = ("apoferritin_ca_apo_def.pdb", "apoferritin_ca_apo_sym.pdb")  # truth first


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

    def table(self) -> str:
        e = self.errors
        rows = [
            ("images", f"{self.n_images} (synthetic, from {self.structures[0]})"),
            ("structures compared", ", ".join(self.structures)),
            ("images preferring the true structure", f"{self.prefer_true:.1%}"),
            ("poses within one grid step", f"{e.within_one_step.mean():.1%}"),
            (
                "median viewing-direction error",
                f"{np.median(e.direction_deg):.1f}° (grid step {e.direction_step_deg:.1f}°)",
            ),
            (
                "median in-plane rotation error",
                f"{np.median(e.rotation_deg):.1f}° (grid step {e.rotation_step_deg:.1f}°)",
            ),
            (
                "median shift error",
                f"{np.median(e.shift_angstrom):.2f} Å (grid step {e.shift_step_angstrom:.2f} Å)",
            ),
            ("likelihood throughput", f"{self.poses_per_second:.3g} pose evaluations / s"),
        ] + [(f"time: {k}", f"{v:.1f} s") for k, v in self.seconds.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def model_path(name: str) -> Path:
    """Path of a model shipped in ``cryolike_dask/data``."""
    return Path(str(resources.files("cryolike_dask") / "data" / name))


def run_demo(
    output: str | Path = "demo_output",
    *,
    n_images: int = 300,
    snr: float = 0.1,
    seed: int = 0,
    cluster: ClusterOptions | None = None,
    progress: bool = True,
    overwrite: bool = True,
    log: Callable[[str], None] = print,
) -> DemoSummary:
    """Run the demo into ``output`` and return its summary (also written to summary.txt)."""
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    cluster = cluster or ClusterOptions()
    rng = np.random.default_rng(seed)
    seconds: dict[str, float] = {}
    quiet = lambda *a: None  # noqa: E731

    t0 = time.perf_counter()
    params = ImageParameters.from_values(32, 5.0, n_inplanes=64, viewing_distance=8 / (4 * np.pi))
    params.save(out / "parameters.npz", overwrite=True)
    log(
        f"[1/5] parameters: 32 px × 5 Å, {params.polar_grid.n_shells} shells × 64 angles, "
        f"{params.viewing_angles.n_angles} viewing directions"
    )
    pts = make_templates(
        [model_path(m) for m in MODELS],
        params,
        out / "templates",
        overwrite=True,
        cluster=ClusterOptions(scheduler="threads"),
        progress=False,
        log=quiet,
    )
    seconds["templates"] = time.perf_counter() - t0
    log(
        f"[2/5] templates of {', '.join(p.stem.removeprefix('templates_fourier_') for p in pts)}"
        f" ({seconds['templates']:.1f} s)"
    )

    t0 = time.perf_counter()
    true_templates = load_tensor(pts[0])
    disp = DisplacementGrid.from_search(1, 3, 3, params.pixel_size[0])
    m, w = n_images, params.n_inplanes
    t_idx = rng.integers(0, true_templates.shape[0], m)
    d_idx = rng.integers(0, disp.n_displacements, m)
    truth = Truth(
        0,
        t_idx,
        disp.x[d_idx].astype(float),
        disp.y[d_idx].astype(float),
        2 * np.pi * rng.integers(0, w, m) / w,
    )
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
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    write_images(raw / "particles.mrcs", synthetic.images, params.pixel_size[0], overwrite=True)
    write_star(raw / "particles.star", lens)
    truth.save(raw / "truth.npz")
    particles = cp.gather_paired([raw / "particles.mrcs"], [raw / "particles.star"], batch_size=100)
    store = cp.convert_particles(
        particles,
        params,
        out / "particles",
        overwrite=True,
        cluster=ClusterOptions(scheduler="sync"),
        progress=False,
        log=quiet,
    )
    seconds["particles"] = time.perf_counter() - t0
    log(
        f"[3/5] {m} particles at SNR {snr:g} written as MRC + STAR and converted "
        f"({seconds['particles']:.1f} s)"
    )

    t0 = time.perf_counter()
    run = LikelihoodRun(
        templates=ZarrTemplates.open(out / "templates" / "templates.zarr"),
        images=ZarrImages.open(store),
        output=out / "likelihood",
        structures=(0, 1),
        displacements=disp,
        request=OutputRequest(integrated=True, optimal_likelihood=True),
    )
    log("[4/5] likelihood of every image against both structures:")
    report = run_likelihood(run, cluster, progress=progress, log=lambda s: log("      " + s))
    seconds["likelihood (incl. cluster start)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stitch(out / "likelihood")
    results = ResultsStore.open(out / "likelihood" / "results.zarr", mode="r").group
    ll = np.asarray(results["log_likelihood_integrated_fourier"][:])
    errors = pose_errors(
        params.viewing_angles,
        w,
        disp.as_array(),
        truth,
        np.asarray(results["optimal_template"][0]),
        np.asarray(results["optimal_displacement_x"][0]),
        np.asarray(results["optimal_displacement_y"][0]),
        np.asarray(results["optimal_inplane_rotation"][0]),
    )
    plots = plot_output_folder(out / "likelihood", out / "plots", raw / "truth.npz")
    seconds["matrices and plots"] = time.perf_counter() - t0
    summary = DemoSummary(
        m,
        [p.stem.removeprefix("templates_fourier_") for p in pts],
        float(np.mean(ll[0] > ll[1])),
        errors,
        seconds,
        report.poses_per_second,
        report.dashboard_link,
        plots,
    )
    text = summary.table()
    (out / "summary.txt").write_text(text + "\n")
    log("[5/5] summary:\n" + text)
    log(f"plots: {', '.join(str(p) for p in plots)}")
    return summary
