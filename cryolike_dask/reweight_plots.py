"""Plots of a reweighting run (PNG, matplotlib Agg): weights with credible intervals,
posterior marginals, chain traces, EM convergence, responsibilities, and the row-centred
log-likelihood matrix sorted by assignment. :func:`plot_reweight` draws them all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.analysis.reweight import Summary

#: most images drawn in the heatmap (an even subsample of the sorted images beyond that)
MAX_HEATMAP_ROWS = 2000


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weights(
    components: Sequence[str],
    map_weights: np.ndarray,
    summary: Summary,
    path: Path,
    truth: dict[str, float] | None = None,
    laplace: Summary | None = None,
) -> Path:
    """Posterior mean with its 95 % credible interval, the MAP weight and, when given, the
    Laplace interval and the true weights, per component."""
    plt = _pyplot()
    k = len(components)
    x = np.arange(k)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * k + 3), 4))
    lo, hi = summary.quantiles[0.025], summary.quantiles[0.975]
    ax.bar(x, summary.mean, color="C0", alpha=0.5, label="posterior mean")
    ax.errorbar(
        x, summary.mean, yerr=[summary.mean - lo, hi - summary.mean], fmt="none", ecolor="C0",
        capsize=5, lw=1.5, label="95% credible interval",
    )  # fmt: skip
    ax.plot(x, map_weights, "D", color="C1", label="MAP (EM)")
    if laplace is not None:
        llo, lhi = laplace.quantiles[0.025], laplace.quantiles[0.975]
        ax.errorbar(
            x + 0.2, laplace.mean, yerr=[laplace.mean - llo, lhi - laplace.mean], fmt="o",
            color="C2", ms=3, capsize=3, lw=1, label="Laplace 95%",
        )  # fmt: skip
    if truth:
        tx = [components.index(n) for n in truth]
        ax.plot(tx, list(truth.values()), "k_", ms=22, mew=2, label="truth")
    ax.set_xticks(
        x, list(components), rotation=30 if k > 4 else 0, ha="right" if k > 4 else "center"
    )
    ax.set_ylabel("weight")
    ax.set_ylim(0, min(1.0, max(float(np.max(hi)), float(np.max(map_weights))) * 1.15 + 0.02))
    ax.set_title("Ensemble weights")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_marginals(components: Sequence[str], draws: np.ndarray, path: Path) -> Path:
    """Histogram of the posterior draws of each weight (all chains pooled)."""
    plt = _pyplot()
    k = len(components)
    cols = min(k, 4)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    flat = draws.reshape(-1, k)
    for j, ax in enumerate(axes.ravel()):
        if j >= k:
            ax.axis("off")
            continue
        ax.hist(flat[:, j], bins=40, color=f"C{j % 10}", alpha=0.8)
        ax.set_title(components[j], fontsize="small")
        ax.set_xlabel("weight")
    fig.suptitle("Posterior marginals")
    return _save(fig, path)


def plot_traces(components: Sequence[str], draws: np.ndarray, path: Path) -> Path:
    """Trace of each weight, one line per chain."""
    plt = _pyplot()
    k = len(components)
    fig, axes = plt.subplots(k, 1, figsize=(8, 1.6 * k + 0.8), sharex=True, squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        for c in range(draws.shape[0]):
            ax.plot(draws[c, :, j], lw=0.6, alpha=0.8)
        ax.set_ylabel(components[j], fontsize="small")
    axes[-1, 0].set_xlabel("draw (after warm-up)")
    fig.suptitle("Gibbs chains")
    return _save(fig, path)


def plot_em_convergence(history: np.ndarray, tolerance: float, path: Path) -> Path:
    """The Frank–Wolfe gap and the objective at each EM pass."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    it = np.arange(1, len(history) + 1)
    gap = np.maximum(history[:, 1], 1e-17)
    a1.semilogy(it, gap, ".-", ms=3)
    a1.axhline(tolerance, color="r", ls="--", lw=1, label=f"tolerance {tolerance:g}")
    a1.set_xlabel("EM pass")
    a1.set_ylabel("Frank–Wolfe gap (nats per image)")
    a1.legend(fontsize="small")
    best = float(np.max(history[:, 0]))
    a2.semilogy(it, np.maximum(best - history[:, 0], 1e-12), ".-", ms=3)
    a2.set_xlabel("EM pass")
    a2.set_ylabel("objective below the best (nats)")
    fig.suptitle("EM convergence")
    return _save(fig, path)


def plot_responsibilities(
    components: Sequence[str], responsibilities: np.ndarray, path: Path
) -> Path:
    """Histogram of the responsibility of each component over the images."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41)
    for j, name in enumerate(components):
        ax.hist(responsibilities[:, j], bins=bins, histtype="step", lw=1.5, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("responsibility r_ik (at the MAP weights)")
    ax.set_ylabel("images")
    ax.set_title("How clearly each image belongs to a component")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_loglik_heatmap(
    components: Sequence[str], loglik: np.ndarray, responsibilities: np.ndarray, path: Path
) -> Path:
    """Row-centred log-likelihoods (each image minus its mean over components), images
    sorted by their most responsible component and then by that responsibility."""
    plt = _pyplot()
    assigned = np.argmax(responsibilities, axis=1)
    top = responsibilities[np.arange(len(assigned)), assigned]
    order = np.lexsort((-top, assigned))
    if order.size > MAX_HEATMAP_ROWS:
        order = order[np.linspace(0, order.size - 1, MAX_HEATMAP_ROWS).astype(np.int64)]
    centred = loglik[order] - loglik[order].mean(axis=1, keepdims=True)
    lim = float(np.quantile(np.abs(centred), 0.98)) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(components) + 3), 6))
    im = ax.imshow(
        centred, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim
    )
    ax.set_xticks(np.arange(len(components)), list(components), rotation=30, ha="right")
    ax.set_ylabel(f"images sorted by assignment ({order.size} shown)")
    fig.colorbar(im, ax=ax, label="log-likelihood − row mean (nats)")
    bounds = np.flatnonzero(np.diff(assigned[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="k", lw=0.8)
    ax.set_title("Row-centred log-likelihoods")
    return _save(fig, path)


def plot_reweight(
    folder: Path,
    *,
    components: Sequence[str],
    map_weights: np.ndarray,
    summary: Summary,
    draws: np.ndarray,
    history: np.ndarray,
    tolerance: float,
    responsibilities: np.ndarray,
    loglik: np.ndarray,
    truth: dict[str, float] | None = None,
    laplace: Summary | None = None,
) -> list[Path]:
    """Every plot of a reweighting run into ``folder``; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(components)
    return [
        plot_weights(names, map_weights, summary, folder / "weights.png", truth, laplace),
        plot_marginals(names, draws, folder / "posterior_marginals.png"),
        plot_traces(names, draws, folder / "chain_traces.png"),
        plot_em_convergence(history, tolerance, folder / "em_convergence.png"),
        plot_responsibilities(names, responsibilities, folder / "responsibilities.png"),
        plot_loglik_heatmap(names, loglik, responsibilities, folder / "loglik_heatmap.png"),
    ]


__all__ = [
    "MAX_HEATMAP_ROWS",
    "plot_em_convergence",
    "plot_loglik_heatmap",
    "plot_marginals",
    "plot_responsibilities",
    "plot_reweight",
    "plot_traces",
    "plot_weights",
]
