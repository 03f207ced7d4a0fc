"""The host's one-sweep post-GEMM reduction (arg-max and integrated log-likelihood).

Against an independent float64 per-pose loop of the BioEM formula (spec §11) with SciPy's
``logsumexp``, and element for element against the whole-tensor path that a GPU runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaln
from scipy.special import logsumexp as scipy_logsumexp

from cryolike_dask.grids import DisplacementGrid, PolarGrid
from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    NonFiniteCrossCorrelationError,
    correlate_block,
    prepare_images,
    prepare_templates,
    translation_kernel,
)
from cryolike_dask.kernels import cross_correlation as cc_mod
from cryolike_dask.kernels.backend import run_ranges
from tests.conftest import random_hermitian_stack
from tests.kernels.reference import direct_correlation, first_argmax_dw, normalized


def brute_force_ll_ms(x, ixx, iyy, isx, isy, iss, n_pixels):
    """``logsumexp_{d,w}`` of the per-pose BioEM log-likelihood, one pose at a time (float64)."""
    n_m, n_s, n_d, n_w = x.shape
    p = n_pixels / 2.0 - 2.0
    const = (
        (3.0 - n_pixels) / 2.0 * math.log(2 * math.pi)
        - math.log(2.0)
        - 0.5 * math.log(iss)
        + float(gammaln(n_pixels / 2.0 - 2.0))
        + p * math.log(2 * iss)
    )
    out = np.empty((n_m, n_s))
    for m in range(n_m):
        sy = complex(isy[m])
        c = abs(sy) ** 2 - float(iyy[m]) * iss
        for s in range(n_s):
            sx = complex(isx[m, s])
            k = (sx.conjugate() * sy).real
            poses = []
            for d in range(n_d):
                for w in range(n_w):
                    a = float(ixx[m, s, w]) * iss - abs(sx) ** 2
                    b = float(x[m, s, d, w]) * iss - k
                    dd = -(b * b / a + c)
                    log_d = math.log(dd) if dd > 0 else (-math.inf if dd == 0 else math.nan)
                    poses.append(-p * log_d - 0.5 * math.log(a) + const)
            out[m, s] = scipy_logsumexp(np.asarray(poses))
    return out


def _case(rng, n_m, n_s, n_d, n_w):
    grid = PolarGrid(2.0, 0.25, n_w)
    templates = random_hermitian_stack(rng, n_s, grid.n_shells, n_w)
    noise = random_hermitian_stack(rng, n_m, grid.n_shells, n_w)
    images = 0.7 * templates[rng.integers(0, n_s, n_m)] + 0.4 * noise
    ctf = rng.uniform(0.3, 1.0, (n_m, grid.n_shells, 1))  # isotropic
    side = round(n_d**0.5)
    disp = DisplacementGrid.from_search(1.0, side, side, 1.0)
    kernel = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, 30.0)
    return grid, templates, images, ctf, kernel


@pytest.mark.parametrize(
    ("n_m", "n_s", "n_d", "n_w", "workers", "chunk"),
    [
        (3, 4, 9, 8, 1, 2**17),
        (3, 4, 9, 8, 2, 2**17),
        (5, 3, 9, 16, 2, 40),  # several chunks per thread, uneven ranges
        (4, 3, 1, 4, 2, 1),  # one displacement, four rotations, one pair per chunk
        (2, 5, 1, 8, 3, 8),
    ],
)
@pytest.mark.parametrize("iso", [True, False])
def test_correlate_block_equals_brute_force(
    monkeypatch, n_m, n_s, n_d, n_w, workers, chunk, iso
) -> None:
    monkeypatch.setattr(cc_mod, "HOST_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(n_m * 100 + n_d * 10 + n_w)
    grid, templates, images, ctf, kernel = _case(rng, n_m, n_s, n_d, n_w)
    if not iso:
        # a real CTF is even under a half turn: C[n, w + W/2] = C[n, w]
        half = rng.uniform(0.8, 1.0, (n_m, grid.n_shells, n_w // 2))
        ctf = ctf * np.concatenate([half, half], axis=-1)
    n_pixels = 15 * 15
    consts = LikelihoodConstants.for_grid(grid, n_pixels)
    pt = prepare_templates(templates, kernel, grid, "double")
    pi = prepare_images(images, ctf, grid, "double")
    assert pi.isotropic_ctf == iso
    result = correlate_block(
        pt, pi, BlockOutputs(integrated_likelihood=True), likelihood=consts, workers=workers
    )
    w = grid.integration_weights
    x, ixx, iyy = direct_correlation(templates, images, ctf, kernel, w)
    isx = np.einsum("nw,mnw,snw->ms", w * grid.mask, np.broadcast_to(ctf, images.shape), templates)
    isy = np.einsum("nw,mnw->m", w * grid.mask, images)
    ref = brute_force_ll_ms(x, ixx, iyy, isx, isy, grid.mask_integral, n_pixels)
    np.testing.assert_allclose(result.log_likelihood_ms, ref, rtol=0, atol=1e-8)
    best, arg = first_argmax_dw(normalized(x, ixx, iyy))
    np.testing.assert_array_equal(result.pose_ms, arg)
    np.testing.assert_allclose(result.cross_correlation_ms, best, rtol=1e-10)
    # the best-pose-only run gives the same optimum
    plain = correlate_block(pt, pi, BlockOutputs(), workers=workers)
    np.testing.assert_array_equal(plain.pose_ms, result.pose_ms)
    np.testing.assert_array_equal(plain.cross_correlation_ms, result.cross_correlation_ms)


def _synthetic(rng, n_m, n_s, n_d, n_w, dtype):
    """Inner products with ``A = 1``, ``C = −1``, ``k/Iss = 0.5``: ``D = 1 − (X − 0.5)²``."""
    iss = 1.0
    isx = np.full((n_m, n_s), 0.5 + 0j, dtype=np.result_type(dtype, np.complex64))
    ixx = np.full((n_m, n_s, n_w), 1.25, dtype)  # A = 1.25 − 0.25 = 1
    iyy = np.full(n_m, 2.0, dtype)  # C = 1 − 2 = −1
    isy = np.ones(n_m, isx.dtype)
    x = rng.uniform(-0.49, 1.49, (n_m, n_s, n_d, n_w)).astype(dtype)
    return x, ixx, iyy, isx, isy, iss


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_pixels", [20, 225, 128 * 128])
@pytest.mark.parametrize(("n_d", "n_w"), [(1, 4), (7, 8), (25, 16)])
def test_host_sweep_equals_whole_tensor_passes(monkeypatch, dtype, n_pixels, n_d, n_w) -> None:
    """Same values as the device path, including a pose with ``D = 0`` (``LL = +inf``)."""
    monkeypatch.setattr(cc_mod, "HOST_CHUNK_ELEMENTS", 3 * n_d * n_w)
    rng = np.random.default_rng(n_pixels + n_d)
    n_m, n_s = 3, 4
    x, ixx, iyy, isx, isy, iss = _synthetic(rng, n_m, n_s, n_d, n_w, dtype)
    x[1, 2, n_d - 1, n_w // 2] = 1.5  # D = 1 − 1² = 0 exactly
    x[2, 0, 0, 0] = -0.5  # and here
    consts = LikelihoodConstants(n_pixels, iss)
    whole = cc_mod._integrated_log_likelihood(x, ixx, iyy, isx, isy, consts, np)
    factors = cc_mod._likelihood_factors(ixx, iyy, isx, isy, consts)
    inv_norm = 1.0 / np.sqrt(ixx * iyy[:, None, None])
    _, _, host, _ = cc_mod._host_reduce(x, factors, consts, inv_norm, argmax=None, workers=2)
    np.testing.assert_array_equal(host, whole)
    assert host.dtype == dtype
    assert host[1, 2] == np.inf and host[2, 0] == np.inf
    ref = brute_force_ll_ms(x.astype(np.float64), ixx, iyy, isx, isy, iss, n_pixels)
    finite = np.isfinite(ref)
    assert not finite[1, 2] and not finite[2, 0] and finite.sum() == n_m * n_s - 2
    # float32: the error is absolute, a few ulps of p·ln D (terms of up to p·|ln 0.01|)
    atol = 1e-9 if dtype == np.float64 else 4e-6 * max(1.0, consts.exponent)
    np.testing.assert_allclose(host[finite], ref[finite], rtol=0, atol=atol)


def test_underflowing_terms_are_exact_zeros_of_the_sum() -> None:
    """Large ``p``: most ``(D₀/D)^p`` underflow; the floor leaves the float32 sums unchanged."""
    rng = np.random.default_rng(3)
    n_m, n_s, n_d, n_w = 2, 3, 257, 8
    x, ixx, iyy, isx, isy, iss = _synthetic(rng, n_m, n_s, n_d, n_w, np.float32)
    consts = LikelihoodConstants(128 * 128, iss)  # p = 8190
    factors = cc_mod._likelihood_factors(ixx, iyy, isx, isy, consts)
    inv_norm = np.ones_like(ixx)
    _, _, _, sums = cc_mod._host_reduce(x, factors, consts, inv_norm, argmax=None, workers=1)
    t = 1.0 - (x.astype(np.float64) - 0.5) ** 2
    ratio = t.min(axis=2, keepdims=True) / t
    assert (ratio**consts.exponent < np.finfo(np.float32).tiny).mean() > 0.9
    exact = np.sum(ratio**consts.exponent, axis=2)
    np.testing.assert_allclose(sums, exact, rtol=2e-4)  # float32 powers of p = 8190
    floor = cc_mod._power_floor(np.float32, consts.exponent)
    assert np.float32(floor) ** np.float32(consts.exponent) >= np.finfo(np.float32).tiny


@pytest.mark.parametrize("mode", ["raw", "normalised"])
def test_host_argmax_first_maximum_and_nan(mode) -> None:
    rng = np.random.default_rng(4)
    n_m, n_s, n_d, n_w = 3, 2, 5, 4
    x = rng.integers(0, 3, (n_m, n_s, n_d, n_w)).astype(np.float32)  # many ties
    inv_norm = np.ones((n_m, n_s, n_w), np.float32)
    x[2, 1, 3, 1] = np.nan
    best, arg, ll, sums = cc_mod._host_reduce(
        x.copy(), None, None, inv_norm, argmax=mode, workers=2
    )
    assert ll is None and sums is None
    flat = x.reshape(n_m, n_s, -1)
    np.testing.assert_array_equal(arg, np.argmax(flat, axis=-1))  # first maximum, first NaN
    assert np.isnan(best[2, 1])
    ok = ~np.isnan(best)
    np.testing.assert_array_equal(best[ok], np.max(flat, axis=-1)[ok])


@pytest.mark.parametrize(
    "outputs",
    [
        BlockOutputs(integrated_likelihood=True),
        BlockOutputs(integrated_likelihood=True, full=True),
        BlockOutputs(per_rotation=True),
    ],
)
@pytest.mark.parametrize("iso", [True, False])
def test_zero_norm_template_raises_without_warnings(outputs, iso) -> None:
    rng = np.random.default_rng(8)
    grid, templates, images, ctf, kernel = _case(rng, 3, 4, 9, 8)
    if not iso:
        ctf = np.broadcast_to(ctf, images.shape).copy()
    templates[2] = 0
    consts = LikelihoodConstants.for_grid(grid, 225)
    pt = prepare_templates(templates, kernel, grid, "single")
    pi = prepare_images(images, ctf, grid, "single")
    with pytest.raises(NonFiniteCrossCorrelationError, match="template 2"):
        correlate_block(pt, pi, outputs, likelihood=consts, workers=2)


def test_run_ranges_covers_every_item_once() -> None:
    for n_items, workers in [(0, 2), (1, 4), (7, 3), (10, None), (5, 1)]:
        seen = np.zeros(n_items, int)

        def fn(lo, hi, seen=seen):
            seen[lo:hi] += 1

        run_ranges(fn, n_items, workers)
        assert (seen == 1).all()

    def boom(lo, hi):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_ranges(boom, 4, 2)
