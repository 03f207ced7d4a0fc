"""Cost of the integrated likelihood in the block kernel, and where the time goes.

    python -m benchmarks.integrated [--displacements 25 257] [--images 128] [--templates 16]
                                    [--repeats 5] [--workers 2] [--cpu-time]

One image block × one template block on the 128-pixel grid (N = 129 shells, W = 256
rotations), single precision, isotropic CTF. Times ``correlate_block`` best-pose only and
with ``integrated_likelihood`` (min of ``--repeats``; the spread is printed as noise), then
the steps of one internal batch: the GEMM, the inverse FFT, the best-pose reduction and the
integrated log-likelihood.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.problems import hermitian
from cryolike_dask.grids import DisplacementGrid, PolarGrid
from cryolike_dask.kernels import (
    BlockOutputs,
    correlate_block,
    prepare_images,
    prepare_templates,
    translation_kernel,
)
from cryolike_dask.kernels import cross_correlation as cc_mod
from cryolike_dask.kernels.backend import irfft, matmul
from cryolike_dask.kernels.likelihood import LikelihoodConstants

N_PIXELS = 128


#: Clock of the timings: wall time, or this process's CPU time (``--cpu-time``: with one
#: thread it ignores other processes on a shared machine, except their cache and memory use).
CLOCK = [time.perf_counter]


def _timeit(f, repeats: int) -> tuple[float, float]:
    """``(min, median)`` seconds of ``repeats`` calls after one warm-up call."""
    clock = CLOCK[0]
    f()
    t = []
    for _ in range(repeats):
        t0 = clock()
        f()
        t.append(clock() - t0)
    return min(t), float(np.median(t))


def setup(n_d: int, n_m: int, n_s: int, workers: int):
    grid = PolarGrid.from_image_size(N_PIXELS)
    side = round(n_d**0.5)
    disp = DisplacementGrid.from_search(2.0, side, side, 1.0)
    rng = np.random.default_rng(0)
    t = hermitian(rng, n_s, grid.n_shells, grid.n_inplanes)
    y = hermitian(rng, n_m, grid.n_shells, grid.n_inplanes)
    ctf = rng.uniform(0.2, 1.0, (n_m, grid.n_shells, 1)).astype(np.float32)
    k = translation_kernel(
        grid.x_points, grid.y_points, disp.x, disp.y, float(N_PIXELS), np.complex64
    )
    pt = prepare_templates(t, k, grid, workers=workers)
    pi = prepare_images(y, ctf, grid, workers=workers)
    consts = LikelihoodConstants.for_grid(grid, N_PIXELS**2)
    return grid, pt, pi, consts


def run(n_d: int, n_m: int, n_s: int, repeats: int, workers: int) -> dict:
    grid, pt, pi, consts = setup(n_d, n_m, n_s, workers)
    n_w = grid.n_inplanes
    d_true = pt.n_displacements
    out: dict = {"D": d_true, "M": n_m, "S": n_s}
    base = BlockOutputs()
    integ = BlockOutputs(integrated_likelihood=True)
    times = {}
    for _ in range(2):  # interleaved, twice, against a busy neighbour
        for name, o in (("optimal", base), ("integrated", integ)):
            r = _timeit(
                lambda o=o: correlate_block(pt, pi, o, likelihood=consts, workers=workers),
                repeats,
            )
            old = times.get(name, (np.inf, np.inf))
            times[name] = (min(old[0], r[0]), min(old[1], r[1]))
    out["optimal_s"], out["optimal_median_s"] = times["optimal"]
    out["integrated_s"], out["integrated_median_s"] = times["integrated"]
    out["ratio"] = out["integrated_s"] / out["optimal_s"]

    # breakdown of one internal batch of the integrated run
    m_step, s_step = cc_mod.batch_sizes(pt, n_m, integ, cc_mod.DEFAULT_WORK_BYTES)
    m_step_o, s_step_o = cc_mod.batch_sizes(pt, n_m, base, cc_mod.DEFAULT_WORK_BYTES)
    out["batch_integrated"] = (m_step, s_step)
    out["batch_optimal"] = (m_step_o, s_step_o)
    n_q = pt.spectrum.shape[0]
    spec = pt.spectrum.reshape(n_q, pt.n_shells, n_s, d_true)
    b = np.ascontiguousarray(spec[:, :, :s_step, :]).reshape(n_q, pt.n_shells, s_step * d_true)
    a = pi.spectrum[:, :m_step, :]
    xq = matmul(np, a, b, workers=workers)
    x = np.empty((m_step, s_step * d_true, n_w), np.float32)
    steps = {
        "gemm": lambda: matmul(np, a, b, out=xq, workers=workers),
        "irfft": lambda: irfft(np, xq.transpose(1, 2, 0), n_w, axis=-1, out=x, workers=workers),
    }
    x4 = x.reshape(m_step, s_step, d_true, n_w)
    nq = matmul(np, pi.ctf_power_spectrum[:, :m_step, :], pt.power_spectrum, workers=workers)
    ixx = irfft(np, nq.transpose(1, 2, 0), n_w, axis=-1).astype(np.float32)[:, :s_step]
    iyy = pi.norms[:m_step].astype(np.float32)
    isx = (pi.ctf[:m_step].astype(np.complex64) @ pt.mask_weighted[:s_step].T).astype(np.complex64)
    isy = pi.mask_overlap[:m_step]

    def argmax_step():
        flat = x4.reshape(m_step, s_step, -1)
        arg = np.argmax(flat, axis=-1)
        np.take_along_axis(flat, arg[..., None], axis=-1)

    steps["argmax"] = argmax_step
    steps["ll_chain"] = lambda: cc_mod._integrated_log_likelihood(
        x4, ixx, iyy, isx, isy, consts, np
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_norm = 1.0 / np.sqrt(ixx * iyy[:, None, None])
    factors = cc_mod._likelihood_factors(ixx, iyy, isx, isy, consts)

    def host(factors, argmax):
        return lambda: cc_mod._host_reduce(
            x4, factors, consts, inv_norm, argmax=argmax, workers=workers
        )

    steps["host_argmax"] = host(None, "raw")
    steps["host_ll"] = host(factors, None)
    steps["host_ll_argmax"] = host(factors, "raw")
    pairs = m_step * s_step
    for k, f in steps.items():
        lo, med = _timeit(f, repeats)
        out[f"{k}_ms_per_batch"] = lo * 1e3
        out[f"{k}_median_ms"] = med * 1e3
        out[f"{k}_us_per_pair"] = lo * 1e6 / pairs
    return out


steps_order = ("gemm", "irfft", "argmax", "ll_chain", "host_argmax", "host_ll", "host_ll_argmax")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--displacements", type=int, nargs="+", default=[25, 257])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--templates", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="time CPU, not wall (use -w 1)")
    args = ap.parse_args(argv)
    if args.cpu_time:
        CLOCK[0] = time.process_time
    for n_d in args.displacements:
        r = run(n_d, args.images, args.templates, args.repeats, args.workers)
        print(
            f"D={r['D']} M={r['M']} S={r['S']}: optimal {r['optimal_s']:.3f} s "
            f"(median {r['optimal_median_s']:.3f}), integrated {r['integrated_s']:.3f} s "
            f"(median {r['integrated_median_s']:.3f}), ratio {r['ratio']:.2f}"
        )
        print(f"  batch (m, s): integrated {r['batch_integrated']}, optimal {r['batch_optimal']}")
        for k in steps_order:
            if f"{k}_ms_per_batch" in r:
                print(
                    f"  {k:16s} {r[f'{k}_ms_per_batch']:8.2f} ms/batch "
                    f"(median {r[f'{k}_median_ms']:8.2f}), {r[f'{k}_us_per_pair']:7.1f} us/pair"
                )


if __name__ == "__main__":
    main()
