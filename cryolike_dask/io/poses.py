"""Prior poses of particles: the orientations and origins that RELION or cryoSPARC recorded.

Conventions (RELION's, whatever the source):

* Angles ``rot``, ``tilt``, ``psi`` in degrees, ZYZ: the particle's rotation is the active
  ``R = Rz(rot) · Ry(tilt) · Rz(psi)``, i.e.
  ``scipy.spatial.transform.Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True)``.
  RELION's Euler matrix ``A`` (``Euler_angles2matrix``) is its transpose. The projection
  direction is ``R · ẑ = (cos rot · sin tilt, sin rot · sin tilt, cos tilt)``.
* Origins ``origin_x``, ``origin_y`` in Å, as RELION 3.1's ``rlnOriginXAngst``/``YAngst``: the
  particle's centre lies at the box centre minus the origin; X is the image column (MRC X,
  array axis 1), Y the image row (array axis 0).
* cryoSPARC's ``alignments3D/pose`` is a rotation vector (radians) of that same active
  rotation: ``Rotation.from_rotvec(pose) = R`` (pyem's ``csparc2star`` gives the same angles:
  its ``expmap`` is the transposed Rodrigues matrix and ``rot2euler`` decomposes RELION's
  ``A``). ``alignments3D/shift`` (pixels) equals RELION's ``rlnOriginX/Y`` in pixels.

A particle without angles (or without an origin) has ``has_angles`` (``has_origin``) False
and NaN values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

#: The values of ``PriorPoses.source``.
POSE_KINDS = ("star-refined", "star-prior", "cryosparc")
#: What ``pose_source`` may ask for when reading metadata.
POSE_SOURCES = ("auto", "refined", "prior", "none")

CONVENTION = (
    "rot, tilt, psi: degrees, RELION ZYZ; rotation = "
    "scipy Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True) = Rz(rot) Ry(tilt) Rz(psi) "
    "(active; RELION's Euler matrix A is its transpose). origin_x, origin_y: Angstrom, as "
    "rlnOriginXAngst/rlnOriginYAngst: the particle's centre is at the box centre minus the "
    "origin; x = image column (MRC X), y = image row. has_angles/has_origin False: unknown (NaN)."
)

_FLOATS = ("rot", "tilt", "psi", "origin_x", "origin_y")
_BOOLS = ("has_angles", "has_origin")
FIELDS = _FLOATS + _BOOLS


@dataclass(frozen=True)
class PriorPoses:
    """Per-particle prior poses (see the module docstring for the conventions).

    Attributes
    ----------
    rot, tilt, psi : numpy.ndarray
        float64 ``[n]``, degrees (NaN where unknown).
    origin_x, origin_y : numpy.ndarray
        float64 ``[n]``, Å (NaN where unknown).
    has_angles, has_origin : numpy.ndarray
        bool ``[n]``: whether the particle's direction (``rot``, ``tilt``) / origin is known.
        ``psi`` may still be NaN where ``has_angles`` is True (a prior without an in-plane
        angle); see :attr:`has_psi`.
    source : str
        ``"star-refined"``, ``"star-prior"`` or ``"cryosparc"``.
    columns : dict of str to str
        Quantity (``rot``, ``tilt``, ``psi``, ``origin_x``, ``origin_y``, ``pixel_size``) → the
        column or field it was read from, as named in the file.
    """

    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origin_x: np.ndarray
    origin_y: np.ndarray
    has_angles: np.ndarray
    has_origin: np.ndarray
    source: str
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = np.asarray(self.rot).shape
        for name in _FLOATS:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        for name in _BOOLS:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=bool))
        for name in FIELDS:
            if getattr(self, name).shape != n or len(n) != 1:
                raise ValueError(
                    f"PriorPoses.{name} has shape {getattr(self, name).shape}, not {n}"
                )
        if self.source not in POSE_KINDS:
            raise ValueError(f"PriorPoses.source is {self.source!r}; expected one of {POSE_KINDS}")
        object.__setattr__(self, "columns", dict(self.columns))

    @property
    def n(self) -> int:
        return int(self.rot.size)

    @property
    def has_psi(self) -> np.ndarray:
        """Particles whose whole rotation (``rot``, ``tilt`` and ``psi``) is known."""
        return self.has_angles & np.isfinite(self.psi)

    def subset(self, index: slice | np.ndarray) -> PriorPoses:
        """The poses of the particles selected by ``index``."""
        return PriorPoses(
            *(getattr(self, name)[index] for name in FIELDS), self.source, self.columns
        )

    @classmethod
    def concat(cls, parts: list[PriorPoses]) -> PriorPoses:
        """Poses of several files, in order. They must share their ``source``; where their
        columns differ, ``columns`` lists each distinct name (``", "``-separated)."""
        if not parts:
            raise ValueError("PriorPoses.concat needs at least one part")
        sources = list(dict.fromkeys(p.source for p in parts))
        if len(sources) != 1:
            raise ValueError(f"poses of different kinds ({', '.join(sources)}) cannot be joined")
        columns: dict[str, str] = {}
        for key in dict.fromkeys(k for p in parts for k in p.columns):
            names = dict.fromkeys(p.columns[key] for p in parts if key in p.columns)
            columns[key] = ", ".join(names)
        return cls(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in FIELDS),
            sources[0],
            columns,
        )

    def rotations(self):
        """The rotations ``R`` (a scipy ``Rotation``) of the particles with :attr:`has_psi`."""
        from scipy.spatial.transform import Rotation

        keep = self.has_psi
        angles = np.stack([self.rot[keep], self.tilt[keep], self.psi[keep]], axis=1)
        return Rotation.from_euler("ZYZ", angles, degrees=True)

    def directions(self) -> np.ndarray:
        """float64 ``[n, 3]``: projection directions ``R · ẑ`` (NaN without angles)."""
        r, t = np.deg2rad(self.rot), np.deg2rad(self.tilt)
        out = np.stack([np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)], axis=1)
        out[~self.has_angles] = np.nan
        return out

    def describe(self) -> str:
        """One line: how many particles have angles and origins, and from which columns."""

        def names(keys: tuple[str, ...]) -> str:
            return ", ".join(dict.fromkeys(self.columns[k] for k in keys if k in self.columns))

        angles, origin = names(("rot", "tilt", "psi")), names(("origin_x", "origin_y"))
        if "pixel_size" in self.columns:
            origin += f" × {self.columns['pixel_size']}"
        return (
            f"prior poses ({self.source}): angles for {int(self.has_angles.sum())}/{self.n} "
            f"particles ({angles or 'no columns'}), origins for {int(self.has_origin.sum())}/"
            f"{self.n} ({origin or 'no columns'})"
        )


def missing_value(values: np.ndarray) -> np.ndarray:
    """RELION's marks of an unset value: 999 (any sign) or NaN."""
    v = np.asarray(values, dtype=np.float64)
    return np.isnan(v) | (np.abs(v) == 999.0)


def cryosparc_to_relion(
    rotvec: np.ndarray, shift_px: np.ndarray, pixel_size: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cryoSPARC ``alignments3D/pose`` (rotation vectors, rad, ``[n, 3]``) and
    ``alignments3D/shift`` (pixels, ``[n, 2]``) → RELION ``(rot, tilt, psi)`` in degrees and
    ``(origin_x, origin_y)`` in Å (``shift × pixel_size``, the pixel size the shifts refer to).

    ``(rot, tilt, psi) = Rotation.from_rotvec(pose).as_euler("ZYZ", degrees=True)``; rows with
    a non-finite pose give NaN angles, rows with a non-finite shift NaN origins.
    """
    from scipy.spatial.transform import Rotation

    rotvec = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    shift = np.asarray(shift_px, dtype=np.float64).reshape(-1, 2)
    angles = np.full((rotvec.shape[0], 3), np.nan)
    ok = np.all(np.isfinite(rotvec), axis=1)
    if ok.any():
        with warnings.catch_warnings():  # tilt 0 or 180: psi is set to 0, the rotation is exact
            warnings.filterwarnings("ignore", message="Gimbal lock", category=UserWarning)
            angles[ok] = Rotation.from_rotvec(rotvec[ok]).as_euler("ZYZ", degrees=True)
    origin = shift * np.asarray(pixel_size, dtype=np.float64).reshape(-1, 1)
    return angles[:, 0], angles[:, 1], angles[:, 2], origin[:, 0], origin[:, 1]


def relion_to_cryosparc(
    rot: np.ndarray,
    tilt: np.ndarray,
    psi: np.ndarray,
    origin_x: np.ndarray,
    origin_y: np.ndarray,
    pixel_size: float | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`cryosparc_to_relion`: RELION angles (degrees) and origins (Å) →
    ``alignments3D/pose`` (rotation vectors, rad, ``[n, 3]``) and ``alignments3D/shift``
    (pixels of ``pixel_size`` Å, ``[n, 2]``)."""
    from scipy.spatial.transform import Rotation

    angles = np.stack([np.ravel(rot), np.ravel(tilt), np.ravel(psi)], axis=1).astype(np.float64)
    pose = Rotation.from_euler("ZYZ", angles, degrees=True).as_rotvec()
    shift = np.stack([np.ravel(origin_x), np.ravel(origin_y)], axis=1).astype(np.float64)
    return pose, shift / np.asarray(pixel_size, dtype=np.float64).reshape(-1, 1)


def sort_key(poses: PriorPoses, band_degrees: float = 10.0) -> np.ndarray:
    """The order that groups particles by viewing direction: by band of the direction's polar
    angle (``band_degrees`` wide, from the +z pole), then by its azimuth (``rot``, 0–360°),
    particles without angles last; ties keep their order. Returns the permutation."""
    d = poses.directions()
    polar = np.rad2deg(np.arccos(np.clip(d[:, 2], -1.0, 1.0)))
    azimuth = np.mod(np.rad2deg(np.arctan2(d[:, 1], d[:, 0])), 360.0)
    n_bands = int(np.ceil(180.0 / band_degrees))
    band = np.clip(np.floor(polar / band_degrees), 0, n_bands - 1)
    missing = ~poses.has_angles
    band[missing] = 0
    azimuth[missing] = 0
    return np.lexsort((np.arange(poses.n), azimuth, band, missing))


__all__ = [
    "CONVENTION",
    "POSE_KINDS",
    "POSE_SOURCES",
    "PriorPoses",
    "cryosparc_to_relion",
    "missing_value",
    "relion_to_cryosparc",
    "sort_key",
]
