"""Integrated (spec §11, §11.1) and optimal-pose (§12) log-likelihoods against direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaln
from scipy.special import logsumexp as scipy_logsumexp

from cryolike_dask.grids import DisplacementGrid, PolarGrid, ViewingAngles
from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    aggregate_integrated_log_likelihood,
    correlate_block,
    ctf_polar,
    decode_pose,
    optimal_pose_log_likelihood,
    prepare_images,
    prepare_templates,
    translation_kernel,
)
from tests.conftest import random_hermitian_stack
from tests.kernels.reference import bioem_per_pose, direct_correlation, per_pair_integrated

BOX = 30.0
N_PIXELS = 15 * 15


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(11)
    grid = PolarGrid(2.0, 0.25, 16)
    templates = random_hermitian_stack(rng, 5, grid.n_shells, grid.n_inplanes)
    # images: noisy copies of templates so that the likelihood is well defined and peaked
    images = 0.6 * templates[[1, 3, 0, 4]] + 0.3 * random_hermitian_stack(rng, 4, grid.n_shells, 16)
    ctf = ctf_polar(
        rng.uniform(8e3, 2e4, 4),
        rng.uniform(8e3, 2e4, 4),
        rng.uniform(0, 3, 4),
        np.zeros(4),
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=BOX,
    )
    disp = DisplacementGrid.from_search(1, 3, 2, 1.0)  # 7 displacements
    kernel = translation_kernel(grid.x_points, grid.y_points, disp.x, disp.y, BOX)
    return dict(grid=grid, templates=templates, images=images, ctf=ctf, disp=disp, kernel=kernel)


def _reference_ll_ms(case):
    grid = case["grid"]
    w = grid.integration_weights
    x, ixx, iyy = direct_correlation(
        case["templates"], case["images"], case["ctf"], case["kernel"], w
    )
    s = grid.mask
    isx = np.einsum("nw,mnw,snw->ms", w * s, case["ctf"], case["templates"])  # undisplaced (§11)
    isy = np.einsum("nw,mnw->m", w * s, case["images"])
    iss = float(np.sum(s**2 * w))
    return per_pair_integrated(bioem_per_pose(x, ixx, iyy, isx, isy, iss, N_PIXELS))


# single: LL is a difference of terms of a few hundred (p ln D, lnΓ, ...), so its float32 error
# is absolute, a few ulps of those terms (ulp(400) = 3e-5), not relative to LL itself
@pytest.mark.parametrize(("precision", "atol"), [("double", 1e-9), ("single", 3e-4)])
def test_per_pair_integrated_equals_direct(case, precision: str, atol: float) -> None:
    grid = case["grid"]
    consts = LikelihoodConstants.for_grid(grid, N_PIXELS)
    result = correlate_block(
        prepare_templates(case["templates"], case["kernel"], grid, precision),
        prepare_images(case["images"], case["ctf"], grid, precision),
        BlockOutputs(integrated_likelihood=True),
        likelihood=consts,
    )
    ref = _reference_ll_ms(case)
    np.testing.assert_allclose(result.log_likelihood_ms, ref, rtol=0, atol=atol)
    assert result.log_likelihood_sum is None  # no prior given


def test_constants_formula() -> None:
    c = LikelihoodConstants(1024, 3.959320140107695)
    p = 1024 / 2 - 2
    expect = (
        (3 - 1024) / 2 * np.log(2 * np.pi)
        - np.log(2)
        - 0.5 * np.log(c.mask_integral)
        + gammaln(1024 / 2 - 2)
        + p * np.log(2 * c.mask_integral)
    )
    assert c.exponent == p
    assert c.constant == pytest.approx(expect, rel=1e-14)
    with pytest.raises(ValueError, match="n_pixels"):
        LikelihoodConstants(3, 4.0)


def test_aggregation_with_normalised_log_weights(case) -> None:
    rng = np.random.default_rng(0)
    ll_ms = rng.normal(2000, 30, size=(4, 5))
    weights = rng.uniform(0.1, 1.0, 5)
    log_w = np.log(weights / weights.sum())
    out = aggregate_integrated_log_likelihood(ll_ms, log_w, 7, 16)
    expect = scipy_logsumexp(ll_ms + log_w, axis=1) - math.log(7) - math.log(16)
    np.testing.assert_allclose(out, expect, rtol=1e-14)
    # identical templates: the average over a normalised prior is the per-template value
    same = aggregate_integrated_log_likelihood(np.full((2, 5), 10.0), log_w, 7, 16)
    np.testing.assert_allclose(same, 10.0 - math.log(7 * 16), rtol=1e-14)


def test_block_log_sum_over_templates_with_prior(case) -> None:
    grid = case["grid"]
    consts = LikelihoodConstants.for_grid(grid, N_PIXELS)
    angles = ViewingAngles.uniform_weights(np.arange(5.0), np.ones(5))
    prior = angles.log_normalized_weights
    pt = prepare_templates(case["templates"], case["kernel"], grid, "double")
    pi = prepare_images(case["images"], case["ctf"], grid, "double")
    res = correlate_block(
        pt, pi, BlockOutputs(integrated_likelihood=True), likelihood=consts, log_prior=prior
    )
    expect = scipy_logsumexp(res.log_likelihood_ms + prior, axis=1)
    np.testing.assert_allclose(res.log_likelihood_sum, expect, rtol=1e-13)


def _direct_model(template, ctf, dx, dy, j, grid):
    k = np.exp(-2j * np.pi * (2 / BOX) * (grid.x_points * dx + grid.y_points * dy))
    shifted = template * k
    return np.roll(shifted, -j, axis=-1) * ctf  # [n, w] ← shifted[n, w + j]


def test_optimal_pose_likelihood_direct(case) -> None:
    grid, disp = case["grid"], case["disp"]
    idx = np.array([1, 3, 0, 4])
    d = np.array([0, 2, 5, 6])
    j = np.array([0, 3, 15, 8])
    gamma = 2 * np.pi * j / grid.n_inplanes
    out = optimal_pose_log_likelihood(
        case["templates"][idx],
        case["images"],
        case["ctf"],
        disp.x[d],
        disp.y[d],
        gamma,
        grid,
        BOX,
        N_PIXELS,
        "double",
    )
    w, s = grid.integration_weights, grid.mask
    iss = float(np.sum(s**2 * w))
    for m in range(4):
        model = _direct_model(
            case["templates"][idx[m]], case["ctf"][m], disp.x[d[m]], disp.y[d[m]], j[m], grid
        )
        y = case["images"][m]
        ixx, iyy = np.sum(np.abs(model) ** 2 * w), np.sum(np.abs(y) ** 2 * w)
        ixy = np.sum(np.real(y * np.conj(model)) * w)
        isx, isy = np.sum(s * model * w), np.sum(s * y * w)
        a = ixx * iss - abs(isx) ** 2
        b = ixy * iss - (isx.real * isy.real + isx.imag * isy.imag)
        c = abs(isy) ** 2 - iyy * iss
        p = N_PIXELS / 2 - 2
        const = (
            (3 - N_PIXELS) / 2 * np.log(2 * np.pi)
            - np.log(2)
            - 0.5 * np.log(iss)
            + gammaln(p)
            + p * np.log(2 * iss)
        )
        ll = -p * np.log(-(b**2 / a + c)) - 0.5 * np.log(a) + const
        assert out.log_likelihood[m] == pytest.approx(ll, rel=1e-12)
        assert out.cross_correlation[m] == pytest.approx(ixy / np.sqrt(ixx * iyy), rel=1e-12)
        dist = np.sum(np.abs(model - y) ** 2 * grid.weight_points)
        assert out.squared_distance[m] == pytest.approx(dist, rel=1e-12)


def test_optimal_pose_cc_equals_kernel_best_and_distance_zero_at_truth(case) -> None:
    grid, disp = case["grid"], case["disp"]
    model = _direct_model(case["templates"][2], case["ctf"][0], disp.x[4], disp.y[4], 5, grid)
    images = np.stack([model, case["images"][1]])
    ctf = case["ctf"][:2]
    res = correlate_block(
        prepare_templates(case["templates"], case["kernel"], grid, "double"),
        prepare_images(images, ctf, grid, "double"),
    )
    s, d, w = decode_pose(res.best_pose, disp.n_displacements, grid.n_inplanes)
    assert (s[0], d[0], w[0]) == (2, 4, 5)
    out = optimal_pose_log_likelihood(
        case["templates"][s],
        images,
        ctf,
        disp.x[d],
        disp.y[d],
        grid.theta[w],
        grid,
        BOX,
        N_PIXELS,
        "double",
    )
    np.testing.assert_allclose(out.cross_correlation, res.best_cross_correlation, rtol=1e-12)
    assert out.squared_distance[0] == pytest.approx(0.0, abs=1e-20)
    assert out.squared_distance[1] > 0
