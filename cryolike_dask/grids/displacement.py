"""The displacement (translation) search grid (spec §8.2)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from cryolike_dask.errors import ParameterError


class NoTranslationalSearchWarning(UserWarning):
    """A displacement count below 1 was given: no translational search along that axis."""


def _axis_count(n: int, axis: str) -> int:
    if int(n) != n:
        raise ParameterError(f"n_displacements_{axis} must be an integer, not {n!r}")
    n = int(n)
    if n < -1:
        raise ParameterError(
            f"n_displacements_{axis} must be a positive count, or -1 for no search along "
            f"{axis}; got {n}"
        )
    return max(n, 1)


@dataclass(frozen=True, eq=False)
class DisplacementGrid:
    """Displacements searched for every template, in Å.

    Attributes
    ----------
    x, y : numpy.ndarray
        float32 ``[D]``: displacement ``d`` moves a template's content by ``+(x[d], y[d])`` Å
        (x along array axis 0, y along axis 1).
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        x = np.ascontiguousarray(self.x, dtype=np.float32).ravel()
        y = np.ascontiguousarray(self.y, dtype=np.float32).ravel()
        if x.size != y.size or x.size == 0:
            raise ParameterError(
                f"displacement grid: x and y must be non-empty and of equal length, got "
                f"{x.size} and {y.size}"
            )
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ParameterError("displacement grid: displacements must be finite")
        x.setflags(write=False)
        y.setflags(write=False)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    @classmethod
    def from_search(
        cls,
        max_displacement_pixels: float,
        n_displacements_x: int,
        n_displacements_y: int,
        pixel_size: float,
    ) -> DisplacementGrid:
        """CryoLike's square search grid (``Images.set_displacement_grid``).

        ``nx = n_displacements_x`` values ``linspace(-dmax, dmax, nx)`` with
        ``dmax = max_displacement_pixels * pixel_size`` Å (and likewise y), flattened with x
        fastest (entry ``iy * nx + ix``); when ``nx`` or ``ny`` is even, ``(0, 0)`` is appended
        so the zero shift is always tried. A count of -1 (or 0) means 1 and warns that no
        translational search is done along that axis. Example: 8 px at 1.346 Å/px, 16 × 16
        gives 257 displacements within ±10.768 Å, the last one 0.
        """
        nx = _axis_count(n_displacements_x, "x")
        ny = _axis_count(n_displacements_y, "y")
        off = [a for a, n in (("x", n_displacements_x), ("y", n_displacements_y)) if n < 1]
        if off:
            counts = ", ".join(
                f"n_displacements_{a} = {n}"
                for a, n in (("x", n_displacements_x), ("y", n_displacements_y))
                if n < 1
            )
            warnings.warn(
                f"{counts} means 1: no translational search is done along {' and '.join(off)} "
                "(only displacement 0 is tried; give counts such as 5 to search)",
                NoTranslationalSearchWarning,
                stacklevel=2,
            )
        if not (math.isfinite(pixel_size) and pixel_size > 0):
            raise ParameterError(f"pixel_size must be positive, not {pixel_size!r}")
        if not (math.isfinite(max_displacement_pixels) and max_displacement_pixels >= 0):
            raise ParameterError(
                f"max_displacement_pixels must be >= 0, not {max_displacement_pixels!r}"
            )
        dmax = 0.0 if nx * ny == 1 else float(max_displacement_pixels) * float(pixel_size)
        xs = np.linspace(-dmax, dmax, nx) if nx > 1 else np.zeros(1)
        ys = np.linspace(-dmax, dmax, ny) if ny > 1 else np.zeros(1)
        gx, gy = np.meshgrid(xs, ys, indexing="xy")  # [ny, nx]: x fastest when flattened
        x, y = gx.ravel(), gy.ravel()
        if nx % 2 == 0 or ny % 2 == 0:
            x, y = np.append(x, 0.0), np.append(y, 0.0)
        return cls(x, y)

    @classmethod
    def from_array(cls, displacements: np.ndarray) -> DisplacementGrid:
        """From a ``[2, D]`` array (row 0 = x Å, row 1 = y Å), CryoLike's ``displacements_set``."""
        arr = np.asarray(displacements)
        if arr.ndim != 2 or arr.shape[0] != 2:
            raise ParameterError(f"displacements must have shape [2, D], not {arr.shape}")
        return cls(arr[0], arr[1])

    @property
    def n_displacements(self) -> int:
        """Number of displacements ``D``."""
        return int(self.x.size)

    def __len__(self) -> int:
        return self.n_displacements

    def as_array(self) -> np.ndarray:
        """float32 ``[2, D]``: row 0 x (Å), row 1 y (Å), as CryoLike's ``displacements_set.pt``."""
        return np.stack([self.x, self.y]).astype(np.float32)
