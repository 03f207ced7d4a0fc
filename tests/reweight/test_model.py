"""The math of ``reweight`` against independent references (cryolike_dask.analysis).

EM against exact answers and ``scipy.optimize``; the Gibbs sampler against numerical
quadrature of the exact posterior and against ``scipy.stats`` Dirichlet/Beta laws; interval
coverage on synthetic mixtures; R-hat/ESS on chains with known answers; Laplace, bootstrap
and K-fold cross-validation on cases whose answer is clear.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats
from scipy.special import logsumexp

from cryolike_dask.analysis import mcmc
from cryolike_dask.analysis import reweight as rw
from tests.reweight.conftest import posterior_quadrature
from tests.standin import cupy_standin_fixture  # noqa: F401 - the fixture ``cupy_standin``


def _gauss_mixture(
    rng: np.random.Generator, n: int, weights: np.ndarray, means: np.ndarray
) -> np.ndarray:
    """Log-likelihood ``[n, K]`` of images ``y ~ Σ w_k N(μ_k, 1)`` under each component: the
    exact likelihood of the data, so Bayesian intervals are calibrated."""
    z = rng.choice(len(weights), size=n, p=weights)
    y = rng.normal(means[z], 1.0)
    return stats.norm.logpdf(y[:, None] - means[None, :])


# ------------------------------------------------------------------------------ EM
def test_four_by_two_maximum_likelihood_is_two_thirds() -> None:
    # Σ_i (L_i1 − L_i2) / (w L_i1 + (1 − w) L_i2) = 0 at w = 2/3 exactly
    ll = np.log(np.array([[3.0, 1.0], [3.0, 1.0], [5.0, 11.0], [5.0, 11.0]]))
    L, _ = rw.shift_rows(ll)
    fit = rw.fit_weights(L, tol=1e-14)
    assert fit.converged and fit.gap < 1e-14
    np.testing.assert_allclose(fit.weights, [2 / 3, 1 / 3], rtol=0, atol=1e-12)
    # the same with one-hot rows and an uninformative one (zero likelihoods allowed here)
    onehot = np.array([[0.0, -np.inf], [0.0, -np.inf], [-np.inf, 0.0], [0.0, 0.0]])
    fit = rw.fit_weights(rw.shift_rows(onehot)[0], tol=1e-14)
    np.testing.assert_allclose(fit.weights, [2 / 3, 1 / 3], rtol=0, atol=1e-12)
    # plain EM reaches the same point
    fit = rw.fit_weights(L, tol=1e-12, accelerate=False)
    np.testing.assert_allclose(fit.weights, [2 / 3, 1 / 3], rtol=0, atol=1e-10)


def _scipy_weights(
    ll: np.ndarray, alpha: np.ndarray | None = None, counts: np.ndarray | None = None
) -> np.ndarray:
    """L-BFGS on softmax parameters θ of the reweighting factors ``f = softmax(θ)``, with
    ``w = softmax(θ + log n)``: maximise ``Σ_i log Σ_k w_k exp(ll_ik) + Σ_k (α_k − 1) log f_k``
    (gradient ``c − N w + (α − 1) − (A − K) f``, ``c`` the summed responsibilities)."""
    n_img, k = ll.shape
    a = np.ones(k) if alpha is None else alpha
    log_n = np.zeros(k) if counts is None else np.log(counts / counts.sum())

    def negative(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_f = theta - logsumexp(theta)
        log_w = theta + log_n - logsumexp(theta + log_n)
        joint = ll + log_w
        rows = logsumexp(joint, axis=1)
        value = rows.sum() + np.sum((a - 1.0) * log_f)
        c = np.exp(joint - rows[:, None]).sum(axis=0)
        grad = c - n_img * np.exp(log_w) + (a - 1.0) - (a.sum() - k) * np.exp(log_f)
        return -value, -grad

    best = None
    for start in (np.zeros(k), np.linspace(-1, 1, k)):
        res = optimize.minimize(
            negative,
            start,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 50000, "ftol": 1e-16, "gtol": 1e-12, "maxcor": 50},
        )
        if best is None or res.fun < best.fun:
            best = res
    return np.exp(best.x + log_n - logsumexp(best.x + log_n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_agrees_with_scipy_lbfgs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 3 + seed
    w_true = rng.dirichlet(np.full(k, 2.0))
    ll = _gauss_mixture(rng, 300, w_true, np.linspace(0.0, 2.5, k))
    ll += rng.normal(0, 3.0, size=(300, 1))  # per-image offsets change nothing
    cases = [
        (None, None),
        (np.full(k, 2.5), None),
        (np.full(k, 3.0), rng.uniform(1, 10, size=k)),  # cryoER prior counts, MAP
        (None, rng.uniform(1, 10, size=k)),  # prior counts do not move the ML weights
    ]
    for alpha, counts in cases:
        fit = rw.fit_weights(
            rw.shift_rows(ll)[0],
            concentration=1.0 if alpha is None else alpha,
            baseline=counts,
            tol=1e-12,
        )
        assert fit.converged
        np.testing.assert_allclose(
            fit.weights, _scipy_weights(ll, alpha, counts), rtol=0, atol=1e-6
        )


def test_em_certificate_bounds_the_suboptimality() -> None:
    rng = np.random.default_rng(7)
    ll = _gauss_mixture(rng, 400, np.array([0.5, 0.3, 0.2]), np.array([0.0, 0.7, 1.4]))
    L, shift = rw.shift_rows(ll)
    best = rw.fit_weights(L, tol=1e-13)
    for tol in (1e-2, 1e-4, 1e-6):
        fit = rw.fit_weights(L, tol=tol, accelerate=False)
        assert fit.gap < tol
        gap_total = (best.objective - fit.objective) / L.shape[0]
        assert -1e-12 <= gap_total <= fit.gap
    assert rw.mixture_log_likelihood(best.weights, L, shift) == pytest.approx(
        logsumexp(ll + np.log(best.weights), axis=1).sum(), rel=1e-12
    )


# ------------------------------------------------------------------------------ Gibbs


@pytest.mark.parametrize("direct", [0.0, 2.0], ids=["every-row", "gathered"])
def test_assignments_follow_the_responsibilities(monkeypatch, direct: float) -> None:
    """Both ways of drawing ``z`` (all rows, or only the moving images' rows)."""
    monkeypatch.setattr(rw, "_DIRECT", direct)
    L = np.array([[1.0, 0.63, 0.1], [0.72, 1.0, 0.3], [0.05, 0.2, 1.0]])
    w = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    dom = rw._Dominant(L, 2)
    p = rw._densities(np, L, dom, w)
    rng = np.random.default_rng(0)
    reps = 20000
    total = sum(rw._assign(np, L, dom, w, p, rng)[0] for _ in range(reps))
    for c in range(2):
        r = rw.responsibilities(w[c], L)
        se = np.sqrt((r * (1 - r)).sum(axis=0) / reps)
        assert np.all(np.abs(total[c] / reps - r.sum(axis=0)) < 4.5 * se)


def test_sum_of_log_densities() -> None:
    """The sampler's ``Σ log p`` (logarithms of products of 8) against the plain sum."""
    rng = np.random.default_rng(5)
    for n in (7, 64, 1001, 4099):
        p = rng.uniform(1e-3, 1.0, size=(3, n))
        np.testing.assert_allclose(rw._sum_log(np, p), np.log(p).sum(axis=1), rtol=1e-13)
    p[1, 17] = 1e-200  # products of 8 could underflow: the plain sum is used
    np.testing.assert_allclose(rw._sum_log(np, p), np.log(p).sum(axis=1), rtol=1e-13)
    p[2, 5] = 0.0
    assert rw._sum_log(np, p)[2] == pytest.approx(np.log(1e-300) + np.log(np.delete(p[2], 5)).sum())


@pytest.mark.parametrize(
    ("n", "alpha", "counts", "moves"),
    [
        (25, 1.0, None, False),
        (25, 0.5, None, False),
        (25, 2.0, np.array([3.0, 1.0]), False),
        (5, 1.0, None, False),
        (25, 1.0, None, True),
        (25, 2.0, np.array([3.0, 1.0]), True),
        (5, 0.7, np.array([1.0, 4.0]), True),
    ],
    ids=[
        "uniform",
        "sparse",
        "prior-counts",
        "five-images",
        "uniform+moves",
        "prior-counts+moves",
        "five-images+moves",
    ],
)
def test_gibbs_matches_quadrature_for_two_structures(
    n: int, alpha: float, counts: np.ndarray | None, moves: bool
) -> None:
    rng = np.random.default_rng(3)
    ll = _gauss_mixture(rng, n, np.array([0.7, 0.3]), np.array([0.0, 1.5]))
    mean, sd = posterior_quadrature(ll, alpha, counts)
    L = rw.shift_rows(ll)[0]
    proposal = rw.laplace(L, concentration=alpha, baseline=counts).proposal() if moves else None
    g = rw.gibbs(
        L,
        concentration=alpha,
        baseline=counts,
        chains=4,
        samples=4000,
        warmup=100,
        seed=11,
        proposal=proposal,
    )
    x = g.weights[:, :, 0]
    ess = mcmc.ess_bulk(x)
    assert ess > 1500
    assert abs(x.mean() - mean) < 4 * sd / math.sqrt(ess)
    # the sd of a sample sd is about sd / sqrt(2 ESS) for near-normal draws; allow 5 of them
    assert abs(x.std() - sd) < 5 * sd / math.sqrt(2 * ess)
    if counts is not None:
        assert 0.2 < g.acceptance.min() <= 1.0
    if moves:
        assert g.move_acceptance is not None and g.move_acceptance.min() > 0.5


def test_one_hot_rows_give_exactly_the_dirichlet() -> None:
    counts = np.array([30, 15, 5])
    z = np.repeat(np.arange(3), counts)
    ll = np.full((50, 3), -np.inf)
    ll[np.arange(50), z] = np.random.default_rng(0).normal(size=50)
    alpha = 1.5
    g = rw.gibbs(rw.shift_rows(ll)[0], concentration=alpha, chains=2, samples=3000, warmup=0)
    assert np.all(g.counts == counts)  # every assignment is forced
    assert g.moved_fraction == 0.0
    post = stats.dirichlet(alpha + counts)
    draws = g.weights.reshape(-1, 3)
    for k in range(3):
        beta = stats.beta(alpha + counts[k], 3 * alpha + 50 - alpha - counts[k])
        assert stats.kstest(draws[:, k], beta.cdf).pvalue > 1e-3
    n = draws.shape[0]
    se = np.sqrt(post.var() / n)
    assert np.all(np.abs(draws.mean(axis=0) - post.mean()) < 4 * se)
    # iid draws: no autocorrelation beyond noise
    lag1 = np.corrcoef(g.weights[0, :-1, 0], g.weights[0, 1:, 0])[0, 1]
    assert abs(lag1) < 4 / math.sqrt(3000)


#: replicates, components, images, draws of the coverage test; the truth is drawn from the
#: prior Dirichlet(1, 1, 1), so exact posterior intervals cover it with probability 0.95.
COVERAGE_REPLICATES = 200
COVERAGE_TOLERANCE = (545, 592)  # of 600 intervals: 570 expected, binomial sd 5.3


def test_credible_intervals_cover_the_truth() -> None:
    rng = np.random.default_rng(2026)
    r, k, n = COVERAGE_REPLICATES, 3, 120
    means = np.array([0.0, 1.2, 2.4])
    truth = rng.dirichlet(np.ones(k), size=r)
    ll = np.stack([_gauss_mixture(rng, n, truth[j], means) for j in range(r)])
    L, _ = rw.shift_rows(ll)  # [R, N, K]: one chain per replicate
    g = rw.gibbs(L, samples=600, warmup=100, seed=5)
    lo, hi = np.quantile(g.weights[:, :, :], [0.025, 0.975], axis=1)
    inside = (lo <= truth) & (truth <= hi)
    covered = int(inside.sum())
    assert COVERAGE_TOLERANCE[0] <= covered <= COVERAGE_TOLERANCE[1], covered
    # per component: 190 of 200 expected, binomial sd 3.1
    assert np.all((inside.sum(axis=0) >= 178) & (inside.sum(axis=0) <= 199)), inside.sum(axis=0)


#: the same with the front end's sampler (one shared matrix per replicate, two chains, the
#: Laplace proposal's independence moves)
MOVES_REPLICATES = 100
MOVES_TOLERANCE = (270, 298)  # of 300 intervals: 285 expected, binomial sd 3.8


def test_credible_intervals_cover_the_truth_with_laplace_moves() -> None:
    rng = np.random.default_rng(7)
    k, n = 3, 120
    means = np.array([0.0, 1.2, 2.4])
    covered = 0
    for j in range(MOVES_REPLICATES):
        truth = rng.dirichlet(np.ones(k))
        L, _ = rw.shift_rows(_gauss_mixture(rng, n, truth, means))
        proposal = rw.laplace(L, draws=10).proposal()
        g = rw.gibbs(L, chains=2, samples=200, warmup=50, seed=j, proposal=proposal)
        lo, hi = np.quantile(g.weights.reshape(-1, k), [0.025, 0.975], axis=0)
        covered += int(((lo <= truth) & (truth <= hi)).sum())
    assert MOVES_TOLERANCE[0] <= covered <= MOVES_TOLERANCE[1], covered


# ------------------------------------------------------------------------------ R-hat / ESS
def test_rhat_and_ess_on_known_chains() -> None:
    rng = np.random.default_rng(1)
    iid = rng.normal(size=(4, 2000))
    assert mcmc.rhat(iid) < 1.01
    assert mcmc.split_rhat(iid) < 1.01
    assert 0.85 * 8000 < mcmc.ess_bulk(iid) < 1.15 * 8000
    assert 0.85 * 8000 < mcmc.ess(iid) < 1.15 * 8000
    assert mcmc.ess_tail(iid) > 0.6 * 8000
    # AR(1) with φ = 0.8: ESS = C S (1 − φ) / (1 + φ)
    phi, ar = 0.8, np.zeros((4, 4000))
    e = rng.normal(size=(4, 4000))
    ar[:, 0] = e[:, 0] / math.sqrt(1 - phi**2)
    for t in range(1, 4000):
        ar[:, t] = phi * ar[:, t - 1] + e[:, t]
    want = 16000 * (1 - phi) / (1 + phi)
    assert 0.75 * want < mcmc.ess_bulk(ar) < 1.25 * want
    assert mcmc.rhat(ar) < 1.02
    # one chain elsewhere, and a trend within chains: R-hat flags both
    shifted = iid.copy()
    shifted[0] += 1.0
    assert mcmc.rhat(shifted) > 1.1
    trend = iid + np.linspace(0, 3, 2000)
    assert mcmc.rhat(trend) > 1.1
    # classic split-R-hat by hand (BDA3)
    s = mcmc.split_chains(iid)
    n = s.shape[1]
    w = s.var(axis=1, ddof=1).mean()
    b = n * s.mean(axis=1).var(ddof=1)
    assert mcmc.split_rhat(iid) == pytest.approx(math.sqrt(((n - 1) / n * w + b / n) / w))
    with pytest.raises(ValueError):
        mcmc.rhat(np.zeros((2, 3)))


# ------------------------------------------------------------------------------ Laplace etc.
def test_laplace_and_bootstrap_agree_with_gibbs_when_well_identified() -> None:
    rng = np.random.default_rng(4)
    ll = _gauss_mixture(rng, 4000, np.array([0.5, 0.3, 0.2]), np.array([0.0, 3.0, 6.0]))
    L, _ = rw.shift_rows(ll)
    g = rw.gibbs(L, chains=2, samples=800, warmup=50, seed=2)
    post = rw.summarize(g.weights)
    lap = rw.laplace(L, draws=20000, seed=1)
    assert lap.positive_definite and lap.converged
    assert np.all(np.abs(lap.summary.mean - post.mean) < 0.15 * post.sd)
    np.testing.assert_allclose(lap.summary.sd, post.sd, rtol=0.12)
    boot = rw.bootstrap(L, 60, seed=3)
    assert boot.converged == 60
    np.testing.assert_allclose(boot.summary.sd, post.sd, rtol=0.35)
    # Laplace's mode is EM's MAP with α + 1 (the softmax basis)
    np.testing.assert_allclose(
        lap.mode, rw.fit_weights(L, concentration=2.0, tol=1e-12).weights, atol=1e-9
    )


def test_cross_validation_prefers_the_right_model() -> None:
    rng = np.random.default_rng(8)
    means = np.array([0.0, 4.0])
    mixed = _gauss_mixture(rng, 600, np.array([0.5, 0.5]), means)
    cv = rw.cross_validate(mixed, 5, seed=1)
    assert cv.elpd["fitted"] > cv.elpd["best_single"]
    d, se = cv.difference["fitted_vs_best_single"], cv.standard_error["fitted_vs_best_single"]
    assert d > 3 * se
    # a single structure: the fitted weights lose almost nothing against it, beat uniform
    single = _gauss_mixture(rng, 600, np.array([1.0, 0.0]), means)
    cv = rw.cross_validate(single, 5, seed=1)
    assert cv.best_single == [0] * 5
    assert abs(cv.difference["fitted_vs_best_single"]) < 5.0
    assert cv.difference["fitted_vs_uniform"] > 3 * cv.standard_error["fitted_vs_uniform"]
    assert cv.per_image.shape == (600, 3)
    with pytest.raises(ValueError):
        rw.cross_validate(single, 1)


def test_prior_and_helpers() -> None:
    assert rw.perplexity([0.5, 0.5]) == pytest.approx(2.0)
    assert rw.perplexity([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    a, n = rw.prior_vectors(3, 2.0, [5, 5, 5])
    assert n is None and np.all(a == 2.0)
    with pytest.raises(ValueError):
        rw.prior_vectors(2, 1.0, [1, 0])
    with pytest.raises(ValueError):
        rw.fit_weights(np.ones((3, 2)), concentration=0.5)  # MAP unbounded below α = 1
    with pytest.raises(ValueError):
        rw.shift_rows(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError):
        rw.shift_rows(np.array([[-np.inf, -np.inf]]))
    # responsibilities sum to one; the scaled-Dirichlet log prior is the Dirichlet's up to a
    # constant when the prior ensemble is uniform
    r = rw.responsibilities([0.2, 0.8], np.array([[1.0, 0.5], [0.1, 1.0]]))
    np.testing.assert_allclose(r.sum(axis=1), 1.0)
    w1, w2 = np.array([0.2, 0.3, 0.5]), np.array([0.6, 0.3, 0.1])
    d = stats.dirichlet([2.0, 3.0, 1.5])
    assert rw.log_prior(w1, [2.0, 3.0, 1.5]) - rw.log_prior(w2, [2.0, 3.0, 1.5]) == pytest.approx(
        d.logpdf(w1) - d.logpdf(w2)
    )


def test_math_runs_on_the_cupy_standin(cupy_standin, monkeypatch) -> None:
    """The GPU code path without a GPU: the strict stand-in refuses NumPy arrays, so any
    host/device mix-up fails; results equal NumPy's (same random numbers)."""
    cp = cupy_standin

    class DeviceRng:  # CuPy's Generator interface, fed by NumPy's generator
        def __init__(self, seed: int) -> None:
            self.g = np.random.default_rng(seed)

        def random(self, shape):
            return cp.asarray(self.g.random(shape))

        def standard_gamma(self, shape):
            return cp.asarray(self.g.standard_gamma(cp.asnumpy(shape)))

    rng = np.random.default_rng(9)
    ll = _gauss_mixture(rng, 200, np.array([0.6, 0.4]), np.array([0.0, 1.0]))
    L_h, _ = rw.shift_rows(ll)
    L_d, shift_d = rw.shift_rows(cp.asarray(ll))
    for alpha, counts in ((1.0, None), (2.0, np.array([1.0, 3.0]))):
        fh = rw.fit_weights(L_h, concentration=alpha, baseline=counts)
        fd = rw.fit_weights(L_d, concentration=alpha, baseline=counts)
        np.testing.assert_allclose(cp.asnumpy(fd.weights), fh.weights, rtol=1e-12)
        proposal = rw.laplace(L_h, concentration=alpha, baseline=counts).proposal()
        for prop in (None, proposal):
            kw = {"concentration": alpha, "baseline": counts, "samples": 30, "warmup": 5}
            gh = rw.gibbs(L_h, rng=DeviceRng(1).g, proposal=prop, **kw)
            gd = rw.gibbs(L_d, rng=DeviceRng(1), proposal=prop, **kw)
            np.testing.assert_allclose(cp.asnumpy(gd.weights), gh.weights, rtol=1e-12)
            np.testing.assert_array_equal(cp.asnumpy(gd.counts), gh.counts)
    # both ways of drawing the assignments
    for direct in (0.0, 2.0):
        monkeypatch.setattr(rw, "_DIRECT", direct)
        gh = rw.gibbs(L_h, samples=10, warmup=0, rng=DeviceRng(2).g)
        gd = rw.gibbs(L_d, samples=10, warmup=0, rng=DeviceRng(2))
        np.testing.assert_array_equal(cp.asnumpy(gd.counts), gh.counts)
    lap = rw.laplace(L_d, draws=100)
    assert lap.summary.mean.shape == (2,)
    assert rw.cross_validate(cp.asarray(ll), 3).folds == 3
    assert rw.bootstrap(L_d, 2).draws.shape == (2, 2)
    assert rw.mixture_log_likelihood(fd.weights, L_d, shift_d) < 0
