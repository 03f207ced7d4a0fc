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

import logging

__version__ = "0.2.0"

logging.getLogger("cryolike_dask").addHandler(logging.NullHandler())

from cryolike_dask._api import (  # noqa: E402
    likelihood,
    open_images,
    open_templates,
    write_likelihood,
)
from cryolike_dask.config import ConfigError, load_config, run_config  # noqa: E402
from cryolike_dask.demo import MODELS as EXAMPLE_MODELS  # noqa: E402
from cryolike_dask.demo import SimulatedParticles, run_demo, simulate_particles  # noqa: E402
from cryolike_dask.demo import model_path as example_model_path  # noqa: E402
from cryolike_dask.errors import (  # noqa: E402
    CryoLikeDaskError,
    OutputExistsError,
    ParameterError,
    StructureIndexError,
)
from cryolike_dask.grids import (  # noqa: E402
    CartesianGrid2D,
    DisplacementGrid,
    PolarGrid,
    ViewingAngles,
)
from cryolike_dask.io.cryolike import CryoLikeFolderError  # noqa: E402
from cryolike_dask.io.models import ModelFileError  # noqa: E402
from cryolike_dask.io.mrc import MrcFileError  # noqa: E402
from cryolike_dask.io.outputs import OUTPUTS, Quantity  # noqa: E402
from cryolike_dask.io.particle_metadata import MetadataError  # noqa: E402
from cryolike_dask.io.stitch import StitchError, stitch  # noqa: E402
from cryolike_dask.io.torch_files import TorchFileError  # noqa: E402
from cryolike_dask.io.zarr_stores import StoreError  # noqa: E402
from cryolike_dask.kernels import NonFiniteCrossCorrelationError  # noqa: E402
from cryolike_dask.params import ImageParameters, LensParameters  # noqa: E402
from cryolike_dask.params.npz import ParameterFileError  # noqa: E402
from cryolike_dask.pipeline.cluster import ClusterError, ClusterOptions  # noqa: E402
from cryolike_dask.pipeline.convert_particles import (  # noqa: E402
    ConversionError,
    ParticleSet,
    convert_particles,
    gather,
    gather_cryosparc_job,
    gather_cs,
    gather_indexed_star,
    gather_paired,
)
from cryolike_dask.pipeline.driver import OutputFolderInUseError, RunReport  # noqa: E402
from cryolike_dask.pipeline.make_templates import TemplateInputError, make_templates  # noqa: E402
from cryolike_dask.pipeline.spec import (  # noqa: E402
    InputDataError,
    LikelihoodOptions,
    LikelihoodRun,
    OutputRequest,
    RunConfigurationError,
)
from cryolike_dask.plots import plot_output_folder  # noqa: E402
from cryolike_dask.precision import Precision  # noqa: E402

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
    "run_config",
    "run_demo",
    "simulate_particles",
    "stitch",
    "write_likelihood",
]
