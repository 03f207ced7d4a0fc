"""Benchmark: a search around prior poses against the global search, same run, same data.

    python -m benchmarks.pose_search [--images 512] [--write]

The 128-px problem (N = 129 shells, W = 256 rotations, S = 239 directions) with the realistic
16 × 16 displacement grid of up to 8 px (D = 257). Images carry random prior poses (uniform
directions and in-plane angles, origins within ±2 px), stored in ``particles.zarr`` ordered
by direction (as ``convert-particles --sort-by-pose`` does). Both runs go through the
production driver (``execute``) on the same local cluster (one worker, two threads), the
global run first (the worker's imports and first-use costs fall on it; each run prepares its
own template spectra, D times their size):

* global: every template, displacement and rotation;
* local: ``--pose-prior window --window-degrees 10 --window-shift-pixels 2
  --use-prior-origin`` (10° around each prior direction and in-plane angle, residual
  displacements within 2 px after centring on the prior origin).

Printed: wall time of each, pose evaluations (global count, local mean per image and the
fraction of the global grid), the speed-up. Random data: timings only.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.kernel import write_section
from benchmarks.problems import hermitian

N_PIXELS = 128
VIEWING_DISTANCE = 4 / (4 * np.pi)  # 239 directions


def make_inputs(folder: Path, n_images: int):
    """Templates (a Zarr template store) and particles with prior poses (``particles.zarr``)."""
    from cryolike_dask.io.poses import PriorPoses, sort_key
    from cryolike_dask.io.zarr_stores import ImageStore, TemplateStore
    from cryolike_dask.params import ImageParameters, LensParameters

    params = ImageParameters.from_values(
        N_PIXELS, 1.0, n_inplanes=2 * N_PIXELS, viewing_distance=VIEWING_DISTANCE
    )
    g = params.polar_grid
    rng = np.random.default_rng(0)
    angles = params.viewing_angles
    tstore = TemplateStore.create(folder / "templates.zarr", params)
    tstore.add_structure("bench", hermitian(rng, angles.n_angles, g.n_shells, g.n_inplanes), angles)
    tstore.mark_complete()
    m = n_images
    poses = PriorPoses(
        rng.uniform(0, 360, m),
        np.degrees(np.arccos(rng.uniform(-1, 1, m))),
        rng.uniform(-180, 180, m),
        rng.uniform(-2, 2, m),
        rng.uniform(-2, 2, m),
        np.ones(m, bool),
        np.ones(m, bool),
        "star-refined",
    )
    poses = poses.subset(sort_key(poses))
    store = ImageStore.create(folder / "particles.zarr", params, m, chunk_images=256)
    lens = LensParameters(
        rng.uniform(8e3, 2e4, m), rng.uniform(8e3, 2e4, m), rng.uniform(0, 3, m), np.zeros(m)
    )
    store.write(0, hermitian(rng, m, g.n_shells, g.n_inplanes), lens)
    store.write_prior_poses(poses)
    store.mark_complete()
    return params


def run_once(folder: Path, params, name: str, client, prior) -> tuple[float, np.ndarray]:
    from cryolike_dask.grids import DisplacementGrid
    from cryolike_dask.io.sources import ZarrImages, ZarrTemplates
    from cryolike_dask.io.zarr_stores import ResultsStore
    from cryolike_dask.pipeline import LikelihoodRun, execute
    from cryolike_dask.pipeline.spec import OutputRequest

    grid = DisplacementGrid.from_search(8, 16, 16, params.pixel_size[0])
    if prior is not None:
        grid = prior.restrict(grid)
    run = LikelihoodRun(
        ZarrTemplates.open(folder / "templates.zarr"),
        ZarrImages.open(folder / "particles.zarr"),
        folder / name,
        (0,),
        grid,
        OutputRequest(pose_prior=prior is not None),
        pose_prior=prior,
        export_pt=False,
    )
    t0 = time.perf_counter()
    execute(run, client, progress=False)
    seconds = time.perf_counter() - t0
    g = ResultsStore.open(folder / name / "results.zarr", mode="r").group
    n = g["evaluated_poses"][0] if "evaluated_poses" in g else None
    return seconds, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster

    from cryolike_dask.pipeline.pose_search import PosePriorSpec

    folder = Path(tempfile.mkdtemp(prefix="pose_search_"))
    try:
        params = make_inputs(folder, args.images)
        with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cl:
            with Client(cl) as client:
                local_spec = PosePriorSpec(
                    "window",
                    half_width=math.radians(10),
                    shift_radius=2 * params.pixel_size[0],
                    use_origin=True,
                )
                # global first: the worker's first run pays its imports and caches
                t_global, _ = run_once(folder, params, "global", client, None)
                t_local, n_local = run_once(folder, params, "local", client, local_spec)
        n_s = params.viewing_angles.n_angles
        n_global = n_s * 257 * params.n_inplanes
        frac = float(np.mean(n_local)) / n_global
        out = {
            "images": args.images,
            "global_seconds": round(t_global, 2),
            "local_seconds": round(t_local, 2),
            "speedup": round(t_global / t_local, 2),
            "global_poses_per_image": n_global,
            "local_poses_per_image_mean": float(np.mean(n_local)),
            "fraction_evaluated": frac,
        }
        print(json.dumps(out, indent=1))
        print(
            f"pose search: local {t_local:.1f} s vs global {t_global:.1f} s "
            f"({t_global / t_local:.1f}×), {100 * frac:.3f}% of the pose grid evaluated"
        )
        if args.write:
            write_section(
                "pose-search",
                "\n".join(
                    [
                        f"128 px (N = 129, W = 256, S = {n_s}), D = 257 (16 × 16 up to 8 px), "
                        f"{args.images} images with random prior poses (sorted by direction), "
                        "one local worker with 2 threads, both runs through `execute` in one "
                        "process (`python -m benchmarks.pose_search --write`).",
                        "",
                        "| search | wall s | poses per image | fraction of the grid |",
                        "|---|---:|---:|---:|",
                        f"| global | {t_global:.1f} | {n_global:,} | 1 |",
                        f"| window 10°, ±2 px residual, centred | {t_local:.1f} | "
                        f"{np.mean(n_local):,.0f} | {frac:.2e} |",
                        "",
                        f"Speed-up {t_global / t_local:.1f}×.",
                    ]
                ),
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
