"""CryoLike's ``.pt`` files: read as NumPy, written atomically, with content checksums.

torch is imported only inside these functions, so nothing else in the package needs it.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError, write_error


class TorchFileError(CryoLikeDaskError):
    """A ``.pt`` file is missing, truncated, or does not hold what was expected."""


def load_tensor(path: str | os.PathLike, what: str = "tensor") -> np.ndarray:
    """Load a ``.pt`` file holding one tensor (``weights_only=True``) as a NumPy array.

    Raises
    ------
    TorchFileError
        If the file is missing, unreadable, or holds something other than a tensor.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise TorchFileError(f"{p}: file not found (expected a {what})")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged archives
        raise TorchFileError(f"{p}: not a readable .pt file ({exc})") from exc
    if not isinstance(obj, torch.Tensor):
        raise TorchFileError(f"{p}: holds a {type(obj).__name__}, expected a {what}")
    return obj.detach().contiguous().numpy()


class _Writer:
    """A file for ``torch.save`` that keeps the OS error of a failed write (torch reports a
    full disk as ``RuntimeError: ... unexpected pos``, without the reason)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename. A failed write (a full disk, ...)
    raises the ``OSError`` naming ``path``; the temporary file is removed."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as f:
                writer = _Writer(f)
                try:
                    torch.save(obj, writer)
                except RuntimeError:
                    if writer.error is None:
                        raise
                    raise writer.error from None
        except OSError as exc:  # also the last flush, at close
            raise write_error(exc, path) from None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_tensor(array: np.ndarray, path: str | os.PathLike) -> Path:
    """``torch.save`` a NumPy array as a plain tensor (same dtype and shape), atomically."""
    import torch

    p = Path(path)
    arr = np.ascontiguousarray(array)
    if not arr.flags.writeable:  # torch warns on read-only buffers; it never writes here
        arr = arr.copy()
    _atomic_save(torch.from_numpy(arr), p)
    return p


def save_pickled_array(array: np.ndarray, path: str | os.PathLike) -> Path:
    """``torch.save`` a NumPy array itself (CryoLike's ``displacements_set.pt``), atomically.

    Loading it needs ``torch.load(path, weights_only=False)``, as with CryoLike's file.
    """
    p = Path(path)
    _atomic_save(np.ascontiguousarray(array), p)
    return p


def load_pickled_array(path: str | os.PathLike) -> np.ndarray:
    """Load a ``.pt`` holding a NumPy array or a tensor (e.g. ``displacements_set.pt``)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise TorchFileError(f"{p}: file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TorchFileError(f"{p}: not a readable .pt file ({exc})") from exc
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, tuple) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0].numpy()  # CryoLike's CrossCorrelationReturn NamedTuple
    raise TorchFileError(f"{p}: holds a {type(obj).__name__}, expected an array")


def tensor_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the tensor in a ``.pt`` file without reading its data (mmap)."""
    import torch

    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise TorchFileError(f"{p}: not a readable .pt file ({exc})") from exc
    if not isinstance(obj, torch.Tensor):
        raise TorchFileError(f"{p}: holds a {type(obj).__name__}, expected a tensor")
    dtype = torch.empty(0, dtype=obj.dtype).numpy().dtype
    return tuple(obj.shape), dtype


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_pt_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable zip archive (the modern ``.pt`` format)."""
    return zipfile.is_zipfile(path)
