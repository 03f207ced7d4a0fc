"""Where a run reads its images and templates: Zarr stores or CryoLike folders, one interface.

Sources are small picklable descriptions (paths and sizes) that Dask tasks carry; the data are
read inside the tasks, with a per-process cache of recently used files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.errors import StructureIndexError
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.io import cryolike as cl
from cryolike_dask.io.models import MODEL_SUFFIXES
from cryolike_dask.io.mrc import MAP_SUFFIXES
from cryolike_dask.io.poses import PriorPoses
from cryolike_dask.io.zarr_stores import (
    LENS_FIELDS,
    ImageIds,
    ImageStore,
    StackInfo,
    StoreError,
    TemplateStore,
    lens_arrays,
)
from cryolike_dask.params.image import ImageParameters


def _file_id(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _check_parameters(
    path: str | os.PathLike, parameters: ImageParameters | None, stored: ImageParameters
) -> None:
    """A store must use the run's grids (when the run gives parameters)."""
    if parameters is not None:
        diffs = parameters.incompatibilities(stored)
        if diffs:
            raise StoreError(f"{path}: image parameters differ from the run's: " + "; ".join(diffs))


# ------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class ImageSource:
    """Base class: ``n_images`` images in ``stacks``, read by ranges."""

    parameters: ImageParameters
    stacks: tuple[StackInfo, ...]

    @property
    def n_images(self) -> int:
        return self.stacks[-1].stop if self.stacks else 0

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Images ``[start, stop)`` (complex ``[m, N, W]``) and per-image lens arrays."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data (paths, sizes, modification times or store ids).

        Its ``"stacks"`` entry lists one identifier per stack, in order: a run on the first
        stacks of a source is a prefix of a run on all of them (:func:`same_images`).
        """
        raise NotImplementedError

    def check_headers(self) -> None:
        """Check what the files' headers tell (shapes, dtypes, counts) without reading the
        data: in the driver, before any worker starts. Raises a :class:`CryoLikeDaskError`
        naming the file and what was expected."""

    def image_ids(self) -> ImageIds:
        """Identifiers of every image (``STACK:ROW`` unless the source names its files)."""
        n = self.n_images
        stack, row = np.zeros(n, np.int64), np.zeros(n, np.int64)
        names = []
        for i, info in enumerate(self.stacks):
            stack[info.start : info.stop] = i
            row[info.start : info.stop] = np.arange(info.n_images)
            names += [f"{info.name}:{r}" for r in range(info.n_images)]
        return ImageIds(np.array(names, dtype=str), stack, row, np.full(n, -1, np.int64))

    def prior_poses(self, start: int = 0, stop: int | None = None) -> PriorPoses | None:
        """Prior poses of images ``[start, stop)`` recorded at conversion; None when the source
        holds none."""
        return None

    def locate(self, index: int) -> str:
        """Human-readable location of image ``index``: its stack file and position in it."""
        for info in self.stacks:
            if info.start <= index < info.stop:
                where = info.source or info.name
                return f"{where}: image {index - info.start} (image {index} of the run)"
        return f"image {index}"


@lru_cache(maxsize=4)
def _load_stack_cached(folder: str, i_stack: int, file_id: tuple, convention: str | None):
    return cl.load_stack(folder, i_stack, None, convention)


@dataclass(frozen=True)
class CryoLikeParticles(ImageSource):
    """Stacks ``0 … n_stacks-1`` of a CryoLike particle folder (``PARTICLES/fft/*.pt, *.npz``)."""

    folder: str = ""
    astigmatism_convention: str | None = None
    file_ids: tuple = field(default=(), repr=False)

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        n_stacks: int,
        parameters: ImageParameters,
        astigmatism_convention: str | None = None,
    ) -> CryoLikeParticles:
        """Check that every stack exists and matches ``parameters``; read their sizes."""
        cl.check_stacks_exist(folder, n_stacks)
        stacks, start, ids = [], 0, []
        for i in range(n_stacks):
            pt, npz = cl.stack_paths(folder, i)
            stack_params = ImageParameters.load(npz, strict=False)
            diffs = parameters.incompatibilities(stack_params)
            if diffs:
                raise cl.CryoLikeFolderError(
                    f"{npz}: image parameters differ from the run's parameters: " + "; ".join(diffs)
                )
            n = cl.stack_size(folder, i)
            stacks.append(StackInfo(pt.stem, start, start + n, str(pt.resolve())))
            start += n
            ids.append((*_file_id(pt), *_file_id(npz)))
        folder = str(Path(folder).resolve())
        return cls(parameters, tuple(stacks), folder, astigmatism_convention, tuple(ids))

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        images, lens = [], []
        for i, info in enumerate(self.stacks):
            a, b = max(start, info.start), min(stop, info.stop)
            if a >= b:
                continue
            stack = _load_stack_cached(
                self.folder, i, tuple(self.file_ids[i]), self.astigmatism_convention
            )
            if stack.images.shape[0] != info.n_images:
                raise cl.CryoLikeFolderError(
                    f"{info.source}: holds {stack.images.shape[0]} images, its .npz says "
                    f"{info.n_images}"
                )
            images.append(stack.images[a - info.start : b - info.start])
            arrays = lens_arrays(stack.lens)
            lens.append({k: v[a - info.start : b - info.start] for k, v in arrays.items()})
        return np.concatenate(images), {
            k: np.concatenate([d[k] for d in lens]) for k in LENS_FIELDS
        }

    @property
    def convention(self) -> str:
        return self.astigmatism_convention or "cryolike"

    def check_headers(self) -> None:
        from cryolike_dask.io.torch_files import tensor_header

        grid = self.parameters.polar_grid
        for info in self.stacks:
            shape, dtype = tensor_header(info.source)
            if len(shape) != 3 or tuple(shape[1:]) != grid.shape or dtype.kind != "c":
                raise cl.CryoLikeFolderError(
                    f"{info.source}: images have shape {tuple(shape)} and dtype {dtype}; "
                    f"expected complex [n, {grid.n_shells}, {grid.n_inplanes}] for the polar "
                    "grid of the parameters"
                )
            if shape[0] != info.n_images:
                raise cl.CryoLikeFolderError(
                    f"{info.source}: holds {shape[0]} images, its .npz says {info.n_images}"
                )

    def image_ids(self) -> ImageIds:
        """``NNNNNN@FILE`` where the stack's ``.npz`` records ``files``/``idxs`` (stacks of
        ``convert-particles``), else ``STACK:ROW``."""
        from cryolike_dask.params.npz import read_npz

        ids = super().image_ids()
        names = ids.image_name.astype(object)
        for i, info in enumerate(self.stacks):
            fields = read_npz(cl.stack_paths(self.folder, i)[1])
            files, idxs = fields.get("files"), fields.get("idxs")
            rows = fields.get("source_rows")
            n = info.n_images
            if files is not None and idxs is not None and np.size(files) == np.size(idxs) == n:
                names[info.start : info.stop] = [
                    f"{int(k) + 1:06d}@{f}"
                    for f, k in zip(np.ravel(files), np.ravel(idxs), strict=True)
                ]
            if rows is not None and np.size(rows) == n:
                ids.source_row[info.start : info.stop] = np.ravel(rows)
        return ImageIds(np.asarray(names, dtype=str), ids.stack, ids.stack_row, ids.source_row)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "cryolike-particles",
            "convention": self.convention,
            "stacks": [list(i) for i in self.file_ids],
        }


@lru_cache(maxsize=8)
def _open_image_store(path: str) -> ImageStore:
    return ImageStore.open(path)


@dataclass(frozen=True)
class ZarrImages(ImageSource):
    """An image store written by ``cryolike-dask import-cryolike`` or ``convert-particles``."""

    path: str = ""
    store_id: str = ""
    n_stacks: int | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        parameters: ImageParameters | None = None,
        n_stacks: int | None = None,
    ) -> ZarrImages:
        """Open and check against ``parameters``; keep only the first ``n_stacks`` stacks."""
        store = ImageStore.open(path)
        _check_parameters(path, parameters, store.parameters)
        stacks = store.stacks or [StackInfo("all", 0, store.n_images, str(path))]
        if n_stacks is not None:
            if not 1 <= n_stacks <= len(stacks):
                raise StoreError(f"{path}: n_stacks = {n_stacks}, the store holds {len(stacks)}")
            stacks = stacks[:n_stacks]
        header = dict(store.group.attrs)["cryolike_dask"]
        return cls(
            parameters or store.parameters,
            tuple(stacks),
            str(Path(path).resolve()),
            header.get("store_id", str(Path(path).resolve())),
            n_stacks,
        )

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return _open_image_store(self.path).read(start, stop)

    @property
    def convention(self) -> str:
        return _open_image_store(self.path).astigmatism_convention

    def prior_poses(self, start: int = 0, stop: int | None = None) -> PriorPoses | None:
        return _open_image_store(self.path).prior_poses(
            start, self.n_images if stop is None else stop
        )

    def image_ids(self) -> ImageIds:
        ids = _open_image_store(self.path).image_ids()
        n = self.n_images
        return ImageIds(ids.image_name[:n], ids.stack[:n], ids.stack_row[:n], ids.source_row[:n])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "zarr-images",
            "path": str(Path(self.path).resolve()),
            "store_id": self.store_id,
            "stacks": [[s.name, s.start, s.stop] for s in self.stacks],
        }


def same_images(stored: dict[str, Any], run: dict[str, Any]) -> bool:
    """Whether ``run``'s images are ``stored``'s or their first stacks (both fingerprints)."""
    a, b = dict(stored), dict(run)
    sa, sb = a.pop("stacks", None), b.pop("stacks", None)
    if a != b or sa is None or sb is None:
        return a == b and sa == sb
    return len(sb) <= len(sa) and sa[: len(sb)] == sb


# ------------------------------------------------------------------------------ templates
@dataclass(frozen=True)
class TemplateSource:
    """Base class: one or more structures, each a stack of templates."""

    parameters: ImageParameters
    names: tuple[str, ...]

    @property
    def n_structures(self) -> int:
        return len(self.names)

    def n_templates(self, structure: int) -> int:
        raise NotImplementedError

    def read(self, structure: int, start: int, stop: int) -> np.ndarray:
        """Templates ``[start, stop)`` of a structure, complex ``[s, N, W]``."""
        raise NotImplementedError

    def take(self, structure: int, indices: np.ndarray) -> np.ndarray:
        """Templates at ``indices`` (any order, repeats allowed), complex ``[k, N, W]``."""
        raise NotImplementedError

    def viewing_angles(self, structure: int) -> ViewingAngles:
        raise NotImplementedError

    def fingerprint(self, structure: int) -> dict[str, Any]:
        raise NotImplementedError

    def structure_kind(self, structure: int) -> str | None:
        """``"map"`` or ``"model"``: what the structure's templates were projected from (by
        the source file's extension), None when the source does not say."""
        return None

    def check_headers(self, structures: tuple[int, ...] | None = None) -> None:
        """Check the structures' headers (shapes, dtypes, counts) without reading the data;
        raises a :class:`CryoLikeDaskError` naming the file and what was expected."""

    def check_structure(self, structure: int) -> None:
        if not 0 <= structure < self.n_structures:
            raise StructureIndexError(
                f"template index {structure} out of range: {self.n_structures} template "
                f"file(s) ({', '.join(self.names)})"
            )


@lru_cache(maxsize=2)
def _load_templates_cached(path: str, file_id: tuple, params: ImageParameters) -> np.ndarray:
    return cl.load_templates(path, params)


@dataclass(frozen=True)
class CryoLikeTemplates(TemplateSource):
    """A CryoLike template folder (``template_file_list.npy`` + ``templates_fourier_*.pt``)."""

    files: tuple[str, ...] = ()
    file_ids: tuple = field(default=(), repr=False)

    @classmethod
    def open(cls, folder: str | os.PathLike, parameters: ImageParameters) -> CryoLikeTemplates:
        paths = cl.read_template_list(folder)
        return cls(
            parameters,
            tuple(cl.template_name(p) for p in paths),
            tuple(str(p) for p in paths),
            tuple(tuple(_file_id(p)) for p in paths),
        )

    def check_headers(self, structures: tuple[int, ...] | None = None) -> None:
        from cryolike_dask.io.torch_files import tensor_header

        grid = self.parameters.polar_grid
        n_angles = self.parameters.viewing_angles.n_angles
        for k in range(self.n_structures) if structures is None else structures:
            self.check_structure(k)
            path = self.files[k]
            shape, dtype = tensor_header(path)
            if len(shape) != 3 or tuple(shape[1:]) != grid.shape or dtype.kind != "c":
                raise cl.CryoLikeFolderError(
                    f"{path}: template stack has shape {tuple(shape)} and dtype {dtype}; "
                    f"expected complex [S, {grid.n_shells}, {grid.n_inplanes}] for the polar "
                    "grid of the parameters"
                )
            if shape[0] != n_angles:
                raise cl.CryoLikeFolderError(
                    f"{path}: {shape[0]} templates but the parameters' viewing distance "
                    f"{self.parameters.viewing_distance:.6g} gives {n_angles} viewing directions"
                )

    def _all(self, structure: int) -> np.ndarray:
        self.check_structure(structure)
        return _load_templates_cached(
            self.files[structure], self.file_ids[structure], self.parameters
        )

    def n_templates(self, structure: int) -> int:
        self.check_structure(structure)
        return self.parameters.viewing_angles.n_angles

    def read(self, structure: int, start: int, stop: int) -> np.ndarray:
        return self._all(structure)[start:stop]

    def take(self, structure: int, indices: np.ndarray) -> np.ndarray:
        return self._all(structure)[np.asarray(indices)]

    def viewing_angles(self, structure: int) -> ViewingAngles:
        return self.parameters.viewing_angles

    def fingerprint(self, structure: int) -> dict[str, Any]:
        return {"kind": "cryolike-templates", "file": list(self.file_ids[structure])}


@lru_cache(maxsize=8)
def _open_template_store(path: str) -> TemplateStore:
    return TemplateStore.open(path)


@dataclass(frozen=True)
class ZarrTemplates(TemplateSource):
    """A template store written by ``import-cryolike`` or ``make-templates``."""

    path: str = ""
    store_id: str = ""

    @classmethod
    def open(
        cls, path: str | os.PathLike, parameters: ImageParameters | None = None
    ) -> ZarrTemplates:
        store = TemplateStore.open(path)
        _check_parameters(path, parameters, store.parameters)
        header = dict(store.group.attrs)["cryolike_dask"]
        return cls(
            parameters or store.parameters,
            tuple(store.names),
            str(Path(path).resolve()),
            header.get("store_id", str(Path(path).resolve())),
        )

    def _store(self) -> TemplateStore:
        return _open_template_store(self.path)

    def n_templates(self, structure: int) -> int:
        self.check_structure(structure)
        return self._store().n_templates(structure)

    def read(self, structure: int, start: int, stop: int) -> np.ndarray:
        self.check_structure(structure)
        return np.asarray(self._store().templates(structure)[start:stop])

    def take(self, structure: int, indices: np.ndarray) -> np.ndarray:
        self.check_structure(structure)
        idx = np.asarray(indices)
        unique, inverse = np.unique(idx, return_inverse=True)
        arr = self._store().templates(structure)
        rows = np.stack([np.asarray(arr[int(i)]) for i in unique]) if unique.size else None
        if rows is None:
            return np.empty((0, *arr.shape[1:]), arr.dtype)
        return rows[inverse]

    def viewing_angles(self, structure: int) -> ViewingAngles:
        self.check_structure(structure)
        return self._store().viewing_angles(structure)

    def structure_kind(self, structure: int) -> str | None:
        self.check_structure(structure)
        suffix = Path(self._store().source(structure)).suffix.lower()
        if suffix in MODEL_SUFFIXES:
            return "model"
        return "map" if suffix in MAP_SUFFIXES else None

    def fingerprint(self, structure: int) -> dict[str, Any]:
        return {
            "kind": "zarr-templates",
            "path": str(Path(self.path).resolve()),
            "store_id": self.store_id,
            "structure": structure,
        }


def open_templates(path: str | os.PathLike, parameters: ImageParameters) -> TemplateSource:
    """A CryoLike template folder or a Zarr template store, whichever ``path`` is."""
    p = Path(path)
    if (p / cl.TEMPLATE_LIST).is_file():
        return CryoLikeTemplates.open(p, parameters)
    if (p / "zarr.json").is_file():
        return ZarrTemplates.open(p, parameters)
    raise cl.CryoLikeFolderError(
        f"{p}: neither a CryoLike template folder (no {cl.TEMPLATE_LIST}) nor a Zarr template store"
    )


def open_particles(
    path: str | os.PathLike,
    parameters: ImageParameters,
    n_stacks: int | None,
    astigmatism_convention: str | None = None,
) -> ImageSource:
    """A CryoLike particle folder (``fft/``) or a Zarr image store, whichever ``path`` is."""
    p = Path(path)
    if (p / "zarr.json").is_file():
        return ZarrImages.open(p, parameters, n_stacks)
    if (p / "fft").is_dir():
        if (p / "particles.zarr" / "zarr.json").is_file():
            ImageStore.open(p / "particles.zarr")  # refuses a conversion that did not finish
        n = cl.count_stacks(p) if n_stacks is None else n_stacks
        return CryoLikeParticles.open(p, n, parameters, astigmatism_convention)
    raise cl.CryoLikeFolderError(
        f"{p}: neither a CryoLike particle folder (no fft/ inside) nor a Zarr image store"
    )
