"""Per-particle metadata from RELION STAR files and cryoSPARC ``.cs`` files (spec §14.3).

Units after reading: defocus Å, angles radians (STAR degrees are converted; ``.cs`` angles are
already radians), Cs mm, voltage kV. Rows keep the file's order; each particle records its row
number, and for indexed inputs its image file and 0-based index in that file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.params.lens import LensParameters, check_microscope
from cryolike_dask.params.npz import ParameterFileError


class MetadataError(CryoLikeDaskError):
    """A STAR or .cs file is unreadable or lacks a required field."""


@dataclass(frozen=True)
class ParticleRecords:
    """Particles described by one metadata file, in row order.

    Attributes
    ----------
    source : Path
        The STAR or .cs file.
    rows : numpy.ndarray
        int64 ``[n]``: row of each particle in ``source`` (0-based).
    lens : LensParameters
        CTF parameters (RELION's astigmatism convention).
    image_files : list of str or None
        Image file of each particle as written in the metadata (indexed inputs).
    image_indices : numpy.ndarray or None
        int64 ``[n]``: 0-based index of each particle within its image file.
    pixel_size : float or None
        Pixel size in Å stated by the metadata (one value), if any.
    """

    source: Path
    rows: np.ndarray
    lens: LensParameters
    image_files: list[str] | None
    image_indices: np.ndarray | None
    pixel_size: float | None

    @property
    def n_particles(self) -> int:
        return int(self.rows.size)

    def subset(self, index: np.ndarray) -> ParticleRecords:
        return ParticleRecords(
            self.source,
            self.rows[index],
            self.lens.subset(index),
            None if self.image_files is None else [self.image_files[i] for i in index],
            None if self.image_indices is None else self.image_indices[index],
            self.pixel_size,
        )


def _table(path: Path):
    import starfile

    if not path.is_file():
        raise MetadataError(f"{path}: file not found")
    try:
        data = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise MetadataError(f"{path}: not a readable STAR file ({exc})") from exc
    blocks = {k: v for k, v in data.items() if hasattr(v, "columns")}
    if not blocks:
        raise MetadataError(f"{path}: no data table (loop_) found")
    if "particles" in blocks:
        table = blocks["particles"].copy()
        if "optics" in blocks:
            optics = blocks["optics"]
            key = "rlnOpticsGroup"
            if key not in table.columns or key not in optics.columns:
                raise MetadataError(f"{path}: optics and particles blocks need rlnOpticsGroup")
            extra = [c for c in optics.columns if c not in table.columns or c == key]
            table = table.merge(optics[extra], on=key, how="left", validate="many_to_one")
            missing = table[extra[1:]].isna().any(axis=1) if len(extra) > 1 else None
            if missing is not None and bool(missing.any()):
                row = int(np.flatnonzero(missing.to_numpy())[0])
                raise MetadataError(
                    f"{path}: particle row {row} refers to an optics group not in data_optics"
                )
    elif len(blocks) == 1:
        table = next(iter(blocks.values())).copy()
    else:
        raise MetadataError(
            f"{path}: {len(blocks)} data blocks ({', '.join(blocks)}); expected one, or "
            "'optics' + 'particles'"
        )
    table.columns = [c[3:] if c.startswith("rln") else c.lstrip("_") for c in table.columns]
    return table


def _column(table, name: str, path: Path, expected: str, default: float | None = None):
    if name not in table.columns:
        if default is not None:
            return np.full(len(table), default, dtype=np.float64)
        raise MetadataError(f"{path}: missing column rln{name} ({expected})")
    try:
        values = table[name].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"{path}: column rln{name} is not numeric ({exc})") from exc
    if not np.all(np.isfinite(values)):
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        raise MetadataError(f"{path}: column rln{name} has a non-finite value in row {row}")
    return values


def _one(values: np.ndarray, name: str, path: Path) -> float:
    """The one value of a column (``name``: a STAR column without ``rln``, or a ``.cs``
    field with its ``/``)."""
    uniq = np.unique(values)
    if uniq.size != 1:
        label = name if "/" in name else f"rln{name}"
        raise MetadataError(
            f"{path}: {label} takes several values ({', '.join(f'{v:g}' for v in uniq[:4])}); "
            "one value per file is supported"
        )
    return float(uniq[0])


#: The names STAR and .cs files give the microscope constants (see ``check_microscope``).
STAR_NAMES = {
    "voltage": "column rlnVoltage",
    "spherical_aberration": "column rlnSphericalAberration",
    "amplitude_contrast": "column rlnAmplitudeContrast",
}
CS_NAMES = {
    "voltage": "field ctf/accel_kv",
    "spherical_aberration": "field ctf/cs_mm",
    "amplitude_contrast": "field ctf/amp_contrast",
}


def _check_microscope(path: Path, names: dict[str, str], scalars: dict[str, float]) -> None:
    try:
        check_microscope(str(path), names, **scalars)
    except ParameterFileError as exc:
        raise MetadataError(str(exc)) from None


def _check_pixel(path: Path, field: str, value: float) -> None:
    if not (np.isfinite(value) and value > 0):
        raise MetadataError(f"{path}: {field} (pixel size) must be positive, not {value:g}")


def read_star(path: str | os.PathLike, indexed: bool | None = None) -> ParticleRecords:
    """Read a RELION STAR file (3.0 single block, or 3.1 ``optics`` + ``particles``).

    Required: ``DefocusU``, ``DefocusV``, ``DefocusAngle`` (degrees), ``Voltage`` (kV),
    ``SphericalAberration`` (mm); optional ``AmplitudeContrast`` (0.1), ``PhaseShift``
    (degrees, 0), ``CtfBfactor``, ``CtfScalefactor``. With ``indexed`` (default: when the
    column exists) ``ImageName`` (``NNNNNN@file``, 1-based) locates each image. The pixel size
    comes from ``ImagePixelSize``, else ``DetectorPixelSize`` (µm) × 10⁴ / ``Magnification``.
    """
    p = Path(path)
    table = _table(p)
    if len(table) == 0:
        raise MetadataError(f"{p}: no particles")
    scalars = {
        "spherical_aberration": _one(
            _column(table, "SphericalAberration", p, "Cs, mm"), "SphericalAberration", p
        ),
        "voltage": _one(_column(table, "Voltage", p, "kV"), "Voltage", p),
        "amplitude_contrast": _one(
            _column(table, "AmplitudeContrast", p, "", default=0.1), "AmplitudeContrast", p
        ),
    }
    _check_microscope(p, STAR_NAMES, scalars)
    lens = LensParameters(
        defocus_u=_column(table, "DefocusU", p, "defocus U, Å"),
        defocus_v=_column(table, "DefocusV", p, "defocus V, Å"),
        defocus_angle=np.deg2rad(_column(table, "DefocusAngle", p, "astigmatism angle, degrees")),
        phase_shift=np.deg2rad(_column(table, "PhaseShift", p, "degrees", default=0.0)),
        **scalars,
        ctf_bfactor=float(_column(table, "CtfBfactor", p, "", default=0.0)[0]),
        ctf_scalefactor=float(_column(table, "CtfScalefactor", p, "", default=1.0)[0]),
        astigmatism_convention="relion",
    )
    files = indices = None
    if indexed or (indexed is None and "ImageName" in table.columns):
        if "ImageName" not in table.columns:
            raise MetadataError(f"{p}: missing column rlnImageName (NNNNNN@file of each image)")
        files, idx = [], []
        for row, name in enumerate(table["ImageName"].astype(str)):
            number, sep, file = name.partition("@")
            if not sep or not number.strip().isdigit() or int(number) < 1 or not file:
                raise MetadataError(
                    f"{p}: rlnImageName in row {row} is {name!r}; expected NNNNNN@file (1-based)"
                )
            idx.append(int(number) - 1)
            files.append(file.strip())
        indices = np.asarray(idx, dtype=np.int64)
    pixel = None
    if "ImagePixelSize" in table.columns:
        pixel = _one(_column(table, "ImagePixelSize", p, "Å"), "ImagePixelSize", p)
        _check_pixel(p, "column rlnImagePixelSize", pixel)
    elif "DetectorPixelSize" in table.columns and "Magnification" in table.columns:
        det = _one(_column(table, "DetectorPixelSize", p, "µm"), "DetectorPixelSize", p)
        mag = _one(_column(table, "Magnification", p, ""), "Magnification", p)
        _check_pixel(p, "column rlnDetectorPixelSize", det)
        _check_pixel(p, "column rlnMagnification", mag)
        pixel = det * 1e4 / mag
    return ParticleRecords(p, np.arange(len(table), dtype=np.int64), lens, files, indices, pixel)


CS_REQUIRED = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/cs_mm",
    "ctf/accel_kv",
    "ctf/amp_contrast",
)


def read_cs(path: str | os.PathLike, indexed: bool = True) -> ParticleRecords:
    """Read a cryoSPARC ``.cs`` file (a NumPy structured array).

    ``ctf/df1_A`` (U, Å), ``ctf/df2_A`` (V), ``ctf/df_angle_rad``, ``ctf/phase_shift_rad``
    (optional), ``ctf/cs_mm``, ``ctf/accel_kv``, ``ctf/amp_contrast``; with ``indexed``,
    ``blob/path`` and ``blob/idx`` (0-based); pixel size from ``blob/psize_A``.
    """
    p = Path(path)
    if not p.is_file():
        raise MetadataError(f"{p}: file not found")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise MetadataError(f"{p}: not a readable cryoSPARC .cs file ({exc})") from exc
    names = data.dtype.names or ()
    missing = [n for n in CS_REQUIRED if n not in names]
    if indexed:
        missing += [n for n in ("blob/path", "blob/idx") if n not in names]
    if missing:
        raise MetadataError(f"{p}: missing field(s) {', '.join(missing)}")
    if data.size == 0:
        raise MetadataError(f"{p}: no particles")

    def num(name: str) -> np.ndarray:
        values = np.asarray(data[name], dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise MetadataError(f"{p}: field {name} has a non-finite value")
        return values

    phase = num("ctf/phase_shift_rad") if "ctf/phase_shift_rad" in names else np.zeros(data.size)
    scalars = {
        "spherical_aberration": _one(num("ctf/cs_mm"), "ctf/cs_mm", p),
        "voltage": _one(num("ctf/accel_kv"), "ctf/accel_kv", p),
        "amplitude_contrast": _one(num("ctf/amp_contrast"), "ctf/amp_contrast", p),
    }
    _check_microscope(p, CS_NAMES, scalars)
    lens = LensParameters(
        num("ctf/df1_A"),
        num("ctf/df2_A"),
        num("ctf/df_angle_rad"),
        phase,
        astigmatism_convention="relion",
        **scalars,
    )
    files = indices = None
    if indexed:
        files = [f.decode() if isinstance(f, bytes) else str(f) for f in data["blob/path"]]
        indices = np.asarray(data["blob/idx"], dtype=np.int64)
    pixel = None
    if "blob/psize_A" in names:
        pixel = float(num("blob/psize_A")[0])
        _check_pixel(p, "field blob/psize_A", pixel)
    return ParticleRecords(p, np.arange(data.size, dtype=np.int64), lens, files, indices, pixel)


def write_star(path: str | os.PathLike, lens: LensParameters) -> Path:
    """A RELION STAR file with one row of CTF parameters per image (angles in degrees).

    ``lens`` must use RELION's convention (the angle is written as RELION reads it).
    """
    if lens.astigmatism_convention != "relion":
        raise MetadataError("write_star needs lens parameters in RELION's convention")
    p = Path(path)
    header = [
        "data_particles",
        "",
        "loop_",
        "_rlnDefocusU #1",
        "_rlnDefocusV #2",
        "_rlnDefocusAngle #3",
        "_rlnVoltage #4",
        "_rlnSphericalAberration #5",
        "_rlnAmplitudeContrast #6",
        "_rlnPhaseShift #7",
    ]
    rows = [
        f"{u:.3f} {v:.3f} {np.rad2deg(a):.6f} {lens.voltage:g} {lens.spherical_aberration:g} "
        f"{lens.amplitude_contrast:g} {np.rad2deg(ph):.6f}"
        for u, v, a, ph in zip(
            lens.defocus_u, lens.defocus_v, lens.defocus_angle, lens.phase_shift, strict=True
        )
    ]
    p.write_text("\n".join(header + rows) + "\n")
    return p
