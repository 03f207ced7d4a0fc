"""``make-templates``: density maps and atomic models → template stacks, as Dask tasks.

Every input is checked before any work starts (file, extension, readability, map box and
voxel size against the image box). Each structure is split into blocks of viewing directions;
each block is one task that computes, normalises and returns its templates, which are stored
into the structure's Zarr array as they come. Memory is bounded by the block size, whatever
the number of directions. Outputs: ``OUT/templates.zarr`` and CryoLike's
``OUT/templates_fourier_NAME.pt`` + ``OUT/template_file_list.npy``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryolike_dask.errors import CryoLikeDaskError, OutputExistsError
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.io.models import MODEL_SUFFIXES, read_atoms
from cryolike_dask.io.mrc import MAP_SUFFIXES, mrc_info, read_volume
from cryolike_dask.io.torch_files import save_tensor
from cryolike_dask.io.zarr_stores import TemplateStore
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.pipeline.cluster import ClusterOptions, get_client
from cryolike_dask.pipeline.executor import Executor, when_done
from cryolike_dask.preprocess.templates import (
    normalize_templates,
    templates_from_atoms,
    templates_from_volume,
)

logger = logging.getLogger(__name__)

#: Relative tolerance when comparing a map's box (voxels × voxel size) with the image box.
BOX_TOLERANCE = 1e-3


class TemplateInputError(CryoLikeDaskError):
    """An input to ``make-templates`` cannot be used (reported before any work starts)."""


@dataclass(frozen=True)
class TemplateInput:
    """One structure to project: a map (``kind = "map"``) or an atomic model (``"model"``)."""

    path: str
    kind: str
    name: str
    scale: tuple[float, float, float] | None = None  # voxel / image box, maps only


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], set()
    for p in paths:
        base = p.stem
        name, k = base, 0
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        seen.add(name)
        names.append(name)
    return names


def check_inputs(
    paths: list[str | os.PathLike],
    params: ImageParameters,
    voxel_size: float | None = None,
) -> list[TemplateInput]:
    """Validate every input and work out how a map sits in the image box.

    A map's physical box (voxels × voxel size) may differ from the image box: it is placed
    physically (its Fourier transform is evaluated at the images' physical frequencies, an
    exact resampling). It is refused when its voxels are too coarse for the polar grid's band
    limit, or when its voxel size is unknown (0 in the header) and its box in voxels differs
    from the image's in pixels; ``voxel_size`` overrides the header.
    """
    if not paths:
        raise TemplateInputError("no input maps or models given")
    ps = [Path(p) for p in paths]
    out = []
    box = params.box_size[0]
    for p, name in zip(ps, _unique_names(ps), strict=True):
        suffix = p.suffix.lower()
        if not p.is_file():
            raise TemplateInputError(f"{p}: file not found")
        if suffix in MODEL_SUFFIXES:
            read_atoms(p, params)  # parses and selects now, to fail early
            out.append(TemplateInput(str(p.resolve()), "model", name))
        elif suffix in MAP_SUFFIXES:
            info = mrc_info(p)
            if not info.is_volume:
                raise TemplateInputError(
                    f"{p}: expected a 3-D density map, found an image stack of shape {info.shape}"
                )
            voxels = (voxel_size,) * 3 if voxel_size else info.voxel_size
            # mrcfile's data axes are (z, y, x); CryoLike treats them as (x, y, z)
            dims = info.shape
            if any(v <= 0 for v in voxels):
                if any(abs(d - params.n_pixels[0]) for d in dims):
                    raise TemplateInputError(
                        f"{p}: the header gives no voxel size and the map is {dims} voxels, "
                        f"not {params.n_pixels[0]}³; pass the voxel size (--voxel-size)"
                    )
                scale = tuple(1.0 / d for d in dims)
            else:
                voxel_axes = (voxels[2], voxels[1], voxels[0])  # to data axis order
                scale = tuple(v / box for v in voxel_axes)
                # band limit of the images / Nyquist of the map (1 when voxel = pixel, F = 1)
                ratio = 4.0 * params.radius_max * max(scale)
                coarser = max(voxel_axes) > params.pixel_size[0] * (1 + BOX_TOLERANCE)
                if (coarser and ratio > 1 + 1e-6) or ratio > 1.5:
                    raise TemplateInputError(
                        f"{p}: voxel size {max(voxel_axes):.4g} Å is too coarse for the image "
                        f"grid (band limit {params.radius_max * 2 / box:.4g} 1/Å); use a finer "
                        "map or a smaller resolution_factor"
                    )
                map_box = [d * v for d, v in zip(dims, voxel_axes, strict=True)]
                if any(abs(b - box) > BOX_TOLERANCE * box for b in map_box):
                    import warnings

                    warnings.warn(
                        f"{p}: the map's box ({' × '.join(f'{b:.4g}' for b in map_box)} Å) "
                        f"differs from the image box ({box:.4g} Å); it is placed by its voxel "
                        f"size ({max(voxel_axes):.4g} Å), not stretched to the image box",
                        UserWarning,
                        stacklevel=2,
                    )
            out.append(TemplateInput(str(p.resolve()), "map", name, scale))
        else:
            raise TemplateInputError(
                f"{p}: unknown extension {p.suffix!r} (maps: {', '.join(MAP_SUFFIXES)}; models: "
                f"{', '.join(MODEL_SUFFIXES)})"
            )
    return out


@lru_cache(maxsize=2)
def _volume(path: str) -> np.ndarray:
    return read_volume(path)[0]


@lru_cache(maxsize=2)
def _atoms(path: str, params: ImageParameters):
    return read_atoms(path, params)


def template_block(
    source: TemplateInput,
    params: ImageParameters,
    start: int,
    stop: int,
    atom_shape: str | None = None,
) -> np.ndarray:
    """Normalised templates ``[start, stop)`` of one structure (a Dask task)."""
    angles = params.viewing_angles.subset(slice(start, stop))
    grid = params.polar_grid
    if source.kind == "map":
        t = templates_from_volume(
            _volume(source.path), angles, grid, source.scale, params.precision
        )
    else:
        atoms = _atoms(source.path, params)
        shape = atom_shape or params.atom_shape
        t = templates_from_atoms(
            atoms.coordinates,
            atoms.radii,
            angles,
            grid,
            max(params.box_size),
            "hard-sphere" if shape == "default" else shape,
            params.precision,
        )
    return normalize_templates(t, grid)


def _block_task(
    idx: np.ndarray,
    source: TemplateInput,
    params: ImageParameters,
    ranges: tuple,
    atom_shape: str | None,
) -> np.ndarray:
    start, stop = ranges[int(idx[0])]
    try:
        return template_block(source, params, start, stop, atom_shape)
    except CryoLikeDaskError as exc:  # name the input (a zero-density map, ...)
        raise TemplateInputError(f"{source.path}: {exc}") from None


def make_templates(
    inputs: list[str | os.PathLike],
    params: ImageParameters,
    output: str | os.PathLike,
    *,
    templates_per_block: int | None = None,
    atom_shape: str | None = None,
    voxel_size: float | None = None,
    overwrite: bool = False,
    export_pt: bool = True,
    cluster: ClusterOptions | None = None,
    client: Any = None,
    progress: bool = True,
) -> list[Path]:
    """Make templates for every input; returns the ``.pt`` files (or the store path).

    Parameters
    ----------
    inputs : list of path
        Density maps (``.mrc/.map/.mrcs``) and atomic models (``.pdb/.cif``), one structure
        each.
    params : ImageParameters
        Polar grid and viewing directions: each structure gives ``S`` complex templates
        ``[S, N, W]`` (unit norm).
    output : path
        Folder for ``templates.zarr``, ``templates_fourier_NAME.pt`` and
        ``template_file_list.npy``.
    client : distributed.Client, optional
        Where to run (default: the session's active client, else ``cluster``, else a new
        LocalCluster).

    Refuses to replace existing outputs unless ``overwrite``.
    """
    sources = check_inputs(list(inputs), params, voxel_size)
    out = Path(output)
    store_path = out / "templates.zarr"
    pt_paths = [out / f"templates_fourier_{s.name}.pt" for s in sources]
    listing = out / "template_file_list.npy"
    if not overwrite:
        existing = [p for p in (store_path, listing, *pt_paths) if p.exists()]
        if existing:
            raise OutputExistsError(f"{existing[0]}: exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # replace means replace: no template file of the old set stays listed
        _remove_old_outputs(out, store_path, listing)
    angles: ViewingAngles = params.viewing_angles
    n = angles.n_angles
    grid = params.polar_grid
    if templates_per_block is None:
        per_template = grid.n_points * 16 * 4  # float64 work + results
        fits = (256 * 2**20) // per_template
        # at least ~8 tasks per structure so that workers share the work
        templates_per_block = max(1, min(n, fits, -(-n // 8)))
    ranges = tuple((a, min(n, a + templates_per_block)) for a in range(0, n, templates_per_block))
    store = TemplateStore.create(store_path, params, overwrite=overwrite)
    logger.info(
        "%d structure(s) × %d viewing directions (angular step ~%.1f°) in %d block(s) of ≤%d",
        len(sources),
        n,
        angles.step_degrees(),
        len(ranges),
        templates_per_block,
    )
    targets, arrays = [], []
    for source in sources:
        target = store.create_structure(
            source.name, n, angles, source=source.path, chunk_templates=templates_per_block
        )
        idx = da.arange(len(ranges), chunks=1)
        arr = da.map_blocks(
            _block_task,
            idx,
            source=source,
            params=params,
            ranges=ranges,
            atom_shape=atom_shape,
            chunks=(tuple(b - a for a, b in ranges), (grid.n_shells,), (grid.n_inplanes,)),
            new_axis=[1, 2],
            dtype=params.precision.complex_dtype,
            name=f"templates-{source.name}-{dask.base.tokenize(source, params, ranges)}",
        )
        arrays.append(arr)
        targets.append(target)
    stored = [
        (when_done(da.store([arr], [target], lock=False, compute=False)), len(ranges))
        for arr, target in zip(arrays, targets, strict=True)
    ]
    cluster = cluster or ClusterOptions()
    try:
        with get_client(cluster, client=client) as c:
            if cluster.dashboard and c is not None and getattr(c, "dashboard_link", None):
                logger.info("Dask dashboard: %s", c.dashboard_link)
            Executor(c, cluster.scheduler, progress).run(stored, "templates", unit="block")
    except BaseException:
        shutil.rmtree(store_path, ignore_errors=True)  # nothing half-made stays behind
        raise
    if export_pt:
        for k, path in enumerate(pt_paths):
            save_tensor(np.asarray(store.templates(k)[:]), path)
        np.save(listing, np.array([str(p.resolve()) for p in pt_paths]))
    store.mark_complete()  # last: readers refuse the store until here
    return pt_paths if export_pt else [store_path]


def _remove_old_outputs(out: Path, store_path: Path, listing: Path) -> None:
    """Remove a previous ``make-templates`` run's store, listing and listed ``.pt`` files."""
    if listing.is_file():
        try:
            old = [Path(str(p)) for p in np.atleast_1d(np.load(listing, allow_pickle=False))]
        except (OSError, ValueError):
            old = []
        for p in old:
            if p.parent.resolve() == out.resolve() and p.name.startswith("templates_fourier_"):
                p.unlink(missing_ok=True)
        listing.unlink()
    if store_path.exists():
        shutil.rmtree(store_path)
