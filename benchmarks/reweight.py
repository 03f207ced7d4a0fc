"""Reweighting benchmark: EM, Gibbs, Laplace and CV on a 10⁵ images × 20 structures matrix.

    python -m benchmarks.reweight [--images 100000] [--structures 20] [--samples 500]
                                  [--chains 4] [--coverage R]

Synthetic log-likelihoods: image ``i`` comes from structure ``z_i`` (weights from a
Dirichlet(2)), ``ll_ik = s·1[k = z_i] + N(0, 1)``, in two regimes: *separated* (``s = 6``
nats: most images clearly belong to one structure) and *ambiguous* (``s = 2``). Reported:
EM's passes over the matrix and time to the Frank–Wolfe certificate (gap < 1e-8), Gibbs
iterations per second (one iteration updates all chains; draws/s = iterations/s × chains;
the plain sampler, without the Laplace moves), Laplace and 5-fold CV times, and the whole
``cd.reweight`` without plots (EM, Laplace, Gibbs with the Laplace moves, CV, outputs).
Times are the best of ``--repeats`` runs (the machine may be shared). A benchmark, not a
test: nothing asserts on the figures.

``--coverage R`` also runs R replicates of the interval-coverage study of the tests
(``tests/reweight/test_model.py``) and prints how many 95 % intervals cover the truth.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.problems import best_time


def synthetic(n: int, k: int, separation: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(ll [n, k], true weights [k])``."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(k, 2.0))
    z = rng.choice(k, size=n, p=w)
    ll = rng.normal(size=(n, k)) - 500.0
    ll[np.arange(n), z] += separation
    return ll, w


def run(n: int, k: int, chains: int, samples: int, warmup: int, repeats: int = 3) -> list[dict]:
    import warnings

    import cryolike_dask as cd
    from cryolike_dask.analysis import reweight as rw

    rows = []
    for regime, sep in (("separated", 6.0), ("ambiguous", 2.0)):
        ll, w_true = synthetic(n, k, sep)
        t_shift, (L, _) = best_time(lambda ll=ll: rw.shift_rows(ll), 3)
        t_em, fit = best_time(lambda L=L: rw.fit_weights(L), 3)
        t_gibbs, g = best_time(
            lambda L=L: rw.gibbs(L, chains=chains, samples=samples, warmup=warmup, seed=1),
            repeats,
        )
        iters = warmup + samples
        t_lap, _ = best_time(lambda L=L: rw.laplace(L))
        t_cv, _ = best_time(lambda ll=ll: rw.cross_validate(ll, 5))
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_all, r = best_time(
                lambda ll=ll, tmp=tmp: cd.reweight(
                    ll,
                    Path(tmp) / "out",
                    layout="images-by-structures",
                    chains=chains,
                    samples=samples,
                    warmup=warmup,
                    plots=False,
                    overwrite=True,
                ),
                repeats,
            )
        rows.append(
            {
                "regime": regime,
                "shift": t_shift,
                "em": t_em,
                "em_passes": fit.iterations,
                "gap": fit.gap,
                "em_error": float(np.max(np.abs(fit.weights - w_true))),
                "gibbs": t_gibbs,
                "gibbs_iterations_per_s": iters / t_gibbs,
                "gibbs_draws_per_s": iters * chains / t_gibbs,
                "moved": g.moved_fraction,
                "laplace": t_lap,
                "cv5": t_cv,
                "reweight": t_all,
                "rhat_max": float(np.max(r.rhat)),
                "ess_min": float(min(r.ess_bulk.min(), r.ess_tail.min())),
            }
        )
    return rows


def coverage(replicates: int, seed: int = 2026) -> tuple[int, int, np.ndarray]:
    """The coverage study of the tests with ``replicates`` replicates: (covered, total,
    per-component covered)."""
    from scipy import stats

    from cryolike_dask.analysis import reweight as rw

    rng = np.random.default_rng(seed)
    k, n = 3, 120
    means = np.array([0.0, 1.2, 2.4])
    truth = rng.dirichlet(np.ones(k), size=replicates)
    ll = np.empty((replicates, n, k))
    for j in range(replicates):
        z = rng.choice(k, size=n, p=truth[j])
        y = rng.normal(means[z], 1.0)
        ll[j] = stats.norm.logpdf(y[:, None] - means[None, :])
    L, _ = rw.shift_rows(ll)
    g = rw.gibbs(L, samples=1000, warmup=200, seed=5)
    lo, hi = np.quantile(g.weights, [0.025, 0.975], axis=1)
    inside = (lo <= truth) & (truth <= hi)
    return int(inside.sum()), int(inside.size), inside.sum(axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--structures", type=int, default=20)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--coverage", type=int, default=0, metavar="R")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timings are the best of this many runs (3)"
    )
    args = ap.parse_args()
    print(
        f"_Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}; "
        f"{args.images} images × {args.structures} structures, {args.chains} chains × "
        f"({args.warmup} + {args.samples}) iterations, best of {args.repeats}._\n"
    )
    print(
        "| regime | EM (s) | EM passes | gap | Gibbs (s) | Gibbs iterations/s | draws/s | "
        "Laplace (s) | 5-fold CV (s) | `cd.reweight` (s) | max R-hat | min ESS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = run(args.images, args.structures, args.chains, args.samples, args.warmup, args.repeats)
    for r in rows:
        print(
            f"| {r['regime']} | {r['em']:.3f} | {r['em_passes']} | {r['gap']:.1e} | "
            f"{r['gibbs']:.2f} | {r['gibbs_iterations_per_s']:.0f} | "
            f"{r['gibbs_draws_per_s']:.0f} | {r['laplace']:.2f} | {r['cv5']:.2f} | "
            f"{r['reweight']:.2f} | {r['rhat_max']:.4f} | {r['ess_min']:.0f} |"
        )
    if args.coverage:
        covered, total, per = coverage(args.coverage)
        print(
            f"\ncoverage: {covered}/{total} 95% intervals cover the truth "
            f"({covered / total:.1%}; per component {per.tolist()} of {args.coverage})"
        )


if __name__ == "__main__":
    main()
