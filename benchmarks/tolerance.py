"""The bounded-error compressed kernel against the exact one, on templates of a real map.

    python -m benchmarks.tolerance [--tolerances 1e-4 1e-3] [--displacements 25 257]
                                   [--templates 96] [--images 256] [--pixels 128]
                                   [--repeats 3] [--workers 2]

Templates of ``tests/data/real/emd_1832.map`` on the 128-pixel grid (N = 129 shells,
W = 256 rotations), single precision; images made from displaced, rotated templates with
astigmatic CTFs and white noise (pixel SNR 0.1). For the exact kernel and each tolerance:
template preparation time, kernel time with the integrated likelihood (best of
``--repeats``), the GEMM work kept, the bound and the exact fallbacks, the largest measured
``|Δcc|`` (full tensor on the first ``--full-images`` images), the fraction of images whose
optimal pose is the exact one, and ``|ΔLL|`` of the integrated log-likelihood.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.problems import best_time
from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.io.mrc import read_volume
from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    correlate_block,
    ctf_polar,
    prepare_images,
    prepare_templates,
    translation_kernel,
)
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.preprocess.templates import normalize_templates, templates_from_volume

MAP = Path(__file__).resolve().parents[1] / "tests" / "data" / "real" / "emd_1832.map"

#: (max displacement in pixels, points per axis) of each displacement count.
SEARCHES = {25: (2.0, 5), 257: (8.0, 16)}


def _hermitian_noise(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    half = shape[2] // 2
    f = np.empty(shape, np.complex128)
    f[..., :half] = rng.standard_normal((*shape[:2], half)) + 1j * rng.standard_normal(
        (*shape[:2], half)
    )
    f[..., half:] = np.conj(f[..., :half])
    return f / np.sqrt(2.0)


def build(n_px: int, n_s: int, n_m: int, n_d: int):
    """Grid, templates ``[S, N, W]``, translation kernel, images and CTFs (complex64)."""
    vol = np.asarray(read_volume(str(MAP))[0], dtype=np.float64)
    params = ImageParameters.from_values(
        n_px, 5.7 * 64 / n_px, n_inplanes=2 * n_px, viewing_distance=8 / (4 * np.pi)
    )
    grid, angles = params.polar_grid, params.viewing_angles
    rng = np.random.default_rng(0)
    idx = rng.choice(angles.n_angles, min(n_s, angles.n_angles), replace=False)
    sub = ViewingAngles(
        angles.azimus[idx], angles.polars[idx], angles.gammas[idx], angles.weights[idx]
    )
    t = normalize_templates(templates_from_volume(vol, sub, grid), grid)
    box = float(params.box_size[0])
    dmax, side = SEARCHES[n_d]
    disp = DisplacementGrid.from_search(dmax, side, side, float(params.pixel_size[0]))
    kernel = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, box)
    u = rng.uniform(8e3, 2e4, n_m)
    ctf = ctf_polar(
        u,
        u * rng.uniform(0.9, 1.0, n_m),
        rng.uniform(0, np.pi, n_m),
        np.zeros(n_m),
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=box,
    ).astype(np.float32)
    s_true = rng.integers(0, t.shape[0], n_m)
    d_true = rng.integers(0, kernel.shape[0], n_m)
    w_true = rng.integers(0, grid.n_inplanes, n_m)
    clean = np.stack(
        [
            np.roll(t[s] * kernel[d], w, axis=-1) * ctf[m]
            for m, (s, d, w) in enumerate(zip(s_true, d_true, w_true, strict=True))
        ]
    )
    rms = float(np.sqrt(np.mean(np.abs(clean) ** 2)))
    y = clean + np.sqrt(10.0) * rms * _hermitian_noise(rng, clean.shape)
    return grid, t.astype(np.complex64), kernel.astype(np.complex64), y.astype(np.complex64), ctf


def run(n_d: int, args: argparse.Namespace) -> None:
    grid, t, kernel, y, ctf = build(args.pixels, args.templates, args.images, n_d)
    w = args.workers
    n_s = t.shape[0]
    consts = LikelihoodConstants.for_grid(grid, args.pixels**2)
    log_prior = np.full(n_s, -np.log(n_s))
    pi = prepare_images(y, ctf, grid, workers=w)
    pi_full = prepare_images(y[: args.full_images], ctf[: args.full_images], grid, workers=w)
    out = BlockOutputs(integrated_likelihood=True)
    print(
        f"\nD = {n_d}: S = {n_s} templates, M = {y.shape[0]} images, N = {grid.n_shells}, "
        f"W = {grid.n_inplanes}"
    )

    def correlate(pt):
        return correlate_block(pt, pi, out, likelihood=consts, log_prior=log_prior, workers=w)

    prep_s, pe = best_time(lambda: prepare_templates(t, kernel, grid, workers=w), 1)
    kern_s, ref = best_time(lambda: correlate(pe), args.repeats)
    full_ref = correlate_block(pe, pi_full, BlockOutputs(full=True), workers=w)
    print(
        f"  exact      prep {prep_s:7.2f} s  kernel {kern_s:7.2f} s  total {prep_s + kern_s:7.2f} s"
    )
    for tol in args.tolerances:
        prep_c, pc = best_time(
            lambda tol=tol: prepare_templates(t, kernel, grid, workers=w, tolerance=tol), 1
        )
        kern_c, res = best_time(lambda pc=pc: correlate(pc), args.repeats)
        full = correlate_block(pc, pi_full, BlockOutputs(full=True), workers=w)
        st = res.compression
        dcc = float(np.abs(full.cross_correlation_msdw - full_ref.cross_correlation_msdw).max())
        same = float(np.mean(res.best_pose == ref.best_pose))
        dll_ms = float(np.abs(res.log_likelihood_ms - ref.log_likelihood_ms).max())
        dll = float(np.abs(res.log_likelihood_sum - ref.log_likelihood_sum).max())
        ranks = pc.compressed.ranks
        print(
            f"  tol {tol:6.0e} prep {prep_c:7.2f} s  kernel {kern_c:7.2f} s  total "
            f"{prep_c + kern_c:7.2f} s  speed-up kernel {kern_s / kern_c:4.2f}x, incl. prep "
            f"{(prep_s + kern_s) / (prep_c + kern_c):4.2f}x"
        )
        print(
            f"             work kept {st.work_fraction:.3f}  mean rank {ranks.mean():.1f} of "
            f"{grid.n_shells} (q = 0: {ranks[0]}, q = W/2: {ranks[-1]})  bytes "
            f"{pc.nbytes / pe.nbytes:.2f} of exact"
        )
        print(
            f"             max bound {st.max_bound:.2e} (before fallback "
            f"{st.max_bound_before_fallback:.2e})  fallback pairs {st.fallback_pairs} of "
            f"{st.pairs}  max |dcc| measured {dcc:.2e} ({args.full_images} images)"
        )
        print(
            f"             same optimal pose {same:.4f}  max |dLL| per pair {dll_ms:.2e}, per "
            f"image {dll:.2e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1e-4, 1e-3])
    ap.add_argument("--displacements", type=int, nargs="+", default=[25, 257])
    ap.add_argument("--templates", type=int, default=96)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--full-images", type=int, default=8)
    ap.add_argument("--pixels", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    for n_d in args.displacements:
        run(n_d, args)


if __name__ == "__main__":
    main()
