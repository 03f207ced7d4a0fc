"""Ensemble weights from an images × structures log-likelihood matrix.

Pure array functions: NumPy or CuPy, chosen from the matrix (:func:`array_module`), as the
kernels do; host NumPy only for K-sized vectors and for the summaries of samples. No Dask,
Zarr or torch.

Model
-----
Image ``i`` comes from one of ``K`` components (structures, and optionally a "none of these"
column), ``p(y_i | w) = Σ_k w_k L_ik``, with ``L_ik = exp(ll_ik)``. Computations use
``L_ik = exp(ll_ik − max_k ll_ik)`` in float64 (rows shifted to max 0, which changes no
weight, responsibility or gradient; log-likelihoods add the shifts back).

Prior (cryoER's parameterisation): reweighting factors ``f ~ Dirichlet(a)`` on the simplex
and a prior ensemble ``n`` (prior counts, normalised; uniform when none are given), with
``w_k = f_k n_k / Σ_m f_m n_m``. With a uniform ``n``, ``w = f`` and ``w ~ Dirichlet(a)``.
In ``w`` the prior density is the scaled Dirichlet
``p(w) ∝ Π_k w_k^(a_k − 1) · (Σ_k w_k / n_k)^(−A)`` with ``A = Σ_k a_k``.

Inference
---------
* :func:`fit_weights` - the maximum of the posterior in ``f`` (maximum likelihood when every
  ``a_k = 1``) by EM with SQUAREM acceleration, stopped on the Frank–Wolfe certificate
  ``max_k ∇_k F − 1 < tol`` of ``F = (log-likelihood + log prior) / n_images``
  (``w · ∇F = 1`` on the simplex, so this is the Frank–Wolfe gap ``max_k ∇_k − w · ∇``: an
  upper bound on ``F(w*) − F(w)`` whenever ``F`` is concave - always for maximum likelihood,
  and for ``a_k ≥ 1`` with a uniform ``n``).
* :func:`gibbs` - exact posterior samples: ``z_i ~ Cat(w_k L_ik)``, then
  ``w ~ Dirichlet(a + counts)`` (with prior counts: that draw is an independence
  Metropolis–Hastings proposal, accepted with ``min(1, t(w')/t(w))``,
  ``t(w) = (Σ_k w_k / n_k)^(−A)``, which keeps the posterior exactly invariant; with a
  uniform ``n``, ``t`` is constant and every draw is accepted).
* :func:`laplace` - Gaussian approximation in the softmax basis (MacKay 1998), whose mode is
  :func:`fit_weights` with ``a + 1``.
* :func:`bootstrap` - weights refitted on images drawn with replacement.
* :func:`cross_validate` - K-fold held-out log predictive density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from cryolike_dask.kernels.backend import array_module, to_host

#: the smallest mixture density used (p_i is never below the dominant structure's weight)
_TINY = 1e-300
#: share of moving assignments above which every row is processed (no gathers)
_DIRECT = 0.4
#: images per block of that pass
_BLOCK = 8192


# ------------------------------------------------------------------------------ basics
def shift_rows(loglik: Any) -> tuple[Any, Any]:
    """``(L, shift)``: ``L = exp(ll − shift)`` float64 ``[..., N, K]`` with ``shift`` the
    row maxima ``[..., N]`` (each row of ``L`` has maximum exactly 1).

    ``−inf`` entries (zero likelihood) are allowed; NaN, ``+inf`` and rows without a finite
    entry raise ``ValueError``.
    """
    xp = array_module(loglik)
    ll = xp.asarray(loglik, dtype=xp.float64)
    if ll.ndim < 2 or ll.shape[-1] < 1 or ll.shape[-2] < 1:
        raise ValueError(f"expected a [..., n_images, n_components] matrix, got {ll.shape}")
    if bool(xp.any(xp.isnan(ll))) or bool(xp.any(ll == xp.inf)):
        raise ValueError("the log-likelihood matrix holds NaN or +inf")
    shift = ll.max(axis=-1)
    if not bool(xp.all(xp.isfinite(shift))):
        raise ValueError("a row of the log-likelihood matrix has no finite entry")
    return xp.exp(ll - shift[..., None]), shift


def _host_vector(x: Any, k: int, name: str) -> np.ndarray:
    v = np.asarray(to_host(x), dtype=np.float64).reshape(-1)
    if v.size == 1 and k != 1:
        v = np.full(k, float(v[0]))
    if v.size != k:
        raise ValueError(f"{name} has {v.size} values for {k} components")
    return v


def prior_vectors(
    k: int, concentration: Any = 1.0, baseline: Any = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Host ``(a, n)``: the Dirichlet concentration ``a [K] > 0`` and the normalised prior
    ensemble ``n [K] > 0`` (None: uniform)."""
    a = _host_vector(concentration, k, "concentration")
    if not np.all(np.isfinite(a) & (a > 0)):
        raise ValueError("concentrations must be finite and > 0")
    if baseline is None:
        return a, None
    n = _host_vector(baseline, k, "prior counts")
    if not np.all(np.isfinite(n) & (n > 0)):
        raise ValueError("prior counts must be finite and > 0")
    n = n / n.sum()
    if np.allclose(n, 1.0 / k, rtol=1e-14, atol=0):
        return a, None
    return a, n


def perplexity(w: Any) -> float:
    """``exp(H(w))``, ``H(w) = −Σ w_k log w_k`` (``0 log 0 = 0``): the effective number of
    components (1 for one structure, K for uniform weights)."""
    v = np.asarray(to_host(w), dtype=np.float64)
    v = v[v > 0]
    return float(np.exp(-np.sum(v * np.log(v))))


def mixture_log_likelihood(w: Any, L: Any, shift: Any, image_weights: Any = None) -> float:
    """``Σ_i m_i log Σ_k w_k exp(ll_ik)`` in nats (``m_i = 1`` without ``image_weights``)."""
    xp = array_module(L)
    w = xp.asarray(w, dtype=xp.float64)
    p = xp.maximum(L @ w, _TINY)
    terms = xp.log(p) + shift
    if image_weights is not None:
        terms = terms * xp.asarray(image_weights, dtype=xp.float64)
    return float(terms.sum())


def responsibilities(w: Any, L: Any) -> Any:
    """``r_ik = w_k L_ik / Σ_m w_m L_im``, float64 ``[N, K]`` (rows sum to 1)."""
    xp = array_module(L)
    wl = L * xp.asarray(w, dtype=xp.float64)
    return wl / xp.maximum(wl.sum(axis=-1, keepdims=True), _TINY)


def log_prior(w: Any, concentration: Any = 1.0, baseline: Any = None) -> float:
    """Log of the prior density of ``w`` up to its constant: ``Σ (a_k − 1) log w_k −
    A log Σ w_k / n_k`` (the scaled Dirichlet of the reweighting factors; ``−inf`` where a
    weight with ``a_k > 1`` is zero)."""
    v = np.asarray(to_host(w), dtype=np.float64)
    a, n = prior_vectors(v.size, concentration, baseline)
    with np.errstate(divide="ignore"):
        out = float(np.sum(np.where(a != 1.0, (a - 1.0) * np.log(v), 0.0)))
    if n is not None:
        out -= float(a.sum()) * math.log(float(np.sum(v / n)))
    return out


# ------------------------------------------------------------------------------ EM
@dataclass(frozen=True)
class FitResult:
    """The maximum of the posterior (or likelihood) found by :func:`fit_weights`.

    Attributes
    ----------
    weights : array
        float64 ``[K]`` on the simplex (same array module as ``L``).
    objective : float
        ``log-likelihood (shifted rows) + log prior`` at ``weights``, nats.
    gap : float
        The Frank–Wolfe certificate ``max_k ∇_k F − 1`` at ``weights`` (per image, nats).
    iterations : int
        EM-map evaluations (each one pass over the matrix).
    converged : bool
        ``gap < tol``.
    history : numpy.ndarray
        float64 ``[iterations, 2]``: objective and gap at each evaluation.
    """

    weights: Any
    objective: float
    gap: float
    iterations: int
    converged: bool
    history: np.ndarray = field(repr=False)


def _newton_factors(b: np.ndarray, n: np.ndarray, d: float, total: float) -> np.ndarray:
    """The M-step with prior counts: ``f_k = b_k / (d + ν n_k)`` on the simplex.

    ``h(ν) = Σ b_k / (d + ν n_k) − 1`` is convex and decreasing, so Newton's method from the
    lower bound ``ν = total / max n`` increases monotonically to the root.
    """
    nu = total / float(n.max())
    for _ in range(200):
        den = d + nu * n
        h = float(np.sum(b / den)) - 1.0
        dh = -float(np.sum(b * n / den**2))
        if dh == 0.0:
            break
        step = -h / dh
        nu += step
        if abs(step) <= 1e-15 * abs(nu):
            break
    f = b / (d + nu * n)
    return f / f.sum()


def _check_map_prior(a: np.ndarray) -> None:
    if np.any(a < 1.0):
        raise ValueError(
            "the posterior density is unbounded for a concentration < 1; fit the maximum "
            "likelihood (concentration 1) instead"
        )


def fit_weights(
    L: Any,
    *,
    concentration: Any = 1.0,
    baseline: Any = None,
    image_weights: Any = None,
    init: Any = None,
    tol: float = 1e-8,
    max_iter: int = 100_000,
    accelerate: bool = True,
) -> FitResult:
    """Maximum-a-posteriori weights by EM (SQUAREM-accelerated), with a certificate.

    Parameters
    ----------
    L : array
        float64 ``[N, K]``, rows shifted to max 1 (:func:`shift_rows`).
    concentration : float or array
        Dirichlet concentration of the reweighting factors, ``≥ 1`` (1: maximum likelihood).
    baseline : array or None
        Prior counts ``[K]`` (cryoER's ``N_m``); None for a uniform prior ensemble.
    image_weights : array or None
        Non-negative weight of each image ``[N]`` (bootstrap counts, CV folds).
    init : array or None
        Starting weights ``[K]`` (default uniform); zero entries stay zero.
    tol : float
        Stop when the Frank–Wolfe gap ``max_k ∇_k F − 1`` is below this (per image, nats).
    max_iter : int
        Most EM-map evaluations.
    accelerate : bool
        SQUAREM steps (each kept only when it raises the objective) instead of plain EM.
    """
    xp = array_module(L)
    n_img, k = L.shape
    a_h, n_h = prior_vectors(k, concentration, baseline)
    _check_map_prior(a_h)
    m = (
        xp.ones(n_img, dtype=xp.float64)
        if image_weights is None
        else xp.asarray(image_weights, dtype=xp.float64)
    )
    n_eff = float(m.sum())
    if not n_eff > 0:
        raise ValueError("the image weights sum to zero")
    ml = bool(np.all(a_h == 1.0))
    a = xp.asarray(a_h)
    d = float(a_h.sum()) - k
    n = None if n_h is None else xp.asarray(n_h)
    history: list[tuple[float, float]] = []

    def m_step(c: Any) -> Any:
        b = c if ml else c + a - 1.0
        if n_h is None or d <= 0.0:
            return b / b.sum()
        f = _newton_factors(np.asarray(to_host(b)), n_h, d, n_eff)
        wn = f * n_h
        return xp.asarray(wn / wn.sum())

    def evaluate(w: Any) -> tuple[float, float, Any]:
        p = xp.maximum(L @ w, _TINY)
        g_lik = L.T @ (m / p)
        obj = float((m * xp.log(p)).sum())
        grad = g_lik
        if not ml:
            safe = xp.maximum(w, _TINY)
            obj += float(xp.where(a != 1.0, (a - 1.0) * xp.log(safe), 0.0).sum())
            grad = grad + xp.where(a != 1.0, (a - 1.0) / safe, 0.0)
            if n is not None:
                s = float((w / n).sum())
                obj -= d * math.log(s)
                grad = grad - d / (n * s)
            else:
                grad = grad - d
        gap = float((grad / n_eff).max()) - 1.0
        history.append((obj, gap))
        return obj, gap, m_step(w * g_lik)

    w = (
        xp.full(k, 1.0 / k, dtype=xp.float64)
        if init is None
        else xp.asarray(init, dtype=xp.float64) / float(xp.asarray(init).sum())
    )
    best = None
    while True:
        obj, gap, w1 = evaluate(w)
        best = (w, obj, gap)
        if gap < tol or len(history) >= max_iter:
            break
        if not accelerate:
            w = w1
            continue
        obj1, gap1, w2 = evaluate(w1)
        if gap1 < tol or len(history) >= max_iter:
            best = (w1, obj1, gap1)
            break
        r = w1 - w
        v = w2 - w1 - r
        rn, vn = float(xp.sqrt((r * r).sum())), float(xp.sqrt((v * v).sum()))
        if vn == 0.0 or rn == 0.0:
            w = w2
            continue
        s = min(-1.0, -rn / vn)
        zero = w2 == 0
        wp = w2
        for _ in range(40):
            cand = xp.where(zero, 0.0, w - 2.0 * s * r + s * s * v)
            if bool(xp.all(cand >= 0)) and bool(xp.all(cand[~zero] > 0)):
                wp = cand / cand.sum()
                break
            s = (s - 1.0) / 2.0
            if s > -1.0 - 1e-12:
                break
        objp, gapp, wp2 = evaluate(wp)
        if gapp < tol:
            best = (wp, objp, gapp)
            break
        w = wp2 if objp >= obj1 else w2
        if len(history) >= max_iter:
            obj, gap, _ = evaluate(w)
            best = (w, obj, gap)
            break
    w, obj, gap = best
    return FitResult(w, obj, gap, len(history), gap < tol, np.asarray(history))


# ------------------------------------------------------------------------------ Gibbs
@dataclass(frozen=True)
class GibbsResult:
    """Posterior draws of :func:`gibbs`.

    Attributes
    ----------
    weights : array
        float64 ``[C, S, K]``: chain, draw, component.
    counts : array
        int64 ``[C, S, K]``: latent assignment counts ``Σ_i 1[z_i = k]`` drawn after each
        kept draw.
    log_likelihood : array
        float64 ``[C, S]``: ``Σ_i log Σ_k w_k L_ik`` of each draw (shifted rows; add
        ``shift.sum()`` for the log-likelihood in nats).
    acceptance : numpy.ndarray
        float64 ``[C]``: acceptance rate of the Dirichlet draws (below 1 only with prior
        counts, where they are Metropolis–Hastings proposals).
    move_acceptance : numpy.ndarray or None
        float64 ``[C]``: acceptance rate of the independence moves from the Laplace
        proposal (None without a proposal).
    initial : numpy.ndarray
        float64 ``[C, K]``: the chains' starting weights.
    moved_fraction : float
        Mean share of assignments that differ from each image's dominant component (only
        their rows are read twice in an iteration).
    """

    weights: Any
    counts: Any
    log_likelihood: Any
    acceptance: np.ndarray
    move_acceptance: np.ndarray | None
    initial: np.ndarray
    moved_fraction: float


@dataclass(frozen=True)
class Proposal:
    """A multivariate-t independence proposal for the weights in the softmax basis:
    ``η = log w_k − log w_ref`` (``k ≠ ref``) ``~ t_df(mean, covariance)``
    (:meth:`LaplaceResult.proposal`)."""

    mean: np.ndarray
    covariance: np.ndarray
    reference: int
    df: float = 15.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "_chol", np.linalg.cholesky(self.covariance))
        object.__setattr__(self, "_precision", np.linalg.inv(self.covariance))

    @property
    def keep(self) -> list[int]:
        return [j for j in range(self.mean.size + 1) if j != self.reference]

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(weights [n, K], log q)`` of ``n`` draws (log density up to a constant)."""
        d = self.mean.size
        z = rng.standard_normal((n, d)) @ self._chol.T
        g = rng.chisquare(self.df, size=n) / self.df
        eta = self.mean + z / np.sqrt(g)[:, None]
        return self.weights(eta), self.log_density(eta)

    def weights(self, eta: np.ndarray) -> np.ndarray:
        theta = np.zeros((eta.shape[0], self.mean.size + 1))
        theta[:, self.keep] = eta
        e = np.exp(theta - theta.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def eta(self, w: np.ndarray) -> np.ndarray:
        lw = np.log(np.maximum(w, _TINY))
        return lw[:, self.keep] - lw[:, [self.reference]]

    def log_density(self, eta: np.ndarray) -> np.ndarray:
        delta = eta - self.mean
        quad = np.einsum("ij,jk,ik->i", delta, self._precision, delta)
        return -0.5 * (self.df + self.mean.size) * np.log1p(quad / self.df)


def default_rng(xp: ModuleType, seed: int | None) -> Any:
    """A random generator of ``xp`` (``numpy.random.default_rng`` or CuPy's)."""
    return np.random.default_rng(seed) if xp is np else xp.random.default_rng(seed)


def _dirichlet(xp: ModuleType, rng: Any, shape: Any) -> Any:
    """Dirichlet draws along the last axis, robust to small shapes (log-space gammas:
    ``G = G' U^(1/a)`` with ``G' ~ Gamma(a + 1)`` for ``a < 1``)."""
    small = shape < 1.0
    g = rng.standard_gamma(xp.where(small, shape + 1.0, shape))
    logg = xp.log(xp.maximum(g, _TINY))
    u = 1.0 - rng.random(shape.shape)
    logg = logg + xp.where(small, xp.log(u) / shape, 0.0)
    e = xp.exp(logg - logg.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _over_dispersed_starts(chains: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Starting weights spread over the simplex (Dirichlet(½) mixed with 10 % uniform)."""
    g = rng.dirichlet(np.full(k, 0.5), size=chains)
    return 0.9 * g + 0.1 / k


class _Dominant:
    """Per-image dominant component ``d_i`` (``L_id = 1``), the counts ``[C, K]`` of the
    assignments ``z = d`` and, for a shared matrix, ``R = Lᵀ`` with each image's dominant
    entry set to 0 (``[K, N]`` contiguous: ``w R`` is every image's density without its
    dominant component, and the rows of ``R`` are what the inverse-CDF draw reads)."""

    def __init__(self, L: Any, chains: int) -> None:
        xp = array_module(L)
        k = int(L.shape[-1])
        self.d = xp.argmax(L, axis=-1)
        if L.ndim == 2:
            rest = xp.ascontiguousarray(L.T)
            rest[self.d, xp.arange(L.shape[0])] = 0.0
            self.rest = rest
            self.rest_rows = xp.ascontiguousarray(rest.T)
            self.base = xp.tile(xp.bincount(self.d, minlength=k), (chains, 1))
        else:
            self.rest = self.rest_rows = None
            offset = k * xp.arange(chains)[:, None]
            self.base = xp.reshape(
                xp.bincount(xp.ravel(self.d + offset), minlength=chains * k), (chains, k)
            )


def _densities(xp: ModuleType, L: Any, dom: _Dominant, w: Any) -> Any:
    """``p_ci = Σ_k w_ck L_ik`` ``[C, N]`` (one matrix product for all chains)."""
    if dom.rest is None:
        return xp.matmul(L, w[:, :, None])[..., 0]
    return w @ dom.rest + xp.take(w, dom.d, axis=1)


def _sum_log(xp: ModuleType, p: Any) -> Any:
    """``Σ_i log max(p_ri, 1e-300)`` of each row of densities ``p [R, N]`` (``p ≤ 1``).

    When every density is at least ``2^-100``, products of 8 (at least ``2^-800``, no
    underflow) are formed by three halvings and only their logarithms are taken.
    """
    n = int(p.shape[-1])
    n8 = n - n % 8
    if n8 < 64 or not float(p.min()) >= 2.0**-100:
        return xp.log(xp.maximum(p, _TINY)).sum(axis=-1)
    x = p[..., :n8]
    for _ in range(3):
        h = x.shape[-1] // 2
        x = x[..., :h] * x[..., h:]
    out = xp.log(x).sum(axis=-1)
    if n8 < n:
        out = out + xp.log(p[..., n8:]).sum(axis=-1)
    return out


def _inverse_cdf(xp: ModuleType, rest: Any, weight: Any, target: Any) -> Any:
    """``z = #{k : Σ_{j ≤ k} weight_j rest_j ≤ target}`` (the inverse CDF of the target in
    the components' order; ``K`` when the target is past them all), small integers of
    ``target``'s shape. ``rest [K, n]``; ``weight [K, ...]`` broadcasts with it to
    ``target``'s shape. One pass over the ``K`` rows with preallocated buffers."""
    k = int(rest.shape[0])
    acc = weight[0] * rest[0]
    below = acc <= target
    z = below.astype(xp.int8 if k < 127 else xp.int32)
    tmp = xp.empty_like(acc)
    for j in range(1, k):
        xp.multiply(weight[j], rest[j], out=tmp)
        acc += tmp
        xp.less_equal(acc, target, out=below)
        z += below
    return z


def _assign(xp: ModuleType, L: Any, dom: _Dominant, w: Any, p: Any, rng: Any) -> tuple[Any, int]:
    """Sample every ``z_i ~ Cat(w_k L_ik)`` given the densities ``p = L w`` ``[C, N]``;
    return the counts ``[C, K]`` and how many assignments differ from the dominant
    component.

    With ``t_i = u_i p_i``, ``u_i ~ U(0, 1)``: ``z_i = d_i`` unless ``t_i < p_i − w_d``
    (probability ``1 − w_d / p_i``); then ``z_i`` is the inverse CDF of ``t_i`` over the other
    components in order (``R``'s rows, :func:`_inverse_cdf`). When few images move only
    their columns of ``R`` are read; else every column, in blocks that stay in cache - the
    same arithmetic on the same numbers either way, so the map from the uniforms to ``z``
    does not depend on the path.
    """
    if dom.rest is None:
        return _assign_stacked(xp, L, dom, w, p, rng)
    c, k = w.shape
    n_img = L.shape[-2]
    wd = xp.take(w, dom.d, axis=1)
    target = rng.random((c, n_img)) * p
    move = target < p - wd
    n_move = int(xp.count_nonzero(move))
    if not n_move:
        return dom.base, 0
    offset = k * xp.arange(c)
    if n_move > _DIRECT * c * n_img:
        wt = w.T[:, :, None]  # [K, C, 1]
        z = xp.empty((c, n_img), dtype=xp.int8 if k < 127 else xp.int32)
        for a in range(0, n_img, _BLOCK):
            b = min(n_img, a + _BLOCK)
            z[:, a:b] = _inverse_cdf(xp, dom.rest[:, a:b], wt, target[:, a:b])
        # movers past every component (round-off, ~1e-16) keep their dominant one
        zz = xp.where(move & (z < k), z, dom.d[None, :]) + offset[:, None]
        counts = xp.reshape(xp.bincount(xp.ravel(zz), minlength=c * k), (c, k))
        return counts, n_move
    flat = xp.flatnonzero(move)  # chain-major: each chain's movers are one slice
    cm = flat // n_img
    ii = flat - cm * n_img
    dm = xp.take(dom.d, ii)
    t = xp.take(xp.ravel(target), flat)
    rows = xp.take(dom.rest_rows, ii, axis=0)  # [moving, K]
    ends = np.cumsum(np.asarray(to_host(xp.count_nonzero(move, axis=1))))
    z = xp.empty(n_move, dtype=xp.int8 if k < 127 else xp.int32)
    start = 0
    for ch in range(c):
        wc = w[ch][:, None]
        for a in range(start, int(ends[ch]), _BLOCK):
            b = min(int(ends[ch]), a + _BLOCK)
            z[a:b] = _inverse_cdf(xp, rows[a:b].T, wc, t[a:b])
        start = int(ends[ch])
    zm = xp.where(z < k, z, dm)
    moved = xp.bincount(zm + k * cm, minlength=c * k) - xp.bincount(dm + k * cm, minlength=c * k)
    return dom.base + xp.reshape(moved, (c, k)), n_move


def _assign_stacked(
    xp: ModuleType, L: Any, dom: _Dominant, w: Any, p: Any, rng: Any
) -> tuple[Any, int]:
    """:func:`_assign` for ``C`` independent problems ``L [C, N, K]`` (one chain each).

    With ``u_i ~ U(0, 1)``: ``z_i = d_i`` unless ``u_i p_i < p_i − w_d`` (probability
    ``1 − w_d / p_i``), so only those images' rows are read again, and ``u_i p_i`` picks their
    component from the cumulative sum of the other components.
    """
    c, k = w.shape
    n_img = L.shape[-2]
    wd = xp.take_along_axis(w, dom.d, axis=1)
    target = rng.random((c, n_img)) * p
    flat = xp.flatnonzero(target < p - wd)
    n_move = int(flat.size)
    counts = dom.base
    if not n_move:
        return counts, 0
    if n_move > _DIRECT * c * n_img:
        # most images move: one pass over every row beats gathering them (the same map from
        # the uniforms to z as below, since the choice of path depends on them), in blocks
        # of images small enough to stay in cache
        move = target < p - wd
        counts = xp.zeros((c, k), dtype=xp.int64)
        for ch in range(c):
            for a in range(0, n_img, _BLOCK):
                b = min(n_img, a + _BLOCK)
                d = dom.d[ch, a:b]
                wl = L[ch, a:b] * w[ch]
                xp.put_along_axis(wl, d[:, None], 0.0, axis=1)
                cum = xp.cumsum(wl, axis=1)
                z = xp.minimum((cum <= target[ch, a:b, None]).sum(axis=1), k - 1)
                ok = move[ch, a:b] & (xp.take_along_axis(wl, z[:, None], axis=1)[:, 0] > 0)
                counts[ch] += xp.bincount(xp.where(ok, z, d), minlength=k)
        return counts, n_move
    cm = flat // n_img
    rows = xp.take(xp.reshape(L, (-1, k)), flat, axis=0)
    dm = xp.take(xp.ravel(dom.d), flat)
    wl = rows * xp.take(w, cm, axis=0)
    xp.put_along_axis(wl, dm[:, None], 0.0, axis=1)
    cum = xp.cumsum(wl, axis=1)
    z = xp.minimum((cum <= xp.take(xp.ravel(target), flat)[:, None]).sum(axis=1), k - 1)
    # round-off past the last positive entry (probability ~1e-16): keep the dominant one
    z = xp.where(xp.take_along_axis(wl, z[:, None], axis=1)[:, 0] > 0, z, dm)
    moved = xp.bincount(z + k * cm, minlength=c * k) - xp.bincount(dm + k * cm, minlength=c * k)
    return counts + xp.reshape(moved, (c, k)), n_move


def gibbs(
    L: Any,
    *,
    concentration: Any = 1.0,
    baseline: Any = None,
    chains: int = 4,
    samples: int = 500,
    warmup: int = 200,
    thin: int = 1,
    seed: int | None = 0,
    rng: Any = None,
    init: Any = None,
    proposal: Proposal | None = None,
    moves: int = 1,
) -> GibbsResult:
    """Exact posterior draws of the weights by Gibbs sampling with latent assignments.

    Parameters
    ----------
    L : array
        float64 ``[N, K]`` rows shifted to max 1 (:func:`shift_rows`), shared by the
        ``chains``; or ``[C, N, K]``: ``C`` independent problems, one chain each.
    concentration, baseline
        The prior (:func:`prior_vectors`).
    chains : int
        Chains for a shared ``[N, K]`` matrix (ignored for ``[C, N, K]``).
    samples, warmup, thin : int
        Draws kept per chain, iterations discarded first, and the kept draws' spacing.
    seed, rng
        ``rng`` (an object with ``random(shape)`` and ``standard_gamma(shape)`` returning
        arrays of ``L``'s module) or else a generator seeded with ``seed``. Starting points,
        proposals and acceptance tests use a NumPy generator seeded with ``seed``.
    init : array or None
        Starting weights ``[C, K]`` (default: over-dispersed random starts).
    proposal : Proposal or None
        Shared ``L`` only: before each Gibbs update, an independence Metropolis–Hastings
        move from this proposal (the Laplace approximation, :meth:`LaplaceResult.proposal`),
        accepted with the exact posterior ratio. Far better mixing where the assignments
        are ambiguous; exactness is unchanged.
    moves : int
        Independence moves per iteration with a proposal (each one product ``L w'``).

    Notes
    -----
    One iteration: ``p = L w`` (one matrix product for all chains, which with a proposal
    also gives the densities of the next independence proposal ``w'``: it does not depend on
    the state); with a proposal, the move ``w → w'``; ``z_i ~ Cat(w_k L_ik)`` for every image (most
    decided by one comparison, see :func:`_assign`); then ``w' ~ Dirichlet(a + counts)``;
    with prior counts that draw is an independence Metropolis–Hastings proposal for
    ``p(w | z)`` accepted with ``min(1, t(w')/t(w))``. Every step leaves the posterior
    exactly invariant.
    """
    xp = array_module(L)
    shared = L.ndim == 2
    c = int(chains) if shared else int(L.shape[0])
    k = int(L.shape[-1])
    if c < 1 or samples < 1 or warmup < 0 or thin < 1:
        raise ValueError("need chains ≥ 1, samples ≥ 1, warmup ≥ 0 and thin ≥ 1")
    if proposal is not None and (not shared or proposal.mean.size != k - 1):
        raise ValueError("a proposal needs a shared [N, K] matrix and K − 1 coordinates")
    a_h, n_h = prior_vectors(k, concentration, baseline)
    host_rng = np.random.default_rng(seed)
    rng = default_rng(xp, seed) if rng is None else rng
    w0 = (
        _over_dispersed_starts(c, k, host_rng)
        if init is None
        else np.asarray(to_host(init), dtype=np.float64).reshape(c, k)
    )
    w0 = w0 / w0.sum(axis=1, keepdims=True)
    a = xp.asarray(a_h)
    big_a = float(a_h.sum())
    inv_n = None if n_h is None else xp.asarray(1.0 / n_h)

    def log_prior_host(w: np.ndarray) -> np.ndarray:
        out = np.log(np.maximum(w, _TINY)) @ (a_h - 1.0)
        if n_h is not None:
            out -= big_a * np.log(w @ (1.0 / n_h))
        return out

    dom = _Dominant(L, c)
    w = xp.asarray(w0)
    out_w = xp.empty((c, samples, k), dtype=xp.float64)
    out_c = xp.empty((c, samples, k), dtype=xp.int64)
    out_ll = xp.empty((c, samples), dtype=xp.float64)
    accepted = xp.zeros(c, dtype=xp.float64)
    n_moves = np.zeros(c)
    n_iter = warmup + samples * thin
    n_cand = 0
    for it in range(n_iter):
        first = None
        if proposal is None:
            p = _densities(xp, L, dom, w)
            loglik = _sum_log(xp, p)
        else:
            # the first move's proposal is independent of the state: one product for both
            first = proposal.draw(host_rng, c)
            both = _densities(xp, L, dom, xp.concatenate([w, xp.asarray(first[0])]))
            ll_both = _sum_log(xp, both)
            p, loglik = both[:c], ll_both[:c]
        keep = it >= warmup and (it - warmup) % thin == 0
        if keep:
            j = (it - warmup) // thin
            out_w[:, j] = w
            out_ll[:, j] = loglik
        if proposal is not None:
            # independence MH in the softmax basis: target ℓ(w) + log p(w) + Σ log w
            w_h = np.asarray(to_host(w))
            ll_old = np.asarray(to_host(loglik))
            log_old = ll_old + log_prior_host(w_h) + np.log(np.maximum(w_h, _TINY)).sum(axis=1)
            q_old = proposal.log_density(proposal.eta(w_h))
            for move in range(moves):
                if move == 0:
                    new_h, q_new = first
                    p_new = both[c:]
                    ll_new = np.asarray(to_host(ll_both[c:]))
                else:
                    new_h, q_new = proposal.draw(host_rng, c)
                    p_new = _densities(xp, L, dom, xp.asarray(new_h))
                    ll_new = np.asarray(to_host(_sum_log(xp, p_new)))
                w_new = xp.asarray(new_h)
                log_new = (
                    ll_new + log_prior_host(new_h) + np.log(np.maximum(new_h, _TINY)).sum(axis=1)
                )
                ok_h = np.log(1.0 - host_rng.random(c)) < (log_new + q_old) - (log_old + q_new)
                if ok_h.any():
                    ok = xp.asarray(ok_h)
                    w = xp.where(ok[:, None], w_new, w)
                    p = xp.where(ok[:, None], p_new, p)
                    log_old = np.where(ok_h, log_new, log_old)
                    q_old = np.where(ok_h, q_new, q_old)
                    n_moves += ok_h
        counts, nc = _assign(xp, L, dom, w, p, rng)
        n_cand += nc
        if keep:
            out_c[:, j] = counts
        prop = _dirichlet(xp, rng, a + counts)
        if inv_n is None:
            w = prop
            accepted += 1.0
        else:
            log_t_new = -big_a * xp.log((prop * inv_n).sum(axis=-1))
            log_t_old = -big_a * xp.log((w * inv_n).sum(axis=-1))
            ok = xp.log(1.0 - rng.random((c,))) < log_t_new - log_t_old
            w = xp.where(ok[:, None], prop, w)
            accepted += ok.astype(xp.float64)
    return GibbsResult(
        out_w,
        out_c,
        out_ll,
        np.asarray(to_host(accepted)) / n_iter,
        None if proposal is None else n_moves / (n_iter * max(moves, 1)),
        w0,
        n_cand / float(n_iter * c * L.shape[-2]),
    )


# ------------------------------------------------------------------------------ summaries
@dataclass(frozen=True)
class Summary:
    """Mean, sd and quantiles of draws of the weights (host NumPy, ``[K]`` each)."""

    mean: np.ndarray
    sd: np.ndarray
    quantiles: dict[float, np.ndarray]

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
        return self.quantiles[round(lo, 6)], self.quantiles[round(hi, 6)]


#: the quantiles every summary reports
QUANTILES = (0.025, 0.05, 0.25, 0.5, 0.75, 0.95, 0.975)


def summarize(draws: Any, quantiles: Sequence[float] = QUANTILES) -> Summary:
    """Summary of draws ``[..., K]`` (all leading axes pooled)."""
    x = np.asarray(to_host(draws), dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    qs = np.quantile(x, list(quantiles), axis=0)
    sd = x.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1])
    return Summary(x.mean(axis=0), sd, {round(q, 6): qs[i] for i, q in enumerate(quantiles)})


# ------------------------------------------------------------------------------ Laplace
@dataclass(frozen=True)
class LaplaceResult:
    """The Laplace approximation in the softmax basis.

    Attributes
    ----------
    mode : numpy.ndarray
        float64 ``[K]``: the mode in the softmax basis (= :func:`fit_weights` with ``a + 1``).
    reference : int
        The component whose log-weight is fixed (the largest), ``η_k = log w_k − log w_ref``.
    covariance : numpy.ndarray
        float64 ``[K−1, K−1]``: covariance of ``η`` (the other components, in order).
    draws : numpy.ndarray
        float64 ``[D, K]``: weights ``softmax(η)`` for ``η ~ N(η̂, covariance)``.
    summary : Summary
        Of ``draws``.
    positive_definite : bool
        Whether the negative Hessian was positive definite (else its pseudo-inverse is used).
    converged : bool
        Whether the mode's EM met its certificate.
    """

    mode: np.ndarray
    reference: int
    covariance: np.ndarray
    draws: np.ndarray = field(repr=False)
    summary: Summary
    positive_definite: bool
    converged: bool

    def proposal(self, df: float = 15.0) -> Proposal:
        """This approximation as a multivariate-t proposal for :func:`gibbs`."""
        keep = [j for j in range(self.mode.size) if j != self.reference]
        lw = np.log(np.maximum(self.mode, _TINY))
        cov = (self.covariance + self.covariance.T) / 2.0
        return Proposal(lw[keep] - lw[self.reference], cov, self.reference, df)


def laplace(
    L: Any,
    *,
    concentration: Any = 1.0,
    baseline: Any = None,
    draws: int = 4000,
    seed: int | None = 0,
    tol: float = 1e-8,
    max_iter: int = 100_000,
) -> LaplaceResult:
    """Gaussian approximation of the posterior of ``θ = log w`` (up to a constant).

    The density of ``θ`` is ``ψ(θ) = ℓ(w) + Σ_k a_k log f_k`` with ``w = softmax(θ)`` and
    ``f = softmax(θ − log n)``; its negative Hessian is
    ``N (diag w − w wᵀ) − Σ_i (diag r_i − r_i r_iᵀ) + A (diag f − f fᵀ)``
    (``r_i``: responsibilities), restricted to ``θ_ref = 0``.
    """
    k = int(L.shape[-1])
    a_h, n_h = prior_vectors(k, concentration, baseline)
    fit = fit_weights(
        L, concentration=a_h + 1.0, baseline=n_h, tol=tol, max_iter=max_iter, accelerate=True
    )
    w_dev = fit.weights
    r = responsibilities(w_dev, L)
    outer = np.asarray(to_host(r.T @ r))
    c = np.asarray(to_host(r.sum(axis=0)))
    w = np.asarray(to_host(w_dev), dtype=np.float64)
    n_img = float(L.shape[0])
    f = w if n_h is None else (w / n_h) / np.sum(w / n_h)
    h = (
        n_img * (np.diag(w) - np.outer(w, w))
        - (np.diag(c) - outer)
        + a_h.sum() * (np.diag(f) - np.outer(f, f))
    )
    ref = int(np.argmax(w))
    keep = [j for j in range(k) if j != ref]
    h_red = h[np.ix_(keep, keep)]
    eta = np.log(np.maximum(w[keep], _TINY)) - math.log(w[ref])
    pd = True
    if k == 1:
        cov = np.zeros((0, 0))
    else:
        try:
            chol = np.linalg.cholesky(h_red)
            cov = np.linalg.inv(chol).T @ np.linalg.inv(chol)
        except np.linalg.LinAlgError:
            pd = False
            cov = np.linalg.pinv(h_red)
    rng = np.random.default_rng(seed)
    theta = np.zeros((draws, k))
    if k > 1:
        theta[:, keep] = rng.multivariate_normal(eta, (cov + cov.T) / 2.0, size=draws)
    e = np.exp(theta - theta.max(axis=1, keepdims=True))
    samples = e / e.sum(axis=1, keepdims=True)
    return LaplaceResult(w, ref, cov, samples, summarize(samples), pd, fit.converged)


# ------------------------------------------------------------------------------ bootstrap
@dataclass(frozen=True)
class BootstrapResult:
    """Weights refitted on bootstrap resamples of the images.

    Attributes
    ----------
    draws : numpy.ndarray
        float64 ``[B, K]``.
    summary : Summary
        Of ``draws`` (percentile intervals).
    converged : int
        How many refits met their certificate.
    """

    draws: np.ndarray = field(repr=False)
    summary: Summary
    converged: int


def bootstrap(
    L: Any,
    replicates: int,
    *,
    concentration: Any = 1.0,
    baseline: Any = None,
    init: Any = None,
    seed: int | None = 0,
    tol: float = 1e-8,
    max_iter: int = 100_000,
) -> BootstrapResult:
    """Refit the weights on ``replicates`` resamples of the images (with replacement, as
    multinomial image weights), each EM started from ``init``."""
    xp = array_module(L)
    n_img = int(L.shape[0])
    rng = np.random.default_rng(seed)
    out, ok = [], 0
    for _ in range(int(replicates)):
        counts = np.bincount(rng.integers(0, n_img, n_img), minlength=n_img).astype(np.float64)
        fit = fit_weights(
            L,
            concentration=concentration,
            baseline=baseline,
            image_weights=xp.asarray(counts),
            init=init,
            tol=tol,
            max_iter=max_iter,
        )
        out.append(np.asarray(to_host(fit.weights)))
        ok += int(fit.converged)
    draws = np.asarray(out, dtype=np.float64).reshape(-1, L.shape[1])
    return BootstrapResult(draws, summarize(draws), ok)


# ------------------------------------------------------------------------------ CV
@dataclass(frozen=True)
class CrossValidation:
    """K-fold held-out log predictive density (nats), summed over all images.

    Attributes
    ----------
    folds : int
    elpd : dict
        ``{"fitted": ..., "uniform": ..., "best_single": ...}``: total held-out
        ``log p(y_i | weights fitted without fold(i))``.
    difference, standard_error : dict
        ``{"fitted_vs_uniform": ..., "fitted_vs_best_single": ...}``: totals of the
        per-image differences and their standard errors ``sqrt(N var(diff))``.
    best_single : list of int
        The structure chosen (best training log-likelihood) in each fold.
    per_image : numpy.ndarray
        float64 ``[N, 3]``: held-out log density of each image (fitted, uniform, single).
    """

    folds: int
    elpd: dict[str, float]
    difference: dict[str, float]
    standard_error: dict[str, float]
    best_single: list[int]
    per_image: np.ndarray = field(repr=False)


def cross_validate(
    loglik: Any,
    folds: int,
    *,
    concentration: Any = 1.0,
    baseline: Any = None,
    single_candidates: Sequence[int] | None = None,
    seed: int | None = 0,
    tol: float = 1e-8,
    max_iter: int = 100_000,
) -> CrossValidation:
    """Fit on all folds but one, score the held-out images; for the fitted weights, uniform
    weights, and the single structure (among ``single_candidates``, default all) with the
    best training log-likelihood. Images are assigned to folds at random (``seed``)."""
    xp = array_module(loglik)
    ll = xp.asarray(loglik, dtype=xp.float64)
    n_img, k = ll.shape
    if not 2 <= folds <= n_img:
        raise ValueError(f"need 2 ≤ folds ≤ n_images ({n_img}), not {folds}")
    L, shift = shift_rows(ll)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n_img, dtype=np.int64)
    fold_of[rng.permutation(n_img)] = np.arange(n_img) % folds
    fold_dev = xp.asarray(fold_of)
    cands = list(range(k)) if single_candidates is None else [int(j) for j in single_candidates]
    per = np.zeros((n_img, 3))
    uniform = np.asarray(
        to_host(xp.log(xp.maximum(L.mean(axis=1), _TINY)) + shift), dtype=np.float64
    )
    chosen = []
    for f in range(folds):
        train = fold_dev != f
        fit = fit_weights(
            L,
            concentration=concentration,
            baseline=baseline,
            image_weights=train.astype(xp.float64),
            tol=tol,
            max_iter=max_iter,
        )
        test = fold_of == f
        lpd = xp.log(xp.maximum(L @ fit.weights, _TINY)) + shift
        per[test, 0] = np.asarray(to_host(lpd))[test]
        per[test, 1] = uniform[test]
        totals = np.asarray(to_host(xp.where(train[:, None], ll, 0.0).sum(axis=0)))
        best = cands[int(np.argmax(totals[cands]))]
        chosen.append(best)
        per[test, 2] = np.asarray(to_host(ll[:, best]))[test]
    diff_u = per[:, 0] - per[:, 1]
    diff_s = per[:, 0] - per[:, 2]

    def se(x: np.ndarray) -> float:
        finite = np.isfinite(x)
        if not finite.all():
            return math.inf
        return float(math.sqrt(n_img) * x.std(ddof=1)) if n_img > 1 else 0.0

    with np.errstate(invalid="ignore"):
        return CrossValidation(
            folds,
            {
                "fitted": float(per[:, 0].sum()),
                "uniform": float(per[:, 1].sum()),
                "best_single": float(per[:, 2].sum()),
            },
            {
                "fitted_vs_uniform": float(diff_u.sum()),
                "fitted_vs_best_single": float(diff_s.sum()),
            },
            {"fitted_vs_uniform": se(diff_u), "fitted_vs_best_single": se(diff_s)},
            chosen,
            per,
        )


# ------------------------------------------------------------------------------ temperature
@dataclass(frozen=True)
class TemperatureFit:
    """A temperature estimated from labelled images (:func:`calibrate_temperature`).

    Attributes
    ----------
    temperature : float
        ``T`` minimising the mean negative log-probability of the true labels.
    nll : float
        That mean (nats per image) at ``temperature``.
    nll_untempered : float
        The same at ``T = 1``.
    weights : numpy.ndarray
        ``[K]`` mixture weights used (the labels' shares unless given).
    """

    temperature: float
    nll: float
    nll_untempered: float
    weights: np.ndarray


def calibrate_temperature(
    loglik: Any, labels: Any, weights: Any = None, *, bounds: tuple[float, float] = (1e-2, 1e3)
) -> TemperatureFit:
    """The temperature of a power likelihood ``ℓ/T`` from images whose components are known.

    Temperature scaling (Guo et al. 2017): with ``r_ik(T) ∝ w_k exp(ll_ik / T)``, ``T``
    minimises ``−(1/N) Σ_i log r_i,labels_i(T)``, a convex function of ``β = 1/T`` (a
    log-sum-exp of functions linear in ``β`` minus a linear one), so the bounded scalar search
    finds its global minimum. Meant for simulated particles of the candidate structures
    (known labels) made and processed like the data: ``T > 1`` says their likelihood ratios
    are overconfident, ``T < 1`` underconfident.

    Parameters
    ----------
    loglik : array
        ``[N, K]`` log-likelihoods (nats) of labelled images.
    labels : array of int
        ``[N]`` the true component of each image.
    weights : array or None
        ``[K]`` mixture weights of those images (default: the labels' shares).
    bounds : (float, float)
        Search interval of ``T``.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    ll = np.asarray(to_host(loglik), dtype=np.float64)
    z = np.asarray(to_host(labels)).astype(np.int64).reshape(-1)
    if ll.ndim != 2 or z.size != ll.shape[0]:
        raise ValueError(f"expected loglik [N, K] and labels [N], got {ll.shape} and {z.shape}")
    n, k = ll.shape
    if np.any((z < 0) | (z >= k)):
        raise ValueError(f"labels must lie in 0 .. {k - 1}")
    if not np.all(np.isfinite(ll)):
        raise ValueError("the log-likelihoods must be finite")
    w = np.bincount(z, minlength=k) / n if weights is None else _host_vector(weights, k, "weights")
    with np.errstate(divide="ignore"):
        lw = np.log(w / w.sum())
    own = ll[np.arange(n), z]
    if not np.all(np.isfinite(lw[z])):
        raise ValueError("a label has zero weight")

    def nll(log_beta: float) -> float:
        beta = math.exp(log_beta)
        return float(np.mean(logsumexp(beta * ll + lw, axis=1) - beta * own - lw[z]))

    lo, hi = bounds
    res = minimize_scalar(
        nll, bounds=(-math.log(hi), -math.log(lo)), method="bounded", options={"xatol": 1e-10}
    )
    return TemperatureFit(float(math.exp(-res.x)), float(res.fun), nll(0.0), w / w.sum())


__all__ = [
    "QUANTILES",
    "BootstrapResult",
    "CrossValidation",
    "FitResult",
    "GibbsResult",
    "LaplaceResult",
    "Proposal",
    "Summary",
    "TemperatureFit",
    "bootstrap",
    "calibrate_temperature",
    "cross_validate",
    "default_rng",
    "fit_weights",
    "gibbs",
    "laplace",
    "log_prior",
    "mixture_log_likelihood",
    "perplexity",
    "prior_vectors",
    "responsibilities",
    "shift_rows",
    "summarize",
]
