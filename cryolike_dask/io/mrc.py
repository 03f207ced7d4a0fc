"""MRC maps and image stacks, read with ``mrcfile`` (permissively when the header is sloppy)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError

#: Extensions of the MRC maps that ``make-templates`` projects.
MAP_SUFFIXES = (".mrc", ".map", ".mrcs")


class MrcFileError(CryoLikeDaskError):
    """An MRC file is missing, unreadable, or not of the expected kind."""


@dataclass(frozen=True)
class MrcInfo:
    """Shape and voxel size of an MRC file without its data.

    ``shape`` is as ``mrcfile`` returns the data: ``(n, ny, nx)`` for stacks (a single image
    is ``(1, ny, nx)``), ``(nz, ny, nx)`` for volumes. ``voxel_size`` is ``(x, y, z)`` in Å;
    0 when the header does not say.
    """

    path: Path
    shape: tuple[int, ...]
    voxel_size: tuple[float, float, float]
    is_volume: bool
    permissive: bool


def _open(path: Path, mmap: bool):
    import mrcfile

    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return opener(path, mode="r", permissive=False), False
    except ValueError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = opener(path, mode="r", permissive=True)
        if handle.data is None:
            handle.close()
            raise MrcFileError(f"{path}: not a readable MRC file (no data could be read)") from None
        return handle, True


def mrc_info(path: str | os.PathLike) -> MrcInfo:
    """Header information of an MRC file (strict reader first, then a permissive one)."""
    p = Path(path)
    if not p.is_file():
        raise MrcFileError(f"{p}: file not found")
    try:
        handle, permissive = _open(p, mmap=True)
    except MrcFileError:
        raise
    except Exception as exc:
        raise MrcFileError(f"{p}: not a readable MRC file ({exc})") from exc
    with handle:
        data = handle.data
        vs = handle.voxel_size
        voxel = (float(vs.x), float(vs.y), float(vs.z))
        shape = tuple(int(s) for s in data.shape)
        # a volume: the header says so (space group 1), or cubic 3-D data (maps saved as stacks)
        is_volume = data.ndim == 3 and (bool(handle.is_volume()) or len(set(shape)) == 1)
    if len(shape) == 2:
        shape = (1, *shape)
        is_volume = False
    return MrcInfo(p, shape, voxel, is_volume, permissive)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3-D density map as float32 ``[a, b, c]`` (mrcfile's z, y, x order) and its voxel size."""
    info = mrc_info(path)
    if not info.is_volume:
        raise MrcFileError(
            f"{info.path}: expected a 3-D density map, found an image stack of shape {info.shape}"
        )
    handle, _ = _open(info.path, mmap=False)
    with handle:
        data = np.asarray(handle.data, dtype=np.float32).copy()
    if not np.all(np.isfinite(data)):
        raise MrcFileError(f"{info.path}: the map contains NaN or infinite values")
    return data, info.voxel_size


def read_images(path: str | os.PathLike, indices: np.ndarray | None = None) -> np.ndarray:
    """Images of an MRC stack as float32 ``[n, ny, nx]`` (all, or the 0-based ``indices``).

    Only the requested images are read (memory-mapped), in the order of ``indices``.
    """
    info = mrc_info(path)
    n = info.shape[0]
    handle, _ = _open(info.path, mmap=True)
    with handle:
        data = handle.data
        if data.ndim == 2:
            data = data[None]
        if indices is None:
            out = np.asarray(data, dtype=np.float32).copy()
        else:
            idx = np.asarray(indices, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                bad = int(idx[(idx < 0) | (idx >= n)][0])
                raise MrcFileError(
                    f"{info.path}: image index {bad + 1} (1-based) is out of range: the stack "
                    f"holds {n} images"
                )
            out = np.asarray(data[idx], dtype=np.float32)
    return out


def write_images(
    path: str | os.PathLike, images: np.ndarray, pixel_size: float, overwrite: bool = False
) -> Path:
    """Write a float32 image stack ``[n, ny, nx]`` with its voxel size (Å)."""
    import mrcfile

    p = Path(path)
    with mrcfile.new(p, overwrite=overwrite) as m:
        m.set_data(np.asarray(images, dtype=np.float32))
        m.set_image_stack()
        m.voxel_size = pixel_size
    return p


def write_volume(
    path: str | os.PathLike, volume: np.ndarray, voxel_size: float, overwrite: bool = False
) -> Path:
    """Write a float32 density map ``[a, b, c]`` with its voxel size (Å)."""
    import mrcfile

    p = Path(path)
    with mrcfile.new(p, overwrite=overwrite) as m:
        m.set_data(np.asarray(volume, dtype=np.float32))
        m.voxel_size = voxel_size
    return p
