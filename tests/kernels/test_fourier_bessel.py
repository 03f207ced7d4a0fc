"""Fourier–Bessel transform and CryoLike's half-spectrum inverse (spec §9)."""

from __future__ import annotations

import numpy as np

from cryolike_dask.kernels.fourier_bessel import (
    fourier_bessel_transform,
    half_fourier_bessel_transform,
    inverse_fourier_bessel_transform,
    n_orders,
)


def test_forward_is_orthonormal(rng) -> None:
    x = rng.normal(size=(3, 5, 16)) + 1j * rng.normal(size=(3, 5, 16))
    f = fourier_bessel_transform(x)
    np.testing.assert_allclose(np.sum(np.abs(f) ** 2, -1), np.sum(np.abs(x) ** 2, -1), rtol=1e-12)
    w = np.arange(16)
    direct = np.exp(-2j * np.pi * np.outer(w, w) / 16) @ x[0, 0] / 4.0
    np.testing.assert_allclose(f[0, 0], direct, atol=1e-12)


def test_half_rule_explicit_formula(rng) -> None:
    """x_w = Re X_0 + 2 Σ_{0<q<W/2} Re(X_q e^{2πiqw/W}) + Re X_{W/2} (−1)^w; extra orders unread."""
    n_w = 12
    spec = rng.normal(size=n_w) + 1j * rng.normal(size=n_w)  # not Hermitian on purpose
    out = inverse_fourier_bessel_transform(spec, n_w)
    w = np.arange(n_w)
    expect = np.full(n_w, spec[0].real)
    for q in range(1, n_w // 2):
        expect += 2 * np.real(spec[q] * np.exp(2j * np.pi * q * w / n_w))
    expect += spec[n_w // 2].real * (-1.0) ** w
    np.testing.assert_allclose(out, expect, atol=1e-12)
    assert n_orders(n_w) == 7


def test_correlation_identity_for_real_sequences(rng) -> None:
    """irfft(conj(F a) · F b) = Σ_v a_v b_{v+w} for real a, b."""
    n_w = 16
    a, b = rng.normal(size=n_w), rng.normal(size=n_w)
    prod = np.conj(half_fourier_bessel_transform(a)) * half_fourier_bessel_transform(b)
    out = inverse_fourier_bessel_transform(prod, n_w)
    expect = [np.sum(a * np.roll(b, -w)) for w in range(n_w)]
    np.testing.assert_allclose(out, expect, atol=1e-12)
    assert half_fourier_bessel_transform(a).shape == (n_orders(n_w),)
