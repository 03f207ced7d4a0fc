"""Fourier–Bessel transform along the angle axis and its half-spectrum inverse (spec §9).

The forward transform is the orthonormal FFT over the ``W`` angles of each shell. The inverse
reads only orders ``q = 0 … ⌊W/2⌋`` (CryoLike's ``irfft(…, norm="forward")``): for sequences
whose product spectrum is Hermitian - every correlation of real images - this is the exact
circular correlation, and it needs only half of the orders.
"""

from __future__ import annotations

from typing import Any

from cryolike_dask.kernels.backend import array_module, fft_kwargs, fft_module


def n_orders(n_inplanes: int) -> int:
    """Number of Fourier orders the inverse needs: ``⌊W/2⌋ + 1``."""
    return n_inplanes // 2 + 1


def fourier_bessel_transform(x: Any, axis: int = -1, workers: int | None = None) -> Any:
    """Orthonormal FFT along ``axis``: ``X_q = W^{-1/2} Σ_w x_w e^{−2πiqw/W}``, all orders."""
    xp = array_module(x)
    return fft_module(xp).fft(x, axis=axis, norm="ortho", **fft_kwargs(xp, workers))


def half_fourier_bessel_transform(x: Any, axis: int = -1, workers: int | None = None) -> Any:
    """Orders ``q = 0 … ⌊W/2⌋`` of :func:`fourier_bessel_transform` (all the inverse reads)."""
    xp = array_module(x)
    w = x.shape[axis]
    if xp.iscomplexobj(x):
        full = fft_module(xp).fft(x, axis=axis, norm="ortho", **fft_kwargs(xp, workers))
        index = [slice(None)] * full.ndim
        index[axis] = slice(0, n_orders(w))
        return full[tuple(index)]
    return fft_module(xp).rfft(x, axis=axis, norm="ortho", **fft_kwargs(xp, workers))


def inverse_fourier_bessel_transform(
    spectrum: Any, n_inplanes: int, axis: int = -1, workers: int | None = None
) -> Any:
    """CryoLike's inverse: ``irfft(X, n=W, norm="forward")`` along ``axis``.

    Only orders ``0 … ⌊W/2⌋`` of ``spectrum`` are read (extra orders are ignored), the
    imaginary parts of order 0 (and ``W/2`` for even ``W``) are dropped, and no ``1/W`` factor
    is applied: ``x_w = Re X_0 + 2 Σ_{0<q<W/2} Re(X_q e^{2πiqw/W}) [+ Re X_{W/2} (−1)^w]``.
    Returns a real array with ``W`` entries along ``axis``.
    """
    xp = array_module(spectrum)
    q = n_orders(n_inplanes)
    if spectrum.shape[axis] > q:
        index = [slice(None)] * spectrum.ndim
        index[axis] = slice(0, q)
        spectrum = spectrum[tuple(index)]
    return fft_module(xp).irfft(
        spectrum, n=n_inplanes, axis=axis, norm="forward", **fft_kwargs(xp, workers)
    )
