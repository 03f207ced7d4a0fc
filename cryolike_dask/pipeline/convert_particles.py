"""``convert-particles``: particle stacks + STAR/cryoSPARC metadata → polar Fourier stacks.

Input forms (spec §14.3), all keeping the metadata's row order (CryoLike sorts by file name)
unless sorted by pose, and recording each image's source row and file:

* paired: ``--mrcs A.mrcs B.mrcs --star A.star B.star`` (each STAR row ↔ the image at the
  same position of its stack; output stacks never mix files, as CryoLike);
* indexed RELION STAR: ``--star particles.star --mrc-folder DIR`` (``rlnImageName``);
* cryoSPARC: ``--cs particles.cs --mrc-folder DIR`` (``blob/path``, ``blob/idx``);
* a cryoSPARC job folder: ``--cryosparc-job DIR`` (``J*_passthrough_particles.cs`` and its
  ``restack/`` or ``downsample/`` batch files).

Prior poses (angles and origins, :mod:`cryolike_dask.io.poses`) are read with the CTF
parameters (``pose_source``) and stored in ``particles.zarr`` (``prior_pose/``); with
``sort_by_pose`` the particles of each output segment (each paired file, or the whole indexed
set) are ordered by prior viewing direction (:func:`sort_by_pose`).

Everything is checked before any work starts; each output stack is one task that reads its
images (memory-mapped, only the needed ones), centres and max-normalises them, NUFFTs them to
the polar grid, unit-normalises them, and writes ``fft/particles_fourier_stack_NNNNNN.pt`` and
``.npz``; the driver writes the same images into ``particles.zarr`` as stacks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError, OutputExistsError, write_error
from cryolike_dask.io.cryolike import stack_paths, write_stack_npz
from cryolike_dask.io.mrc import MrcFileError, mrc_info, read_images
from cryolike_dask.io.particle_metadata import MetadataError, ParticleRecords, read_cs, read_star
from cryolike_dask.io.poses import PriorPoses, sort_key
from cryolike_dask.io.torch_files import save_tensor
from cryolike_dask.io.zarr_stores import ImageStore, StackInfo
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.pipeline.cluster import ClusterOptions, get_client
from cryolike_dask.pipeline.executor import Executor
from cryolike_dask.preprocess.particles import images_to_fourier

logger = logging.getLogger(__name__)

#: Relative difference above which two pixel sizes are said to conflict.
PIXEL_TOLERANCE = 1e-3


class ConversionError(CryoLikeDaskError):
    """The particle inputs cannot be converted (reported before any output is written)."""


@dataclass(frozen=True)
class ParticleSet:
    """Every particle to convert, in output order.

    Attributes
    ----------
    image_files : list of str
        Distinct image files (resolved paths).
    file_index, image_index : numpy.ndarray
        Per particle: which file, and the 0-based image in it.
    rows : numpy.ndarray
        Per particle: its row in its metadata file.
    metadata : list of str
        Metadata file of each particle.
    lens : LensParameters
        CTF parameters (RELION convention).
    pixel_size : float
        Pixel size of the stored images, Å (before downsampling).
    stacks : list of (start, stop)
        Output stacks.
    shape : (int, int)
        Image size in pixels (array axes 0 and 1).
    poses : PriorPoses or None
        Per particle: its prior pose, when the metadata has poses.
    segments : list of (start, stop) or None
        Ranges that output stacks never cross (one per paired file; ``None``: one range).
    """

    image_files: list[str]
    file_index: np.ndarray
    image_index: np.ndarray
    rows: np.ndarray
    metadata: list[str]
    lens: LensParameters
    pixel_size: float
    stacks: list[tuple[int, int]]
    shape: tuple[int, int]
    poses: PriorPoses | None = None
    segments: list[tuple[int, int]] | None = None

    @property
    def n_particles(self) -> int:
        return int(self.rows.size)

    def take(self, order: np.ndarray) -> ParticleSet:
        """The same particles in the order ``order`` (a permutation that keeps every particle
        in its segment, so the stacks stay as they are)."""
        order = np.asarray(order, dtype=np.int64)
        if not np.array_equal(np.sort(order), np.arange(self.n_particles)):
            raise ValueError("ParticleSet.take needs a permutation of the particles")
        for a, b in self.segments or []:
            if order[a:b].size and (order[a:b].min() < a or order[a:b].max() >= b):
                raise ValueError(f"ParticleSet.take would move particles across [{a}, {b})")
        return ParticleSet(
            self.image_files,
            self.file_index[order],
            self.image_index[order],
            self.rows[order],
            [self.metadata[i] for i in order],
            self.lens.subset(order),
            self.pixel_size,
            self.stacks,
            self.shape,
            None if self.poses is None else self.poses.subset(order),
            self.segments,
        )


def sort_by_pose(particles: ParticleSet) -> ParticleSet:
    """The particles of each segment (each paired file, or the whole indexed set) ordered by
    prior viewing direction, so that neighbouring images share directions: by 10° band of the
    projection direction's polar angle (``tilt``), then its azimuth (``rot``); particles
    without angles last, and ties in their metadata order. Images keep their ids and source
    rows (``particles.zarr``'s ``image_name``, ``source_row``). Sorting twice changes nothing.
    """
    if particles.poses is None:
        raise ConversionError(
            "--sort-by-pose needs prior poses, and the metadata gives none (or --pose-source "
            "is none)"
        )
    order = np.empty(particles.n_particles, dtype=np.int64)
    for a, b in particles.segments or [(0, particles.n_particles)]:
        order[a:b] = a + sort_key(particles.poses.subset(slice(a, b)))
    return particles.take(order)


_sort_by_pose = sort_by_pose  # for the functions whose keyword ``sort_by_pose`` shadows it


def _concat_lens(parts: list[LensParameters]) -> LensParameters:
    first = parts[0]
    for p in parts[1:]:
        for name in ("voltage", "spherical_aberration", "amplitude_contrast"):
            if getattr(p, name) != getattr(first, name):
                raise ConversionError(
                    f"metadata files disagree on {name} ({getattr(first, name)} vs "
                    f"{getattr(p, name)}); convert them separately"
                )
    cat = np.concatenate
    return LensParameters(
        cat([p.defocus_u for p in parts]),
        cat([p.defocus_v for p in parts]),
        cat([p.defocus_angle for p in parts]),
        cat([p.phase_shift for p in parts]),
        first.spherical_aberration,
        first.voltage,
        first.amplitude_contrast,
        first.ctf_bfactor,
        first.ctf_scalefactor,
        first.astigmatism_convention,
    )


def _resolve(folder: Path, name: str, source: Path) -> Path:
    raw = name.lstrip(">")
    for cand in (Path(raw), folder / raw, folder / Path(raw).name):
        if cand.is_file():
            return cand.resolve()
    raise ConversionError(
        f"{source}: image file {name!r} not found (looked in {folder} as given and by file name)"
    )


def _pixel_size(
    explicit: float | None, metadata: float | None, headers: list[tuple[Path, float]]
) -> float:
    """``--pixel-size`` > metadata > MRC header (spec §17.9: CryoLike demanded it given)."""
    if explicit is not None:
        if not explicit > 0:
            raise ConversionError(f"--pixel-size must be positive, not {explicit}")
        return float(explicit)
    if metadata is not None and metadata > 0:
        for path, h in headers:
            if h > 0 and h != 1.0 and abs(h - metadata) > PIXEL_TOLERANCE * metadata:
                warnings.warn(
                    f"{path}: header voxel size {h:g} Å differs from the metadata's "
                    f"{metadata:g} Å; using the metadata's",
                    UserWarning,
                    stacklevel=3,
                )
        return float(metadata)
    values = {round(h, 6) for _, h in headers if h > 0}
    if len(values) == 1:
        return float(values.pop())
    if len(values) > 1:
        raise ConversionError(
            "the image files' headers give different pixel sizes ("
            + ", ".join(f"{p.name}: {h:g} Å" for p, h in headers)
            + "); pass --pixel-size"
        )
    raise ConversionError(
        "no pixel size: the metadata has none and the MRC headers say 0; pass --pixel-size"
    )


def _stacks(boundaries: list[tuple[int, int]], batch_size: int) -> list[tuple[int, int]]:
    out = []
    for start, stop in boundaries:
        out += [(a, min(stop, a + batch_size)) for a in range(start, stop, batch_size)]
    return out


def _finish(
    files: list[Path],
    file_index: np.ndarray,
    image_index: np.ndarray,
    rows: np.ndarray,
    metadata: list[str],
    lens: LensParameters,
    pixel: float,
    boundaries: list[tuple[int, int]],
    batch_size: int,
    poses: PriorPoses | None = None,
    sort: bool = False,
) -> ParticleSet:
    if batch_size < 1:
        raise ConversionError(f"--batch-size must be at least 1, not {batch_size}")
    shapes = {}
    for f in files:
        info = mrc_info(f)
        shapes[f] = info.shape
        used = image_index[file_index == files.index(f)]
        if used.size and used.max() >= info.shape[0]:
            raise ConversionError(
                f"{f}: image {int(used.max()) + 1} (1-based) requested but the stack holds "
                f"{info.shape[0]}"
            )
    sizes = {s[1:] for s in shapes.values()}
    if len(sizes) != 1:
        listing = ", ".join(f"{f.name}: {s[1]}×{s[2]}" for f, s in shapes.items())
        raise ConversionError(f"image files have different image sizes ({listing})")
    shape = sizes.pop()
    out = ParticleSet(
        [str(f) for f in files],
        file_index,
        image_index,
        rows,
        metadata,
        lens,
        pixel,
        _stacks(boundaries, batch_size),
        shape,
        poses,
        list(boundaries),
    )
    return sort_by_pose(out) if sort else out


def _concat_poses(records: list[ParticleRecords]) -> PriorPoses | None:
    have = [r.poses is not None for r in records]
    if not any(have):
        return None
    if not all(have):
        listing = ", ".join(
            f"{r.source.name}: {'yes' if h else 'no'}" for r, h in zip(records, have, strict=True)
        )
        raise ConversionError(
            f"some metadata files carry poses and some do not ({listing}); give all or none "
            "(or --pose-source none)"
        )
    try:
        return PriorPoses.concat([r.poses for r in records if r.poses is not None])
    except ValueError as exc:
        raise ConversionError(f"the metadata files' poses differ in kind: {exc}") from None


def gather_paired(
    mrcs: list[str | os.PathLike],
    stars: list[str | os.PathLike],
    pixel_size: float | None = None,
    batch_size: int = 1024,
    pose_source: str = "auto",
    sort_by_pose: bool = False,
) -> ParticleSet:
    """Stacks with paired STAR files (row ``k`` of a STAR ↔ image ``k`` of its stack)."""
    if len(mrcs) != len(stars) or not mrcs:
        raise ConversionError(
            f"--mrcs and --star must list the same number of files ({len(mrcs)} vs {len(stars)})"
        )
    files, fidx, iidx, rows, meta, lenses, bounds, headers = [], [], [], [], [], [], [], []
    start, meta_pixels, records = 0, set(), []
    for k, (m, s) in enumerate(zip(mrcs, stars, strict=True)):
        info = mrc_info(m)
        rec = read_star(s, indexed=False, pose_source=pose_source, pixel_size=pixel_size)
        records.append(rec)
        n = info.shape[0]
        if rec.n_particles != n:
            raise ConversionError(
                f"{rec.source}: {rec.n_particles} rows but {info.path} holds {n} images"
            )
        files.append(info.path.resolve())
        headers.append((info.path, info.voxel_size[0]))
        fidx.append(np.full(n, k))
        iidx.append(np.arange(n))
        rows.append(rec.rows)
        meta += [str(rec.source)] * n
        lenses.append(rec.lens)
        bounds.append((start, start + n))
        start += n
        if rec.pixel_size:
            meta_pixels.add(round(rec.pixel_size, 6))
    if len(meta_pixels) > 1:
        raise ConversionError(f"the STAR files give different pixel sizes {sorted(meta_pixels)}")
    pixel = _pixel_size(pixel_size, meta_pixels.pop() if meta_pixels else None, headers)
    return _finish(
        files,
        np.concatenate(fidx),
        np.concatenate(iidx),
        np.concatenate(rows),
        meta,
        _concat_lens(lenses),
        pixel,
        bounds,
        batch_size,
        _concat_poses(records),
        sort_by_pose,
    )


def _gather_indexed(
    rec: ParticleRecords,
    mrc_folder: str | os.PathLike,
    pixel_size: float | None,
    batch_size: int,
    sort: bool = False,
) -> ParticleSet:
    folder = Path(mrc_folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: image folder not found")
    assert rec.image_files is not None and rec.image_indices is not None
    names = list(dict.fromkeys(rec.image_files))
    resolved = {n: _resolve(folder, n, rec.source) for n in names}
    files = list(dict.fromkeys(resolved.values()))
    fidx = np.array([files.index(resolved[n]) for n in rec.image_files], dtype=np.int64)
    headers = [(f, mrc_info(f).voxel_size[0]) for f in files]
    pixel = _pixel_size(pixel_size, rec.pixel_size, headers)
    n = rec.n_particles
    return _finish(
        files,
        fidx,
        rec.image_indices,
        rec.rows,
        [str(rec.source)] * n,
        rec.lens,
        pixel,
        [(0, n)],
        batch_size,
        rec.poses,
        sort,
    )


def gather_indexed_star(
    star: str | os.PathLike,
    mrc_folder: str | os.PathLike,
    pixel_size: float | None = None,
    batch_size: int = 1024,
    pose_source: str = "auto",
    sort_by_pose: bool = False,
) -> ParticleSet:
    """An indexed RELION STAR (``rlnImageName = NNNNNN@file``) and its image folder."""
    rec = read_star(star, indexed=True, pose_source=pose_source, pixel_size=pixel_size)
    return _gather_indexed(rec, mrc_folder, pixel_size, batch_size, sort_by_pose)


def gather_cs(
    cs: str | os.PathLike,
    mrc_folder: str | os.PathLike,
    pixel_size: float | None = None,
    batch_size: int = 1024,
    pose_source: str = "auto",
    sort_by_pose: bool = False,
) -> ParticleSet:
    """A cryoSPARC ``.cs`` file (``blob/path``, ``blob/idx``) and its image folder."""
    rec = read_cs(cs, indexed=True, pose_source=pose_source, pixel_size=pixel_size)
    return _gather_indexed(rec, mrc_folder, pixel_size, batch_size, sort_by_pose)


def gather_cryosparc_job(
    job: str | os.PathLike,
    pixel_size: float | None = None,
    batch_size: int = 1024,
    pose_source: str = "auto",
    sort_by_pose: bool = False,
) -> ParticleSet:
    """A cryoSPARC job folder: ``J*_passthrough_particles.cs`` with ``restack/`` (preferred)
    or ``downsample/`` batch files ``batch_NNNNNN_*.mrc``, read in order; CTF rows are consumed
    in the same order."""
    folder = Path(job)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: cryoSPARC job folder not found")
    cs_files = sorted(folder.glob("*_passthrough_particles.cs"))
    if len(cs_files) != 1:
        raise ConversionError(
            f"{folder}: expected one *_passthrough_particles.cs, found {len(cs_files)}"
        )
    rec = read_cs(cs_files[0], indexed=False, pose_source=pose_source, pixel_size=pixel_size)
    for sub, pattern in (
        ("restack", "batch_{:06d}_restacked.mrc"),
        ("downsample", "batch_{:06d}_downsample.mrc"),
    ):
        batches = []
        i = 0
        while (folder / sub / pattern.format(i)).is_file():
            batches.append((folder / sub / pattern.format(i)).resolve())
            i += 1
        if batches:
            break
    else:
        raise ConversionError(f"{folder}: no restack/ or downsample/ batch_000000_*.mrc files")
    counts = [mrc_info(b).shape[0] for b in batches]
    if sum(counts) != rec.n_particles:
        raise ConversionError(
            f"{cs_files[0]}: {rec.n_particles} rows but the {len(batches)} batch files hold "
            f"{sum(counts)} images"
        )
    fidx = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    iidx = np.concatenate([np.arange(c) for c in counts])
    headers = [(b, mrc_info(b).voxel_size[0]) for b in batches]
    pixel = _pixel_size(pixel_size, rec.pixel_size, headers)
    n = rec.n_particles
    return _finish(
        batches,
        fidx,
        iidx,
        rec.rows,
        [str(rec.source)] * n,
        rec.lens,
        pixel,
        [(0, n)],
        batch_size,
        rec.poses,
        sort_by_pose,
    )


def gather(
    *,
    mrcs: list | None = None,
    star: list | None = None,
    cs: str | os.PathLike | None = None,
    mrc_folder: str | os.PathLike | None = None,
    cryosparc_job: str | os.PathLike | None = None,
    pixel_size: float | None = None,
    batch_size: int = 1024,
    pose_source: str = "auto",
    sort_by_pose: bool = False,
) -> ParticleSet:
    """The particle set of exactly one input form (see the module docstring).

    ``pose_source``: which poses to read (``"auto"``, ``"refined"``, ``"prior"``, ``"none"``;
    see :func:`cryolike_dask.io.particle_metadata.read_star`); ``sort_by_pose``: order each
    segment by prior viewing direction (:func:`sort_by_pose`)."""
    mrcs, star = list(mrcs or []), list(star or [])
    forms = [bool(mrcs), cs is not None, cryosparc_job is not None, bool(star) and not mrcs]
    if sum(forms) != 1:
        raise ConversionError(
            "give exactly one input form: --mrcs ... --star ...; --star FILE --mrc-folder DIR; "
            "--cs FILE --mrc-folder DIR; or --cryosparc-job DIR"
        )
    kw = {
        "pixel_size": pixel_size,
        "batch_size": batch_size,
        "pose_source": pose_source,
        "sort_by_pose": sort_by_pose,
    }
    if mrcs:
        return gather_paired(mrcs, star, **kw)
    if cryosparc_job is not None:
        return gather_cryosparc_job(cryosparc_job, **kw)
    if mrc_folder is None:
        raise ConversionError("--mrc-folder DIR is needed with an indexed --star or --cs")
    if cs is not None:
        return gather_cs(cs, mrc_folder, **kw)
    if len(star) != 1:
        raise ConversionError("an indexed conversion takes one --star file")
    return gather_indexed_star(star[0], mrc_folder, **kw)


def check_against_parameters(
    particles: ParticleSet, params: ImageParameters, downsample: int = 1
) -> None:
    """Image size and pixel size (after downsampling) must be the parameters'."""
    if downsample != 1 and (downsample < 1 or downsample % 2):
        raise ConversionError(f"--downsample must be 1 or an even factor, not {downsample}")
    nx, ny = particles.shape
    if nx % downsample or ny % downsample:
        raise ConversionError(f"{nx}×{ny} images cannot be downsampled by {downsample}")
    size = (nx // downsample, ny // downsample)
    if size != params.n_pixels:
        raise ConversionError(
            f"images are {nx}×{ny} pixels"
            + (
                f" ({size[0]}×{size[1]} after downsampling by {downsample})"
                if downsample > 1
                else ""
            )
            + f" but the parameters' n_pixels is {params.n_pixels[0]}×{params.n_pixels[1]}"
        )
    pixel = particles.pixel_size * downsample
    want = params.pixel_size[0]
    if abs(pixel - want) > PIXEL_TOLERANCE * want:
        raise ConversionError(
            f"the images' pixel size is {pixel:g} Å"
            + (f" after downsampling by {downsample}" if downsample > 1 else "")
            + f" but the parameters' pixel_size is {want:g} Å"
        )


def read_particles(particles: ParticleSet, start: int, stop: int) -> np.ndarray:
    """Images ``[start, stop)`` of the set, float32 ``[n, nx, ny]``, in set order."""
    out = np.empty((stop - start, *particles.shape), dtype=np.float32)
    fidx = particles.file_index[start:stop]
    iidx = particles.image_index[start:stop]
    for f in np.unique(fidx):
        sel = np.flatnonzero(fidx == f)
        out[sel] = read_images(particles.image_files[int(f)], iidx[sel])
    return out


def convert_stack(
    particles: ParticleSet,
    i_stack: int,
    params: ImageParameters,
    output: str,
    downsample: int,
    convention: str,
) -> tuple[int, np.ndarray]:
    """Convert one output stack and write its ``.pt`` and ``.npz`` (a Dask task)."""
    start, stop = particles.stacks[i_stack]
    images = read_particles(particles, start, stop)
    fourier, _ = images_to_fourier(images, params.polar_grid, params.precision, downsample)
    lens = particles.lens.subset(slice(start, stop)).with_convention(convention)
    pt, npz = stack_paths(output, i_stack)
    save_tensor(fourier, pt)
    files = np.array([particles.image_files[i] for i in particles.file_index[start:stop]])
    write_stack_npz(
        npz,
        params,
        lens,
        {
            "n_images": np.int64(stop - start),
            "stack_start": np.int64(start),
            "stack_end": np.int64(stop),
            "source_rows": particles.rows[start:stop],
            "source_metadata": np.array(particles.metadata[start:stop]),
            "files": files,
            "idxs": particles.image_index[start:stop],
        },
    )
    return i_stack, fourier


def convert_particles(
    particles: ParticleSet,
    params: ImageParameters,
    output: str | os.PathLike,
    *,
    downsample: int = 1,
    convention: str = "relion",
    overwrite: bool = False,
    cluster: ClusterOptions | None = None,
    client: Any = None,
    progress: bool = True,
    sort_by_pose: bool = False,
) -> Path:
    """Convert every stack; returns the path of ``particles.zarr``.

    Each image is centred, max-normalised, NUFFT'd to the polar grid of ``params`` and
    unit-normalised: complex ``[M, N, W]`` in ``particles.zarr`` and CryoLike's
    ``fft/particles_fourier_stack_NNNNNN.pt/.npz``, with its CTF parameters (Å, rad, kV, mm).
    ``client``: where to run (default: the session's active client, else ``cluster``, else
    a new LocalCluster).

    The particles' prior poses, if any, are stored as ``prior_pose/`` in image order; with
    ``sort_by_pose`` the particles are first ordered by prior viewing direction within each
    segment (:func:`sort_by_pose`; a set gathered sorted stays as it is).

    Refuses to replace existing outputs unless ``overwrite``.
    """
    check_against_parameters(particles, params, downsample)
    if sort_by_pose:
        particles = _sort_by_pose(particles)
    out = Path(output)
    store_path = out / "particles.zarr"
    if not overwrite:
        clash = [p for p in (store_path, *stack_paths(out, 0)) if p.exists()]
        if clash:
            raise OutputExistsError(f"{clash[0]}: exists; pass --overwrite to replace it")
    else:  # replace means replace: no stack of the old conversion stays behind
        _remove_old_outputs(out, store_path)
    (out / "fft").mkdir(parents=True, exist_ok=True)
    stacks = [
        StackInfo(f"particles_fourier_stack_{i:06d}", a, b, str(stack_paths(out, i)[0]))
        for i, (a, b) in enumerate(particles.stacks)
    ]
    store = ImageStore.create(
        store_path,
        params,
        particles.n_particles,
        chunk_images=max(b - a for a, b in particles.stacks),
        stacks=stacks,
        astigmatism_convention=convention,
        overwrite=overwrite,
    )
    store.group.attrs["source_files"] = particles.image_files
    store.write_ids(
        np.array(
            [
                f"{int(k) + 1:06d}@{particles.image_files[f]}"
                for f, k in zip(particles.file_index, particles.image_index, strict=True)
            ]
        ),
        particles.rows,
    )
    if particles.poses is not None:
        store.write_prior_poses(particles.poses)
        logger.info("%s", particles.poses.describe())
    else:
        logger.info("no prior poses in the metadata")
    logger.info(
        "%d particles from %d file(s) → %d stack(s), pixel %g Å",
        particles.n_particles,
        len(particles.image_files),
        len(particles.stacks),
        particles.pixel_size * downsample,
    )

    def store_stack(i: int, result: tuple[int, np.ndarray]) -> None:
        _write(store, particles, result[0], result[1], convention)

    args = [
        (particles, i, params, str(out), downsample, convention)
        for i in range(len(particles.stacks))
    ]
    cluster = cluster or ClusterOptions()
    try:
        with get_client(cluster, client=client) as c:
            if cluster.dashboard and c is not None and getattr(c, "dashboard_link", None):
                logger.info("Dask dashboard: %s", c.dashboard_link)
            Executor(c, cluster.scheduler, progress).map(
                convert_stack, args, "converting", unit="stack", on_result=store_stack
            )
    except BaseException:
        _remove_old_outputs(out, store_path)  # nothing half-made stays behind
        raise
    store.mark_complete()  # last: readers refuse the store (and its fft/ folder) until here
    return store_path


def _remove_old_outputs(out: Path, store_path: Path) -> None:
    """Remove a conversion's ``particles.zarr`` and ``fft/particles_fourier_stack_*`` files,
    and the temporary files of a conversion that was killed while writing one."""
    if store_path.exists():
        shutil.rmtree(store_path)
    for f in (out / "fft").glob("particles_fourier_stack_*"):
        if f.suffix in (".pt", ".npz"):
            f.unlink()
    for f in (out / "fft").glob(".particles_fourier_stack_*.tmp-*"):
        f.unlink(missing_ok=True)


def _write(
    store: ImageStore, particles: ParticleSet, i: int, fourier: np.ndarray, convention: str
) -> None:
    a, b = particles.stacks[i]
    try:
        store.write(a, fourier, particles.lens.subset(slice(a, b)).with_convention(convention))
    except OSError as exc:  # a full disk: name the store (a failed write names no file)
        raise write_error(exc, store.path) from None


__all__ = [
    "ConversionError",
    "MetadataError",
    "MrcFileError",
    "ParticleSet",
    "check_against_parameters",
    "convert_particles",
    "gather",
    "gather_cryosparc_job",
    "gather_cs",
    "gather_indexed_star",
    "gather_paired",
    "sort_by_pose",
]
