"""``reweight``: ensemble weights of structures, with uncertainty, from likelihoods.

The front end of ``cryolike-dask reweight`` and of ``cd.reweight``: it reads a source
(:mod:`cryolike_dask.io.reweight_files`), runs the inference of
:mod:`cryolike_dask.analysis.reweight` and writes the outputs and plots
(``docs/reweight.md``). :class:`ReweightOptions` holds every setting, so each front end
(keyword arguments, command line, a config's ``reweight:`` section) fills it and calls
:func:`reweight_with_options`.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cryolike_dask import __version__
from cryolike_dask.analysis import mcmc
from cryolike_dask.analysis import reweight as model
from cryolike_dask.io import reweight_files as files
from cryolike_dask.io.reweight_files import ReweightError

logger = logging.getLogger(__name__)

#: the name of the "none of these" component in the outputs
NONE_NAME = "none_of_these"


class ReweightWarning(UserWarning):
    """The sampler's diagnostics are poor, or EM stopped before its certificate."""


class ReweightOptions(BaseModel):
    """Every setting of a reweighting run (the keyword arguments of :func:`reweight`).

    Input: ``layout`` (``images-by-structures`` | ``structures-by-images``; needed for plain
    matrix files), ``kind`` (``loglik`` | ``negloglik``), ``matrix`` (``integrated`` |
    ``optimal``: which likelihood of a likelihood folder), ``structures`` (keep these columns,
    names or indices), ``structure_names`` (rename the columns).

    Model: ``alpha`` (Dirichlet concentration of the reweighting factors, > 0),
    ``prior_counts`` (cryoER's cluster counts ``N_m``: one per structure, or a file),
    ``none_column`` (a "none of these" component: a structure name or index of the source,
    or a file with one log-likelihood per image), ``none_alpha`` / ``none_prior_count``
    (its concentration and prior count; default ``alpha`` and the mean prior count),
    ``temperature`` (a power likelihood: every log-likelihood is divided by ``T``; 1 = the
    likelihood as given, > 1 for an overconfident one; :func:`calibrate_temperature` estimates
    ``T`` from labelled simulated images).

    Inference: ``chains``, ``samples`` (kept per chain), ``warmup``, ``thin``, ``seed``,
    ``laplace`` (report the Laplace approximation), ``laplace_moves`` (add independence
    Metropolis–Hastings moves from it to the Gibbs sampler), ``bootstrap`` (replicates,
    0 = none), ``folds`` (K-fold CV; < 2 = none), ``tolerance`` (Frank–Wolfe gap of EM),
    ``max_iterations``, ``device`` (``cpu`` | ``gpu``: NumPy or CuPy arrays).

    Outputs: ``star`` (a STAR file to subset instead of the particles' own),
    ``star_min_responsibility``, ``plots``, ``truth`` (true weights by component name, for
    synthetic data), ``rhat_threshold`` and ``ess_threshold`` (when to warn).
    """

    model_config = ConfigDict(extra="forbid")

    layout: Literal["images-by-structures", "structures-by-images"] | None = None
    kind: Literal["loglik", "negloglik"] = "loglik"
    matrix: Literal["integrated", "optimal"] = "integrated"
    structures: list[str | int] | None = None
    structure_names: list[str] | None = None
    alpha: float = Field(1.0, gt=0)
    prior_counts: list[float] | Path | None = None
    none_column: str | int | None = None
    none_alpha: float | None = Field(None, gt=0)
    none_prior_count: float | None = Field(None, gt=0)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    chains: int = Field(4, ge=1)
    samples: int = Field(500, ge=4)
    warmup: int = Field(200, ge=0)
    thin: int = Field(1, ge=1)
    seed: int = 0
    laplace: bool = True
    laplace_moves: bool = True
    bootstrap: int = Field(0, ge=0)
    folds: int = Field(5, ge=0)
    tolerance: float = Field(1e-8, gt=0)
    max_iterations: int = Field(100_000, gt=0)
    device: Literal["cpu", "gpu"] = "cpu"
    star: Path | None = None
    star_min_responsibility: float = Field(0.0, ge=0, le=1)
    plots: bool = True
    truth: dict[str, float] | None = None
    rhat_threshold: float = Field(1.01, gt=1)
    ess_threshold: float = Field(400.0, ge=0)


@dataclass(frozen=True)
class ReweightResult:
    """What :func:`reweight` found and wrote.

    Weights are over ``components`` (the structures in input order, then
    ``none_of_these`` when that component is used); every array is host NumPy float64.

    Attributes
    ----------
    output : Path
        The output folder.
    components : list of str
        Names of the ``K`` components.
    point_estimate : str
        ``"map"`` (``alpha ≥ 1``) or ``"ml"`` (``alpha < 1``: the posterior density is
        unbounded, so ``map_weights`` holds the maximum-likelihood weights).
    map_weights : numpy.ndarray
        ``[K]``: EM's weights, certified by ``gap``.
    posterior_mean, posterior_sd : numpy.ndarray
        ``[K]`` from the Gibbs draws.
    intervals : dict
        ``{quantile: [K]}`` for 0.025, 0.05, 0.25, 0.5, 0.75, 0.95, 0.975.
    samples : numpy.ndarray
        ``[chains, draws, K]`` posterior draws.
    rhat, ess_bulk, ess_tail : numpy.ndarray
        ``[K]`` rank-normalised split-R-hat and effective sample sizes.
    log_likelihood : float
        ``Σ_i log Σ_k w_k exp(ll_ik)`` at ``map_weights``, nats.
    gap : float
        Frank–Wolfe gap at ``map_weights`` (per image, nats).
    iterations : int
        EM passes over the matrix.
    responsibilities : numpy.ndarray
        ``[n_images, K]`` at ``map_weights``.
    expected_counts, assigned_counts : numpy.ndarray
        ``[K]``: ``Σ_i r_ik`` and the number of images most responsible to each component.
    summary : dict
        What ``summary.json`` holds.
    files : dict
        ``{name: path}`` of everything written.
    warnings : list of str
        Diagnostics that were flagged.
    """

    output: Path
    components: list[str]
    point_estimate: str
    map_weights: np.ndarray
    posterior_mean: np.ndarray
    posterior_sd: np.ndarray
    intervals: dict[float, np.ndarray]
    samples: np.ndarray = field(repr=False)
    rhat: np.ndarray
    ess_bulk: np.ndarray
    ess_tail: np.ndarray
    log_likelihood: float
    gap: float
    iterations: int
    responsibilities: np.ndarray = field(repr=False)
    expected_counts: np.ndarray
    assigned_counts: np.ndarray
    summary: dict[str, Any] = field(repr=False)
    files: dict[str, Path] = field(repr=False)
    warnings: list[str] = field(default_factory=list)


def _xp(device: str):
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError as exc:
        raise ReweightError(f"device gpu needs CuPy ({exc}); use device cpu") from None
    return cupy


def _host(x: Any) -> np.ndarray:
    from cryolike_dask.kernels.backend import to_host

    return np.asarray(to_host(x), dtype=np.float64)


def _none_component(
    data: files.LikelihoodInput, spec: str | int, kind: str
) -> tuple[files.LikelihoodInput, np.ndarray, str, str | None]:
    """Split the "none of these" column off ``data``: a structure of the source, or a file of
    per-image log-likelihoods (in ``kind``). Returns the data without it, the column, where
    it came from and the file's digest."""
    from dataclasses import replace

    n = data.loglik.shape[0]
    is_file = isinstance(spec, str) and (
        Path(spec).suffix.lower() in files.FILE_SUFFIXES or os.sep in spec or Path(spec).is_file()
    )
    if is_file:
        values, digest = files.read_vector(spec, n, "none-of-these log-likelihood per image")
        if kind == "negloglik":
            values = -values
        return data, values, str(spec), digest
    try:
        k = files.pick_structure(data.structures, spec, "none column")
    except ReweightError:
        raise ReweightError(
            f"none column {spec!r}: neither a structure of {data.description} "
            f"({', '.join(data.structures)}) nor an existing file"
        ) from None
    if data.loglik.shape[1] < 2:
        raise ReweightError("the none column needs at least one other structure")
    keep = [j for j in range(data.loglik.shape[1]) if j != k]
    column = data.loglik[:, k].copy()
    name = data.structures[k]
    return (
        replace(data, loglik=data.loglik[:, keep], structures=[data.structures[j] for j in keep]),
        column,
        f"structure {name}",
        None,
    )


def _diagnose(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = draws.shape[-1]
    rhat = np.array([mcmc.rhat(draws[:, :, j]) for j in range(k)])
    bulk = np.array([mcmc.ess_bulk(draws[:, :, j]) for j in range(k)])
    tail = np.array([mcmc.ess_tail(draws[:, :, j]) for j in range(k)])
    return rhat, bulk, tail


def reweight_with_options(
    source: Any,
    output: str | os.PathLike,
    options: ReweightOptions,
    *,
    overwrite: bool = False,
) -> ReweightResult:
    """:func:`reweight` with its settings as one :class:`ReweightOptions`."""
    t_start = time.perf_counter()
    o = options
    files.check_output_folder(output, overwrite)
    data = files.read_source(
        source,
        layout=o.layout,
        kind=o.kind,
        matrix=o.matrix,
        structure_names=o.structure_names,
        structures=o.structures,
    )
    digests = dict(data.checksums.get("files", {}))
    none_from = None
    components = list(data.structures)
    ll = data.loglik
    if o.none_column is not None:
        data, column, none_from, digest = _none_component(data, o.none_column, o.kind)
        if digest:
            digests[str(o.none_column)] = digest
        components = [*data.structures, NONE_NAME]
        ll = np.concatenate([data.loglik, column[:, None]], axis=1)
        files.check_finite(ll, components, data.images, f"{data.description} + {none_from}")
    n_img, k = ll.shape
    k_struct = len(data.structures)
    if n_img < 2:
        raise ReweightError(f"{data.description}: {n_img} image; reweighting needs at least 2")
    if k < 2:
        raise ReweightError(
            f"{data.description}: one component ({components[0]}); reweighting needs at least "
            "2 structures (or a structure and a none column)"
        )
    # prior
    baseline = None
    if o.prior_counts is not None:
        spec = str(o.prior_counts) if isinstance(o.prior_counts, Path) else o.prior_counts
        counts, digest = files.read_vector(
            spec, k_struct, "prior count per structure", data.structures
        )
        if digest:
            digests[str(o.prior_counts)] = digest
        if np.any(counts <= 0):
            j = int(np.flatnonzero(counts <= 0)[0])
            raise ReweightError(
                f"prior counts: {counts[j]} for structure {data.structures[j]}; expected "
                "positive counts (cryoER's cluster sizes)"
            )
        if k > k_struct:
            extra = o.none_prior_count if o.none_prior_count is not None else float(counts.mean())
            counts = np.append(counts, extra)
        baseline = counts
    alpha = np.full(k, float(o.alpha))
    if k > k_struct and o.none_alpha is not None:
        alpha[-1] = float(o.none_alpha)
    point = "map" if np.all(alpha >= 1.0) else "ml"
    warn_list: list[str] = []
    if o.truth is not None:
        unknown = [n for n in o.truth if n not in components]
        if unknown:
            raise ReweightError(
                f"truth names {', '.join(unknown)}: no such component ({', '.join(components)})"
            )
    if o.star is not None and not Path(o.star).is_file():
        raise ReweightError(f"{o.star}: file not found (expected the particles' STAR file)")
    out = files.prepare_output_folder(output, overwrite)

    xp = _xp(o.device)
    if o.temperature != 1.0:
        # the power likelihood ℓ/T (generalised Bayes); every step below uses it
        ll = ll / o.temperature
    L, shift = model.shift_rows(xp.asarray(ll))
    shift_total = float(shift.sum())
    logger.info(
        "reweight: %d images × %d components (%s) from %s%s",
        n_img,
        k,
        ", ".join(components),
        data.description,
        "" if o.temperature == 1.0 else f", log-likelihoods / {o.temperature:g}",
    )
    # 1. EM with certificate
    t0 = time.perf_counter()
    fit = model.fit_weights(
        L,
        concentration=alpha if point == "map" else 1.0,
        baseline=baseline,
        tol=o.tolerance,
        max_iter=o.max_iterations,
    )
    t_em = time.perf_counter() - t0
    w_map = _host(fit.weights)
    if not fit.converged:
        msg = (
            f"EM stopped after {fit.iterations} passes with Frank–Wolfe gap {fit.gap:.3g} "
            f"(tolerance {o.tolerance:g}); raise max_iterations"
        )
        warn_list.append(msg)
    loglik_map = model.mixture_log_likelihood(fit.weights, L, shift)
    logger.info(
        "EM: %s weights in %d passes (%.2f s), gap %.2e, log-likelihood %.6g nats",
        point.upper(),
        fit.iterations,
        t_em,
        fit.gap,
        loglik_map,
    )
    # 2. Laplace (also the proposal of the sampler's independence moves)
    lap = None
    if o.laplace or o.laplace_moves:
        lap = model.laplace(
            L, concentration=alpha, baseline=baseline, seed=o.seed, tol=o.tolerance,
            max_iter=o.max_iterations,
        )  # fmt: skip
        if not lap.positive_definite:
            warn_list.append("Laplace: the Hessian is not positive definite (pseudo-inverse used)")
    proposal = lap.proposal() if (o.laplace_moves and lap.positive_definite) else None
    # 3. Gibbs
    t0 = time.perf_counter()
    g = model.gibbs(
        L,
        concentration=alpha,
        baseline=baseline,
        chains=o.chains,
        samples=o.samples,
        warmup=o.warmup,
        thin=o.thin,
        seed=o.seed,
        proposal=proposal,
    )
    t_gibbs = time.perf_counter() - t0
    lap_report = lap if o.laplace else None
    draws = _host(g.weights)
    post = model.summarize(draws)
    rhat, ess_b, ess_t = _diagnose(draws)  # samples ≥ 4 (the options' minimum)
    rhat_ll = mcmc.rhat(_host(g.log_likelihood))
    iters = o.chains * (o.warmup + o.samples * o.thin)
    logger.info(
        "Gibbs: %d chains × %d draws in %.2f s (%.0f draws/s incl. warm-up); max R-hat %.4f, "
        "min ESS bulk %.0f tail %.0f",
        o.chains,
        o.samples,
        t_gibbs,
        iters / max(t_gibbs, 1e-9),
        float(np.nanmax(rhat)),
        float(np.nanmin(ess_b)),
        float(np.nanmin(ess_t)),
    )
    bad_rhat = [components[j] for j in range(k) if not rhat[j] < o.rhat_threshold]
    if bad_rhat or not rhat_ll < o.rhat_threshold:
        values = ", ".join(f"{components[j]} {rhat[j]:.3f}" for j in range(k))
        warn_list.append(
            f"R-hat ≥ {o.rhat_threshold} ({values}; log-likelihood {rhat_ll:.3f}): the chains "
            "disagree; run more samples/warmup"
        )
    low_ess = [j for j in range(k) if not min(ess_b[j], ess_t[j]) >= o.ess_threshold]
    if low_ess:
        values = ", ".join(f"{components[j]} {min(ess_b[j], ess_t[j]):.0f}" for j in low_ess)
        warn_list.append(
            f"effective sample size below {o.ess_threshold:g} ({values}); intervals are "
            "imprecise; run more samples"
        )
    if baseline is not None and float(np.min(g.acceptance)) < 0.2:
        warn_list.append(
            f"Metropolis–Hastings acceptance {float(np.min(g.acceptance)):.2f} (prior counts with "
            "few images); run more samples"
        )
    # 4. bootstrap, CV
    boot = cv = None
    if o.bootstrap:
        boot = model.bootstrap(
            L,
            o.bootstrap,
            concentration=alpha if point == "map" else 1.0,
            baseline=baseline,
            init=fit.weights,
            seed=o.seed,
            tol=o.tolerance,
            max_iter=o.max_iterations,
        )
    if o.folds >= 2:
        if n_img < o.folds:
            warn_list.append(f"cross-validation skipped: {n_img} images for {o.folds} folds")
        else:
            cv = model.cross_validate(
                xp.asarray(ll),
                o.folds,
                concentration=alpha if point == "map" else 1.0,
                baseline=baseline,
                single_candidates=range(k_struct),
                seed=o.seed,
                tol=o.tolerance,
                max_iter=o.max_iterations,
            )
    # 5. per image
    resp = _host(model.responsibilities(fit.weights, L))
    expected = resp.sum(axis=0)
    assigned_idx = np.argmax(resp, axis=1)
    assigned = np.bincount(assigned_idx, minlength=k).astype(np.float64)
    for msg in warn_list:
        warnings.warn(msg, ReweightWarning, stacklevel=2)

    # 6. outputs
    written: dict[str, Path] = {}
    q = post.quantiles
    rows = [
        [
            components[j],
            w_map[j],
            post.mean[j],
            post.sd[j],
            q[0.025][j],
            q[0.5][j],
            q[0.975][j],
            expected[j],
            int(assigned[j]),
        ]
        for j in range(k)
    ]
    written["weights"] = files.write_table(
        out / "weights.csv",
        [
            "structure",
            "map_weight",
            "posterior_mean",
            "posterior_sd",
            "q2.5",
            "q50",
            "q97.5",
            "expected_count",
            "assigned_count",
        ],
        rows,
    )
    methods = [("gibbs", post)]
    if lap_report is not None:
        methods.append(("laplace", lap_report.summary))
    if boot is not None:
        methods.append(("bootstrap", boot.summary))
    written["intervals"] = files.write_table(
        out / "intervals.csv",
        ["structure", "method", "mean", "sd", "q2.5", "q25", "q50", "q75", "q97.5"],
        [
            [
                components[j],
                name,
                s.mean[j],
                s.sd[j],
                s.quantiles[0.025][j],
                s.quantiles[0.25][j],
                s.quantiles[0.5][j],
                s.quantiles[0.75][j],
                s.quantiles[0.975][j],
            ]
            for name, s in methods
            for j in range(k)
        ],
    )
    samples_path = out / "posterior_samples.npz"
    np.savez_compressed(
        samples_path,
        weights=draws,
        counts=np.asarray(_host(g.counts), dtype=np.int64),
        log_likelihood=_host(g.log_likelihood) + shift_total,
        components=np.asarray(components, dtype=str),
        initial=g.initial,
        acceptance=g.acceptance,
        laplace=lap_report.draws if lap_report is not None else np.zeros((0, k)),
        bootstrap=boot.draws if boot is not None else np.zeros((0, k)),
    )
    written["posterior_samples"] = samples_path
    # cryoER's files: structures only, renormalised among them
    ws = draws[..., :k_struct]
    ws = ws / ws.sum(axis=-1, keepdims=True)
    if baseline is not None:
        nb = baseline[:k_struct] / baseline[:k_struct].sum()
        factor = ws / nb
        factor = factor / factor.sum(axis=-1, keepdims=True)
    else:
        factor = ws
    written["reweighting_factor"], written["reweighted_prob"] = files.write_cryoer(out, factor, ws)
    # STAR subsets
    images = data.images
    if o.star is not None:
        star = Path(o.star)
        rows_known = images.source_row if np.all(images.source_row >= 0) else np.arange(n_img)
        from dataclasses import replace

        images = replace(
            images,
            source_row=rows_known,
            star_file=np.full(n_img, str(star), dtype=object).astype(str),
        )
    keep = resp.max(axis=1) >= o.star_min_responsibility
    star_files = files.write_star_subsets(out / "star", images, assigned_idx, keep, components)
    for p in star_files:
        written[f"star:{p.name}"] = p

    truth_report = None
    if o.truth is not None:
        truth_report = {
            name: {
                "truth": float(value),
                "map_weight": float(w_map[components.index(name)]),
                "posterior_mean": float(post.mean[components.index(name)]),
                "q2.5": float(q[0.025][components.index(name)]),
                "q97.5": float(q[0.975][components.index(name)]),
                "inside_95": bool(
                    q[0.025][components.index(name)] <= value <= q[0.975][components.index(name)]
                ),
            }
            for name, value in o.truth.items()
        }
    summary: dict[str, Any] = {
        "cryolike_dask": {"kind": "reweight", "package_version": __version__},
        "settings": o.model_dump(mode="json"),
        "input": {
            "description": data.description,
            "sources": [str(s) for s in data.sources],
            "n_images": n_img,
            "structures": data.structures,
            "components": components,
            "none_column": none_from,
            "prior_counts": None if baseline is None else baseline.tolist(),
            "checksums": {**data.checksums, "files": digests},
            "fingerprint": data.fingerprint,
        },
        "model": {
            "concentration": alpha.tolist(),
            "temperature": o.temperature,
            "prior_ensemble": None if baseline is None else (baseline / baseline.sum()).tolist(),
            "point_estimate": point,
        },
        "em": {
            "weights": w_map.tolist(),
            "log_likelihood": loglik_map,
            "log_posterior_unnormalised": fit.objective + shift_total,
            "frank_wolfe_gap": fit.gap,
            "tolerance": o.tolerance,
            "iterations": fit.iterations,
            "converged": fit.converged,
            "seconds": t_em,
        },
        "gibbs": {
            "chains": o.chains,
            "draws_per_chain": o.samples,
            "warmup": o.warmup,
            "thin": o.thin,
            "rhat": dict(zip(components, rhat.tolist(), strict=True)),
            "rhat_max": float(np.max(rhat)),
            "rhat_log_likelihood": rhat_ll,
            "ess_bulk": dict(zip(components, ess_b.tolist(), strict=True)),
            "ess_tail": dict(zip(components, ess_t.tolist(), strict=True)),
            "ess_min": float(min(np.min(ess_b), np.min(ess_t))),
            "acceptance": g.acceptance.tolist(),
            "laplace_moves": proposal is not None,
            "move_acceptance": None if g.move_acceptance is None else g.move_acceptance.tolist(),
            "moved_fraction": g.moved_fraction,
            "seconds": t_gibbs,
            "draws_per_second": iters / max(t_gibbs, 1e-9),
            "diagnostics": "rank-normalised split-R-hat and bulk/tail ESS (Vehtari et al. 2021)",
        },
        "posterior": {
            "mean": post.mean.tolist(),
            "sd": post.sd.tolist(),
            "quantiles": {str(key): v.tolist() for key, v in q.items()},
        },
        "perplexity": {
            "map": model.perplexity(w_map),
            "posterior_mean": model.perplexity(post.mean),
        },
        "counts": {"expected": expected.tolist(), "assigned": assigned.astype(int).tolist()},
        "laplace": None
        if lap_report is None
        else {
            "mode": lap_report.mode.tolist(),
            "mean": lap_report.summary.mean.tolist(),
            "sd": lap_report.summary.sd.tolist(),
            "q2.5": lap_report.summary.quantiles[0.025].tolist(),
            "q97.5": lap_report.summary.quantiles[0.975].tolist(),
            "positive_definite": lap_report.positive_definite,
        },
        "bootstrap": None
        if boot is None
        else {
            "replicates": o.bootstrap,
            "converged": boot.converged,
            "mean": boot.summary.mean.tolist(),
            "sd": boot.summary.sd.tolist(),
            "q2.5": boot.summary.quantiles[0.025].tolist(),
            "q97.5": boot.summary.quantiles[0.975].tolist(),
        },
        "cross_validation": None
        if cv is None
        else {
            "folds": cv.folds,
            "elpd": cv.elpd,
            "elpd_per_image": {key: v / n_img for key, v in cv.elpd.items()},
            "difference": cv.difference,
            "standard_error": cv.standard_error,
            "best_single": [components[j] for j in cv.best_single],
        },
        "truth": truth_report,
        "warnings": warn_list,
    }
    # responsibilities
    written["responsibilities"] = files.write_responsibilities(
        out / "responsibilities.zarr",
        resp,
        components,
        data.images,
        {"cryolike_dask": {"kind": "reweight-responsibilities", "package_version": __version__},
         "map_weights": w_map.tolist(), "source": data.description},
    )  # fmt: skip
    if o.plots:
        from cryolike_dask.reweight_plots import plot_reweight

        plots = plot_reweight(
            out / "plots",
            components=components,
            map_weights=w_map,
            summary=post,
            draws=draws,
            history=fit.history,
            tolerance=o.tolerance,
            responsibilities=resp,
            loglik=ll,
            truth=o.truth,
            laplace=lap_report.summary if lap_report is not None else None,
        )
        for p in plots:
            written[f"plot:{p.stem}"] = p
    summary["files"] = {key: str(p) for key, p in written.items()} | {
        "summary": str(out / "summary.json")
    }
    summary["seconds"] = time.perf_counter() - t_start
    written["summary"] = files.write_json(out / "summary.json", summary)
    return ReweightResult(
        out,
        components,
        point,
        w_map,
        post.mean,
        post.sd,
        dict(q),
        draws,
        rhat,
        ess_b,
        ess_t,
        loglik_map,
        fit.gap,
        fit.iterations,
        resp,
        expected,
        assigned,
        summary,
        written,
        warn_list,
    )


def make_options(**settings: Any) -> ReweightOptions:
    """Validated :class:`ReweightOptions`; bad values raise :class:`ReweightError`."""
    try:
        return ReweightOptions(**settings)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ReweightError(f"reweight options: {detail}") from None


def reweight(
    source: Any,
    output: str | os.PathLike,
    *,
    layout: str | None = None,
    kind: str = "loglik",
    alpha: float = 1.0,
    prior_counts: Any = None,
    none_column: str | int | None = None,
    chains: int = 4,
    samples: int = 500,
    seed: int = 0,
    bootstrap: int = 0,
    folds: int = 5,
    overwrite: bool = False,
    **options: Any,
) -> ReweightResult:
    """Ensemble weights of structures, with uncertainty, from image × structure likelihoods.

    Each image is a mixture over structures, ``p(y_i) = Σ_k w_k exp(ll_ik)``, with a
    Dirichlet(``alpha``) prior on the reweighting factors (cryoER's parameterisation; the
    weights themselves without ``prior_counts``). Computes EM's MAP weights (maximum
    likelihood for ``alpha = 1``; stopped on the Frank–Wolfe gap), exact posterior draws by
    Gibbs sampling (``chains`` × ``samples``, with R-hat and ESS), a Laplace approximation,
    optionally a bootstrap, and the K-fold held-out log predictive density (``folds``).

    Parameters
    ----------
    source : path, sequence of paths, or array
        A likelihood output folder (its ``results.zarr``), a ``matrices.zarr``, a
        ``.npy``/``.pt``/``.txt``/``.csv`` matrix, several likelihood folders (joined along
        structures), or an array (float ``[n_images, n_structures]`` or its transpose).
    output : path
        The output folder (created). Existing reweight outputs are refused unless
        ``overwrite``.
    layout : {"images-by-structures", "structures-by-images"}, optional
        Orientation of a plain matrix (required unless the file states it).
    kind : {"loglik", "negloglik"}
        Whether the values are log-likelihoods (nats) or their negatives.
    alpha : float
        Dirichlet concentration (> 0; 1 = uniform prior on the simplex).
    prior_counts : sequence of float or path, optional
        cryoER's cluster counts ``N_m``, one per structure.
    none_column : str or int, optional
        A "none of these" component: a structure of the source (name/index) or a file with
        one log-likelihood per image.
    chains, samples : int
        Gibbs chains and draws kept per chain.
    seed : int
        Seed of every random choice (starts, draws, folds, bootstrap).
    bootstrap : int
        Bootstrap replicates over images (0: none).
    folds : int
        Folds of the cross-validation (< 2: none).
    **options
        Any other field of :class:`ReweightOptions` (``warmup``, ``thin``, ``matrix``,
        ``structures``, ``device``, ``truth``, ``plots`` ...).

    Returns
    -------
    ReweightResult
        Weights as float64 ``[K]`` arrays over the structures in input order (then
        ``none_of_these``); responsibilities float64 ``[n_images, K]``; log-likelihoods in
        nats. Files written in ``output``: ``weights.csv``, ``intervals.csv``,
        ``summary.json``, ``posterior_samples.npz``, ``responsibilities.zarr``,
        ``reweighting_factor.txt``, ``reweighted_prob.txt``, ``star/`` and ``plots/``.

    Raises
    ------
    ReweightError
        Unreadable, ambiguous (no layout) or non-finite input; structures on different
        grids; bad options.
    OutputExistsError
        ``output`` holds reweight outputs and ``overwrite`` is false.
    """
    o = make_options(
        layout=layout,
        kind=kind,
        alpha=alpha,
        prior_counts=prior_counts,
        none_column=none_column,
        chains=chains,
        samples=samples,
        seed=seed,
        bootstrap=bootstrap,
        folds=folds,
        **options,
    )
    return reweight_with_options(source, output, o, overwrite=overwrite)


def reweight_folder(
    folder: str | os.PathLike,
    options: ReweightOptions | dict[str, Any] | None = None,
    *,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ReweightResult:
    """Reweight a likelihood output folder with ``options`` (a :class:`ReweightOptions` or
    its fields as a dict, e.g. a config's ``reweight:`` section); writes into ``output``
    (default ``folder/reweight``)."""
    if options is None:
        o = ReweightOptions()
    elif isinstance(options, ReweightOptions):
        o = options
    else:
        o = make_options(**dict(options))
    target = Path(output) if output is not None else Path(folder) / "reweight"
    return reweight_with_options(Path(folder), target, o, overwrite=overwrite)


calibrate_temperature = model.calibrate_temperature

__all__ = [
    "NONE_NAME",
    "ReweightError",
    "ReweightOptions",
    "ReweightResult",
    "ReweightWarning",
    "calibrate_temperature",
    "make_options",
    "reweight",
    "reweight_folder",
    "reweight_with_options",
]
