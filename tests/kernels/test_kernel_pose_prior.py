"""The block kernel with a pose prior: masked optimum and weighted log-sums.

Against the independent per-pose references of ``tests/kernels/reference.py`` (direct sums,
SciPy's ``logsumexp``): the best cross-correlation over the allowed poses only, and
``logsumexp_{d,w}(LL + log prior)`` per (image, template), on the host and through the strict
CuPy stand-in (the device path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.special import logsumexp as scipy_logsumexp

from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    correlate_block,
    prepare_images,
    prepare_templates,
)
from cryolike_dask.kernels import cross_correlation as cc_mod
from tests.kernels.reference import bioem_per_pose, direct_correlation, normalized
from tests.kernels.test_host_reduce import _case
from tests.standin import cupy_standin_fixture  # noqa: F401 - the fixture ``cupy_standin``


@dataclass(frozen=True)
class Prior:
    log_template: np.ndarray
    log_rotation: np.ndarray
    log_displacement: np.ndarray


def _prior(rng, n_m, n_s, n_d, n_w, *, drop_template: bool):
    lt = np.where(rng.uniform(size=(n_m, n_s)) < 0.3, -np.inf, -rng.uniform(0, 2, (n_m, n_s)))
    lt[:, 0] = 0.0  # every image may take template 0
    if drop_template:
        lt[:, -1] = -np.inf  # no image may take the last template: it is not computed
    lr = np.where(
        rng.uniform(size=(n_m, n_s, n_w)) < 0.4, -np.inf, -rng.uniform(0, 3, (n_m, n_s, n_w))
    )
    lr[:, :, 0] = 0.0
    ld = -rng.uniform(0, 1.5, n_d)
    return Prior(lt, lr, ld)


def _reference(templates, images, ctf, kernel, grid, n_pixels, prior):
    w = grid.integration_weights
    x, ixx, iyy = direct_correlation(templates, images, ctf, kernel, w)
    isx = np.einsum("nw,mnw,snw->ms", w * grid.mask, np.broadcast_to(ctf, images.shape), templates)
    isy = np.einsum("nw,mnw->m", w * grid.mask, images)
    ll = bioem_per_pose(x, ixx, iyy, isx, isy, grid.mask_integral, n_pixels)
    log_prior = (
        prior.log_template[:, :, None, None]
        + prior.log_rotation[:, :, None, :]
        + prior.log_displacement[None, None, :, None]
    )
    with np.errstate(invalid="ignore"):
        ll_ms = scipy_logsumexp(ll + log_prior, axis=(2, 3))
    cc = normalized(x, ixx, iyy)
    cc = np.where(np.isfinite(log_prior), cc, -np.inf)
    n_m, n_s = cc.shape[:2]
    flat = cc.reshape(n_m, n_s, -1)
    return flat.max(axis=-1), flat.argmax(axis=-1), ll_ms


@pytest.mark.parametrize("iso", [True, False])
@pytest.mark.parametrize("drop_template", [False, True])
@pytest.mark.parametrize("chunk", [2**17, 24])
def test_pose_prior_equals_brute_force(monkeypatch, iso, drop_template, chunk) -> None:
    monkeypatch.setattr(cc_mod, "HOST_CHUNK_ELEMENTS", chunk)
    n_m, n_s, n_d, n_w = 4, 5, 9, 8
    rng = np.random.default_rng(7 + iso + 2 * drop_template)
    grid, templates, images, ctf, kernel = _case(rng, n_m, n_s, n_d, n_w)
    if not iso:
        half = rng.uniform(0.8, 1.0, (n_m, grid.n_shells, n_w // 2))
        ctf = ctf * np.concatenate([half, half], axis=-1)
    n_pixels = 15 * 15
    consts = LikelihoodConstants.for_grid(grid, n_pixels)
    prior = _prior(rng, n_m, n_s, n_d, n_w, drop_template=drop_template)
    pt = prepare_templates(templates, kernel, grid, "double")
    pi = prepare_images(images, ctf, grid, "double")
    log_w = np.log(np.full(n_s, 1.0 / n_s))
    res = correlate_block(
        pt,
        pi,
        BlockOutputs(integrated_likelihood=True),
        likelihood=consts,
        log_prior=log_w,
        pose_prior=prior,
        workers=2,
    )
    best, arg, ll_ms = _reference(templates, images, ctf, kernel, grid, n_pixels, prior)
    allowed = np.isfinite(prior.log_template)
    np.testing.assert_allclose(res.log_likelihood_ms[allowed], ll_ms[allowed], atol=1e-8)
    assert np.all(res.log_likelihood_ms[~allowed] == -np.inf)
    np.testing.assert_allclose(res.cross_correlation_ms[allowed], best[allowed], rtol=1e-10)
    np.testing.assert_array_equal(res.pose_ms[allowed], arg[allowed])
    assert np.all(res.cross_correlation_ms[~allowed] == -np.inf)
    np.testing.assert_allclose(
        res.log_likelihood_sum, scipy_logsumexp(ll_ms + log_w, axis=1), atol=1e-8
    )
    # the optimum is over allowed poses only: the best pose decodes to an allowed one
    s = res.best_pose // (n_d * n_w)
    w = res.best_pose % n_w
    assert np.all(np.isfinite(prior.log_rotation[np.arange(n_m), s, w]))
    assert np.all(np.isfinite(prior.log_template[np.arange(n_m), s]))
    # the best-pose-only run (no likelihood) has the same optimum
    plain = correlate_block(pt, pi, BlockOutputs(), pose_prior=prior, workers=2)
    np.testing.assert_array_equal(plain.best_pose, res.best_pose)
    np.testing.assert_array_equal(plain.best_cross_correlation, res.best_cross_correlation)


def test_prior_of_zeros_equals_the_global_search_bit_for_bit() -> None:
    n_m, n_s, n_d, n_w = 3, 4, 9, 8
    rng = np.random.default_rng(3)
    grid, templates, images, ctf, kernel = _case(rng, n_m, n_s, n_d, n_w)
    consts = LikelihoodConstants.for_grid(grid, 225)
    pt = prepare_templates(templates, kernel, grid, "single")
    pi = prepare_images(images, ctf, grid, "single")
    out = BlockOutputs(integrated_likelihood=True)
    zero = Prior(np.zeros((n_m, n_s)), np.zeros((n_m, n_s, n_w)), np.zeros(n_d))
    a = correlate_block(pt, pi, out, likelihood=consts, log_prior=np.zeros(n_s))
    b = correlate_block(pt, pi, out, likelihood=consts, log_prior=np.zeros(n_s), pose_prior=zero)
    for name in ("best_cross_correlation", "best_pose", "log_likelihood_ms", "pose_ms"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_pose_prior_through_the_cupy_standin(cupy_standin) -> None:
    """The device path (whole-tensor passes) gives the host's numbers."""
    cp = cupy_standin
    n_m, n_s, n_d, n_w = 3, 4, 9, 8
    rng = np.random.default_rng(11)
    grid, templates, images, ctf, kernel = _case(rng, n_m, n_s, n_d, n_w)
    consts = LikelihoodConstants.for_grid(grid, 225)
    prior = _prior(rng, n_m, n_s, n_d, n_w, drop_template=True)
    out = BlockOutputs(integrated_likelihood=True)
    host = correlate_block(
        prepare_templates(templates, kernel, grid, "double"),
        prepare_images(images, ctf, grid, "double"),
        out,
        likelihood=consts,
        pose_prior=prior,
    )
    dev_prior = Prior(
        *(cp.asarray(v) for v in (prior.log_template, prior.log_rotation)),
        cp.asarray(prior.log_displacement),
    )
    dev = correlate_block(
        prepare_templates(cp.asarray(templates), cp.asarray(kernel), grid, "double"),
        prepare_images(cp.asarray(images), cp.asarray(ctf), grid, "double"),
        out,
        likelihood=consts,
        pose_prior=dev_prior,
    )
    np.testing.assert_allclose(cp.asnumpy(dev.log_likelihood_ms), host.log_likelihood_ms, atol=1e-9)
    np.testing.assert_array_equal(cp.asnumpy(dev.best_pose), host.best_pose)
    np.testing.assert_allclose(
        cp.asnumpy(dev.best_cross_correlation), host.best_cross_correlation, rtol=1e-12
    )
