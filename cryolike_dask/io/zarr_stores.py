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
    attrs: image_parameters, stacks (name, start, stop, source), astigmatism_convention

Template store (``kind = "templates"``), one subgroup ``structure_K`` per structure::

    structure_K/templates  complex [S, N, W]   ("template", "shell", "angle")
    structure_K/azimus, polars, gammas [S] rad (float32), weights [S]
    attrs: image_parameters, structures (names, in order)
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters

SCHEMA_VERSION = 1
LENS_FIELDS = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "phase_shift",
    "voltage",
    "spherical_aberration",
    "amplitude_contrast",
)


class StoreError(ValueError):
    """A Zarr store is missing, of another kind or schema, or inconsistent."""


def _version() -> str:
    from cryolike_dask import __version__

    return __version__


def _header(kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
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
    header = dict(group.attrs).get("cryolike_dask")
    if not isinstance(header, dict) or header.get("kind") != kind:
        raise StoreError(
            f"{p}: not a cryolike_dask {kind} store (attrs['cryolike_dask'] = {header})"
        )
    if header.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{p}: schema version {header.get('schema_version')}, this version reads "
            f"{SCHEMA_VERSION}"
        )
    return group


def _new_group(path: Path, overwrite: bool) -> zarr.Group:
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
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

    def viewing_angles(self, structure: int) -> ViewingAngles:
        sub = self._sub(structure)
        return ViewingAngles(
            *(np.asarray(sub[k][:]) for k in ("azimus", "polars", "gammas", "weights"))
        )


# ------------------------------------------------------------------------------ results
#: Bits of the results store's ``done`` mask: which outputs a block holds.
DONE_OPTIMAL_POSE = 1
DONE_INTEGRATED = 2
DONE_OPTIMAL_LIKELIHOOD = 4
DONE_PER_TEMPLATE = 8
DONE_FULL = 16

PER_IMAGE_ARRAYS = {
    # name: (dtype kind "float"/"int", fill value)
    "cross_correlation": ("float", math.nan),
    "optimal_template": ("int", -1),
    "optimal_displacement_x": ("float", math.nan),
    "optimal_displacement_y": ("float", math.nan),
    "optimal_inplane_rotation": ("float", math.nan),
    "log_likelihood_integrated_fourier": ("float", math.nan),
    "log_likelihood_optimal_fourier": ("float", math.nan),
}
PER_TEMPLATE_ARRAYS = {
    "cross_correlation": ("float", math.nan),
    "optimal_displacement_x": ("float", math.nan),
    "optimal_displacement_y": ("float", math.nan),
    "optimal_inplane_rotation": ("float", math.nan),
    "log_likelihood_integrated_fourier": ("float", math.nan),
}


class ResultsStore:
    """Per-image results for every structure, plus optional per-template and full arrays.

    ``done[structure, image_block]`` is a bit mask of the outputs a block holds (``DONE_*``);
    only the driver writes it, after the block's data are written.
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
        self.real_dtype = np.dtype(attrs["real_dtype"])
        self.n_inplanes = int(attrs["n_inplanes"])

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
        n_inplanes: int,
        real_dtype: np.dtype,
        fingerprint: dict[str, Any],
        stacks: list[StackInfo],
        overwrite: bool = False,
    ) -> ResultsStore:
        """Create an empty results store (all values NaN / -1, nothing done)."""
        p = Path(path)
        group = _new_group(p, overwrite)
        n_s = len(structures)
        for name, (kind, fill) in PER_IMAGE_ARRAYS.items():
            dtype = np.int64 if kind == "int" else real_dtype
            group.create_array(
                name,
                shape=(n_s, n_images),
                chunks=(1, image_block),
                dtype=dtype,
                fill_value=fill,
                dimension_names=("structure", "image"),
            )
        n_blocks = -(-n_images // image_block)
        group.create_array(
            "done",
            shape=(n_s, n_blocks),
            chunks=(n_s, n_blocks),
            dtype="uint8",
            fill_value=0,
            dimension_names=("structure", "image_block"),
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
                "n_inplanes": int(n_inplanes),
                "real_dtype": np.dtype(real_dtype).name,
                "stacks": [s.__dict__ for s in stacks],
            }
        )
        return cls(p, group)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> ResultsStore:
        return cls(path, open_group(path, "results", mode))

    @property
    def n_images(self) -> int:
        return int(self.group["cross_correlation"].shape[1])

    @property
    def n_blocks(self) -> int:
        return int(self.group["done"].shape[1])

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.image_block
        return start, min(self.n_images, start + self.image_block)

    def done(self) -> np.ndarray:
        """The ``[structure, block]`` done mask."""
        return np.asarray(self.group["done"][:])

    def mark_done(self, structure: int, blocks: list[int], bits: int) -> None:
        """Set ``bits`` for ``blocks`` (driver only: the mask is one chunk)."""
        mask = self.group["done"]
        row = np.asarray(mask[structure])
        row[blocks] |= np.uint8(bits)
        mask[structure] = row

    def clear_done(self, structure: int, blocks: list[int]) -> None:
        mask = self.group["done"]
        row = np.asarray(mask[structure])
        row[blocks] = 0
        mask[structure] = row

    def per_template_array(self, structure: int, name: str) -> zarr.Array:
        """``structure_K/per_template/NAME`` ``[M, S]``, created on first use."""
        sub = self.group.require_group(f"structure_{structure}")
        pt = sub.require_group("per_template")
        if name in pt:
            return pt[name]
        _kind, fill = PER_TEMPLATE_ARRAYS[name]
        return pt.create_array(
            name,
            shape=(self.n_images, self.n_templates[structure]),
            chunks=(self.image_block, self.template_block),
            dtype=self.real_dtype,
            fill_value=fill,
            dimension_names=("image", "template"),
        )

    def full_array(self, structure: int) -> zarr.Array:
        """``structure_K/cross_correlation_msdw`` ``[M, S, D, W]``, created on first use.

        Chunked ``(image_block, template_block, D, W)``: each kernel block writes whole chunks.
        """
        sub = self.group.require_group(f"structure_{structure}")
        if "cross_correlation_msdw" in sub:
            return sub["cross_correlation_msdw"]
        n_d = self.displacements.shape[1]
        return sub.create_array(
            "cross_correlation_msdw",
            shape=(self.n_images, self.n_templates[structure], n_d, self.n_inplanes),
            chunks=(self.image_block, self.template_block, n_d, self.n_inplanes),
            dtype=self.real_dtype,
            fill_value=math.nan,
            compressors=None,
            dimension_names=("image", "template", "displacement", "rotation"),
        )
