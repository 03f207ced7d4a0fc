"""The uniform polar Fourier grid (CryoLike's ``PolarGrid``, spec §1).

Spatial frequencies are in *polar units* k (dimensionless): the physical frequency is
``nu = 2 k / box_size`` in 1/Å, and ``k = n_pixels / 4`` is Nyquist. Shells are the nodes of a
Gauss–Jacobi (α = 0, β = 1) quadrature mapped to ``(0, radius_max)``; every shell carries the
same ``n_inplanes`` angles ``θ_w = 2π w / W``. Arrays over the grid are shaped
``[n_shells, n_inplanes]`` (shell index first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import roots_jacobi

from cryolike_dask.errors import ParameterError

#: CryoLike's radial spacing, π/2 / (2π) = 0.25 polar units.
DEFAULT_DIST_RADII = 0.25


@dataclass(frozen=True, eq=False)
class PolarGrid:
    """Uniform polar quadrature grid over the disk ``|k| <= radius_max``.

    Parameters
    ----------
    radius_max : float
        Radius ``R`` of the disk, polar units (``resolution_factor * n_pixels / 4``).
    dist_radii : float
        Nominal radial spacing; the number of shells is ``N = 1 + ceil(R / dist_radii)``.
    n_inplanes : int
        Number of angles ``W`` per shell (also the number of in-plane rotations searched).

    Two grids are equal when these three numbers are; everything else is derived from them.
    """

    radius_max: float
    dist_radii: float
    n_inplanes: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.radius_max) and self.radius_max > 0):
            raise ParameterError(f"radius_max must be a positive number, not {self.radius_max!r}")
        if not (math.isfinite(self.dist_radii) and self.dist_radii > 0):
            raise ParameterError(f"dist_radii must be a positive number, not {self.dist_radii!r}")
        if int(self.n_inplanes) != self.n_inplanes or self.n_inplanes < 2:
            raise ParameterError(f"n_inplanes must be an integer >= 2, not {self.n_inplanes!r}")
        object.__setattr__(self, "radius_max", float(self.radius_max))
        object.__setattr__(self, "dist_radii", float(self.dist_radii))
        object.__setattr__(self, "n_inplanes", int(self.n_inplanes))

    @classmethod
    def from_image_size(
        cls,
        n_pixels: int,
        resolution_factor: float = 1.0,
        n_inplanes: int | None = None,
        dist_radii: float = DEFAULT_DIST_RADII,
    ) -> PolarGrid:
        """The grid CryoLike uses for ``n_pixels``-wide images (spec §1.1).

        ``radius_max = resolution_factor * n_pixels / 4`` and ``n_inplanes`` defaults to
        ``2 * n_pixels``.
        """
        w = 2 * int(n_pixels) if n_inplanes is None else int(n_inplanes)
        return cls(resolution_factor * n_pixels * 0.25, dist_radii, w)

    # ----------------------------------------------------------------------------- identity
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolarGrid):
            return NotImplemented
        return (self.radius_max, self.dist_radii, self.n_inplanes) == (
            other.radius_max,
            other.dist_radii,
            other.n_inplanes,
        )

    def __hash__(self) -> int:
        return hash((self.radius_max, self.dist_radii, self.n_inplanes))

    def __repr__(self) -> str:
        return (
            f"PolarGrid(radius_max={self.radius_max!r}, dist_radii={self.dist_radii!r}, "
            f"n_inplanes={self.n_inplanes}, n_shells={self.n_shells})"
        )

    # ----------------------------------------------------------------------------- sizes
    @property
    def n_shells(self) -> int:
        """Number of radial shells ``N = 1 + ceil(radius_max / dist_radii)``."""
        return 1 + math.ceil(self.radius_max / self.dist_radii)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_shells, n_inplanes)``."""
        return (self.n_shells, self.n_inplanes)

    @property
    def n_points(self) -> int:
        """Total number of grid points ``N * W``."""
        return self.n_shells * self.n_inplanes

    # ----------------------------------------------------------------------------- radial
    @cached_property
    def _jacobi(self) -> tuple[np.ndarray, np.ndarray]:
        nodes, weights = roots_jacobi(self.n_shells, 0.0, 1.0)
        return np.asarray(nodes, np.float64), np.asarray(weights, np.float64)

    @cached_property
    def radii(self) -> np.ndarray:
        """Shell radii ``r_n = (t_n + 1) R / 2``, ascending, polar units; float64 ``[N]``."""
        r = (self._jacobi[0] + 1.0) * self.radius_max / 2.0
        r.setflags(write=False)
        return r

    @cached_property
    def weight_shells(self) -> np.ndarray:
        """Radial weights ``ω_n (R/2)^2 / (2π)`` (CryoLike's ``weight_shells``); float64 ``[N]``."""
        w = self._jacobi[1] * (self.radius_max / 2.0) ** 2 / (2.0 * np.pi)
        w.setflags(write=False)
        return w

    # ----------------------------------------------------------------------------- angular
    @cached_property
    def theta(self) -> np.ndarray:
        """Angles ``θ_w = 2π w / W``, radians, from +x (array axis 0); float64 ``[W]``."""
        t = np.linspace(0.0, 2.0 * np.pi, self.n_inplanes, endpoint=False)
        t.setflags(write=False)
        return t

    @cached_property
    def x_points(self) -> np.ndarray:
        """``r_n cos θ_w``, polar units; float64 ``[N, W]``."""
        x = self.radii[:, None] * np.cos(self.theta)[None, :]
        x.setflags(write=False)
        return x

    @cached_property
    def y_points(self) -> np.ndarray:
        """``r_n sin θ_w``, polar units; float64 ``[N, W]``."""
        y = self.radii[:, None] * np.sin(self.theta)[None, :]
        y.setflags(write=False)
        return y

    # ----------------------------------------------------------------------------- weights
    @cached_property
    def weight_points(self) -> np.ndarray:
        """Point weights for ``∫ d²k / (2π)²``: ``weight_shells / W``; float64 ``[N, W]``."""
        w = np.repeat((self.weight_shells / self.n_inplanes)[:, None], self.n_inplanes, axis=1)
        w.setflags(write=False)
        return w

    @cached_property
    def integration_weights(self) -> np.ndarray:
        """Quadrature weights ``ωI`` for ``∫_{|k|<=R} f(k) d²k`` (sum ``πR²``); float64 ``[N, W]``.

        These weight every inner product and norm of the likelihood (spec §1.4).
        """
        w = self.weight_points * (2.0 * np.pi) ** 2
        w.setflags(write=False)
        return w

    @cached_property
    def shell_integration_weights(self) -> np.ndarray:
        """``ωI`` of one point of each shell (the grid is uniform in angle); float64 ``[N]``."""
        w = self.weight_shells * (2.0 * np.pi) ** 2 / self.n_inplanes
        w.setflags(write=False)
        return w

    def integrate(self, values: np.ndarray) -> np.ndarray:
        """``Σ_{n,w} values[..., n, w] · ωI[n, w]``: the integral over the disk, polar units."""
        return np.tensordot(values, self.integration_weights, axes=([-2, -1], [0, 1]))

    # ----------------------------------------------------------------------------- mask
    @cached_property
    def mask(self) -> np.ndarray:
        """FT of the constant-1 image over the box ``[-1, 1]²``: ``4 sinc(2x) sinc(2y)``.

        Real, float64 ``[N, W]``; ``np.sinc`` is the normalised sinc ``sin(πt)/(πt)``.
        """
        s = 4.0 * np.sinc(2.0 * self.x_points) * np.sinc(2.0 * self.y_points)
        s.setflags(write=False)
        return s

    @cached_property
    def mask_integral(self) -> float:
        """``Iss = Σ |mask|² ωI`` (≈ 4, the box area); used by the integrated likelihood."""
        return float(np.sum(self.mask**2 * self.integration_weights))

    def resolution(self, box_size: float) -> np.ndarray:
        """Resolution of each shell in Å, ``box_size / (2 r_n)``; float64 ``[N]``."""
        return box_size / (2.0 * self.radii)
