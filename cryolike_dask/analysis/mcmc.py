"""Convergence diagnostics of MCMC chains (host NumPy): split-R-hat and effective sample size.

The formulas are those of Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-
normalization, folding, and localization: an improved R-hat for assessing convergence of
MCMC" (Bayesian Analysis 16, 667), as Stan reports them:

* :func:`rhat` - the rank-normalised split-R-hat: the larger of the classic split-R-hat of
  the rank-normalised draws (bulk) and of the rank-normalised folded draws ``|x − median|``
  (tails);
* :func:`ess_bulk` - the effective sample size of the rank-normalised split chains;
* :func:`ess_tail` - the smaller of the effective sample sizes of the indicators
  ``x ≤ q5`` and ``x ≥ q95``;
* :func:`ess` - the effective sample size of the split chains as they are, with Geyer's
  initial monotone sequence estimator of the autocorrelation time.

Every function takes draws ``[chains, draws]``; chains are split in halves (an odd draw is
dropped from the middle), so at least 4 draws per chain are needed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata


def _chains(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"expected draws [chains, draws], got shape {a.shape}")
    if a.shape[1] < 4:
        raise ValueError(f"need at least 4 draws per chain, got {a.shape[1]}")
    return a


def split_chains(x: np.ndarray) -> np.ndarray:
    """``[C, S]`` → ``[2C, S // 2]``: each chain's first and second half (middle draw of an
    odd ``S`` dropped)."""
    a = _chains(x)
    half = a.shape[1] // 2
    return np.concatenate([a[:, :half], a[:, a.shape[1] - half :]], axis=0)


def rank_normalize(x: np.ndarray) -> np.ndarray:
    """Normal scores of the pooled ranks: ``Φ⁻¹((r − 3/8) / (S + 1/4))`` (Blom), ties averaged."""
    a = np.asarray(x, dtype=np.float64)
    r = rankdata(a, method="average").reshape(a.shape)
    return ndtri((r - 0.375) / (a.size + 0.25))


def _rhat_classic(a: np.ndarray) -> float:
    """Gelman–Rubin ``sqrt(var⁺ / W)`` of chains ``a [M, N]`` (already split)."""
    n = a.shape[1]
    w = float(np.mean(np.var(a, axis=1, ddof=1)))
    b = n * float(np.var(np.mean(a, axis=1), ddof=1))
    if w == 0.0:
        return 1.0 if b == 0.0 else math.inf
    var_plus = (n - 1) / n * w + b / n
    return math.sqrt(var_plus / w)


def rhat(x: np.ndarray) -> float:
    """Rank-normalised split-R-hat: ``max(bulk, tail)`` (Vehtari et al. 2021)."""
    s = split_chains(x)
    if np.all(s == s.flat[0]):
        return 1.0
    bulk = _rhat_classic(rank_normalize(s))
    tail = _rhat_classic(rank_normalize(np.abs(s - np.median(s))))
    return max(bulk, tail)


def split_rhat(x: np.ndarray) -> float:
    """The classic split-R-hat (Gelman et al., BDA3), without rank normalisation."""
    return _rhat_classic(split_chains(x))


def _autocovariance(a: np.ndarray) -> np.ndarray:
    """Biased autocovariance of each chain ``[M, N]`` by FFT (lag 0 .. N−1)."""
    n = a.shape[1]
    centred = a - a.mean(axis=1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(f * np.conj(f), n=size, axis=1)[:, :n] / n


def _ess_split(a: np.ndarray) -> float:
    """Effective sample size of split chains ``a [M, N]`` (Stan's estimator)."""
    m, n = a.shape
    if np.all(a == a.flat[0]):
        return float(m * n)
    acov = _autocovariance(a)
    chain_var = acov[:, 0] * n / (n - 1)
    w = float(chain_var.mean())
    var_plus = w * (n - 1) / n
    if m > 1:
        var_plus += float(np.var(a.mean(axis=1), ddof=1))
    if var_plus <= 0.0:
        return float(m * n)
    rho = 1.0 - (w - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Geyer's initial positive sequence: sums of adjacent pairs while positive ...
    pairs = []
    t = 0
    while t + 1 < n:
        p = rho[t] + rho[t + 1]
        if p <= 0.0:
            break
        pairs.append(p)
        t += 2
    # ... made monotone (non-increasing)
    pairs_arr = np.minimum.accumulate(np.asarray(pairs)) if pairs else np.zeros(1)
    tau = -1.0 + 2.0 * float(pairs_arr.sum())
    total = float(m * n)
    tau = max(tau, 1.0 / math.log10(total)) if total > 1 else max(tau, 1.0)
    return total / tau


def ess(x: np.ndarray) -> float:
    """Effective sample size of the draws ``[C, S]`` (split chains, no rank normalisation)."""
    return _ess_split(split_chains(x))


def ess_bulk(x: np.ndarray) -> float:
    """Bulk effective sample size: :func:`ess` of the rank-normalised split chains."""
    return _ess_split(rank_normalize(split_chains(x)))


def ess_tail(x: np.ndarray) -> float:
    """Tail effective sample size: the smaller ESS of ``x ≤ q5`` and ``x ≥ q95``."""
    s = split_chains(x)
    lo, hi = np.quantile(s, [0.05, 0.95])
    return min(_ess_split((s <= lo).astype(np.float64)), _ess_split((s >= hi).astype(np.float64)))


__all__ = ["ess", "ess_bulk", "ess_tail", "rank_normalize", "rhat", "split_chains", "split_rhat"]
