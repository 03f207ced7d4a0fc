"""Per-image lens (CTF) parameters: CryoLike's ``LensDescriptor`` (spec §7.1, §14.3).

Units: defocus in Å, angles in **radians**, spherical aberration in mm, voltage in kV.
``astigmatism_convention`` says how the defocus angle is measured (spec §7.4):

* ``"cryolike"`` - CryoLike's formula, ``Δ̄ + |U−V|/2 · cos(2(θ − a))`` with θ from array
  axis 0; used for stacks made by CryoLike so that its numbers reproduce;
* ``"relion"`` - RELION's CTF exactly, for particles converted from STAR/cryoSPARC files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryolike_dask.params.npz import ParameterFileError, read_npz, require

ASTIGMATISM_CONVENTIONS = ("cryolike", "relion")


def _numbers(value: Any, name: str, source: str) -> np.ndarray:
    try:
        return np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    except (TypeError, ValueError):
        raise ParameterFileError(
            f"{source}: field {name!r} is not numeric ({str(value)[:40]!r})"
        ) from None


def _per_image(value: Any, n: int | None, name: str, source: str) -> np.ndarray:
    arr = _numbers(value, name, source)
    if n is not None and arr.size == 1 and n != 1:
        arr = np.full(n, arr[0])
    if n is not None and arr.size != n:
        raise ParameterFileError(f"{source}: field {name!r} has {arr.size} values, expected {n}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ParameterFileError(
            f"{source}: field {name!r} has a non-finite value at image {bad} ({arr[bad]})"
        )
    arr.setflags(write=False)
    return arr


def _single(value: Any, name: str, source: str) -> float:
    arr = _numbers(value, name, source)
    if arr.size == 0 or not np.all(arr == arr[0]):
        raise ParameterFileError(
            f"{source}: field {name!r} must have a single value for all images, got "
            f"{np.unique(arr)[:5]}"
        )
    v = float(arr[0])
    if not math.isfinite(v):
        raise ParameterFileError(f"{source}: field {name!r} is not finite ({v})")
    return v


#: The microscope constants each lens-parameter file holds once, under its own field names:
#: attribute -> (what it is, unit).
SCALAR_FIELDS = {
    "voltage": ("acceleration voltage", "kV"),
    "spherical_aberration": ("spherical aberration", "mm"),
    "amplitude_contrast": ("amplitude contrast", ""),
}

#: The names CryoLike's stack ``.npz`` files give them.
NPZ_NAMES = {
    "voltage": "field voltage",
    "spherical_aberration": "field sphericalAberration",
    "amplitude_contrast": "field amplitudeContrast",
}


def check_microscope(
    source: str,
    names: dict[str, str] | None = None,
    *,
    voltage: float,
    spherical_aberration: float,
    amplitude_contrast: float,
) -> None:
    """Refuse a voltage, spherical aberration or amplitude contrast the CTF cannot use.

    The voltage must be positive, Cs at least 0 (0: an aberration-corrected microscope) and
    the amplitude contrast in [0, 1), all finite. The message names ``source`` (the file)
    and the field as that file calls it (``names``: attribute -> ``"field voltage"``,
    ``"column rlnVoltage"``, ...).

    Raises
    ------
    ParameterFileError
        Naming the file, the field and the value.
    """
    names = {**NPZ_NAMES, **(names or {})}
    values = {
        "voltage": voltage,
        "spherical_aberration": spherical_aberration,
        "amplitude_contrast": amplitude_contrast,
    }
    rules = {
        "voltage": (lambda v: v > 0, "must be positive"),
        "spherical_aberration": (lambda v: v >= 0, "must be 0 or positive"),
        "amplitude_contrast": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    }
    for attr, value in values.items():
        ok, rule = rules[attr]
        what, unit = SCALAR_FIELDS[attr]
        v = float(value)
        if not math.isfinite(v) or not ok(v):
            rule = "must be finite" if not math.isfinite(v) else rule
            raise ParameterFileError(
                f"{source}: {names[attr]} ({what}{', ' + unit if unit else ''}) {rule}, not {v:g}"
            )


@dataclass(frozen=True, eq=False)
class LensParameters:
    """CTF parameters of ``M`` images.

    Attributes
    ----------
    defocus_u, defocus_v : numpy.ndarray
        float64 ``[M]``, Å.
    defocus_angle : numpy.ndarray
        float64 ``[M]``, radians (see ``astigmatism_convention``).
    phase_shift : numpy.ndarray
        float64 ``[M]``, radians.
    spherical_aberration : float
        Cs in mm (one value for all images).
    voltage : float
        Acceleration voltage in kV.
    amplitude_contrast : float
        Amplitude contrast ``A`` in [0, 1).
    ctf_bfactor, ctf_scalefactor : float
        Read and carried, never used by the CTF (as in CryoLike).
    astigmatism_convention : str
        ``"cryolike"`` or ``"relion"``.
    extra : dict
        Bookkeeping fields carried through (``angleRotation``, ``files``, ``idxs``, ...).
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    phase_shift: np.ndarray
    spherical_aberration: float = 2.7
    voltage: float = 300.0
    amplitude_contrast: float = 0.1
    ctf_bfactor: float = 0.0
    ctf_scalefactor: float = 1.0
    astigmatism_convention: str = "cryolike"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        src = "lens parameters"
        u = _per_image(self.defocus_u, None, "defocusU", src)
        n = u.size
        object.__setattr__(self, "defocus_u", u)
        object.__setattr__(self, "defocus_v", _per_image(self.defocus_v, n, "defocusV", src))
        object.__setattr__(
            self, "defocus_angle", _per_image(self.defocus_angle, n, "defocusAngle", src)
        )
        object.__setattr__(self, "phase_shift", _per_image(self.phase_shift, n, "phaseShift", src))
        for name in ("spherical_aberration", "voltage", "amplitude_contrast"):
            object.__setattr__(self, name, _single(getattr(self, name), name, src))
        check_microscope(
            src,
            voltage=self.voltage,
            spherical_aberration=self.spherical_aberration,
            amplitude_contrast=self.amplitude_contrast,
        )
        if self.astigmatism_convention not in ASTIGMATISM_CONVENTIONS:
            raise ParameterFileError(
                f"{src}: astigmatism_convention must be one of {ASTIGMATISM_CONVENTIONS}, not "
                f"{self.astigmatism_convention!r}"
            )

    @property
    def n_images(self) -> int:
        """Number of images ``M``."""
        return int(self.defocus_u.size)

    def __len__(self) -> int:
        return self.n_images

    # ----------------------------------------------------------------------------- npz
    @classmethod
    def from_dict(
        cls,
        fields: dict[str, Any],
        source: str = "lens parameters",
        astigmatism_convention: str | None = None,
    ) -> LensParameters:
        """From CryoLike's stack ``.npz`` keys (angles already in radians).

        The convention is read from the ``astigmatism_convention`` key when present (our own
        stacks), else ``"cryolike"``; an explicit argument overrides both.
        """
        u = require(fields, "defocusU", source, "defocus U per image, Å")
        n = np.atleast_1d(u).size
        conv = astigmatism_convention or fields.get("astigmatism_convention") or "cryolike"
        extra = {
            k: fields[k]
            for k in ("angleRotation", "angleTilt", "anglePsi", "ref_pixel_size", "files", "idxs")
            if k in fields
        }
        try:
            scalars = {
                "spherical_aberration": _single(
                    require(fields, "sphericalAberration", source, "Cs in mm"),
                    "sphericalAberration",
                    source,
                ),
                "voltage": _single(require(fields, "voltage", source, "kV"), "voltage", source),
                "amplitude_contrast": _single(
                    0.1 if fields.get("amplitudeContrast") is None else fields["amplitudeContrast"],
                    "amplitudeContrast",
                    source,
                ),
            }
            check_microscope(source, **scalars)
            return cls(
                defocus_u=_per_image(u, n, "defocusU", source),
                defocus_v=_per_image(
                    require(fields, "defocusV", source, "defocus V per image, Å"),
                    n,
                    "defocusV",
                    source,
                ),
                defocus_angle=_per_image(
                    require(fields, "defocusAngle", source, "astigmatism angle per image, rad"),
                    n,
                    "defocusAngle",
                    source,
                ),
                phase_shift=_per_image(
                    0.0 if fields.get("phaseShift") is None else fields["phaseShift"],
                    n,
                    "phaseShift",
                    source,
                ),
                **scalars,
                ctf_bfactor=_scalar_or_first(fields.get("ctfBfactor"), 0.0),
                ctf_scalefactor=_scalar_or_first(fields.get("ctfScalefactor"), 1.0),
                astigmatism_convention=str(conv),
                extra=extra,
            )
        except ParameterFileError as exc:
            msg = str(exc)
            raise ParameterFileError(
                msg if msg.startswith(source) else f"{source}: {msg}"
            ) from None

    @classmethod
    def load(
        cls, path: str | os.PathLike, astigmatism_convention: str | None = None
    ) -> LensParameters:
        """Read the lens fields of a CryoLike particle-stack ``.npz``."""
        return cls.from_dict(read_npz(path), str(path), astigmatism_convention)

    def to_dict(self) -> dict[str, Any]:
        """CryoLike's stack ``.npz`` lens keys (radians), plus ``astigmatism_convention``."""
        out: dict[str, Any] = {
            "defocusU": self.defocus_u,
            "defocusV": self.defocus_v,
            "defocusAngle": self.defocus_angle,
            "phaseShift": self.phase_shift,
            "sphericalAberration": np.float64(self.spherical_aberration),
            "voltage": np.float64(self.voltage),
            "amplitudeContrast": np.float64(self.amplitude_contrast),
            "angleRotation": None,
            "angleTilt": None,
            "anglePsi": None,
            "ref_pixel_size": None,
            "files": None,
            "idxs": None,
            "ctfBfactor": np.float64(self.ctf_bfactor),
            "ctfScalefactor": np.float64(self.ctf_scalefactor),
            "astigmatism_convention": self.astigmatism_convention,
        }
        out.update(self.extra)
        return out

    def subset(self, index: slice | np.ndarray) -> LensParameters:
        """Parameters of the images selected by ``index``."""
        extra = {}
        for k, v in self.extra.items():
            if isinstance(v, np.ndarray) and v.ndim == 1 and v.size == self.n_images:
                extra[k] = v[index]
            else:
                extra[k] = v
        return LensParameters(
            self.defocus_u[index],
            self.defocus_v[index],
            self.defocus_angle[index],
            self.phase_shift[index],
            self.spherical_aberration,
            self.voltage,
            self.amplitude_contrast,
            self.ctf_bfactor,
            self.ctf_scalefactor,
            self.astigmatism_convention,
            extra,
        )

    def with_convention(self, astigmatism_convention: str) -> LensParameters:
        """A copy that interprets the defocus angle with another convention."""
        return LensParameters(
            self.defocus_u,
            self.defocus_v,
            self.defocus_angle,
            self.phase_shift,
            self.spherical_aberration,
            self.voltage,
            self.amplitude_contrast,
            self.ctf_bfactor,
            self.ctf_scalefactor,
            astigmatism_convention,
            dict(self.extra),
        )


def _scalar_or_first(value: Any, default: float) -> float:
    if value is None:
        return default
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    except (TypeError, ValueError):
        return default  # unused by the CTF (B-factor, scale factor): carried when readable
    return float(arr[0]) if arr.size else default
