"""``import-cryolike``: copy CryoLike folders into Zarr template and image stores."""

from __future__ import annotations

import os
from pathlib import Path

from cryolike_dask.io.sources import CryoLikeParticles, CryoLikeTemplates
from cryolike_dask.io.zarr_stores import ImageStore, TemplateStore
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters


def import_cryolike_templates(
    folder: str | os.PathLike,
    params: ImageParameters,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk_templates: int = 512,
) -> Path:
    """Copy every template file of a CryoLike template folder into one Zarr template store.

    Structures keep the order of ``template_file_list.npy``; viewing angles and weights are
    regenerated from the parameters, as CryoLike does. Returns the store's path.
    """
    source = CryoLikeTemplates.open(folder, params)
    store = TemplateStore.create(output, params, overwrite=overwrite)
    for k, name in enumerate(source.names):
        templates = source.read(k, 0, source.n_templates(k))
        store.add_structure(
            name,
            templates,
            source.viewing_angles(k),
            source=source.files[k],
            chunk_templates=chunk_templates,
        )
    store.mark_complete()
    return store.path


def import_cryolike_particles(
    folder: str | os.PathLike,
    params: ImageParameters,
    output: str | os.PathLike,
    *,
    n_stacks: int | None = None,
    astigmatism_convention: str | None = None,
    overwrite: bool = False,
    chunk_images: int = 1024,
) -> Path:
    """Copy CryoLike particle stacks (all, or the first ``n_stacks``) into one Zarr image store.

    Each stack's range is recorded in the store's ``stacks`` attribute, so results can be
    exported per stack in CryoLike's layout. The CTF convention is ``"cryolike"`` unless given.
    """
    from cryolike_dask.io.cryolike import count_stacks

    n = count_stacks(folder) if n_stacks is None else n_stacks
    source = CryoLikeParticles.open(folder, n, params, astigmatism_convention)
    store = ImageStore.create(
        output,
        params,
        source.n_images,
        chunk_images=chunk_images,
        stacks=list(source.stacks),
        astigmatism_convention=source.convention,
        overwrite=overwrite,
    )
    for info in source.stacks:
        images, lens = source.read(info.start, info.stop)
        store.write(info.start, images, _lens_from_arrays(lens, source.convention))
    store.mark_complete()
    return store.path


def _lens_from_arrays(lens: dict, convention: str) -> LensParameters:
    return LensParameters(
        lens["defocus_u"],
        lens["defocus_v"],
        lens["defocus_angle"],
        lens["phase_shift"],
        lens["spherical_aberration"],
        lens["voltage"],
        lens["amplitude_contrast"],
        astigmatism_convention=convention,
    )
