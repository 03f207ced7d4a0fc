"""Pure array kernels (NumPy or CuPy, chosen from the input arrays; no Dask or Zarr).

Only :mod:`~cryolike_dask.kernels.backend` knows libraries: on the CPU it routes the large
complex GEMMs and inverse FFTs of NumPy arrays through torch (MKL, zero-copy views) when that
is faster, with NumPy/SciPy as the fallback; CuPy arrays stay on CuPy.

* :mod:`~cryolike_dask.kernels.ctf` - CTF on the polar grid;
* :mod:`~cryolike_dask.kernels.translation` - Fourier translation kernel;
* :mod:`~cryolike_dask.kernels.fourier_bessel` - angular FFT and its half-spectrum inverse;
* :mod:`~cryolike_dask.kernels.cross_correlation` - the block kernel and its reductions;
* :mod:`~cryolike_dask.kernels.likelihood` - integrated and optimal-pose log-likelihoods;
* :mod:`~cryolike_dask.kernels.reduction` - the (best, pose, log-sum) monoid.
"""

from cryolike_dask.kernels.backend import array_module, has_gpu, to_host
from cryolike_dask.kernels.cross_correlation import (
    BlockOutputs,
    BlockResult,
    NonFiniteCrossCorrelationError,
    PreparedImages,
    PreparedTemplates,
    correlate_block,
    decode_pose,
    encode_pose,
    prepare_images,
    prepare_templates,
)
from cryolike_dask.kernels.ctf import ctf_from_lens, ctf_polar, electron_wavelength
from cryolike_dask.kernels.fourier_bessel import (
    fourier_bessel_transform,
    inverse_fourier_bessel_transform,
)
from cryolike_dask.kernels.likelihood import (
    LikelihoodConstants,
    OptimalPoseLikelihood,
    aggregate_integrated_log_likelihood,
    bioem_log_likelihood,
    model_at_pose,
    optimal_pose_log_likelihood,
)
from cryolike_dask.kernels.reduction import combine_best, combine_log_sums, logsumexp
from cryolike_dask.kernels.translation import translation_kernel

__all__ = [
    "BlockOutputs",
    "BlockResult",
    "LikelihoodConstants",
    "NonFiniteCrossCorrelationError",
    "OptimalPoseLikelihood",
    "PreparedImages",
    "PreparedTemplates",
    "aggregate_integrated_log_likelihood",
    "array_module",
    "bioem_log_likelihood",
    "combine_best",
    "combine_log_sums",
    "correlate_block",
    "ctf_from_lens",
    "ctf_polar",
    "decode_pose",
    "electron_wavelength",
    "encode_pose",
    "fourier_bessel_transform",
    "has_gpu",
    "inverse_fourier_bessel_transform",
    "logsumexp",
    "model_at_pose",
    "optimal_pose_log_likelihood",
    "prepare_images",
    "prepare_templates",
    "to_host",
    "translation_kernel",
]
