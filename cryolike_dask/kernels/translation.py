"""Fourier translation kernel (spec §8.1)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cryolike_dask.kernels.backend import array_module


def translation_kernel(
    x_points: Any,
    y_points: Any,
    dx: Any,
    dy: Any,
    box_size: tuple[float, float] | float,
    dtype: Any = np.complex128,
) -> Any:
    """``K[d, n, w] = exp(−2πi (x_p · 2 dx_d / bx + y_p · 2 dy_d / by))``.

    Multiplying a Fourier image by ``K[d]`` moves its real-space content by ``+(dx_d, dy_d)``
    (towards increasing array index).

    Parameters
    ----------
    x_points, y_points : array ``[N, W]``
        Polar-grid point coordinates, polar units.
    dx, dy : array ``[D]``
        Displacements along array axes 0 and 1, Å.
    box_size : float or (float, float)
        Box edge lengths ``(bx, by)`` in Å.
    dtype
        Complex dtype of the result; the phase is computed in float64 first.

    Returns
    -------
    array
        ``[D, N, W]`` of ``dtype`` on the array module of ``dx``.
    """
    xp = array_module(dx, x_points)
    bx, by = (box_size, box_size) if np.isscalar(box_size) else box_size
    dxa = xp.atleast_1d(xp.asarray(dx, dtype=xp.float64))
    dya = xp.atleast_1d(xp.asarray(dy, dtype=xp.float64))
    xp_ = xp.asarray(x_points, dtype=xp.float64)
    yp_ = xp.asarray(y_points, dtype=xp.float64)
    phase = (2.0 / float(bx)) * dxa[:, None, None] * xp_[None] + (2.0 / float(by)) * dya[
        :, None, None
    ] * yp_[None]
    return xp.exp(-2j * np.pi * phase).astype(dtype, copy=False)
