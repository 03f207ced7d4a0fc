"""Non-uniform FFTs to the polar grid (spec §3.1, §5.2), with FINUFFT (cuFINUFFT on a GPU).

Conventions: the first array axis is paired with the polar x coordinate, the mode origin of
each axis is at index ``⌊n/2⌋``, the sign is ``−1``; the CPU path computes in float64 (as
CryoLike) with tolerance ``max(eps, 1e-6)`` in single and ``max(eps, 1e-12)`` in double
precision, then casts.
"""

from __future__ import annotations

import numpy as np

from cryolike_dask.errors import ParameterError
from cryolike_dask.grids.polar import PolarGrid
from cryolike_dask.precision import Precision


def tolerance(precision: str | Precision, eps: float = 1e-12) -> float:
    """CryoLike's clamp: ``max(eps, 1e-6)`` for single, ``max(eps, 1e-12)`` for double."""
    prec = Precision.parse(precision).resolve()
    return max(eps, 1e-12 if prec is Precision.DOUBLE else 1e-6)


def images_to_polar(
    images: np.ndarray, grid: PolarGrid, precision: str | Precision = "single", eps: float = 1e-12
) -> np.ndarray:
    """Polar Fourier transform of real images ``[m, nx, ny]`` → complex ``[m, N, W]``.

    ``F[p] = (4π / sqrt(nx ny)) Σ_{i,j} f[i,j] exp(−i (k1_p (i − ⌊nx/2⌋) + k2_p (j − ⌊ny/2⌋)))``
    with ``k1 = 2π · 2 x_p / nx`` and ``k2 = 2π · 2 y_p / ny`` (``x_p, y_p`` in polar units).
    """
    import finufft

    imgs = np.asarray(images)
    if imgs.ndim == 2:
        imgs = imgs[None]
    m, nx, ny = imgs.shape
    k1 = (2.0 * np.pi * 2.0 * grid.x_points / nx).ravel()
    k2 = (2.0 * np.pi * 2.0 * grid.y_points / ny).ravel()
    if np.abs(k1).max() > 3 * np.pi or np.abs(k2).max() > 3 * np.pi:
        raise ParameterError(
            f"the polar grid reaches beyond 1.5× Nyquist of {nx}×{ny} images (radius "
            f"{grid.radius_max}); use a smaller resolution_factor"
        )
    f = np.ascontiguousarray(imgs, dtype=np.complex128)
    out = finufft.nufft2d2(k1, k2, f, isign=-1, eps=tolerance(precision, eps))
    out = out.reshape(m, *grid.shape) * (4.0 * np.pi / np.sqrt(nx * ny))
    return out.astype(Precision.parse(precision).resolve().complex_dtype)


def volume_at_points(
    volume: np.ndarray,
    points: np.ndarray,
    scale: np.ndarray,
    precision: str | Precision = "single",
    eps: float = 1e-12,
) -> np.ndarray:
    """``Σ_abc ρ[a,b,c] exp(−i Σ_ax 2π · 2 · k_ax · s_ax (idx_ax − ⌊n_ax/2⌋))`` at ``points``.

    ``points`` is ``[P, 3]`` in polar units; ``scale[ax]`` is ``voxel_ax / image_box`` (which
    is ``1/n_ax`` when the map spans exactly the image box, CryoLike's assumption). Returns
    complex128 ``[P]`` (without CryoLike's ``π / N^{1/3}`` factor, which normalisation removes).
    """
    import finufft

    coords = [2.0 * np.pi * 2.0 * points[:, ax] * scale[ax] for ax in range(3)]
    if max(float(np.abs(c).max(initial=0.0)) for c in coords) > 3 * np.pi:
        raise ParameterError("the polar grid reaches beyond 1.5× Nyquist of the map's voxels")
    f = np.ascontiguousarray(volume, dtype=np.complex128)
    return finufft.nufft3d2(*coords, f, isign=-1, eps=tolerance(precision, eps))


def polar_to_images(
    fourier: np.ndarray, grid: PolarGrid, n_pixels: int | tuple[int, int], eps: float = 1e-12
) -> np.ndarray:
    """Real-space images ``[m, nx, ny]`` (float64) from polar Fourier images ``[m, N, W]``.

    CryoLike's inverse (spec §3.2): a type-1 NUFFT of ``F[p] · weight_points[p]`` with the
    forward transform's frequencies and scale, real part. Used to synthesise particles.
    """
    import finufft

    nx, ny = (n_pixels, n_pixels) if np.isscalar(n_pixels) else n_pixels
    f = np.asarray(fourier, dtype=np.complex128)
    if f.ndim == 2:
        f = f[None]
    m = f.shape[0]
    k1 = (2.0 * np.pi * 2.0 * grid.x_points / nx).ravel()
    k2 = (2.0 * np.pi * 2.0 * grid.y_points / ny).ravel()
    c = np.ascontiguousarray((f * grid.weight_points[None]).reshape(m, -1))
    out = finufft.nufft2d1(k1, k2, c, (nx, ny), isign=1, eps=max(eps, 1e-12))
    return (out * (4.0 * np.pi / np.sqrt(nx * ny))).real
