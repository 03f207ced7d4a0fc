"""Parameters: image parameters (``parameters.npz``) and per-image lens (CTF) parameters."""

from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.params.npz import ParameterFileError

__all__ = ["ImageParameters", "LensParameters", "ParameterFileError"]
