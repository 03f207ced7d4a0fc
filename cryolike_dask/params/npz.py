"""Reading and writing CryoLike's ``.npz`` files, with errors that name file and field.

CryoLike stores ``None`` as a 0-d object array and scalars as 0-d arrays; on loading, 0-d arrays
become Python scalars and ``None``-valued or empty arrays become ``None`` (spec §14.1).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError, OutputExistsError, write_error


class ParameterFileError(CryoLikeDaskError):
    """A parameter file is missing, unreadable, or has a missing or malformed field."""


def read_npz(path: str | os.PathLike) -> dict[str, Any]:
    """Load every key of a CryoLike ``.npz`` file, converting 0-d arrays to Python values.

    Raises
    ------
    ParameterFileError
        If the file does not exist or is not a readable ``.npz`` archive.
    """
    p = Path(path)
    if not p.is_file():
        raise ParameterFileError(f"{p}: file not found")
    if not zipfile.is_zipfile(p):
        raise ParameterFileError(f"{p}: not a readable .npz file (not a zip archive)")
    raw: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(p) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                raw[member[: -len(".npy")]] = _read_npy(archive.read(member))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise ParameterFileError(f"{p}: not a readable .npz file ({exc})") from exc
    return {k: _unwrap(v) for k, v in raw.items()}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds pickled NumPy arrays (CryoLike's 0-d object arrays) and nothing else."""

    _allowed: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _read_npy(data: bytes) -> np.ndarray:
    """One ``.npy`` member; object arrays through :class:`_ArrayOnlyUnpickler`."""
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        _, _, dtype = np.lib.format.read_array_header_2_0(fp)
    if dtype.hasobject:
        arr = _ArrayOnlyUnpickler(fp, encoding="latin1").load()
        return np.asarray(arr)
    fp.seek(0)
    return np.lib.format.read_array(fp, allow_pickle=False)


def _unwrap(value: np.ndarray) -> Any:
    if value.dtype == object and value.ndim == 0:
        return value.item()
    if value.ndim == 0:
        return value.item()
    if value.size == 0:
        return None
    return value


def write_npz(path: str | os.PathLike, fields: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``fields`` with ``np.savez_compressed``; ``None`` is stored as a 0-d object array.

    The file is written to a temporary name first and renamed, so a reader never sees a
    half-written file. An existing file is refused unless ``overwrite``.
    """
    p = Path(path)
    if p.suffix != ".npz":
        raise ParameterFileError(f"{p}: parameter files must end in .npz")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p}: exists; pass overwrite=True to replace it")
    arrays = {
        k: np.array(None, dtype=object) if v is None else np.asarray(v) for k, v in fields.items()
    }
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}.npz")
    try:
        try:
            np.savez_compressed(tmp, **arrays)
        except OSError as exc:  # a full disk: name the file, not its temporary name
            raise write_error(exc, p) from None
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def require(fields: Mapping[str, Any], key: str, source: str, expected: str) -> Any:
    """``fields[key]``, or a :class:`ParameterFileError` naming the source, key and expectation."""
    if key not in fields or fields[key] is None:
        raise ParameterFileError(f"{source}: missing field {key!r} (expected {expected})")
    return fields[key]
