"""cryolike_dask: CryoLike's image-to-structure likelihoods, exact, on NumPy/CuPy and Dask.

Layers, bottom to top (see ``docs/architecture.md``):

* :mod:`cryolike_dask.grids` and :mod:`cryolike_dask.params` - polar and Cartesian grids,
  viewing directions, displacement grid, image and lens (CTF) parameters;
* :mod:`cryolike_dask.kernels` - pure array functions (NumPy or CuPy, chosen from the input
  arrays): CTF, translation, Fourier-Bessel transform, block cross-correlation, likelihoods.
"""

from __future__ import annotations

__version__ = "0.1.0"

from cryolike_dask.grids import (
    CartesianGrid2D,
    DisplacementGrid,
    PolarGrid,
    ViewingAngles,
)
from cryolike_dask.params import ImageParameters, LensParameters
from cryolike_dask.precision import Precision

__all__ = [
    "CartesianGrid2D",
    "DisplacementGrid",
    "ImageParameters",
    "LensParameters",
    "PolarGrid",
    "Precision",
    "ViewingAngles",
    "__version__",
]
