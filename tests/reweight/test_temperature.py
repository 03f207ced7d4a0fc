"""The power likelihood ``ℓ/T`` (``temperature``) and its calibration from labelled images,
against independent references: ``T = 1`` is the untempered run bit for bit; the tempered
posterior of two structures agrees with ``scipy.integrate.quad`` of the exact tempered
posterior; the calibrated ``T`` recovers a known overconfidence and matches a brute-force
grid minimum of the label log-loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import log_softmax

import cryolike_dask as cd
from cryolike_dask._reweight import ReweightError, make_options
from cryolike_dask.analysis import mcmc
from cryolike_dask.analysis import reweight as rw
from cryolike_dask.cli import main
from tests.reweight.conftest import posterior_quadrature

pytestmark = pytest.mark.filterwarnings("ignore::cryolike_dask._reweight.ReweightWarning")


def _labelled(rng: np.random.Generator, n: int, weights, means) -> tuple[np.ndarray, np.ndarray]:
    """``(ll [n, K], z)``: the exact log-likelihood of ``y ~ Σ w_k N(μ_k, 1)`` (calibrated)."""
    z = rng.choice(len(weights), size=n, p=np.asarray(weights))
    y = rng.normal(np.asarray(means)[z], 1.0)
    return stats.norm.logpdf(y[:, None] - np.asarray(means)[None, :]), z


def test_temperature_one_is_the_untempered_run(tmp_path: Path) -> None:
    ll, _ = _labelled(np.random.default_rng(4), 80, [0.6, 0.4], [0.0, 1.5])
    kw = {"layout": "images-by-structures", "chains": 2, "samples": 50, "warmup": 10,
          "folds": 3, "plots": False}  # fmt: skip
    a = cd.reweight(ll, tmp_path / "a", **kw)
    b = cd.reweight(ll, tmp_path / "b", temperature=1.0, **kw)
    np.testing.assert_array_equal(a.map_weights, b.map_weights)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.log_likelihood == b.log_likelihood
    weights_a, weights_b = (tmp_path / x / "weights.csv" for x in ("a", "b"))
    assert weights_a.read_text() == weights_b.read_text()
    # and T = 2 is the untempered run of ll / 2
    c = cd.reweight(ll, tmp_path / "c", temperature=2.0, **kw)
    d = cd.reweight(ll / 2.0, tmp_path / "d", **kw)
    np.testing.assert_array_equal(c.samples, d.samples)
    assert c.summary["model"]["temperature"] == 2.0
    with pytest.raises(ReweightError, match="temperature"):
        make_options(temperature=0.0)


def test_tempered_posterior_matches_quadrature(tmp_path: Path) -> None:
    ll, _ = _labelled(np.random.default_rng(3), 60, [0.7, 0.3], [0.0, 2.5])
    temperature = 3.0
    # the tempered posterior is the exact posterior of ll / T (uniform prior: alpha = 1)
    mean, sd = posterior_quadrature(ll / temperature, 1.0)
    _, sd_untempered = posterior_quadrature(ll, 1.0)
    assert sd > 1.3 * sd_untempered  # the tempering matters here
    r = cd.reweight(ll, tmp_path / "o", layout="images-by-structures", temperature=temperature,
                    chains=4, samples=2500, warmup=100, folds=0, plots=False, seed=5)  # fmt: skip
    x = r.samples[:, :, 0]
    ess = mcmc.ess_bulk(x)
    assert ess > 1500
    assert abs(x.mean() - mean) < 4 * sd / math.sqrt(ess)
    assert abs(x.std() - sd) < 5 * sd / math.sqrt(2 * ess)


def test_calibrate_temperature_recovers_a_known_overconfidence() -> None:
    ll, z = _labelled(np.random.default_rng(8), 3000, [0.5, 0.3, 0.2], [0.0, 1.0, 2.0])
    calibrated = rw.calibrate_temperature(ll, z)
    assert 0.9 < calibrated.temperature < 1.1  # the exact likelihood needs no tempering
    fit = rw.calibrate_temperature(3.0 * ll, z)  # log-likelihood ratios three times too large
    assert 2.7 < fit.temperature < 3.3
    assert fit.nll < fit.nll_untempered
    np.testing.assert_allclose(fit.weights, np.bincount(z) / z.size)
    # the minimum agrees with a brute-force grid of the label log-loss
    grid = np.linspace(1.5, 6.0, 4501)
    lw = np.log(fit.weights)
    loss = [-np.mean(log_softmax(3.0 * ll / t + lw, axis=1)[np.arange(z.size), z]) for t in grid]
    assert fit.temperature == pytest.approx(grid[int(np.argmin(loss))], abs=2e-3)
    assert min(loss) - 1e-6 < fit.nll <= min(loss) + 1e-12  # at least as good as the grid
    with pytest.raises(ValueError, match="labels"):
        rw.calibrate_temperature(ll, np.full(3000, 3))


def test_temperature_on_the_command_line(tmp_path: Path) -> None:
    ll, _ = _labelled(np.random.default_rng(1), 40, [0.6, 0.4], [0.0, 1.5])
    np.save(tmp_path / "ll.npy", ll)
    out = tmp_path / "out"
    assert main(["reweight", str(tmp_path / "ll.npy"), "--layout", "images-by-structures",
                 "--output", str(out), "--temperature", "2.5", "--samples", "40", "--warmup",
                 "10", "--chains", "2", "--no-plots", "--folds", "0"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["temperature"] == 2.5
    assert summary["settings"]["temperature"] == 2.5
