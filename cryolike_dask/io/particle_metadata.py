"""Per-particle metadata from RELION STAR files and cryoSPARC ``.cs`` files (spec §14.3).

Units after reading: defocus Å, CTF angles radians (STAR degrees are converted; ``.cs`` angles
are already radians), Cs mm, voltage kV. Rows keep the file's order; each particle records its
row number, and for indexed inputs its image file and 0-based index in that file. Prior poses
(``pose_source``) follow RELION's conventions, degrees and Å (:mod:`cryolike_dask.io.poses`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.io.poses import POSE_SOURCES, PriorPoses, cryosparc_to_relion, missing_value
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
    poses : PriorPoses or None
        Prior angles and origins (see :mod:`cryolike_dask.io.poses`), when read.
    """

    source: Path
    rows: np.ndarray
    lens: LensParameters
    image_files: list[str] | None
    image_indices: np.ndarray | None
    pixel_size: float | None
    poses: PriorPoses | None = None

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
            None if self.poses is None else self.poses.subset(index),
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


def _check_pose_source(pose_source: str) -> None:
    if pose_source not in POSE_SOURCES:
        raise MetadataError(
            f"pose_source is {pose_source!r}; expected one of {', '.join(POSE_SOURCES)}"
        )


#: STAR columns (without ``rln``) of each pose kind: angles, origins in Å, origins in pixels.
STAR_POSE_COLUMNS = {
    "refined": (
        ("AngleRot", "AngleTilt", "AnglePsi"),
        ("OriginXAngst", "OriginYAngst"),
        ("OriginX", "OriginY"),
    ),
    "prior": (
        ("AngleRotPrior", "AngleTiltPrior", "AnglePsiPrior"),
        ("OriginXPriorAngst", "OriginYPriorAngst"),
        ("OriginXPrior", "OriginYPrior"),
    ),
}


def _pose_values(table, name: str, path: Path) -> np.ndarray:
    try:
        return table[name].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"{path}: column rln{name} is not numeric ({exc})") from exc


def _star_poses(
    table,
    path: Path,
    pose_source: str,
    file_pixel: tuple[float, str] | None,
    pixel_size: float | None,
) -> PriorPoses | None:
    """The poses of a STAR table (see :func:`read_star`)."""
    _check_pose_source(pose_source)
    cols = set(table.columns)
    if pose_source == "none":
        return None
    if pose_source == "auto":
        if all(c in cols for c in STAR_POSE_COLUMNS["refined"][0]):
            pose_source = "refined"
        elif all(c in cols for c in STAR_POSE_COLUMNS["prior"][0][:2]):
            pose_source = "prior"
        else:
            return None
    angle_cols, angst_cols, pixel_cols = STAR_POSE_COLUMNS[pose_source]
    needed = angle_cols if pose_source == "refined" else angle_cols[:2]
    absent = [c for c in needed if c not in cols]
    if absent:
        raise MetadataError(
            f"{path}: {pose_source} poses asked for but column(s) "
            f"{', '.join('rln' + c for c in absent)} are missing"
        )
    n = len(table)
    columns = {}
    rot, tilt = (_pose_values(table, c, path) for c in angle_cols[:2])
    columns["rot"], columns["tilt"] = (f"rln{c}" for c in angle_cols[:2])
    if angle_cols[2] in cols:
        psi = _pose_values(table, angle_cols[2], path)
        columns["psi"] = f"rln{angle_cols[2]}"
    else:
        psi = np.full(n, np.nan)
    has_angles = ~(missing_value(rot) | missing_value(tilt))
    psi = np.where(missing_value(psi), np.nan, psi)
    rot, tilt = np.where(has_angles, rot, np.nan), np.where(has_angles, tilt, np.nan)
    psi = np.where(has_angles, psi, np.nan)

    ox = oy = np.full(n, np.nan)
    has_origin = np.zeros(n, dtype=bool)
    for pair, in_pixels in ((angst_cols, False), (pixel_cols, True)):
        present = [c for c in pair if c in cols]
        if not present:
            continue
        if len(present) == 1:
            other = next(c for c in pair if c not in cols)
            raise MetadataError(f"{path}: column rln{present[0]} without rln{other}")
        x, y = (_pose_values(table, c, path) for c in pair)
        scale = 1.0
        if in_pixels:
            if file_pixel is not None:
                scale, where = file_pixel
            elif pixel_size is not None:
                scale, where = float(pixel_size), "the given pixel size"
            else:
                raise MetadataError(
                    f"{path}: origins rln{pair[0]}/rln{pair[1]} are in pixels but the file "
                    "states no pixel size; give one (--pixel-size)"
                )
            columns["pixel_size"] = where
        has_origin = ~(missing_value(x) | missing_value(y))
        ox = np.where(has_origin, x * scale, np.nan)
        oy = np.where(has_origin, y * scale, np.nan)
        columns["origin_x"], columns["origin_y"] = (f"rln{c}" for c in pair)
        break
    return PriorPoses(
        rot, tilt, psi, ox, oy, has_angles, has_origin, f"star-{pose_source}", columns
    )


def read_star(
    path: str | os.PathLike,
    indexed: bool | None = None,
    pose_source: str = "auto",
    pixel_size: float | None = None,
) -> ParticleRecords:
    """Read a RELION STAR file (3.0 single block, or 3.1 ``optics`` + ``particles``).

    Required: ``DefocusU``, ``DefocusV``, ``DefocusAngle`` (degrees), ``Voltage`` (kV),
    ``SphericalAberration`` (mm); optional ``AmplitudeContrast`` (0.1), ``PhaseShift``
    (degrees, 0), ``CtfBfactor``, ``CtfScalefactor``. With ``indexed`` (default: when the
    column exists) ``ImageName`` (``NNNNNN@file``, 1-based) locates each image. The pixel size
    comes from ``ImagePixelSize``, else ``DetectorPixelSize`` (µm) × 10⁴ / ``Magnification``.

    Poses (``pose_source``; conventions in :mod:`cryolike_dask.io.poses`):

    * ``"refined"``: ``AngleRot``, ``AngleTilt``, ``AnglePsi`` (all three required) and the
      origin ``OriginXAngst``/``OriginYAngst`` (Å, RELION 3.1), else ``OriginX``/``OriginY``
      (pixels × the file's pixel size, else ``pixel_size``), else none;
    * ``"prior"``: ``AngleRotPrior``, ``AngleTiltPrior`` (required), ``AnglePsiPrior``
      (optional), ``OriginXPriorAngst``/``OriginYPriorAngst``, else ``OriginXPrior``/``YPrior``
      (pixels);
    * ``"auto"`` (default): refined when its three angle columns exist, else prior when its
      rot and tilt columns exist, else none; ``"none"``: no poses.

    A value of ±999 (RELION's unset prior) or NaN marks it unknown. A particle has angles
    (``has_angles``) when its rot and tilt are known: they fix its projection direction. An
    unknown or absent psi then stays NaN (:attr:`PriorPoses.has_psi` is False) rather than
    discarding the direction; an unknown rot or tilt makes all three NaN. An origin needs both
    X and Y. Asking for ``"refined"`` or ``"prior"`` when the columns are absent raises
    :class:`MetadataError` naming them.
    """
    p = Path(path)
    _check_pose_source(pose_source)
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
    pixel = where = None
    if "ImagePixelSize" in table.columns:
        pixel = _one(_column(table, "ImagePixelSize", p, "Å"), "ImagePixelSize", p)
        _check_pixel(p, "column rlnImagePixelSize", pixel)
        where = "rlnImagePixelSize"
    elif "DetectorPixelSize" in table.columns and "Magnification" in table.columns:
        det = _one(_column(table, "DetectorPixelSize", p, "µm"), "DetectorPixelSize", p)
        mag = _one(_column(table, "Magnification", p, ""), "Magnification", p)
        _check_pixel(p, "column rlnDetectorPixelSize", det)
        _check_pixel(p, "column rlnMagnification", mag)
        pixel = det * 1e4 / mag
        where = "rlnDetectorPixelSize × 10⁴ / rlnMagnification"
    poses = _star_poses(
        table, p, pose_source, None if pixel is None else (pixel, where), pixel_size
    )
    return ParticleRecords(
        p, np.arange(len(table), dtype=np.int64), lens, files, indices, pixel, poses
    )


CS_REQUIRED = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/cs_mm",
    "ctf/accel_kv",
    "ctf/amp_contrast",
)


def read_cs(
    path: str | os.PathLike,
    indexed: bool = True,
    pose_source: str = "auto",
    pixel_size: float | None = None,
) -> ParticleRecords:
    """Read a cryoSPARC ``.cs`` file (a NumPy structured array).

    ``ctf/df1_A`` (U, Å), ``ctf/df2_A`` (V), ``ctf/df_angle_rad``, ``ctf/phase_shift_rad``
    (optional), ``ctf/cs_mm``, ``ctf/accel_kv``, ``ctf/amp_contrast``; with ``indexed``,
    ``blob/path`` and ``blob/idx`` (0-based); pixel size from ``blob/psize_A``.

    Poses (``pose_source`` ``"auto"``, the default, or ``"refined"``): ``alignments3D/pose``
    (rotation vectors, rad) → RELION angles, and ``alignments3D/shift`` (pixels) × the pixel
    size the alignment used (``alignments3D/psize_A``, else ``blob/psize_A``, else
    ``pixel_size``) → origins in Å (:func:`cryolike_dask.io.poses.cryosparc_to_relion`).
    ``"auto"`` reads them when present; ``"refined"`` requires ``alignments3D/pose``;
    ``"prior"`` is refused (a .cs file has no priors); ``"none"`` reads none. Non-finite
    values mark a particle's angles or origin unknown.
    """
    p = Path(path)
    _check_pose_source(pose_source)
    if pose_source == "prior":
        raise MetadataError(
            f"{p}: a cryoSPARC .cs file has no prior poses; use pose_source 'auto', "
            "'refined' (alignments3D/pose) or 'none'"
        )
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
    poses = _cs_poses(data, p, pose_source, pixel_size)
    return ParticleRecords(
        p, np.arange(data.size, dtype=np.int64), lens, files, indices, pixel, poses
    )


def _cs_vectors(data: np.ndarray, field: str, width: int, path: Path) -> np.ndarray:
    """float64 ``[n, width]`` of a ``.cs`` field, or a :class:`MetadataError` naming it."""
    try:
        return np.asarray(data[field], dtype=np.float64).reshape(data.size, width)
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"{path}: field {field} is not [n, {width}] numbers ({exc})") from exc


def _cs_poses(
    data: np.ndarray, path: Path, pose_source: str, pixel_size: float | None
) -> PriorPoses | None:
    names = data.dtype.names or ()
    if pose_source == "none" or "alignments3D/pose" not in names:
        if pose_source == "refined":
            raise MetadataError(
                f"{path}: refined poses asked for but field alignments3D/pose is missing"
            )
        return None
    n = data.size
    pose = _cs_vectors(data, "alignments3D/pose", 3, path)
    columns = {"rot": "alignments3D/pose", "tilt": "alignments3D/pose", "psi": "alignments3D/pose"}
    shift = np.full((n, 2), np.nan)
    scale = np.nan
    if "alignments3D/shift" in names:
        shift = _cs_vectors(data, "alignments3D/shift", 2, path)
        for field in ("alignments3D/psize_A", "blob/psize_A"):
            if field in names:
                values = np.asarray(data[field], dtype=np.float64).ravel()
                scale = _one(values, field, path)
                _check_pixel(path, f"field {field}", scale)
                columns["pixel_size"] = field
                break
        else:
            if pixel_size is None:
                raise MetadataError(
                    f"{path}: alignments3D/shift is in pixels but the file states no pixel size "
                    "(alignments3D/psize_A or blob/psize_A); give one (--pixel-size)"
                )
            scale = float(pixel_size)
            columns["pixel_size"] = "the given pixel size"
        columns["origin_x"] = columns["origin_y"] = "alignments3D/shift"
    rot, tilt, psi, ox, oy = cryosparc_to_relion(pose, shift, scale)
    has_angles = np.isfinite(rot) & np.isfinite(tilt) & np.isfinite(psi)
    has_origin = np.isfinite(ox) & np.isfinite(oy)
    return PriorPoses(
        rot,
        tilt,
        psi,
        np.where(has_origin, ox, np.nan),
        np.where(has_origin, oy, np.nan),
        has_angles,
        has_origin,
        "cryosparc",
        columns,
    )


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
