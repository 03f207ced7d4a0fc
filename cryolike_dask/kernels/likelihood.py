"""Log-likelihoods (spec §11, §11.1, §12).

The per-pose log-likelihood is BioEM's: the image is modelled as ``α · model + β · 1 + noise``
(``1`` is the constant image, whose Fourier transform is the grid's *mask*), marginalised over
the scale α, the offset β and the noise level. With inner products under the quadrature
weights ``ωI`` (``Iss = <s, s>``, ``Isx = <s, x>``, ``Isy = <s, y>``, ``Ixx``, ``Iyy``, ``Ixy``):

``A = Ixx Iss − |Isx|²``, ``B = Ixy Iss − Re(conj(Isx) Isy)``, ``C = |Isy|² − Iyy Iss``,
``D = −(B²/A + C)``, ``p = Npix/2 − 2`` and
``LL = −p ln D − ½ ln A + (3 − Npix)/2 ln 2π − ln 2 − ½ ln Iss + lnΓ(Npix/2 − 2) + p ln(2 Iss)``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryolike_dask.grids.polar import PolarGrid
from cryolike_dask.kernels.backend import array_module
from cryolike_dask.kernels.reduction import logsumexp
from cryolike_dask.kernels.translation import translation_kernel
from cryolike_dask.precision import Precision


@dataclass(frozen=True)
class LikelihoodConstants:
    """The image-independent part of the BioEM likelihood.

    Parameters
    ----------
    n_pixels : int
        Number of real-space pixels of an image (``Npix = nx * ny``).
    mask_integral : float
        ``Iss`` of the polar grid (:attr:`PolarGrid.mask_integral`).
    """

    n_pixels: int
    mask_integral: float

    def __post_init__(self) -> None:
        if int(self.n_pixels) != self.n_pixels or self.n_pixels <= 5:
            raise ValueError(f"n_pixels must be an integer > 5, not {self.n_pixels!r}")
        if not (math.isfinite(self.mask_integral) and self.mask_integral > 0):
            raise ValueError(f"mask_integral must be positive, not {self.mask_integral!r}")

    @classmethod
    def for_grid(cls, grid: PolarGrid, n_pixels: int) -> LikelihoodConstants:
        """Constants for images of ``n_pixels`` pixels on ``grid``."""
        return cls(int(n_pixels), grid.mask_integral)

    @property
    def exponent(self) -> float:
        """``p = Npix/2 − 2``."""
        return self.n_pixels / 2.0 - 2.0

    @property
    def constant(self) -> float:
        """``(3 − Npix)/2 ln 2π − ln 2 − ½ ln Iss + lnΓ(Npix/2 − 2) + p ln(2 Iss)``."""
        iss, p = self.mask_integral, self.exponent
        return (
            (3.0 - self.n_pixels) / 2.0 * math.log(2.0 * math.pi)
            - math.log(2.0)
            - 0.5 * math.log(iss)
            + math.lgamma(self.n_pixels / 2.0 - 2.0)
            + p * math.log(2.0 * iss)
        )


def bioem_log_likelihood(
    ixx: Any, ixy: Any, iyy: Any, isx: Any, isy: Any, constants: LikelihoodConstants
) -> Any:
    """Per-pose BioEM log-likelihood from the inner products (broadcasting arrays).

    ``isx`` and ``isy`` may be complex; ``B`` uses ``Re(conj(Isx) Isy)`` (equal to CryoLike's
    form for the Hermitian data of real images). A perfect noise-free fit (``D = 0``) gives
    ``+inf``.
    """
    xp = array_module(ixx, ixy)
    iss = constants.mask_integral
    a = ixx * iss - (isx.real**2 + isx.imag**2)
    b = ixy * iss - (isx.real * isy.real + isx.imag * isy.imag)
    c = (isy.real**2 + isy.imag**2) - iyy * iss
    d = -(b * b / a + c)
    # a noise-free perfect fit has D = 0 and LL = +inf: returned as such, without a warning
    with np.errstate(divide="ignore", invalid="ignore") if xp is np else _nullcontext():
        return -constants.exponent * xp.log(d) - 0.5 * xp.log(a) + constants.constant


def aggregate_integrated_log_likelihood(
    log_likelihood_ms: Any, log_weights: Any, n_displacements: int, n_inplanes: int
) -> Any:
    """Integrated log-likelihood per image from the per-(image, template) values (§11.1).

    ``LL_m = logsumexp_s(LL[m, s] + log_weights[s]) − ln D − ln W``.

    Parameters
    ----------
    log_likelihood_ms : array ``[M, S]``
        ``logsumexp`` over displacements and rotations of the per-pose log-likelihood.
    log_weights : array ``[S]``
        Log prior of each template, ``ln(w_s / Σ w)``
        (:attr:`~cryolike_dask.grids.ViewingAngles.log_normalized_weights`).
        Passing CryoLike's raw weights instead reproduces its numbers, bug §17.2 included.
    n_displacements, n_inplanes : int
        ``D`` and ``W``: the uniform prior over displacements and rotations.

    Returns
    -------
    array ``[M]`` of the dtype of ``log_likelihood_ms``.
    """
    xp = array_module(log_likelihood_ms)
    lw = xp.asarray(log_weights, dtype=log_likelihood_ms.dtype)
    total = logsumexp(log_likelihood_ms + lw[None, :], axis=1)
    return total - (math.log(n_displacements) + math.log(n_inplanes))


@dataclass(frozen=True)
class OptimalPoseLikelihood:
    """Results of :func:`optimal_pose_log_likelihood`, each ``[M]`` (working float dtype).

    Attributes
    ----------
    log_likelihood
        BioEM log-likelihood of each image at its pose (natural log).
    cross_correlation
        ``Ixy / sqrt(Ixx Iyy)`` at the pose (equals the kernel's best cross-correlation).
    squared_distance
        ``Σ |CTF · T_pose − I|² · weight_points``: CryoLike's intended Fourier distance (its own
        implementation crashes, spec §17.5); ``weight_points = ωI / (2π)²``.
    """

    log_likelihood: Any
    cross_correlation: Any
    squared_distance: Any


def rotation_index(rotation: Any, n_inplanes: int) -> Any:
    """Index ``j = round(γ / (2π / W)) mod W`` of in-plane rotations ``γ`` (radians)."""
    xp = array_module(rotation)
    step = 2.0 * np.pi / n_inplanes
    return xp.mod(
        xp.rint(xp.asarray(rotation, dtype=xp.float64) / step).astype(xp.int64), n_inplanes
    )


def model_at_pose(
    templates: Any,
    ctf: Any,
    displacement_x: Any,
    displacement_y: Any,
    rotation: Any,
    grid: PolarGrid,
    box_size: tuple[float, float] | float,
) -> Any:
    """The model image of each image's pose: ``CTF · Rot(−γ)[Shift(+d)[T]]`` (spec §9).

    ``model[m, n, w] = C[m, n, w] · (T_m K_{d_m})[n, (w + j_m) mod W]`` with ``j_m`` the
    rotation index of ``rotation[m]``. ``templates`` is ``[M, N, W]`` (the template chosen
    for each image), ``ctf`` ``[M, N, W]`` real, displacements ``[M]`` Å, rotation ``[M]`` rad.
    """
    xp = array_module(templates)
    m, n, w = templates.shape
    x = xp.asarray(grid.x_points)
    y = xp.asarray(grid.y_points)
    # one displacement per image: the kernel's displacement axis is the image axis
    kernel = translation_kernel(
        x, y, xp.asarray(displacement_x), xp.asarray(displacement_y), box_size, templates.dtype
    )
    shifted = templates * kernel
    j = rotation_index(xp.asarray(rotation), grid.n_inplanes)
    cols = (xp.arange(w)[None, :] + j[:, None]) % w  # [M, W]
    rotated = xp.take_along_axis(shifted, xp.broadcast_to(cols[:, None, :], (m, n, w)), axis=2)
    return rotated * ctf


def optimal_pose_log_likelihood(
    templates: Any,
    images: Any,
    ctf: Any,
    displacement_x: Any,
    displacement_y: Any,
    rotation: Any,
    grid: PolarGrid,
    box_size: tuple[float, float] | float,
    n_pixels: int,
    precision: str | Precision = "single",
) -> OptimalPoseLikelihood:
    """Log-likelihood of each image at a given pose (CryoLike's ``calc_likelihood_optimal_pose``).

    Parameters
    ----------
    templates : complex array ``[M, N, W]``
        For each image, the template of its pose (``T[optimal_template[m]]``).
    images : complex array ``[M, N, W]``
        The images.
    ctf : real array ``[M, N, W]`` (or broadcastable)
        Each image's CTF on the polar grid.
    displacement_x, displacement_y : array ``[M]``
        Pose displacement, Å.
    rotation : array ``[M]``
        In-plane rotation, radians (rounded to the grid's rotation step).
    grid : PolarGrid
    box_size : float or (float, float)
        Box edge in Å (for the translation kernel).
    n_pixels : int
        ``Npix`` of the real-space images.
    precision : "single" or "double"

    Returns
    -------
    OptimalPoseLikelihood
    """
    prec = Precision.parse(precision).resolve()
    xp = array_module(templates, images)
    cdt, rdt = prec.complex_dtype, prec.real_dtype
    t = xp.asarray(templates).astype(cdt, copy=False)
    y = xp.asarray(images).astype(cdt, copy=False)
    c = xp.asarray(ctf).astype(rdt, copy=False)
    model = model_at_pose(t, c, displacement_x, displacement_y, rotation, grid, box_size)
    model = model.astype(cdt, copy=False)
    w = xp.asarray(grid.integration_weights, dtype=rdt)
    s = xp.asarray(grid.mask, dtype=rdt)
    # Iss in the working precision, as CryoLike's likelihood_fourier computes it
    consts = LikelihoodConstants(int(n_pixels), float(xp.sum(s * s * w)))
    axes = (1, 2)
    isy = xp.sum(s * y * w, axis=axes)
    isx = xp.sum(s * model * w, axis=axes)
    iyy = xp.sum((y.real**2 + y.imag**2) * w, axis=axes)
    ixx = xp.sum((model.real**2 + model.imag**2) * w, axis=axes)
    ixy = xp.sum((y * xp.conj(model)).real * w, axis=axes)
    ll = bioem_log_likelihood(ixx, ixy, iyy, isx, isy, consts)
    cc = ixy / xp.sqrt(ixx * iyy)
    wp = xp.asarray(grid.weight_points, dtype=rdt)
    diff = model - y
    dist = xp.sum((diff.real**2 + diff.imag**2) * wp, axis=axes)
    return OptimalPoseLikelihood(ll.astype(rdt), cc.astype(rdt), dist.astype(rdt))
