"""Files and stores: CryoLike's ``.pt``/``.npz``/``.npy`` layouts and our Zarr stores."""

from cryolike_dask.io.cryolike import CryoLikeFolderError, OutputLayout
from cryolike_dask.io.sources import (
    CryoLikeParticles,
    CryoLikeTemplates,
    ImageSource,
    TemplateSource,
    ZarrImages,
    ZarrTemplates,
    open_particles,
    open_templates,
)
from cryolike_dask.io.torch_files import TorchFileError
from cryolike_dask.io.zarr_stores import ImageStore, ResultsStore, StoreError, TemplateStore

__all__ = [
    "CryoLikeFolderError",
    "CryoLikeParticles",
    "CryoLikeTemplates",
    "ImageSource",
    "ImageStore",
    "OutputLayout",
    "ResultsStore",
    "StoreError",
    "TemplateSource",
    "TemplateStore",
    "TorchFileError",
    "ZarrImages",
    "ZarrTemplates",
    "open_particles",
    "open_templates",
]
