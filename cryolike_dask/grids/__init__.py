"""Grids: polar Fourier grid, Cartesian grid, viewing directions, displacement search grid."""

from cryolike_dask.grids.cartesian import CartesianGrid2D
from cryolike_dask.grids.displacement import DisplacementGrid, NoTranslationalSearchWarning
from cryolike_dask.grids.polar import PolarGrid
from cryolike_dask.grids.sphere import ViewingAngles

__all__ = [
    "CartesianGrid2D",
    "DisplacementGrid",
    "NoTranslationalSearchWarning",
    "PolarGrid",
    "ViewingAngles",
]
