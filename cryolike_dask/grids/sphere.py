"""Viewing directions on the sphere and their quadrature weights (spec §4).

A template is the projection of a structure along one viewing direction. CryoLike spaces the
directions by a *viewing distance* ``vd`` (on the unit sphere): Gauss–Legendre circles of
constant polar angle, each with an adaptive number of equally spaced azimuths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import roots_legendre

from cryolike_dask.errors import ParameterError


@dataclass(frozen=True, eq=False)
class ViewingAngles:
    """Viewing directions (azimuth α, polar β, in-plane γ), radians, and sphere weights.

    Attributes
    ----------
    azimus, polars, gammas : numpy.ndarray
        float32 ``[S]`` radians (float32 as in CryoLike, whose template geometry evaluates
        the cosines of these float32 angles).
    weights : numpy.ndarray
        float64 ``[S]``: sphere quadrature weights (sum ``4π`` for :meth:`from_viewing_distance`).
    """

    azimus: np.ndarray
    polars: np.ndarray
    gammas: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("azimus", "polars", "gammas"):
            arrays[name] = np.ascontiguousarray(getattr(self, name), dtype=np.float32).ravel()
        arrays["weights"] = np.ascontiguousarray(self.weights, dtype=np.float64).ravel()
        sizes = {a.size for a in arrays.values()}
        if len(sizes) != 1:
            raise ParameterError(
                "viewing angles: azimus, polars, gammas and weights must have the same length, "
                f"got {[a.size for a in arrays.values()]}"
            )
        if not np.all(np.isfinite(arrays["weights"])) or np.any(arrays["weights"] <= 0):
            raise ParameterError("viewing angles: weights must be positive and finite")
        for name, a in arrays.items():
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    @classmethod
    def from_viewing_distance(cls, viewing_distance: float) -> ViewingAngles:
        """CryoLike's adaptive sphere grid for viewing distance ``vd`` (spec §4).

        ``a = 2π / vd``; ``n_eq = 3 + round(a)``; ``n_circles = 3 + ceil(n_eq / 2)`` Gauss–Legendre
        circles at polar angles ``arccos(node)``; circle ``c`` holds ``3 + round(a sin β_c)``
        azimuths ``linspace(0, 2π, n, endpoint=False)``; weight = Legendre weight × ``2π / n``.
        Examples: ``vd = 1/(4π)`` gives 2370 directions, ``8/(4π)`` gives 96.
        """
        vd = float(viewing_distance)
        if not (math.isfinite(vd) and vd > 0):
            raise ParameterError(
                f"viewing_distance must be a positive number, not {viewing_distance!r}"
            )
        a = 2.0 * np.pi / vd
        n_eq = 3 + round(a)  # Python round: half to even, as CryoLike
        n_circles = 3 + math.ceil(n_eq / 2)
        nodes, legendre_weights = roots_legendre(n_circles)
        polar_circles = np.arccos(nodes)
        n_azimuths = 3 + np.round(a * np.sin(polar_circles)).astype(np.int64)
        azimus, polars, weights = [], [], []
        for beta, lw, n_az in zip(polar_circles, legendre_weights, n_azimuths, strict=True):
            azimus.append(np.linspace(0.0, 2.0 * np.pi, int(n_az), endpoint=False))
            polars.append(np.full(int(n_az), beta))
            weights.append(np.full(int(n_az), lw * 2.0 * np.pi / n_az))
        az = np.concatenate(azimus)
        return cls(az, np.concatenate(polars), np.zeros_like(az), np.concatenate(weights))

    @classmethod
    def uniform_weights(
        cls, azimus: np.ndarray, polars: np.ndarray, gammas: np.ndarray | None = None
    ) -> ViewingAngles:
        """Directions with equal weights ``1/S`` (CryoLike's plain ``ViewingAngles``)."""
        az = np.atleast_1d(np.asarray(azimus))
        g = np.zeros_like(az) if gammas is None else gammas
        return cls(az, polars, g, np.full(az.size, 1.0 / az.size))

    @property
    def n_angles(self) -> int:
        """Number of viewing directions ``S``."""
        return int(self.azimus.size)

    def __len__(self) -> int:
        return self.n_angles

    @property
    def log_normalized_weights(self) -> np.ndarray:
        """``ln(w_s / Σ w)``: the log prior of each direction; float64 ``[S]``.

        This is what the integrated likelihood adds before the sum over templates (CryoLike adds
        the raw weights instead, spec §17.2).
        """
        return np.log(self.weights) - np.log(np.sum(self.weights))

    def step_degrees(self) -> float:
        """Typical angle between neighbouring directions, degrees: ``sqrt(4π / S)`` rad, the
        spacing of ``S`` evenly spread directions."""
        return float(np.degrees(np.sqrt(4.0 * np.pi / max(self.n_angles, 1))))

    def directions(self) -> np.ndarray:
        """Unit projection directions ``(cos α sin β, sin α sin β, cos β)``; float64 ``[S, 3]``."""
        a = self.azimus.astype(np.float64)
        b = self.polars.astype(np.float64)
        return np.stack([np.cos(a) * np.sin(b), np.sin(a) * np.sin(b), np.cos(b)], axis=1)

    def subset(self, index: slice | np.ndarray) -> ViewingAngles:
        """The directions selected by ``index`` (weights kept as they are, not renormalised)."""
        return ViewingAngles(
            self.azimus[index], self.polars[index], self.gammas[index], self.weights[index]
        )
