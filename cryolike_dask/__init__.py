"""cryolike_dask: CryoLike's image-to-structure likelihoods, exact, on NumPy/CuPy and Dask.

One flat public API (``import cryolike_dask as cd``)::

    images = cd.open_images("particles/particles.zarr")
    templates = cd.open_templates("templates/templates.zarr")
    ds = cd.likelihood(images, templates, n_displacements_x=5, n_displacements_y=5,
                       integrated_likelihood=True)          # lazy xarray.Dataset
    ds.compute()                                             # on the active Dask client

* inputs: :func:`open_images`, :func:`open_templates`, :func:`make_templates`,
  :func:`convert_particles` (with :func:`gather` and its input forms);
* the likelihood: :func:`likelihood` (lazy), :func:`write_likelihood` (resumable, into a
  folder: ``results.zarr`` and CryoLike's files), :data:`OUTPUTS` (what can be computed);
* results: :func:`stitch` (matrices), :func:`plot_output_folder`;
* the built-in example: :data:`EXAMPLE_MODELS`, :func:`example_model_path`,
  :func:`simulate_particles`, :func:`run_demo`;
* every user-facing error derives from :class:`CryoLikeDaskError`.

Every function that computes uses the active Dask client (``distributed.Client``) when there
is one, or a ``client=`` argument, and starts a LocalCluster only when there is none.
Submodules are internal: only the names exported here (``__all__``) are the public surface.
The CryoLike drop-in lives in :mod:`cryolike_dask.run_likelihood`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.2.0"

logging.getLogger("cryolike_dask").addHandler(logging.NullHandler())

_EXPORTS: dict[str, tuple[str, str]] = {
    "CartesianGrid2D": ("cryolike_dask.grids", "CartesianGrid2D"),
    "ClusterError": ("cryolike_dask.pipeline.cluster", "ClusterError"),
    "ClusterOptions": ("cryolike_dask.pipeline.cluster", "ClusterOptions"),
    "ConfigError": ("cryolike_dask.config", "ConfigError"),
    "ConversionError": ("cryolike_dask.pipeline.convert_particles", "ConversionError"),
    "CryoLikeDaskError": ("cryolike_dask.errors", "CryoLikeDaskError"),
    "CryoLikeFolderError": ("cryolike_dask.io.cryolike", "CryoLikeFolderError"),
    "FolderLockedError": ("cryolike_dask.io.locks", "FolderLockedError"),
    "DisplacementGrid": ("cryolike_dask.grids", "DisplacementGrid"),
    "EXAMPLE_MODELS": ("cryolike_dask.demo", "MODELS"),
    "ImageParameters": ("cryolike_dask.params", "ImageParameters"),
    "InputDataError": ("cryolike_dask.pipeline.spec", "InputDataError"),
    "LensParameters": ("cryolike_dask.params", "LensParameters"),
    "LikelihoodOptions": ("cryolike_dask.pipeline.spec", "LikelihoodOptions"),
    "LikelihoodRun": ("cryolike_dask.pipeline.spec", "LikelihoodRun"),
    "MetadataError": ("cryolike_dask.io.particle_metadata", "MetadataError"),
    "ModelFileError": ("cryolike_dask.io.models", "ModelFileError"),
    "MrcFileError": ("cryolike_dask.io.mrc", "MrcFileError"),
    "NonFiniteCrossCorrelationError": ("cryolike_dask.kernels", "NonFiniteCrossCorrelationError"),
    "OUTPUTS": ("cryolike_dask.io.outputs", "OUTPUTS"),
    "OutputExistsError": ("cryolike_dask.errors", "OutputExistsError"),
    "OutputFolderInUseError": ("cryolike_dask.pipeline.driver", "OutputFolderInUseError"),
    "OutputRequest": ("cryolike_dask.pipeline.spec", "OutputRequest"),
    "ParameterError": ("cryolike_dask.errors", "ParameterError"),
    "ParameterFileError": ("cryolike_dask.params.npz", "ParameterFileError"),
    "ParticleSet": ("cryolike_dask.pipeline.convert_particles", "ParticleSet"),
    "PolarGrid": ("cryolike_dask.grids", "PolarGrid"),
    "Precision": ("cryolike_dask.precision", "Precision"),
    "Quantity": ("cryolike_dask.io.outputs", "Quantity"),
    "ReweightError": ("cryolike_dask.io.reweight_files", "ReweightError"),
    "ReweightOptions": ("cryolike_dask._reweight", "ReweightOptions"),
    "ReweightResult": ("cryolike_dask._reweight", "ReweightResult"),
    "ReweightWarning": ("cryolike_dask._reweight", "ReweightWarning"),
    "RunConfigurationError": ("cryolike_dask.pipeline.spec", "RunConfigurationError"),
    "RunReport": ("cryolike_dask.pipeline.driver", "RunReport"),
    "SimulatedParticles": ("cryolike_dask.demo", "SimulatedParticles"),
    "StitchError": ("cryolike_dask.io.stitch", "StitchError"),
    "StoreError": ("cryolike_dask.io.zarr_stores", "StoreError"),
    "StructureIndexError": ("cryolike_dask.errors", "StructureIndexError"),
    "TemplateInputError": ("cryolike_dask.pipeline.make_templates", "TemplateInputError"),
    "TorchFileError": ("cryolike_dask.io.torch_files", "TorchFileError"),
    "ViewingAngles": ("cryolike_dask.grids", "ViewingAngles"),
    "convert_particles": ("cryolike_dask.pipeline.convert_particles", "convert_particles"),
    "example_model_path": ("cryolike_dask.demo", "model_path"),
    "gather": ("cryolike_dask.pipeline.convert_particles", "gather"),
    "gather_cryosparc_job": ("cryolike_dask.pipeline.convert_particles", "gather_cryosparc_job"),
    "gather_cs": ("cryolike_dask.pipeline.convert_particles", "gather_cs"),
    "gather_indexed_star": ("cryolike_dask.pipeline.convert_particles", "gather_indexed_star"),
    "gather_paired": ("cryolike_dask.pipeline.convert_particles", "gather_paired"),
    "likelihood": ("cryolike_dask._api", "likelihood"),
    "load_config": ("cryolike_dask.config", "load_config"),
    "make_templates": ("cryolike_dask.pipeline.make_templates", "make_templates"),
    "open_images": ("cryolike_dask._api", "open_images"),
    "open_templates": ("cryolike_dask._api", "open_templates"),
    "plot_output_folder": ("cryolike_dask.plots", "plot_output_folder"),
    "reweight": ("cryolike_dask._reweight", "reweight"),
    "reweight_folder": ("cryolike_dask._reweight", "reweight_folder"),
    "run_config": ("cryolike_dask.config", "run_config"),
    "run_demo": ("cryolike_dask.demo", "run_demo"),
    "simulate_particles": ("cryolike_dask.demo", "simulate_particles"),
    "stitch": ("cryolike_dask.io.stitch", "stitch"),
    "write_likelihood": ("cryolike_dask._api", "write_likelihood"),
}


def __getattr__(name: str) -> Any:
    """The flat API is imported on first use (``import cryolike_dask.kernels`` stays light)."""
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'cryolike_dask' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "EXAMPLE_MODELS",
    "OUTPUTS",
    "CartesianGrid2D",
    "ClusterError",
    "ClusterOptions",
    "ConfigError",
    "ConversionError",
    "CryoLikeDaskError",
    "CryoLikeFolderError",
    "DisplacementGrid",
    "FolderLockedError",
    "ImageParameters",
    "InputDataError",
    "LensParameters",
    "LikelihoodOptions",
    "LikelihoodRun",
    "MetadataError",
    "ModelFileError",
    "MrcFileError",
    "NonFiniteCrossCorrelationError",
    "OutputExistsError",
    "OutputFolderInUseError",
    "OutputRequest",
    "ParameterError",
    "ParameterFileError",
    "ParticleSet",
    "PolarGrid",
    "Precision",
    "Quantity",
    "ReweightError",
    "ReweightOptions",
    "ReweightResult",
    "ReweightWarning",
    "RunConfigurationError",
    "RunReport",
    "SimulatedParticles",
    "StitchError",
    "StoreError",
    "StructureIndexError",
    "TemplateInputError",
    "TorchFileError",
    "ViewingAngles",
    "__version__",
    "convert_particles",
    "example_model_path",
    "gather",
    "gather_cryosparc_job",
    "gather_cs",
    "gather_indexed_star",
    "gather_paired",
    "likelihood",
    "load_config",
    "make_templates",
    "open_images",
    "open_templates",
    "plot_output_folder",
    "reweight",
    "reweight_folder",
    "run_config",
    "run_demo",
    "simulate_particles",
    "stitch",
    "write_likelihood",
]
