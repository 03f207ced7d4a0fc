"""CPU library paths of the kernel's two big steps: GEMM and inverse real FFT.

    python -m benchmarks.cpu_paths [--displacements 25 257] [--threads 1 2] [--repeats 5]

At the kernel's own step shapes (N=129 shells, W=256 angles, Q=129 orders, 128 images per
GEMM, the templates per step that ``batch_sizes`` picks for the default 256 MiB budget) it
times, with min-of-repeats and the candidates interleaved:

* GEMM ``[Q, m, N] @ [Q, N, s·D]`` complex64: ``numpy.matmul`` (OpenBLAS) vs ``torch.matmul``
  on ``torch.from_numpy`` views (MKL), and ``backend.matmul`` (what the kernel uses);
* inverse real FFT over the order axis of the GEMM output ``[Q, m, s·D]`` → ``[m, s·D, W]``:
  ``scipy.fft.irfft`` on the transposed view, on a contiguous transposed copy (copy timed),
  ``torch.fft.irfft`` along axis 0 (result ``[W, m, s·D]``) and along the last axis of the
  transposed view, and ``backend.irfft`` (what the kernel uses).

Figures are nanoseconds per (image, template, displacement) - the unit of issue 12.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _best(fns: dict, repeats: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for f in fns.values():  # warm-up (plans, thread pools)
        f()
    for _ in range(repeats):
        for k, f in fns.items():  # interleaved A/B
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def measure(n_d: int, threads: int, repeats: int) -> list[tuple[str, str, float]]:
    import scipy.fft
    import torch
    from threadpoolctl import threadpool_limits

    from cryolike_dask.kernels import backend

    q, n, w, m = 129, 129, 256, 128
    real = 4
    per_pair = n_d * (q * 2 * real + w * real)
    s = max(1, min(239, (256 * 2**20) // (per_pair * m)))
    cols = s * n_d
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((q, m, n)) + 1j * rng.standard_normal((q, m, n))).astype(np.complex64)
    b = (rng.standard_normal((q, n, cols)) + 1j * rng.standard_normal((q, n, cols))).astype(
        np.complex64
    )
    out = np.empty((q, m, cols), np.complex64)
    units = m * cols  # (image, template, displacement) triples per step
    rows = []
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
            g = _best(
                {
                    "numpy.matmul (OpenBLAS)": lambda: np.matmul(a, b, out=out),
                    "torch.matmul (MKL, from_numpy)": lambda: torch.matmul(ta, tb, out=tout),
                    "backend.matmul (kernel)": lambda: backend.matmul(np, a, b, workers=threads),
                },
                repeats,
            )
            rows += [("GEMM", k, v / units * 1e9) for k, v in g.items()]
            xq = out
            txq = torch.from_numpy(xq)
            f = _best(
                {
                    "scipy irfft, transposed view": lambda: scipy.fft.irfft(
                        xq.transpose(1, 2, 0), n=w, axis=-1, norm="forward", workers=threads
                    ),
                    "scipy irfft, contiguous copy": lambda: scipy.fft.irfft(
                        np.ascontiguousarray(xq.transpose(1, 2, 0)),
                        n=w,
                        axis=-1,
                        norm="forward",
                        workers=threads,
                        overwrite_x=True,
                    ),
                    "scipy irfft, axis 0": lambda: scipy.fft.irfft(
                        xq, n=w, axis=0, norm="forward", workers=threads
                    ),
                    "torch irfft, axis 0": lambda: torch.fft.irfft(txq, n=w, dim=0, norm="forward"),
                    "torch irfft, last axis of view": lambda: torch.fft.irfft(
                        txq.permute(1, 2, 0), n=w, dim=-1, norm="forward"
                    ),
                    "backend.irfft (kernel)": lambda: backend.irfft(
                        np, xq.transpose(1, 2, 0), w, axis=-1, workers=threads
                    ),
                },
                repeats,
            )
            rows += [("irfft", k, v / units * 1e9) for k, v in f.items()]
    finally:
        torch.set_num_threads(old)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--displacements", type=int, nargs="+", default=[25, 257])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--kernel",
        action="store_true",
        help="time prepare_templates/correlate_block with torch on and off instead",
    )
    ap.add_argument("--templates", type=int, default=24)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args(argv)
    if args.kernel:
        print("| D | case | path | threads | time (s) | pose evaluations/s |")
        print("|---|---|---|---|---|---|")
        for n_d in args.displacements:
            side = round(n_d**0.5)  # D = side² (257 → a 16 × 16 grid, 256 displacements)
            for t in args.threads:
                rows = kernel_ab(side, args.templates, args.images, args.repeats, t)
                for case, path, sec, rate in rows:
                    print(f"| {side * side} | {case} | {path} | {t} | {sec:.3f} | {rate:.3g} |")
                    # (prepare_templates: rate = the block's poses over the preparation time)
        return 0
    print("| step | D | path | " + " | ".join(f"{t} thr (ns)" for t in args.threads) + " |")
    print("|---|---|---|" + "---|" * len(args.threads))
    for n_d in args.displacements:
        table: dict[tuple[str, str], list[float]] = {}
        for t in args.threads:
            for step, name, ns in measure(n_d, t, args.repeats):
                table.setdefault((step, name), []).append(ns)
        for (step, name), vals in table.items():
            print(f"| {step} | {n_d} | {name} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
    return 0


def kernel_ab(n_side: int, n_templates: int, n_images: int, repeats: int, threads: int) -> list:
    """``prepare_templates`` and ``correlate_block`` with torch routing on and off (interleaved).

    128 px grid (N=129, W=256), ``D = n_side²``; anisotropic and isotropic CTFs; best pose
    only and with the integrated likelihood. Returns rows ``(case, path, seconds, poses/s)``.
    """
    from benchmarks.problems import PROBLEMS, hermitian
    from cryolike_dask.grids import DisplacementGrid
    from cryolike_dask.kernels import (
        BlockOutputs,
        LikelihoodConstants,
        backend,
        correlate_block,
        ctf_polar,
        prepare_images,
        prepare_templates,
        translation_kernel,
    )

    grid = PROBLEMS["realistic"].grid
    disp = DisplacementGrid.from_search(2.0, n_side, n_side, 1.0)
    rng = np.random.default_rng(0)
    t = hermitian(rng, n_templates, grid.n_shells, grid.n_inplanes)
    y = hermitian(rng, n_images, grid.n_shells, grid.n_inplanes)
    m = n_images
    ctf_args = dict(
        voltage_kv=300, spherical_aberration_mm=2.7, amplitude_contrast=0.1,
        radii=grid.radii, theta=grid.theta, box_size=128.0,
    )  # fmt: skip
    du = rng.uniform(8e3, 2e4, m)
    aniso = ctf_polar(du, rng.uniform(8e3, 2e4, m), rng.uniform(0, 3, m), np.zeros(m), **ctf_args)
    iso = ctf_polar(du, du, np.zeros(m), np.zeros(m), anisotropic=False, **ctf_args)
    k = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, 128.0, np.complex64)
    lc = LikelihoodConstants.for_grid(grid, 128)
    poses = float(m) * n_templates * disp.n_displacements * grid.n_inplanes
    cases = {
        "prepare_templates": lambda: prepare_templates(t, k, grid, workers=threads),
    }
    pt = prepare_templates(t, k, grid, workers=threads)
    pis = {
        "aniso": prepare_images(y, aniso.astype(np.float32), grid, workers=threads),
        "iso": prepare_images(y, iso.astype(np.float32), grid, workers=threads),
    }
    for name, pi in pis.items():
        cases[f"best pose, {name} CTF"] = lambda pi=pi: correlate_block(
            pt, pi, BlockOutputs(), workers=threads
        )
        cases[f"integrated LL, {name} CTF"] = lambda pi=pi: correlate_block(
            pt, pi, BlockOutputs(integrated_likelihood=True), likelihood=lc, workers=threads
        )
    best: dict = {}
    routed = hasattr(backend, "USE_TORCH")  # False on a checkout from before torch routing
    for _ in range(repeats):
        for use in (False, True) if routed else (None,):
            if routed:
                backend.USE_TORCH = use
            for name, f in cases.items():
                t0 = time.perf_counter()
                f()
                key = (name, {True: "torch", False: "numpy/scipy", None: "before"}[use])
                best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
    if routed:
        backend.USE_TORCH = True
    return [(c, path, sec, poses / sec) for (c, path), sec in sorted(best.items())]


if __name__ == "__main__":
    raise SystemExit(main())
