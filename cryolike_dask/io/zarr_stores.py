"""Zarr v3 stores for image stacks, template stacks and results.

Every store is a Zarr group whose ``attrs["cryolike_dask"]`` names its ``kind``, the
``schema_version`` and the package version. Arrays carry ``dimension_names``. Stacks are
chunked along images/templates only (never along shells or angles); results are
``(structure, image)`` arrays chunked ``(1, image_block)`` so that xarray opens them directly.

Image store (``kind = "images"``)::

    images              complex [M, N, W]   ("image", "shell", "angle")
    defocus_u, defocus_v                [M] Å
    defocus_angle, phase_shift          [M] rad
    voltage [M] kV, spherical_aberration [M] mm, amplitude_contrast [M]
    image_name [M], source_row [M]      (convert-particles: NNNNNN@FILE, metadata row)
    prior_pose/rot, tilt, psi [M] deg, origin_x, origin_y [M] Å, has_angles, has_origin [M]
                                        (optional; attrs source, columns, convention)
    attrs: image_parameters, stacks (name, start, stop, source), astigmatism_convention

Template store (``kind = "templates"``), one subgroup ``structure_K`` per structure::

    structure_K/templates  complex [S, N, W]   ("template", "shell", "angle")
    structure_K/azimus, polars, gammas [S] rad (float32), weights [S]
    attrs: image_parameters, structures (names, in order)
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cryolike_dask.errors import CryoLikeDaskError, OutputExistsError
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.io.outputs import Quantity
from cryolike_dask.io.poses import CONVENTION as POSE_CONVENTION
from cryolike_dask.io.poses import FIELDS as POSE_FIELDS
from cryolike_dask.io.poses import PriorPoses
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters

SCHEMA_VERSION = 1
#: Schema of each kind of store (results: 2 = coordinates, bookkeeping group, consolidated).
SCHEMA_VERSIONS = {"images": 1, "templates": 1, "results": 2}
LENS_FIELDS = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "phase_shift",
    "voltage",
    "spherical_aberration",
    "amplitude_contrast",
)


class StoreError(CryoLikeDaskError):
    """A Zarr store is missing, of another kind or schema, or inconsistent."""


def _version() -> str:
    from cryolike_dask import __version__

    return __version__


def _header(kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSIONS[kind],
        "package_version": _version(),
        "store_id": uuid.uuid4().hex,
    }


def params_to_json(params: ImageParameters) -> dict[str, Any]:
    """Image parameters as plain JSON values."""
    return {
        "n_pixels": list(params.n_pixels),
        "pixel_size": list(params.pixel_size),
        "radius_max": params.radius_max,
        "dist_radii": params.dist_radii,
        "n_inplanes": params.n_inplanes,
        "precision": params.precision.value,
        "viewing_distance": params.viewing_distance,
        "atom_radii": params.atom_radii,
        "atom_selection": params.atom_selection,
        "use_protein_residue_model": params.use_protein_residue_model,
        "atom_shape": params.atom_shape,
    }


def params_from_json(d: dict[str, Any], source: str) -> ImageParameters:
    """Inverse of :func:`params_to_json`."""
    return ImageParameters.from_dict(dict(d), source=source)


def open_group(path: str | os.PathLike, kind: str, mode: str = "r") -> zarr.Group:
    """Open a store and check its kind and schema version."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such Zarr store")
    try:
        group = zarr.open_group(p, mode=mode)
    except Exception as exc:
        raise StoreError(f"{p}: not a readable Zarr group ({exc})") from exc
    attrs = dict(group.attrs)
    header = attrs.get("cryolike_dask")
    if not isinstance(header, dict) or header.get("kind") != kind:
        raise StoreError(
            f"{p}: not a cryolike_dask {kind} store (attrs['cryolike_dask'] = {header})"
        )
    if header.get("schema_version") != SCHEMA_VERSIONS[kind]:
        raise StoreError(
            f"{p}: schema version {header.get('schema_version')}, this version reads "
            f"{SCHEMA_VERSIONS[kind]}"
        )
    if attrs.get("complete") is False:
        step = {"images": "convert-particles or import-cryolike", "templates": "make-templates"}
        raise StoreError(
            f"{p}: incomplete (the run that made it did not finish); make it again with "
            f"{step.get(kind, 'the command that made it')} --overwrite"
        )
    return group


def mark_complete(group: zarr.Group) -> None:
    """Record that a store's data are all written (readers refuse a store without it)."""
    group.attrs["complete"] = True


def _new_group(path: Path, overwrite: bool) -> zarr.Group:
    if path.exists():
        if not overwrite:
            raise OutputExistsError(f"{path}: exists; pass overwrite=True to replace it")
        shutil.rmtree(path)
    return zarr.open_group(path, mode="w")


# ------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class StackInfo:
    """Where a source stack lives in an image store: images ``[start, stop)``."""

    name: str
    start: int
    stop: int
    source: str = ""

    @property
    def n_images(self) -> int:
        return self.stop - self.start


class ImageStore:
    """A Zarr image store (see the module docstring). Open with :meth:`open`."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        attrs = dict(group.attrs)
        self.parameters = params_from_json(attrs["image_parameters"], f"{self.path} attrs")
        self.stacks = [StackInfo(**s) for s in attrs.get("stacks", [])]
        self.astigmatism_convention: str = attrs.get("astigmatism_convention", "cryolike")
        self.images = group["images"]

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        params: ImageParameters,
        n_images: int,
        *,
        chunk_images: int = 1024,
        stacks: list[StackInfo] | None = None,
        astigmatism_convention: str = "cryolike",
        overwrite: bool = False,
    ) -> ImageStore:
        """Create an empty store for ``n_images`` images of ``params``' polar grid."""
        p = Path(path)
        group = _new_group(p, overwrite)
        grid = params.polar_grid
        chunk = max(1, min(int(chunk_images), int(n_images)))
        group.create_array(
            "images",
            shape=(n_images, *grid.shape),
            chunks=(chunk, *grid.shape),
            dtype=params.precision.complex_dtype,
            dimension_names=("image", "shell", "angle"),
            compressors=None,
            fill_value=0,
        )
        for name in LENS_FIELDS:
            group.create_array(
                name,
                shape=(n_images,),
                chunks=(chunk,),
                dtype="float64",
                dimension_names=("image",),
                fill_value=np.nan,
            )
        group.attrs.update(
            {
                "cryolike_dask": _header("images"),
                "image_parameters": params_to_json(params),
                "stacks": [s.__dict__ for s in (stacks or [])],
                "astigmatism_convention": astigmatism_convention,
                "complete": False,
            }
        )
        return cls(p, group)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> ImageStore:
        """Open an existing image store."""
        group = open_group(path, "images", mode)
        return cls(path, group)

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    def mark_complete(self) -> None:
        """Record that every image is written; readers refuse the store until then."""
        mark_complete(self.group)

    @property
    def chunk_images(self) -> int:
        return int(self.images.chunks[0])

    def write(self, start: int, images: np.ndarray, lens: LensParameters) -> None:
        """Write images ``[start, start + n)`` and their lens parameters."""
        stop = start + images.shape[0]
        if lens.n_images != images.shape[0]:
            raise StoreError(f"{lens.n_images} lens parameter rows for {images.shape[0]} images")
        self.images[start:stop] = images.astype(self.images.dtype, copy=False)
        values = lens_arrays(lens)
        for name in LENS_FIELDS:
            self.group[name][start:stop] = values[name]

    def write_ids(self, names: np.ndarray, source_rows: np.ndarray) -> None:
        """Per-image identifiers (``NNNNNN@FILE``) and source metadata rows, all images."""
        _write_coord(self.group, "image_name", np.asarray(names, dtype=str), "image")
        _write_coord(self.group, "source_row", np.asarray(source_rows, np.int64), "image")

    def image_ids(self) -> ImageIds:
        """Identifiers of every image (from the stacks where no source names were stored)."""
        n = self.n_images
        stack = np.zeros(n, np.int64)
        row = np.arange(n, dtype=np.int64)
        labels = np.empty(n, dtype=object)
        for i, info in enumerate(self.stacks or [StackInfo("all", 0, n)]):
            stack[info.start : info.stop] = i
            row[info.start : info.stop] -= info.start
            labels[info.start : info.stop] = [
                f"{info.name}:{r}" for r in range(info.stop - info.start)
            ]
        names = np.asarray(self.group["image_name"][:]) if "image_name" in self.group else labels
        source = (
            np.asarray(self.group["source_row"][:])
            if "source_row" in self.group
            else np.full(n, -1, np.int64)
        )
        return ImageIds(np.array(np.asarray(names).tolist(), dtype=str), stack, row, source)

    def write_prior_poses(self, poses: PriorPoses) -> None:
        """Every image's prior pose, in image order: ``prior_pose/rot`` … ``has_origin``
        (float64 / bool ``[M]``, chunked like the images), with the group's attrs naming the
        ``source``, the ``columns`` read and the ``convention``. Replaces any stored before."""
        if poses.n != self.n_images:
            raise StoreError(f"{self.path}: {poses.n} prior poses for {self.n_images} images")
        if "prior_pose" in self.group:
            del self.group["prior_pose"]
        sub = self.group.create_group("prior_pose")
        for name in POSE_FIELDS:
            values = getattr(poses, name)
            arr = sub.create_array(
                name,
                shape=values.shape,
                chunks=(max(1, self.chunk_images),),
                dtype=values.dtype,
                dimension_names=("image",),
                fill_value=np.nan if values.dtype.kind == "f" else False,
            )
            arr[:] = values
        sub.attrs.update(
            {
                "source": poses.source,
                "columns": dict(poses.columns),
                "convention": POSE_CONVENTION,
                "units": {
                    "rot": "deg",
                    "tilt": "deg",
                    "psi": "deg",
                    "origin_x": "A",
                    "origin_y": "A",
                },
            }
        )

    def prior_poses(self, start: int = 0, stop: int | None = None) -> PriorPoses | None:
        """Prior poses of images ``[start, stop)``, or None when the store holds none."""
        if "prior_pose" not in self.group:
            return None
        sub = self.group["prior_pose"]
        attrs = dict(sub.attrs)
        stop = self.n_images if stop is None else stop
        return PriorPoses(
            *(np.asarray(sub[name][start:stop]) for name in POSE_FIELDS),
            attrs["source"],
            dict(attrs.get("columns", {})),
        )

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Images ``[start, stop)`` and their per-image lens arrays (see :data:`LENS_FIELDS`)."""
        images = np.asarray(self.images[start:stop])
        lens = {name: np.asarray(self.group[name][start:stop]) for name in LENS_FIELDS}
        return images, lens


def lens_arrays(lens: LensParameters) -> dict[str, np.ndarray]:
    """Per-image arrays of every lens field (constants repeated)."""
    n = lens.n_images
    return {
        "defocus_u": lens.defocus_u,
        "defocus_v": lens.defocus_v,
        "defocus_angle": lens.defocus_angle,
        "phase_shift": lens.phase_shift,
        "voltage": np.full(n, lens.voltage),
        "spherical_aberration": np.full(n, lens.spherical_aberration),
        "amplitude_contrast": np.full(n, lens.amplitude_contrast),
    }


# ------------------------------------------------------------------------------ templates
class TemplateStore:
    """A Zarr template store holding one or more structures."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        attrs = dict(group.attrs)
        self.parameters = params_from_json(attrs["image_parameters"], f"{self.path} attrs")
        self.names: list[str] = list(attrs.get("structures", []))

    @classmethod
    def create(
        cls, path: str | os.PathLike, params: ImageParameters, overwrite: bool = False
    ) -> TemplateStore:
        """Create an empty template store."""
        p = Path(path)
        group = _new_group(p, overwrite)
        group.attrs.update(
            {
                "cryolike_dask": _header("templates"),
                "image_parameters": params_to_json(params),
                "structures": [],
                "complete": False,
            }
        )
        return cls(p, group)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> TemplateStore:
        """Open an existing template store."""
        return cls(path, open_group(path, "templates", mode))

    @property
    def n_structures(self) -> int:
        return len(self.names)

    def mark_complete(self) -> None:
        """Record that every structure is written; readers refuse the store until then."""
        mark_complete(self.group)

    def add_structure(
        self,
        name: str,
        templates: np.ndarray,
        angles: ViewingAngles,
        *,
        source: str = "",
        chunk_templates: int = 512,
    ) -> int:
        """Append a structure with its templates; returns its index."""
        grid = self.parameters.polar_grid
        if templates.ndim != 3 or templates.shape[1:] != grid.shape:
            raise StoreError(
                f"templates of {name!r} have shape {templates.shape}, expected [S, "
                f"{grid.n_shells}, {grid.n_inplanes}]"
            )
        arr = self.create_structure(
            name, templates.shape[0], angles, source=source, chunk_templates=chunk_templates
        )
        arr[:] = templates.astype(arr.dtype, copy=False)
        return self.n_structures - 1

    def create_structure(
        self,
        name: str,
        n_templates: int,
        angles: ViewingAngles,
        *,
        source: str = "",
        chunk_templates: int = 512,
    ) -> zarr.Array:
        """Append an empty structure of ``n_templates`` templates; returns its array to fill."""
        grid = self.parameters.polar_grid
        if n_templates != angles.n_angles:
            raise StoreError(f"{name!r}: {n_templates} templates for {angles.n_angles} angles")
        index = self.n_structures
        sub = self.group.create_group(f"structure_{index}")
        chunk = max(1, min(chunk_templates, n_templates))
        arr = sub.create_array(
            "templates",
            shape=(n_templates, *grid.shape),
            chunks=(chunk, *grid.shape),
            dtype=self.parameters.precision.complex_dtype,
            dimension_names=("template", "shell", "angle"),
            compressors=None,
            fill_value=0,
        )
        for key in ("azimus", "polars", "gammas", "weights"):
            values = getattr(angles, key)
            a = sub.create_array(
                key,
                shape=(n_templates,),
                chunks=(n_templates,),
                dtype=values.dtype,
                dimension_names=("template",),
            )
            a[:] = values
        sub.attrs.update({"name": name, "source": source})
        self.names.append(name)
        self.group.attrs["structures"] = list(self.names)
        return arr

    def _sub(self, structure: int) -> zarr.Group:
        if not 0 <= structure < self.n_structures:
            raise StoreError(
                f"{self.path}: structure {structure} out of range (0..{self.n_structures - 1})"
            )
        return self.group[f"structure_{structure}"]

    def templates(self, structure: int) -> zarr.Array:
        """The ``[S, N, W]`` array of a structure."""
        return self._sub(structure)["templates"]

    def n_templates(self, structure: int) -> int:
        return int(self.templates(structure).shape[0])

    def source(self, structure: int) -> str:
        """The file a structure's templates were made from (as ``make-templates`` read it)."""
        return str(self._sub(structure).attrs.get("source", ""))

    def viewing_angles(self, structure: int) -> ViewingAngles:
        sub = self._sub(structure)
        return ViewingAngles(
            *(np.asarray(sub[k][:]) for k in ("azimus", "polars", "gammas", "weights"))
        )


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class ImageIds:
    """Per-image identifiers that join results back to their source.

    Attributes
    ----------
    image_name : numpy.ndarray of str
        ``NNNNNN@FILE`` (RELION's ``rlnImageName`` form, 1-based) where the source file is
        known, else ``STACK:ROW``.
    stack, stack_row : numpy.ndarray of int
        Index of the image's stack in the run and its 0-based row in that stack.
    source_row : numpy.ndarray of int
        Row in the source metadata file (STAR/.cs), -1 where unknown.
    """

    image_name: np.ndarray
    stack: np.ndarray
    stack_row: np.ndarray
    source_row: np.ndarray


IMAGE_COORDINATES = ("image_name", "stack", "stack_row", "source_row")


def consolidate(path: str | os.PathLike) -> None:
    """Write the store's consolidated metadata (``xr.open_zarr`` then opens it silently)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not part of the Zarr v3 specification"
        zarr.consolidate_metadata(str(path))


def _dtype(q: Quantity, real_dtype: np.dtype) -> np.dtype:
    return np.dtype(np.int64) if q.kind == "int" else np.dtype(real_dtype)


def done_chunk(n_images: int, image_block: int) -> int:
    """Images per chunk of the done mask: whole image blocks, about 64 KiB, so marking a
    block rewrites one small chunk and reading a row stays a few hundred reads."""
    blocks = max(1, 2**16 // max(1, image_block))
    return max(1, min(n_images, blocks * image_block))


def _write_coord(group: zarr.Group, name: str, values: np.ndarray, dim: str) -> None:
    values = np.asarray(values)
    dtype: Any = str if values.dtype.kind in "UO" else values.dtype
    arr = group.create_array(
        name, shape=values.shape, dtype=dtype, dimension_names=(dim,), overwrite=True
    )
    arr[:] = values


class ResultsStore:
    """Per-image results for every structure, plus optional per-template and full arrays.

    Layout (schema 2; the arrays follow :data:`cryolike_dask.io.outputs.OUTPUTS`)::

        NAME                          [structure, image]  per-image quantities
        structure, image              coordinates (names; 0..M-1)
        image_name, stack, stack_row, source_row    [image]  identifiers (coordinates)
        structure_K/per_template/STEM [image, template]
        structure_K/STEM              [image, template, displacement, rotation] (full tensor)
        bookkeeping/done              [structure, image] uint8 bit mask

    ``bookkeeping/done`` holds the output bits (:data:`~cryolike_dask.io.outputs.FLAG_BITS`)
    each image holds; only the driver writes it, after a block's data are written. A run on
    the first stacks of the images of a store (same inputs otherwise) uses the same store. The
    metadata are consolidated, so ``xr.open_zarr`` reads the root as a Dataset with the
    structure names and image identifiers as coordinates.
    """

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        attrs = dict(group.attrs)
        self.fingerprint: dict[str, Any] = attrs["fingerprint"]
        self.structures: list[str] = list(attrs["structures"])
        self.image_block: int = int(attrs["image_block"])
        self.template_block: int = int(attrs["template_block"])
        self.n_templates: list[int] = list(attrs["n_templates"])
        self.displacements = np.asarray(attrs["displacements"], dtype=np.float32)
        self.rotations = np.asarray(attrs["rotations"], dtype=np.float64)
        self.real_dtype = np.dtype(attrs["real_dtype"])
        self.n_inplanes = int(attrs["n_inplanes"])
        self.n_images = int(attrs["n_images"])

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        structures: list[str],
        n_templates: list[int],
        n_images: int,
        image_block: int,
        template_block: int,
        displacements: np.ndarray,
        rotations: np.ndarray,
        real_dtype: np.dtype,
        fingerprint: dict[str, Any],
        stacks: list[StackInfo],
        image_ids: ImageIds,
        overwrite: bool = False,
    ) -> ResultsStore:
        """Create a results store with its coordinates and nothing done (no arrays yet:
        :meth:`require` adds those of the requested quantities).

        The store is built under a temporary name beside ``path`` and renamed once its
        metadata are complete, so a run killed meanwhile leaves no half-made store.
        """
        final = Path(path)
        if final.exists():
            if not overwrite:
                raise OutputExistsError(f"{final}: exists; pass overwrite=True to replace it")
            shutil.rmtree(final)
        p = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
        group = _new_group(p, overwrite=True)
        n_s = len(structures)
        _write_coord(group, "structure", np.array(structures, dtype=str), "structure")
        _write_coord(group, "image", np.arange(n_images, dtype=np.int64), "image")
        for name in IMAGE_COORDINATES:
            _write_coord(group, name, getattr(image_ids, name), "image")
        book = group.create_group("bookkeeping")
        book.create_array(
            "done",
            shape=(n_s, n_images),
            chunks=(1, done_chunk(n_images, image_block)),
            dtype="uint8",
            fill_value=0,
            dimension_names=("structure", "image"),
        )
        group.attrs.update(
            {
                "cryolike_dask": _header("results"),
                "fingerprint": fingerprint,
                "structures": list(structures),
                "n_templates": [int(n) for n in n_templates],
                "n_images": int(n_images),
                "image_block": int(image_block),
                "template_block": int(template_block),
                "displacements": np.asarray(displacements, np.float32).tolist(),
                "rotations": np.asarray(rotations, np.float64).tolist(),
                "n_inplanes": len(rotations),
                "real_dtype": np.dtype(real_dtype).name,
                "stacks": [s.__dict__ for s in stacks],
            }
        )
        consolidate(p)
        os.replace(p, final)
        return cls(final, zarr.open_group(final, mode="r+"))

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> ResultsStore:
        return cls(path, open_group(path, "results", mode))

    @property
    def n_blocks(self) -> int:
        return -(-self.n_images // self.image_block)

    @property
    def _done(self) -> zarr.Array:
        return self.group["bookkeeping/done"]

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.image_block
        return start, min(self.n_images, start + self.image_block)

    def done_images(self, structure: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The done bits of images ``[start, stop)`` of a structure, uint8."""
        stop = self.n_images if stop is None else stop
        return np.asarray(self._done[structure, start:stop])

    def done(self) -> np.ndarray:
        """The ``[structure, block]`` done mask: the bits every image of the block holds."""
        full = np.asarray(self._done[:])
        starts = np.arange(0, self.n_images, self.image_block)
        return np.bitwise_and.reduceat(full, starts, axis=1)

    def write_done(self, structure: int, ranges: list[tuple[int, int]], row: np.ndarray) -> None:
        """Write the done bits of ``ranges`` from ``row`` (the structure's whole ``[M]`` row,
        kept by the driver, the only writer): whole chunks, each touched chunk once and
        consecutive ones in one write, with no read-back."""
        if not ranges:
            return
        if len(row) != self.n_images:
            raise ValueError(f"the done row has {len(row)} images, the store {self.n_images}")
        chunk = int(self._done.chunks[1])
        touched = sorted({c for a, b in ranges for c in range(a // chunk, -(-b // chunk))})
        runs: list[list[int]] = []
        for c in touched:
            if runs and c == runs[-1][1]:
                runs[-1][1] = c + 1
            else:
                runs.append([c, c + 1])
        for c0, c1 in runs:
            a, b = c0 * chunk, min(self.n_images, c1 * chunk)
            self._done[structure, a:b] = row[a:b]

    def clear_done(self, structure: int, start: int, stop: int, bits: int = 0xFF) -> None:
        """Clear ``bits`` for images ``[start, stop)`` (driver only)."""
        keep = np.uint8(0xFF & ~bits)
        self._done[structure, start:stop] = self.done_images(structure, start, stop) & keep

    # ---------------------------------------------------------------------------- arrays
    def _path(self, q: Quantity, structure: int) -> str:
        return q.store_path.format(k=structure)

    def has(self, q: Quantity, structure: int = 0) -> bool:
        return self._path(q, structure) in self.group

    def array(self, q: Quantity, structure: int = 0) -> zarr.Array:
        """The array of ``q`` (for scope ``image`` the ``[structure, image]`` array)."""
        path = self._path(q, structure)
        if path not in self.group:
            raise StoreError(f"{self.path}: holds no {q.name} for structure {structure}")
        return self.group[path]

    def read(self, q: Quantity, structure: int, start: int, stop: int) -> np.ndarray:
        """Values of images ``[start, stop)`` of ``q`` for one structure."""
        if q.scope == "image":
            return np.asarray(self.array(q)[structure, start:stop])
        return np.asarray(self.array(q, structure)[start:stop])

    def require(self, quantities: Iterable[Quantity], structures: Iterable[int]) -> None:
        """Create the arrays of ``quantities`` that do not exist yet, then consolidate."""
        missing = [
            (q, k)
            for q in quantities
            for k in ([0] if q.scope == "image" else list(structures))
            if not self.has(q, k)
        ]
        if not missing:
            return
        # create through the live hierarchy, not the (now stale) consolidated view
        live = zarr.open_group(self.path, mode="r+", use_consolidated=False)
        for q, k in missing:
            self._create(live, q, k)
        consolidate(self.path)
        self.group = zarr.open_group(self.path, mode="r+")

    def _create(self, root: zarr.Group, q: Quantity, structure: int) -> None:
        dtype = _dtype(q, self.real_dtype)
        attrs = (
            {"units": q.units, "long_name": q.description}
            if q.units
            else {"long_name": q.description}
        )
        if q.scope == "image":
            arr = root.create_array(
                q.name,
                shape=(len(self.structures), self.n_images),
                chunks=(1, self.image_block),
                dtype=dtype,
                fill_value=q.fill,
                dimension_names=q.dims,
            )
            attrs["coordinates"] = " ".join(IMAGE_COORDINATES)
            arr.attrs.update(attrs)
            return
        n_t = self.n_templates[structure]
        sub = root.require_group(f"structure_{structure}")
        if q.scope == "template":
            pt = sub.require_group("per_template")
            if "template" not in pt:
                _write_coord(pt, "template", np.arange(n_t, dtype=np.int64), "template")
                _write_coord(pt, "image", np.arange(self.n_images, dtype=np.int64), "image")
            arr = pt.create_array(
                q.stem,
                shape=(self.n_images, n_t),
                chunks=(self.image_block, self.template_block),
                dtype=dtype,
                fill_value=q.fill,
                dimension_names=q.dims,
            )
        else:
            n_d = self.displacements.shape[1]
            if "displacement" not in sub:
                _write_coord(sub, "template", np.arange(n_t, dtype=np.int64), "template")
                _write_coord(sub, "image", np.arange(self.n_images, dtype=np.int64), "image")
                _write_coord(sub, "displacement", np.arange(n_d, dtype=np.int64), "displacement")
                _write_coord(sub, "displacement_x", self.displacements[0], "displacement")
                _write_coord(sub, "displacement_y", self.displacements[1], "displacement")
                _write_coord(sub, "rotation", self.rotations, "rotation")
            # each kernel block writes whole chunks
            arr = sub.create_array(
                q.stem,
                shape=(self.n_images, n_t, n_d, self.n_inplanes),
                chunks=(self.image_block, self.template_block, n_d, self.n_inplanes),
                dtype=dtype,
                fill_value=q.fill,
                compressors=None,
                dimension_names=q.dims,
            )
            attrs["coordinates"] = "displacement_x displacement_y"
        arr.attrs.update(attrs)
