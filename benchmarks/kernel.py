"""Kernel benchmark: ours vs CryoLike's algorithm vs the machine's GEMM peak.

    python -m benchmarks.kernel [--sizes small realistic] [--repeats 2] [--write]

Each method runs in a fresh process (so peak memory is its own) on the same data:

* ``baseline`` - CryoLike's comparator algorithm in torch (``benchmarks/baseline.py``);
* ``ours`` - ``prepare_templates`` + ``prepare_images`` + ``correlate_block`` (best pose per
  image), as one worker runs them, with every core for BLAS and FFTs;
* ``gemm`` - a complex64 batched matrix product of the contraction's shape
  ``[Q, m, N] @ [Q, N, s·D]`` through NumPy/OpenBLAS and torch/MKL: the faster is the
  machine's practical peak for the work that dominates.

Figures: pose evaluations per second (``M·S·D·W / s``), contraction GFLOP/s (our
``8·M·S·D·N·(W/2+1)`` flops over the whole time - the fraction of the peak the kernel keeps),
ratios, and peak RSS. ``--write`` rewrites the kernel section of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.problems import PROBLEMS, Problem, data

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "cryolike_dask_bench"


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def contraction_flops(p: Problem) -> float:
    g = p.grid
    return (
        8.0
        * p.n_images
        * p.n_templates
        * p.displacements.n_displacements
        * g.n_shells
        * (g.n_inplanes // 2 + 1)
    )


def run_ours(p: Problem, repeats: int) -> dict:
    from cryolike_dask.kernels import (
        BlockOutputs,
        correlate_block,
        prepare_images,
        prepare_templates,
    )

    d = data(p, CACHE)
    grid = p.grid
    workers = _threads()
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        pt = prepare_templates(
            np.asarray(d["templates"]), np.asarray(d["kernel"]), grid, workers=workers
        )
        block = 256
        scores, poses = [], []
        for m0 in range(0, p.n_images, block):
            m1 = min(p.n_images, m0 + block)
            pi = prepare_images(
                np.asarray(d["images"][m0:m1]), np.asarray(d["ctf"][m0:m1]), grid, workers=workers
            )
            r = correlate_block(pt, pi, BlockOutputs(), workers=workers)
            scores.append(r.best_cross_correlation)
            poses.append(r.best_pose)
        best = min(best, time.perf_counter() - t0)
        out = (np.concatenate(scores), np.concatenate(poses))
        del pt
    np.save(CACHE / f"{p.name}_ours_scores.npy", out[0])
    np.save(CACHE / f"{p.name}_ours_poses.npy", out[1])
    return {"seconds": best}


def run_baseline(p: Problem, repeats: int) -> dict:
    import torch

    from benchmarks.baseline import cryolike_best_pose

    torch.set_num_threads(_threads())
    d = data(p, CACHE)
    grid = p.grid
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores, poses = cryolike_best_pose(
            np.asarray(d["templates"]),
            np.asarray(d["images"]),
            np.asarray(d["ctf"]),
            np.asarray(d["kernel"]),
            grid.shell_integration_weights,
        )
        best = min(best, time.perf_counter() - t0)
    ours_s = np.load(CACHE / f"{p.name}_ours_scores.npy")
    ours_p = np.load(CACHE / f"{p.name}_ours_poses.npy")
    return {
        "seconds": best,
        "max_score_difference": float(np.abs(ours_s - scores).max()),
        "same_pose_fraction": float(np.mean(ours_p == poses)),
    }


def run_gemm(p: Problem, repeats: int) -> dict:
    g = p.grid
    q, n = g.n_inplanes // 2 + 1, g.n_shells
    m, cols = 128, 40 * p.displacements.n_displacements
    rng = np.random.default_rng(1)
    a = (rng.random((q, m, n)) + 1j * rng.random((q, m, n))).astype(np.complex64)
    b = (rng.random((q, n, cols)) + 1j * rng.random((q, n, cols))).astype(np.complex64)
    import torch

    torch.set_num_threads(_threads())
    out = np.empty((q, m, cols), np.complex64)
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    paths = {
        "numpy": lambda: np.matmul(a, b, out=out),  # OpenBLAS
        "torch": lambda: torch.matmul(ta, tb, out=tout),  # MKL, what the kernel uses
    }
    best = {k: float("inf") for k in paths}
    for f in paths.values():
        f()
    for _ in range(max(3, repeats)):
        for k, f in paths.items():  # interleaved
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    rate = {k: 8.0 * q * m * n * cols / v / 1e9 for k, v in best.items()}
    return {
        "gflops": max(rate.values()),  # the peak: the faster library
        "gflops_numpy": rate["numpy"],
        "gflops_torch": rate["torch"],
        "shape": f"[{q},{m},{n}]@[{q},{n},{cols}]",
    }


def child(method: str, size: str, repeats: int) -> None:
    p = PROBLEMS[size]
    result = {"ours": run_ours, "baseline": run_baseline, "gemm": run_gemm}[method](p, repeats)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(method: str, size: str, repeats: int) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.kernel",
            "--child",
            method,
            "--sizes",
            size,
            "--repeats",
            str(repeats),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {size} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (
        "| problem | method | time (s) | pose evaluations/s | contraction GFLOP/s | "
        "vs baseline | vs GEMM peak | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['seconds']:.2f} | {r['poses_per_s']:.3g} | "
            f"{r['gflops']:.1f} | {r['speedup']:.2f}× | {r['of_peak']:.0%} | {r['rss']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["small", "realistic"], choices=list(PROBLEMS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.sizes[0], args.repeats)
        return 0
    rows, notes = [], []
    for size in args.sizes:
        p = PROBLEMS[size]
        data(p, CACHE)  # make the inputs once, outside the timed processes
        ours = measure("ours", size, args.repeats)
        base = measure("baseline", size, args.repeats)
        gemm = measure("gemm", size, args.repeats)
        flops = contraction_flops(p)
        for name, r in (("CryoLike algorithm (torch)", base), ("cryolike_dask kernel", ours)):
            rows.append(
                {
                    "problem": p.describe(),
                    "method": name,
                    "seconds": r["seconds"],
                    "poses_per_s": p.pose_evaluations / r["seconds"],
                    "gflops": flops / r["seconds"] / 1e9,
                    "speedup": base["seconds"] / r["seconds"],
                    "of_peak": flops / r["seconds"] / 1e9 / gemm["gflops"],
                    "rss": r["peak_rss_mib"],
                }
            )
        notes.append(
            f"- {size}: GEMM peak {gemm['gflops']:.1f} GFLOP/s ({gemm['shape']}; NumPy/OpenBLAS "
            f"{gemm['gflops_numpy']:.1f}, torch/MKL {gemm['gflops_torch']:.1f}); "
            f"ours vs baseline: best scores differ by ≤ {base['max_score_difference']:.1e}, "
            f"same pose for {base['same_pose_fraction']:.1%} of images"
        )
        print(table(rows))
    text = table(rows) + "\n\n" + "\n".join(notes)
    print()
    print("\n".join(notes))
    if args.write:
        write_section("kernel", text)
    return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {_threads()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def write_section(name: str, body: str) -> None:
    """Replace the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    path = ROOT / "docs" / "performance.md"
    text = path.read_text() if path.exists() else "# Performance\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = f"_Measured {time.strftime('%Y-%m-%d')} on {machine()}._\n\n"
    block = f"{start}\n{stamp}{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
