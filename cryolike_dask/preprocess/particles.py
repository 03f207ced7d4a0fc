"""Particle images → polar Fourier images (spec §3.3)."""

from __future__ import annotations

import numpy as np

from cryolike_dask.errors import ParameterError
from cryolike_dask.grids.polar import PolarGrid
from cryolike_dask.precision import Precision
from cryolike_dask.preprocess.nufft import images_to_polar


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool ``[m, nx, ny]`` images by an even ``factor`` (kernel = stride = factor)."""
    if factor == 1:
        return images
    if factor < 1 or factor % 2:
        raise ParameterError(f"the downsampling factor must be 1 or even, not {factor}")
    m, nx, ny = images.shape
    if nx % factor or ny % factor:
        raise ParameterError(f"{nx}×{ny} images cannot be downsampled by {factor}")
    return images.reshape(m, nx // factor, factor, ny // factor, factor).mean(axis=(2, 4))


def center_and_scale(images: np.ndarray) -> np.ndarray:
    """Subtract each image's mean, then divide by its largest absolute value (float32).

    Raises ``ValueError`` naming the first constant (all-equal) image.
    """
    x = np.asarray(images, dtype=np.float32)
    x = x - x.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    peak = np.abs(x).max(axis=(1, 2), keepdims=True)
    flat = np.flatnonzero(peak.ravel() == 0)
    if flat.size:
        raise ParameterError(f"image {int(flat[0])} is constant (no signal after centring)")
    return (x / peak).astype(np.float32)


def unit_normalize(fourier: np.ndarray, grid: PolarGrid) -> np.ndarray:
    """Divide each ``[N, W]`` image by ``sqrt(Σ ωI |F|²)`` (unit norm under ωI)."""
    w = grid.integration_weights.astype(fourier.real.dtype)
    norms = np.sqrt(np.sum((fourier.real**2 + fourier.imag**2) * w, axis=(1, 2)))
    zero = np.flatnonzero(~(norms > 0))
    if zero.size:
        raise ParameterError(f"image {int(zero[0])} has zero norm on the polar grid")
    return fourier / norms[:, None, None]


def images_to_fourier(
    images: np.ndarray,
    grid: PolarGrid,
    precision: str | Precision = "single",
    downsample_factor: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """CryoLike's conversion of real images ``[m, nx, ny]``.

    Downsample (mean, optional), centre and max-normalise, NUFFT to the polar grid, and
    normalise to unit norm. Returns ``(fourier [m, N, W] complex, physical [m, nx', ny'] f32)``.
    """
    phys = center_and_scale(downsample(np.asarray(images, np.float32), downsample_factor))
    fourier = images_to_polar(phys, grid, precision)
    return unit_normalize(fourier, grid).astype(fourier.dtype), phys
