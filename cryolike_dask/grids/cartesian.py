"""Cartesian pixel grid of the real-space images (CryoLike's ``CartesianGrid2D``, spec §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryolike_dask.errors import ParameterError


def _pair(value: float | int | tuple | list | np.ndarray, name: str, kind: type) -> tuple:
    arr = np.atleast_1d(np.asarray(value))
    if arr.ndim != 1 or arr.size not in (1, 2):
        raise ParameterError(f"{name} must be a number or a pair of numbers, not {value!r}")
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    out = tuple(kind(v) for v in arr)
    for v in out:
        if not (math.isfinite(v) and v > 0):
            raise ParameterError(f"{name} must be positive and finite, not {value!r}")
    if kind is int and not np.all(arr == np.round(arr)):
        raise ParameterError(f"{name} must be whole numbers, not {value!r}")
    return out


@dataclass(frozen=True)
class CartesianGrid2D:
    """Square or rectangular pixel grid.

    Parameters
    ----------
    n_pixels : int or (int, int)
        Pixels along array axis 0 ("x" in CryoLike's naming) and axis 1 ("y").
    pixel_size : float or (float, float)
        Pixel size in Å along each axis.
    """

    n_pixels: tuple[int, int]
    pixel_size: tuple[float, float]

    def __init__(self, n_pixels: int | tuple[int, int], pixel_size: float | tuple[float, float]):
        object.__setattr__(self, "n_pixels", _pair(n_pixels, "n_pixels", int))
        object.__setattr__(self, "pixel_size", _pair(pixel_size, "pixel_size", float))

    @property
    def box_size(self) -> tuple[float, float]:
        """Box edge lengths ``n_pixels * pixel_size`` in Å."""
        return (self.n_pixels[0] * self.pixel_size[0], self.n_pixels[1] * self.pixel_size[1])

    @property
    def n_pixels_total(self) -> int:
        """``nx * ny``, the pixel count that enters the likelihood's normalisation."""
        return self.n_pixels[0] * self.n_pixels[1]

    def axis(self, i: int) -> np.ndarray:
        """Pixel coordinates along axis ``i`` in Å: ``(j - n/2) * pixel_size``; float64 ``[n]``."""
        half = self.box_size[i] / 2.0
        return np.linspace(-half, half, self.n_pixels[i], endpoint=False)

    @property
    def x_pixels(self) -> np.ndarray:
        """Coordinate along axis 0 of every pixel, Å; float64 ``[nx, ny]`` (``indexing='ij'``)."""
        return np.meshgrid(self.axis(0), self.axis(1), indexing="ij")[0]

    @property
    def y_pixels(self) -> np.ndarray:
        """Coordinate along axis 1 of every pixel, Å; float64 ``[nx, ny]``."""
        return np.meshgrid(self.axis(0), self.axis(1), indexing="ij")[1]
