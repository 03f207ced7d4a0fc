"""``cryolike-dask reweight``: its argument parser and command (registered by
:func:`cryolike_dask.cli.build_parser` through :func:`add_reweight_parser`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryolike_dask.io.reweight_files import ReweightError


def _truth(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=WEIGHT") from None


def add_reweight_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``reweight`` subcommand to ``sub`` (every option with help)."""
    p = sub.add_parser(
        "reweight",
        help="ensemble weights of the structures, with uncertainty, from likelihoods",
        description="Each image is a mixture over structures, p(y_i) = Σ_k w_k L_ik, with a "
        "Dirichlet prior on the weights (cryoER's reweighting factors with --prior-counts). "
        "EM finds the MAP/maximum-likelihood weights (stopped on a Frank–Wolfe certificate), a "
        "Gibbs sampler draws exact posterior samples (R-hat, ESS), plus a Laplace "
        "approximation, an optional bootstrap and K-fold held-out log predictive density. "
        "Writes weights.csv, intervals.csv, summary.json, posterior_samples.npz, "
        "responsibilities.zarr, cryoER's reweighting_factor.txt/reweighted_prob.txt, "
        "per-structure STAR subsets and plots into DIR (docs/reweight.md).",
    )
    p.add_argument(
        "source",
        nargs="+",
        type=Path,
        metavar="SOURCE",
        help="a likelihood output folder (or several, joined along structures), a "
        "results.zarr or matrices.zarr, or a .npy/.pt/.txt/.csv matrix",
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output folder")
    g = p.add_argument_group("input")
    g.add_argument(
        "--layout",
        choices=["images-by-structures", "structures-by-images"],
        help="orientation of a plain matrix file: rows are images, or rows are structures "
        "(required unless the file states it)",
    )
    g.add_argument(
        "--kind",
        choices=["loglik", "negloglik"],
        default="loglik",
        help="the values are log-likelihoods (default) or negative log-likelihoods, in nats",
    )
    g.add_argument(
        "--matrix",
        choices=["integrated", "optimal"],
        default="integrated",
        help="which likelihood of a likelihood folder: integrated over poses (default) or at "
        "the optimal pose",
    )
    g.add_argument(
        "--structures",
        nargs="+",
        metavar="NAME",
        help="use only these structures (names or 0-based indices), in this order",
    )
    g.add_argument(
        "--structure-names", nargs="+", metavar="NAME", help="names for the matrix's structures"
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="Dirichlet concentration of the weights / reweighting factors (1: uniform; "
        "< 1: the point estimate is the maximum likelihood)",
    )
    m.add_argument(
        "--prior-counts",
        nargs="+",
        metavar="N",
        help="cryoER's prior counts per structure (e.g. MD cluster sizes): numbers, or one "
        "file (.txt one per line, .npy, .csv NAME,COUNT)",
    )
    m.add_argument(
        "--none-column",
        metavar="NAME|INDEX|FILE",
        help="a 'none of these' component: a structure of the source (e.g. a noise model) or "
        "a file with one log-likelihood per image (in --kind)",
    )
    m.add_argument("--none-alpha", type=float, help="concentration of the none component (alpha)")
    m.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="power likelihood: use loglik / T (T > 1 widens the posterior for an overconfident "
        "likelihood; estimate T from labelled simulations, see docs/reweight.md) (1)",
    )
    m.add_argument(
        "--none-prior-count", type=float, help="prior count of the none component (mean count)"
    )
    i = p.add_argument_group("inference")
    i.add_argument("--chains", type=int, default=4, help="Gibbs chains (4)")
    i.add_argument("--samples", type=int, default=500, help="draws kept per chain (500)")
    i.add_argument("--warmup", type=int, default=200, help="draws discarded per chain (200)")
    i.add_argument("--thin", type=int, default=1, help="keep every THIN-th draw (1)")
    i.add_argument("--seed", type=int, default=0, help="random seed (0)")
    i.add_argument(
        "--no-laplace", action="store_true", help="do not report the Laplace approximation"
    )
    i.add_argument(
        "--no-laplace-moves",
        action="store_true",
        help="pure Gibbs sampling (no independence moves from the Laplace approximation)",
    )
    i.add_argument(
        "--bootstrap", type=int, default=0, metavar="B", help="bootstrap replicates (0: none)"
    )
    i.add_argument(
        "--folds", type=int, default=5, metavar="F", help="cross-validation folds (5; 0: none)"
    )
    i.add_argument(
        "--tolerance", type=float, default=1e-8, help="EM's Frank–Wolfe gap tolerance (1e-8)"
    )
    i.add_argument("--max-iterations", type=int, default=100_000, help="most EM passes (100000)")
    i.add_argument(
        "--device", choices=["cpu", "gpu"], default="cpu", help="NumPy (cpu) or CuPy (gpu)"
    )
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--star",
        type=Path,
        metavar="FILE",
        help="STAR file to split per structure (default: the particles' own STAR, if known)",
    )
    o.add_argument(
        "--star-min-responsibility",
        type=float,
        default=0.0,
        metavar="R",
        help="a particle goes into its structure's STAR subset only with responsibility ≥ R",
    )
    o.add_argument("--no-plots", action="store_true", help="no PNG plots")
    o.add_argument(
        "--truth",
        nargs="+",
        type=_truth,
        metavar="NAME=W",
        help="true weights (synthetic data), reported against the intervals",
    )
    o.add_argument("--overwrite", action="store_true", help="replace existing reweight outputs")
    p.set_defaults(func=cmd_reweight)
    return p


def _prior_counts(values: list[str] | None) -> Any:
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).suffix:
        return Path(values[0])
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ReweightError(
            f"--prior-counts {' '.join(values)}: expected numbers or one file"
        ) from None


def cmd_reweight(args: argparse.Namespace) -> int:
    """Run ``reweight`` from parsed arguments and print a short summary; returns 0."""
    from cryolike_dask._reweight import make_options, reweight_with_options

    def maybe_int(v: str) -> str | int:
        return int(v) if v.lstrip("-").isdigit() else v

    options = make_options(
        layout=args.layout,
        kind=args.kind,
        matrix=args.matrix,
        structures=[maybe_int(s) for s in args.structures] if args.structures else None,
        structure_names=args.structure_names,
        alpha=args.alpha,
        prior_counts=_prior_counts(args.prior_counts),
        none_column=maybe_int(args.none_column) if args.none_column is not None else None,
        none_alpha=args.none_alpha,
        none_prior_count=args.none_prior_count,
        temperature=args.temperature,
        chains=args.chains,
        samples=args.samples,
        warmup=args.warmup,
        thin=args.thin,
        seed=args.seed,
        laplace=not args.no_laplace,
        laplace_moves=not args.no_laplace_moves,
        bootstrap=args.bootstrap,
        folds=args.folds,
        tolerance=args.tolerance,
        max_iterations=args.max_iterations,
        device=args.device,
        star=args.star,
        star_min_responsibility=args.star_min_responsibility,
        plots=not args.no_plots,
        truth=dict(args.truth) if args.truth else None,
    )
    source = args.source[0] if len(args.source) == 1 else list(args.source)
    r = reweight_with_options(source, args.output, options, overwrite=args.overwrite)
    width = max(len(c) for c in r.components)
    label = "MAP" if r.point_estimate == "map" else "ML"
    print(f"{'component':<{width}}  {label:>8}  {'mean':>8}  {'95% interval':>19}  {'R-hat':>6}")
    lo, hi = r.intervals[0.025], r.intervals[0.975]
    for j, name in enumerate(r.components):
        print(
            f"{name:<{width}}  {r.map_weights[j]:8.4f}  {r.posterior_mean[j]:8.4f}  "
            f"[{lo[j]:7.4f}, {hi[j]:7.4f}]  {r.rhat[j]:6.3f}"
        )
    print(
        f"EM: {r.iterations} passes, Frank–Wolfe gap {r.gap:.2e}; log-likelihood "
        f"{r.log_likelihood:.6g} nats; min ESS {min(r.ess_bulk.min(), r.ess_tail.min()):.0f}"
    )
    cv = r.summary.get("cross_validation")
    if cv:
        d, se = cv["difference"], cv["standard_error"]
        print(
            f"held-out log density ({cv['folds']} folds): fitted − uniform "
            f"{d['fitted_vs_uniform']:.1f} ± {se['fitted_vs_uniform'] or float('inf'):.1f}, "
            f"fitted − best single {d['fitted_vs_best_single']:.1f} ± "
            f"{se['fitted_vs_best_single'] or float('inf'):.1f} nats"
        )
    print(f"weights: {r.files['weights']}")
    print(f"summary: {r.files['summary']}")
    stars = [p for k, p in r.files.items() if k.startswith("star:")]
    if stars:
        print(f"STAR subsets: {stars[0].parent}/ ({len(stars)} files)")
    if any(k.startswith("plot:") for k in r.files):
        print(f"plots: {r.output / 'plots'}/")
    return 0


__all__ = ["add_reweight_parser", "cmd_reweight"]
