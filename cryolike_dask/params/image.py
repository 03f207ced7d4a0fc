"""Image parameters: CryoLike's ``ImageDescriptor`` and its ``parameters.npz`` (spec §14.1).

They fix the pixel grid, the polar Fourier grid, the viewing directions (through the viewing
distance) and the atom model used to make templates from atomic models.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.errors import ParameterError
from cryolike_dask.grids.cartesian import CartesianGrid2D
from cryolike_dask.grids.polar import DEFAULT_DIST_RADII, PolarGrid
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.params.npz import ParameterFileError, read_npz, require, write_npz
from cryolike_dask.precision import Precision

ATOM_SHAPES = ("gaussian", "hard-sphere", "default")

#: Keys of CryoLike's ``parameters.npz``, in the order CryoLike writes them.
IMAGE_PARAMETER_KEYS = (
    "n_pixels",
    "pixel_size",
    "radius_max",
    "dist_radii",
    "n_inplanes",
    "precision",
    "viewing_distance",
    "atom_radii",
    "atom_selection",
    "use_protein_residue_model",
    "atom_shape",
)


@dataclass(frozen=True)
class ImageParameters:
    """Everything that defines the images' grids (CryoLike's ``ImageDescriptor``).

    Attributes
    ----------
    n_pixels : (int, int)
        Image size in pixels along array axes 0 and 1.
    pixel_size : (float, float)
        Pixel size in Å.
    radius_max : float
        Polar-grid radius, polar units (``resolution_factor * n_pixels / 4``).
    dist_radii : float
        Nominal radial spacing of the polar grid (0.25).
    n_inplanes : int
        Angles per shell = in-plane rotations searched.
    precision : Precision
        Precision of stored Fourier stacks and of the computation.
    viewing_distance : float
        Spacing of the viewing directions on the unit sphere (see :class:`ViewingAngles`).
    atom_radii, atom_selection, use_protein_residue_model, atom_shape
        How atomic models become densities (used by template generation).
    """

    n_pixels: tuple[int, int]
    pixel_size: tuple[float, float]
    radius_max: float
    dist_radii: float
    n_inplanes: int
    precision: Precision = Precision.SINGLE
    viewing_distance: float = 1.0 / (4.0 * math.pi)
    atom_radii: float | None = None
    atom_selection: str | None = "name CA"
    use_protein_residue_model: bool = True
    atom_shape: str = "gaussian"

    def __post_init__(self) -> None:
        grid = CartesianGrid2D(self.n_pixels, self.pixel_size)  # validates both
        object.__setattr__(self, "n_pixels", grid.n_pixels)
        object.__setattr__(self, "pixel_size", grid.pixel_size)
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        PolarGrid(self.radius_max, self.dist_radii, self.n_inplanes)  # validates
        object.__setattr__(self, "radius_max", float(self.radius_max))
        object.__setattr__(self, "dist_radii", float(self.dist_radii))
        object.__setattr__(self, "n_inplanes", int(self.n_inplanes))
        vd = float(self.viewing_distance)
        if not (math.isfinite(vd) and vd > 0):
            raise ParameterError(
                f"viewing_distance must be positive, not {self.viewing_distance!r}"
            )
        object.__setattr__(self, "viewing_distance", vd)
        if self.atom_radii is not None:
            r = float(self.atom_radii)
            if not (math.isfinite(r) and r > 0):
                raise ParameterError(f"atom_radii must be positive, not {self.atom_radii!r}")
            object.__setattr__(self, "atom_radii", r)
        if self.atom_shape not in ATOM_SHAPES:
            raise ParameterError(
                f"atom_shape must be one of {ATOM_SHAPES}, not {self.atom_shape!r}"
            )
        object.__setattr__(self, "use_protein_residue_model", bool(self.use_protein_residue_model))

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def from_values(
        cls,
        n_pixels: int | tuple[int, int],
        pixel_size: float | tuple[float, float],
        precision: str | Precision = "single",
        resolution_factor: float = 1.0,
        viewing_distance: float | None = None,
        n_inplanes: int | None = None,
        atom_radii: float | None = None,
        atom_selection: str | None = "name CA",
        use_protein_residue_model: bool = True,
        atom_shape: str = "gaussian",
    ) -> ImageParameters:
        """CryoLike's ``ImageDescriptor.from_individual_values`` (spec §1.1, §4).

        ``radius_max = resolution_factor * n_pixels / 4``, ``dist_radii = 0.25``,
        ``n_inplanes = 2 * n_pixels`` and ``viewing_distance = 1 / (4π resolution_factor)``
        unless given. ``resolution_factor`` is not stored, only its effect.
        """
        if not (math.isfinite(resolution_factor) and resolution_factor > 0):
            raise ParameterError(f"resolution_factor must be positive, not {resolution_factor!r}")
        grid = CartesianGrid2D(n_pixels, pixel_size)
        n = grid.n_pixels[0]
        return cls(
            n_pixels=grid.n_pixels,
            pixel_size=grid.pixel_size,
            radius_max=resolution_factor * n * 0.25,
            dist_radii=DEFAULT_DIST_RADII,
            n_inplanes=2 * n if n_inplanes is None else int(n_inplanes),
            precision=Precision.parse(precision),
            viewing_distance=(
                1.0 / (4.0 * math.pi) / resolution_factor
                if viewing_distance is None
                else float(viewing_distance)
            ),
            atom_radii=atom_radii,
            atom_selection=atom_selection,
            use_protein_residue_model=use_protein_residue_model,
            atom_shape=atom_shape,
        )

    # ----------------------------------------------------------------------------- npz
    @classmethod
    def from_dict(cls, fields: dict[str, Any], source: str = "parameters") -> ImageParameters:
        """Build from a dict with CryoLike's ``parameters.npz`` keys (extra keys are ignored)."""
        try:
            return cls(
                n_pixels=tuple(np.atleast_1d(require(fields, "n_pixels", source, "2 integers"))),
                pixel_size=tuple(
                    np.atleast_1d(require(fields, "pixel_size", source, "2 positive numbers, Å"))
                ),
                radius_max=require(fields, "radius_max", source, "a positive number"),
                dist_radii=require(fields, "dist_radii", source, "a positive number"),
                n_inplanes=require(fields, "n_inplanes", source, "an integer >= 2"),
                precision=fields.get("precision") or "default",
                viewing_distance=require(fields, "viewing_distance", source, "a positive number"),
                atom_radii=fields.get("atom_radii"),
                atom_selection=fields.get("atom_selection"),
                use_protein_residue_model=bool(fields.get("use_protein_residue_model", True)),
                atom_shape=fields.get("atom_shape") or "default",
            )
        except ParameterFileError:
            raise
        except (TypeError, ValueError) as exc:
            raise ParameterFileError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike, strict: bool = True) -> ImageParameters:
        """Read a CryoLike ``parameters.npz``.

        With ``strict`` (default) a field that a parameters file does not hold (a typo, or a
        particle stack's ``.npz`` passed by mistake) is an error; ``strict=False`` reads the
        image parameters embedded in a particle stack's ``.npz``.
        """
        fields = read_npz(path)
        if strict:
            extra = sorted(set(fields) - set(IMAGE_PARAMETER_KEYS))
            if extra:
                raise ParameterFileError(
                    f"{path}: unexpected field(s) {', '.join(extra)}; a parameters file holds "
                    f"{', '.join(IMAGE_PARAMETER_KEYS)}"
                )
        return cls.from_dict(fields, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The fields with CryoLike's keys and dtypes (``int64[2]``, ``float64[2]``, ...)."""
        return {
            "n_pixels": np.asarray(self.n_pixels, dtype=np.int64),
            "pixel_size": np.asarray(self.pixel_size, dtype=np.float64),
            "radius_max": np.float64(self.radius_max),
            "dist_radii": np.float64(self.dist_radii),
            "n_inplanes": np.int64(self.n_inplanes),
            "precision": str(self.precision.value),
            "viewing_distance": np.float64(self.viewing_distance),
            "atom_radii": None if self.atom_radii is None else np.float64(self.atom_radii),
            "atom_selection": self.atom_selection,
            "use_protein_residue_model": bool(self.use_protein_residue_model),
            "atom_shape": self.atom_shape,
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``parameters.npz`` in CryoLike's format; refuses an existing file by default."""
        return write_npz(path, self.to_dict(), overwrite=overwrite)

    # ----------------------------------------------------------------------------- derived
    @property
    def polar_grid(self) -> PolarGrid:
        """The polar Fourier grid (Gauss–Jacobi β = 1 shells)."""
        return PolarGrid(self.radius_max, self.dist_radii, self.n_inplanes)

    @property
    def cartesian_grid(self) -> CartesianGrid2D:
        """The real-space pixel grid."""
        return CartesianGrid2D(self.n_pixels, self.pixel_size)

    @property
    def box_size(self) -> tuple[float, float]:
        """Box edge lengths in Å."""
        return self.cartesian_grid.box_size

    @property
    def viewing_angles(self) -> ViewingAngles:
        """Viewing directions regenerated from ``viewing_distance``."""
        return ViewingAngles.from_viewing_distance(self.viewing_distance)

    def is_compatible_with(self, other: ImageParameters) -> bool:
        """CryoLike's compatibility rule: same polar grid, pixel counts and pixel sizes."""
        return not self.incompatibilities(other)

    def incompatibilities(self, other: ImageParameters) -> list[str]:
        """Human-readable list of the fields where ``other`` differs in a way that matters."""
        out = []
        for name in ("radius_max", "dist_radii", "n_inplanes", "n_pixels", "pixel_size"):
            a, b = getattr(self, name), getattr(other, name)
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                out.append(f"{name}: {a} != {b}")
        return out

    def with_precision(self, precision: str | Precision) -> ImageParameters:
        """A copy with another precision."""
        return replace(self, precision=Precision.parse(precision))
