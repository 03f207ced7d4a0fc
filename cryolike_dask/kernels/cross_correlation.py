"""The block cross-correlation kernel (spec §10, §11, §13; design.md "The block kernel").

For a block of templates ``T[s, n, w]`` and a block of images ``I[m, n, w]`` with CTFs
``C[m, n, w]``, over displacements ``d`` and in-plane rotations ``w``:

``X[m,s,d,w] = Σ_n Σ_w' ωI[n] C[m,n,w'] conj(I[m,n,w']) T[s,n,w'+w] K[d,n,w'+w]``,
``Ixx[m,s,w] = Σ_n Σ_w' ωI[n] C[m,n,w']² |T[s,n,w'+w]|²``, ``Iyy[m] = Σ ωI |I[m]|²`` and
``cc[m,s,d,w] = X / sqrt(Ixx · Iyy)`` (indices along ``w`` mod ``W``).

How: both sides are weighted by ``σ = sqrt(ωI)`` and Fourier-transformed along the angle
axis; only the orders ``q = 0 … W/2`` that the half-spectrum inverse reads are kept (half of
CryoLike's work); the contraction over shells is one batched GEMM ``(Q, m, N) @ (Q, N, s·D)``;
the inverse FFT gives all ``W`` rotations; the result is normalised and reduced inside the
kernel. The rotation axis is exact when inputs have the Hermitian symmetry of real images
(``F[n, w + W/2] = conj F[n, w]``), which every image and template made from real data has.

Use :func:`prepare_templates` once per template block (cache it), :func:`prepare_images` once
per image block, then :func:`correlate_block`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.grids.polar import PolarGrid
from cryolike_dask.kernels.backend import (
    array_module,
    fft_kwargs,
    fft_module,
    irfft,
    irfft_rows,
    matmul,
    one_library_thread,
    run_ranges,
)
from cryolike_dask.kernels.compression import (
    BAND_ORDERS,
    SAFETY_FACTOR,
    CompressedSpectrum,
    CompressionStats,
    compress_spectrum,
    compressed_products,
    image_norms,
    image_side,
)
from cryolike_dask.kernels.fourier_bessel import n_orders
from cryolike_dask.kernels.likelihood import LikelihoodConstants
from cryolike_dask.kernels.reduction import logsumexp
from cryolike_dask.precision import Precision

#: Default budget for the kernel's per-batch temporaries (bytes).
DEFAULT_WORK_BYTES = 256 * 2**20
#: Size of the displaced-template temporaries each host thread works on in prepare_templates
HOST_PREPARE_BYTES = 16 * 2**20


class NonFiniteCrossCorrelationError(CryoLikeDaskError, FloatingPointError):
    """The cross-correlation of an image with a template is NaN or infinite.

    This happens when a template, an image or a CTF has zero norm (or contains NaN/Inf).
    """


# ------------------------------------------------------------------------------ templates
@dataclass(frozen=True)
class PreparedTemplates:
    """Template side of the kernel; computed once per template block and reusable.

    Attributes
    ----------
    spectrum : complex ``[Q, N, S·D]`` or None
        ``FFT_w(σ · T[s] · K[d])``, orders ``q = 0 … W/2``; column ``s·D + d``. ``None``
        when the block is compressed.
    power_spectrum : complex ``[Q, N, S]``
        ``rFFT_w(ωI · |T[s]|²)`` (orthonormal), for the CTF-weighted template norms.
    mask_weighted : complex ``[S, N·W]``
        ``ωI · mask · T[s]``, for the overlap ``Isx`` with the constant image.
    n_templates, n_displacements, n_shells, n_inplanes : int
    compressed : CompressedSpectrum or None
        The bounded-error compressed spectrum (``prepare_templates(tolerance=...)``), in
        place of ``spectrum``.
    """

    spectrum: Any
    power_spectrum: Any
    mask_weighted: Any
    n_templates: int
    n_displacements: int
    n_shells: int
    n_inplanes: int
    compressed: CompressedSpectrum | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared arrays."""
        main = self.spectrum.nbytes if self.spectrum is not None else self.compressed.nbytes
        return int(main + self.power_spectrum.nbytes + self.mask_weighted.nbytes)


@dataclass(frozen=True)
class KernelMemory:
    """Memory model of one kernel task, in bytes (what the planner asks the kernel).

    Attributes
    ----------
    per_template : int
        A prepared template: displaced spectra ``D·N·Q``, power spectrum ``N·Q`` and masked
        template ``N·W`` complex values.
    per_image : int
        An image, raw and prepared (spectra ``2·Q·N`` complex, CTF ``N·W`` real, raw
        ``N·W`` complex), with a margin for its float64 CTF temporaries.
    per_pair : int
        Per (image, template) reduced outputs (per-template best, pose, log-sum).
    per_pair_full : int
        Per (image, template) for the full ``[D, W]`` cross-correlation tensor.
    fixed : int
        Per task regardless of sizes (on a GPU: the CUDA context and library handles).
    work_factor : float
        Peak temporaries per byte of the kernel's work budget (on a GPU 2: CuPy makes
        contiguous copies of sliced GEMM operands and of the transposed inverse-FFT input,
        and cuFFT/cuBLAS take work areas of about the same size).
    """

    per_template: int
    per_image: int
    per_pair: int
    per_pair_full: int
    fixed: int = 0
    work_factor: float = 1.0

    def task_bytes(
        self, images: int, templates: int, *, full: bool = False, work_bytes: int = 0
    ) -> int:
        """Estimated peak bytes of one task of ``images`` × ``templates``."""
        pair = self.per_pair + (self.per_pair_full if full else 0)
        return int(
            templates * self.per_template + images * self.per_image
            + images * templates * pair + work_bytes * self.work_factor + self.fixed
        )  # fmt: skip


#: CUDA context, cuBLAS/cuFFT handles and plans of one GPU worker (bytes, measured order).
CUDA_CONTEXT_BYTES = 512 * 2**20


def kernel_memory(
    n_shells: int,
    n_inplanes: int,
    n_displacements: int,
    precision: str = "single",
    device: str = "cpu",
) -> KernelMemory:
    """The :class:`KernelMemory` of blocks on this polar grid and displacement grid.

    On a GPU everything of a task lives in device memory at once: two cached image blocks
    (the worker keeps the last two), the float64 CTF and its square while an image block is
    prepared, the library work areas and the CUDA context are counted too.
    """
    c = Precision.parse(precision).resolve().complex_dtype.itemsize
    r = c // 2
    q = n_orders(n_inplanes)
    p = n_shells * n_inplanes
    per_image = int(p * c * 2.5 + 2 * q * n_shells * c)
    fixed, factor = 0, 1.0
    if device == "gpu":
        per_image = 2 * per_image + 2 * p * 8
        fixed, factor = CUDA_CONTEXT_BYTES, 2.0
    return KernelMemory(
        per_template=(n_displacements * n_shells * q + n_shells * q + p) * c,
        per_image=per_image,
        per_pair=4 * r,
        per_pair_full=n_displacements * n_inplanes * r,
        fixed=fixed,
        work_factor=factor,
    )


def _check_stack(name: str, stack: Any, grid: PolarGrid) -> None:
    if stack.ndim != 3 or tuple(stack.shape[1:]) != grid.shape:
        raise ValueError(
            f"{name} must have shape [count, n_shells, n_inplanes] = [*, {grid.n_shells}, "
            f"{grid.n_inplanes}] for this polar grid, got {tuple(stack.shape)}"
        )


def prepare_templates(
    templates: Any,
    translation: Any,
    grid: PolarGrid,
    precision: str | Precision = "single",
    *,
    workers: int | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
    tolerance: float | None = None,
    safety: float = SAFETY_FACTOR,
    band: int = BAND_ORDERS,
) -> PreparedTemplates:
    """Prepare a block of templates for :func:`correlate_block`.

    Parameters
    ----------
    templates : complex array ``[S, N, W]``
        Templates on ``grid`` (NumPy or CuPy; the result lives on the same device).
    translation : complex array ``[D, N, W]``
        Translation kernel of the searched displacements (:func:`translation_kernel`).
    grid : PolarGrid
    precision : "single" or "double"
        Working precision (complex64 or complex128).
    workers : int, optional
        Threads for SciPy's FFT (NumPy arrays only).
    work_bytes : int
        Budget for temporaries; templates are processed in sub-batches that fit it.
    tolerance : float, optional
        Allowed error of the normalised cross-correlation: the spectrum is compressed to a
        truncated basis per order (:mod:`~cryolike_dask.kernels.compression`), and
        :func:`correlate_block` guarantees ``|cc − cc_exact| ≤ tolerance`` for every pose
        (plus floating-point rounding), recomputing exactly the pairs its bound cannot
        certify. ``None`` (default): the exact spectrum.
    safety : float
        ``β`` of the rank choice (``ρ_j ≤ β · tolerance · ‖X_j‖``); compressed blocks only.
    band : int
        Consecutive orders sharing one rank; compressed blocks only.
    """
    xp = array_module(templates)
    prec = Precision.parse(precision).resolve()
    cdt, rdt = prec.complex_dtype, prec.real_dtype
    _check_stack("templates", templates, grid)
    n_s, n_n, n_w = templates.shape
    kernel = xp.asarray(translation).astype(cdt, copy=False)
    if kernel.ndim != 3 or tuple(kernel.shape[1:]) != grid.shape:
        raise ValueError(
            f"translation kernel must have shape [D, {grid.n_shells}, {grid.n_inplanes}], "
            f"got {tuple(kernel.shape)}"
        )
    n_d = kernel.shape[0]
    n_q = n_orders(n_w)
    fft = fft_module(xp)
    kw = fft_kwargs(xp, workers)

    t = xp.asarray(templates).astype(cdt, copy=False)
    weights = xp.asarray(grid.shell_integration_weights).astype(rdt)  # ωI per shell
    sigma = xp.sqrt(weights)[:, None]  # [N, 1]
    t_sigma = t * sigma  # [S, N, W]

    # Angle-major layout [W, N, s, D]: the FFT runs along axis 0 and its first Q orders are
    # already the GEMM operand [Q, N, s·D] - no transposition of the large result.
    t_w = xp.ascontiguousarray(t_sigma.transpose(2, 1, 0))  # [W, N, S]
    k_w = xp.ascontiguousarray(kernel.transpose(2, 1, 0))  # [W, N, D]
    filled = xp.empty((n_q, n_n, n_s, n_d), dtype=cdt)
    per_template = n_d * n_n * n_w * np.dtype(cdt).itemsize * 2
    step = max(1, min(n_s, work_bytes // max(per_template, 1)))
    half = n_w % 4 == 0 and _is_hermitian(t_sigma) and _is_hermitian(kernel)

    def spectra(s0: int, s1: int, d0: int, d1: int, kw: dict) -> None:
        k, out = k_w[:, :, d0:d1], filled[:, :, s0:s1, d0:d1]
        if half:
            _half_angle_spectrum(t_w[:, :, s0:s1], k, out, xp, fft, kw)
        else:
            displaced = t_w[:, :, s0:s1, None] * k[:, :, None, :]  # [W, N, s, D]
            out[...] = fft.fft(displaced, axis=0, norm="ortho", **kw)[:n_q]

    if xp is np:
        # host: small pieces (a few templates, or a few displacements of one), one per
        # thread: the elementwise products and FFTs then work in cache, on every core
        units = _prepare_units(n_s, n_d, per_template, HOST_PREPARE_BYTES)
        run_ranges(lambda lo, hi: [spectra(*u, {}) for u in units[lo:hi]], len(units), workers)
    else:
        for s0 in range(0, n_s, step):
            spectra(s0, min(n_s, s0 + step), 0, n_d, kw)
    spectrum = filled.reshape(n_q, n_n, n_s * n_d)

    power = (t_sigma.real**2 + t_sigma.imag**2).astype(rdt, copy=False)  # ωI |T|²
    power_spectrum = fft.rfft(power, axis=-1, norm="ortho", **kw)  # [S, N, Q]
    power_spectrum = xp.ascontiguousarray(power_spectrum.transpose(2, 1, 0)).astype(cdt)

    mask = xp.asarray(grid.mask).astype(rdt)
    mask_weighted = (t * (mask * weights[:, None])).reshape(n_s, n_n * n_w).astype(cdt)
    if tolerance is None:
        return PreparedTemplates(spectrum, power_spectrum, mask_weighted, n_s, n_d, n_n, n_w)
    bands, bases, coefficients, residual = compress_spectrum(
        spectrum, n_w, float(tolerance), safety=safety, band=band, workers=workers
    )
    del spectrum
    compressed = CompressedSpectrum(
        bands,
        bases,
        coefficients,
        residual.reshape(n_s, n_d),
        float(tolerance),
        float(safety),
        t,
        kernel,
        grid,
        prec.value,
    )
    return PreparedTemplates(
        None, power_spectrum, mask_weighted, n_s, n_d, n_n, n_w, compressed=compressed
    )


def _prepare_units(
    n_s: int, n_d: int, per_template: int, budget: int
) -> list[tuple[int, int, int, int]]:
    """``(s0, s1, d0, d1)`` pieces of the template spectrum of about ``budget`` bytes each."""
    if per_template <= budget:
        step = max(1, budget // max(per_template, 1))
        return [(s0, min(n_s, s0 + step), 0, n_d) for s0 in range(0, n_s, step)]
    d_step = max(1, (n_d * budget) // per_template)
    return [
        (s0, s0 + 1, d0, min(n_d, d0 + d_step)) for s0 in range(n_s) for d0 in range(0, n_d, d_step)
    ]


def _is_hermitian(x: Any, rtol: float = 1e-5) -> bool:
    """Whether ``x[..., w + W/2] == conj(x[..., w])`` to ``rtol`` of its largest value."""
    xp = array_module(x)
    h = x.shape[-1] // 2
    scale = float(xp.abs(x).max()) or 1.0
    return float(xp.abs(x[..., h:] - xp.conj(x[..., :h])).max()) <= rtol * scale


def _half_angle_spectrum(t_w: Any, k_w: Any, out: Any, xp: Any, fft: Any, kw: dict) -> None:
    """Orders ``0 … W/2`` of ``FFT_w(T·K_d)`` from the first half of the angles, into ``out``.

    For angularly Hermitian ``b = T·K`` (``b[w + W/2] = conj b[w]``, real images) and
    ``h = W/2``: ``B_{2k} = FFT_h(2 Re b)[k]`` and ``B_{2k+1} = FFT_h(2i Im b · e^{−2πiw/W})[k]``
    (orthonormal scaling ``W^{-1/2}``). Half the product and ¾ of the FFT work of the full
    transform, few temporaries. ``t_w`` is ``[W, N, s]``, ``k_w`` ``[W, N, D]``, ``out`` a
    ``[W/2+1, N, s, D]`` view to fill.
    """
    n_w = t_w.shape[0]
    h = n_w // 2
    b = t_w[:h, :, :, None] * k_w[:h, :, None, :]  # [h, N, s, D]
    scale = 1.0 / np.sqrt(n_w)
    even = fft.rfft(b.real, axis=0, **kw)  # q = 0, 2, …, h  (×2 folded into the scale)
    xp.multiply(even, b.real.dtype.type(2.0 * scale), out=out[0::2])
    del even
    twiddle = xp.exp(-2j * np.pi * xp.arange(h) / n_w).astype(b.dtype)
    v = xp.multiply(b.imag, twiddle[:, None, None, None])  # complex [h, N, s, D]
    del b
    odd = fft.fft(v, axis=0, overwrite_x=True, **kw) if xp is np else fft.fft(v, axis=0)
    xp.multiply(odd[: h // 2], v.dtype.type(2j * scale), out=out[1::2])


# ------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class PreparedImages:
    """Image side of the kernel, computed once per image block.

    Attributes
    ----------
    spectrum : complex ``[Q, M, N]``
        ``conj(FFT_w(σ · C · I))``, orders ``q = 0 … W/2``.
    ctf_power_spectrum : complex ``[Q, M, N]``
        ``conj(rFFT_w(C²))`` (orthonormal), for the template norms.
    ctf : real ``[M, N·W]``
        The CTF, for the overlap ``Isx``.
    norms : real ``[M]``
        ``Iyy = Σ ωI |I|²``.
    mask_overlap : complex ``[M]``
        ``Isy = Σ ωI · mask · I``.
    isotropic_ctf : bool
        The CTF was given without an angle axis (``[M or 1, N, 1]``): template norms then do
        not depend on the rotation, and :func:`correlate_block` skips the normalisation pass.
    """

    spectrum: Any
    ctf_power_spectrum: Any
    ctf: Any
    norms: Any
    mask_overlap: Any
    isotropic_ctf: bool = False

    @property
    def n_images(self) -> int:
        """Number of images ``M``."""
        return int(self.norms.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared arrays."""
        return int(
            self.spectrum.nbytes
            + self.ctf_power_spectrum.nbytes
            + self.ctf.nbytes
            + self.norms.nbytes
            + self.mask_overlap.nbytes
        )


def prepare_images(
    images: Any,
    ctf: Any,
    grid: PolarGrid,
    precision: str | Precision = "single",
    *,
    workers: int | None = None,
) -> PreparedImages:
    """Prepare a block of images and their CTFs for :func:`correlate_block`.

    Parameters
    ----------
    images : complex array ``[M, N, W]``
        Images on ``grid`` (NumPy or CuPy).
    ctf : real array ``[M, N, W]``, ``[M, N, 1]`` (isotropic) or ``[1, N, W]`` (shared)
        CTF of each image on the grid (:func:`~cryolike_dask.kernels.ctf.ctf_polar`). An
        isotropic CTF is broadcast over angles, so template norms are exact for it too
        (CryoLike's are not, spec §17.4).
    grid : PolarGrid
    precision : "single" or "double"
    workers : int, optional
        Threads for SciPy's FFT.
    """
    xp = array_module(images)
    prec = Precision.parse(precision).resolve()
    cdt, rdt = prec.complex_dtype, prec.real_dtype
    _check_stack("images", images, grid)
    n_m, n_n, n_w = images.shape
    c = xp.asarray(ctf)
    if xp.iscomplexobj(c):
        raise ValueError("ctf must be real")
    if c.ndim != 3 or c.shape[1] != n_n or c.shape[0] not in (1, n_m) or c.shape[2] not in (1, n_w):
        raise ValueError(
            f"ctf must have shape [{n_m} or 1, {n_n}, {n_w} or 1], got {tuple(c.shape)}"
        )
    isotropic = c.shape[2] == 1
    c = xp.ascontiguousarray(xp.broadcast_to(c.astype(rdt, copy=False), (n_m, n_n, n_w)))
    fft = fft_module(xp)
    kw = fft_kwargs(xp, workers)
    n_q = n_orders(n_w)

    y = xp.asarray(images).astype(cdt, copy=False)
    weights = xp.asarray(grid.shell_integration_weights).astype(rdt)
    sigma = xp.sqrt(weights)[:, None]
    y_sigma = y * sigma
    coeffs = fft.fft(y_sigma * c, axis=-1, norm="ortho", **kw)[..., :n_q]  # [M, N, Q]
    spectrum = xp.ascontiguousarray(xp.conj(coeffs).transpose(2, 0, 1))
    ctf_power = fft.rfft(c * c, axis=-1, norm="ortho", **kw)  # [M, N, Q]
    ctf_power_spectrum = xp.ascontiguousarray(xp.conj(ctf_power).transpose(2, 0, 1)).astype(cdt)
    norms = xp.sum(y_sigma.real**2 + y_sigma.imag**2, axis=(1, 2))
    mask = xp.asarray(grid.mask).astype(rdt)
    mask_overlap = xp.sum(y * (mask * weights[:, None]), axis=(1, 2))
    return PreparedImages(
        spectrum, ctf_power_spectrum, c.reshape(n_m, n_n * n_w), norms, mask_overlap, isotropic
    )


# ------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class BlockOutputs:
    """What :func:`correlate_block` returns beyond the per-pair and per-image optimum.

    Attributes
    ----------
    full : bool
        The full ``[M, S, D, W]`` cross-correlation tensor.
    per_rotation : bool
        ``[M, S, W]``: best over displacements for each rotation (and which displacement).
    per_displacement : bool
        ``[M, S, D]``: best over rotations for each displacement (and which rotation).
    integrated_likelihood : bool
        Per-(image, template) integrated log-likelihood (needs likelihood constants).
    """

    full: bool = False
    per_rotation: bool = False
    per_displacement: bool = False
    integrated_likelihood: bool = False


@dataclass(frozen=True)
class BlockResult:
    """Results of one (template block × image block) pair. ``M`` images, ``S`` templates.

    Floats are of the working precision, indices int64; index values are *local* to the
    template block. A pose index packs ``s · D · W + d · W + w``.

    Attributes
    ----------
    best_cross_correlation : ``[M]``
        Best normalised cross-correlation over the block's templates, displacements, rotations.
    best_pose : ``[M]`` int64
        First pose (flat order s, d, w) that reaches it.
    cross_correlation_ms : ``[M, S]``
        Best over (d, w) for each template.
    pose_ms : ``[M, S]`` int64
        First ``d · W + w`` that reaches it.
    log_likelihood_ms : ``[M, S]`` or None
        ``logsumexp`` over (d, w) of the per-pose log-likelihood (spec §11).
    log_likelihood_sum : ``[M]`` or None
        ``logsumexp_s(log_likelihood_ms + log_prior)`` over the block's templates.
    cross_correlation_msdw : ``[M, S, D, W]`` or None
    cross_correlation_msw, displacement_index_msw : ``[M, S, W]`` or None
    cross_correlation_msd, rotation_index_msd : ``[M, S, D]`` or None
    compression : CompressionStats or None
        For compressed templates: the work kept, the error bound and the exact fallbacks.
    """

    best_cross_correlation: Any
    best_pose: Any
    cross_correlation_ms: Any
    pose_ms: Any
    log_likelihood_ms: Any = None
    log_likelihood_sum: Any = None
    cross_correlation_msdw: Any = None
    cross_correlation_msw: Any = None
    displacement_index_msw: Any = None
    cross_correlation_msd: Any = None
    rotation_index_msd: Any = None
    #: set on the instance by :func:`_with_stats` (not a field: exact results are unchanged)
    compression: ClassVar[CompressionStats | None] = None


#: Images per GEMM when memory allows: thin GEMMs run far below the machine's peak.
GEMM_IMAGES = 128


#: Largest transform (elements) a step may take: cuFFT's limit.
MAX_FFT_ELEMENTS = 2**31 - 1


def batch_sizes(
    templates: PreparedTemplates, n_images: int, outputs: BlockOutputs, work_bytes: int
) -> tuple[int, int]:
    """``(images, templates)`` per internal step so that its temporaries fit ``work_bytes``.

    A step holds the complex ``[Q, m, s·D]`` GEMM result and the real ``[m, s, D, W]``
    correlation (plus, on a GPU, one more real tensor for the integrated likelihood). Images are
    grouped up to :data:`GEMM_IMAGES` for GEMM efficiency; templates are then chunked to fit.
    """
    n_d, n_w = templates.n_displacements, templates.n_inplanes
    real = np.dtype(templates.power_spectrum.dtype).itemsize // 2
    # on the host the likelihood runs in cache-sized chunks (no second full tensor)
    second = outputs.integrated_likelihood and array_module(templates.power_spectrum) is not np
    per_pair = n_d * (n_orders(n_w) * 2 * real + n_w * real * (2 if second else 1))
    m = max(1, min(n_images, GEMM_IMAGES, work_bytes // max(per_pair, 1)))
    s = max(1, min(templates.n_templates, work_bytes // max(per_pair * m, 1)))
    # cuFFT plans at most 2**31 - 1 elements per transform
    s = max(1, min(s, MAX_FFT_ELEMENTS // max(m * n_d * n_w, 1)))
    return int(m), int(s)


def image_batch_size(templates: PreparedTemplates, outputs: BlockOutputs, work_bytes: int) -> int:
    """Images per internal step (see :func:`batch_sizes`)."""
    return batch_sizes(templates, GEMM_IMAGES, outputs, work_bytes)[0]


def correlate_block(
    templates: PreparedTemplates,
    images: PreparedImages,
    outputs: BlockOutputs = BlockOutputs(),
    *,
    likelihood: LikelihoodConstants | None = None,
    log_prior: Any = None,
    pose_prior: Any = None,
    workers: int | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
) -> BlockResult:
    """Cross-correlate a block of images with a block of templates, reduced inside.

    Parameters
    ----------
    templates : PreparedTemplates
    images : PreparedImages
        Must be on the same device and of the same precision as ``templates``.
    outputs : BlockOutputs
        Optional outputs; the full ``[M, S, D, W]`` tensor is built only when asked for.
    likelihood : LikelihoodConstants, optional
        Needed for ``outputs.integrated_likelihood``.
    log_prior : real array ``[S]``, optional
        Log prior weight of each template of the block (``ln(w_s / Σ w)`` over the whole
        structure); with the integrated likelihood, gives ``log_likelihood_sum``.
    pose_prior : optional
        A search limited around each image's prior pose: an object with float64 log weights
        ``log_template [M, S]``, ``log_rotation [M, S, W]`` and ``log_displacement [D]``
        (``-inf`` = excluded; see :class:`cryolike_dask.kernels.pose_prior.PriorFactors`).
        The best cross-correlation is taken over the allowed poses only (``-inf`` where an
        image has none in this block), and each pose's likelihood is weighted by
        ``exp(log_template + log_rotation + log_displacement)`` before the log-sums
        (normalising the prior is the caller's). Templates no image of the block may take
        are not computed.
    workers : int, optional
        Threads for SciPy's FFT.
    work_bytes : int
        Budget for the temporaries of one internal image batch.

    Raises
    ------
    NonFiniteCrossCorrelationError
        If any normalised cross-correlation is NaN (zero-norm template, image or CTF).

    Compressed templates (``prepare_templates(tolerance=...)``) give every output from the
    compressed products; each (image, template) pair whose error bound exceeds the
    tolerance is recomputed exactly, and ``BlockResult.compression`` reports what was done.
    """
    host = array_module(templates.power_spectrum) is np
    with one_library_thread(workers if host else None):
        return _correlate_block(
            templates,
            images,
            outputs,
            likelihood=likelihood,
            log_prior=log_prior,
            pose_prior=pose_prior,
            workers=workers,
            work_bytes=work_bytes,
        )


def _correlate_block(
    templates: PreparedTemplates,
    images: PreparedImages,
    outputs: BlockOutputs,
    *,
    likelihood: LikelihoodConstants | None,
    log_prior: Any,
    pose_prior: Any,
    workers: int | None,
    work_bytes: int,
) -> BlockResult:
    """:func:`correlate_block`'s work (host libraries already set up for ``workers``)."""
    xp = array_module(templates.power_spectrum)
    n_m, n_s = images.n_images, templates.n_templates
    n_d, n_w = templates.n_displacements, templates.n_inplanes
    rdt = np.empty(0, dtype=templates.power_spectrum.dtype).real.dtype
    if images.spectrum.shape[0] != templates.power_spectrum.shape[0] or (
        images.spectrum.shape[2] != templates.n_shells
    ):
        raise ValueError("images and templates were prepared for different polar grids")
    if outputs.integrated_likelihood and likelihood is None:
        raise ValueError("the integrated likelihood needs LikelihoodConstants")
    prior = None
    if pose_prior is not None:
        prior = _BlockPrior.of(pose_prior, xp, rdt, (n_m, n_s, n_w), n_d)
        if prior.keep is not None:  # templates no image may take: not computed
            return _correlate_subset(
                templates, images, outputs, prior, likelihood, log_prior, workers, work_bytes
            )

    best_ms = xp.empty((n_m, n_s), dtype=rdt)
    pose_ms = xp.empty((n_m, n_s), dtype=xp.int64)
    ll_ms = xp.empty((n_m, n_s), dtype=rdt) if outputs.integrated_likelihood else None
    full = xp.empty((n_m, n_s, n_d, n_w), dtype=rdt) if outputs.full else None
    msw = xp.empty((n_m, n_s, n_w), dtype=rdt) if outputs.per_rotation else None
    msw_arg = xp.empty((n_m, n_s, n_w), dtype=xp.int64) if outputs.per_rotation else None
    msd = xp.empty((n_m, n_s, n_d), dtype=rdt) if outputs.per_displacement else None
    msd_arg = xp.empty((n_m, n_s, n_d), dtype=xp.int64) if outputs.per_displacement else None

    isx_all = None
    if outputs.integrated_likelihood:
        # Isx[m, s] = Σ ωI · mask · C[m] · T[s] (undisplaced, unrotated template: spec §11)
        isx_all = _mask_overlap(
            images.ctf, templates.mask_weighted, xp, workers, images.isotropic_ctf, n_w
        )

    m_step, s_step = batch_sizes(templates, n_m, outputs, work_bytes)
    n_q = templates.power_spectrum.shape[0]
    comp = templates.compressed
    if comp is None:
        spectrum = templates.spectrum.reshape(n_q, templates.n_shells, n_s, n_d)
    else:  # the bound's factors: a_m per image, max_d ρ_{s,d} per template
        a_m = image_norms(images.spectrum, n_w)
        rho_s = xp.max(comp.residual, axis=1)
        bound_ms = xp.empty((n_m, n_s), dtype=np.float64)
    cdt = templates.power_spectrum.dtype
    # On the CPU the GEMM result and the correlation reuse one buffer each across steps (a
    # fresh 100 MB array costs its page faults every step); GPU memory pools do this already.
    reuse = xp is np
    xq_buf = np.empty(n_q * m_step * s_step * n_d, cdt) if reuse else None
    x_buf = np.empty(m_step * s_step * n_d * n_w, rdt) if reuse else None
    # Isotropic CTF: Ixx does not depend on the rotation, so cc = X · (one positive factor per
    # image and template) - the arg-max is taken on X and only the best value is normalised
    reduced_only = not (outputs.full or outputs.per_rotation or outputs.per_displacement)
    skip_norm = reduced_only and images.isotropic_ctf
    for m0 in range(0, n_m, m_step):
        m1 = min(n_m, m0 + m_step)
        mb = m1 - m0
        iyy = images.norms[m0:m1].astype(rdt, copy=False)
        # template norms of the image batch, all templates at once (D times smaller work)
        nq = matmul(
            xp, images.ctf_power_spectrum[:, m0:m1, :], templates.power_spectrum, workers=workers
        )
        ixx_all = irfft(xp, nq.transpose(1, 2, 0), n_w, axis=-1, workers=workers)
        ixx_all = ixx_all.astype(rdt, copy=False)  # [mb, S, W]
        del nq
        if comp is not None:
            # |Δcc| ≤ a_m ρ_{s,d} / sqrt(Ixx Iyy) (compression module), max over (d, w)
            with _errstate(xp):
                floor = xp.min(ixx_all, axis=-1).astype(np.float64) * iyy[:, None]
                bound_ms[m0:m1] = a_m[m0:m1, None] * rho_s[None, :] / xp.sqrt(floor)
            side = image_side(comp, images.spectrum[:, m0:m1, :], workers=workers)
        for s0 in range(0, n_s, s_step):
            s1 = min(n_s, s0 + s_step)
            sb = s1 - s0
            xq_out = xq_buf[: n_q * mb * sb * n_d].reshape(n_q, mb, sb * n_d) if reuse else None
            if comp is None:
                # contraction over shells for every order q: one batched GEMM
                # [Q, mb, N] @ [Q, N, s·D]
                b = spectrum[:, :, s0:s1, :].reshape(n_q, templates.n_shells, sb * n_d)
                xq = matmul(xp, images.spectrum[:, m0:m1, :], b, out=xq_out, workers=workers)
            else:  # (A_q U_q) C_q per band of orders
                if xq_out is None:
                    xq_out = xp.empty((n_q, mb, sb * n_d), dtype=cdt)
                xq = compressed_products(comp, side, s0, s1, xq_out, workers=workers)
            x_out = x_buf[: mb * sb * n_d * n_w].reshape(mb, sb * n_d, n_w) if reuse else None
            fill = None
            rows = xq.transpose(1, 2, 0).reshape(mb * sb * n_d, n_q) if reuse else None
            if rows is not None and np.shares_memory(rows, xq):
                # host: each thread transforms the rows of its chunk of (image, template)
                # pairs and reduces them while they are in cache (_host_reduce)
                x = x_out
                fill = _row_filler(rows, x.reshape(mb * sb * n_d, n_w), n_d)
            else:
                x = irfft(xp, xq.transpose(1, 2, 0), n_w, axis=-1, out=x_out, workers=workers)
            del xq, rows
            x = x.reshape(mb, sb, n_d, n_w).astype(rdt, copy=False)  # raw correlation X
            ixx = ixx_all[:, s0:s1]
            factors = None
            if outputs.integrated_likelihood:
                assert likelihood is not None and isx_all is not None and ll_ms is not None
                factors = _likelihood_factors(
                    ixx, iyy, isx_all[m0:m1, s0:s1], images.mask_overlap[m0:m1], likelihood
                )
            with _errstate(xp):  # a zero norm gives inf/NaN, reported below with its indices
                inv_norm = 1.0 / xp.sqrt(ixx * iyy[:, None, None])  # [mb, s, W]

            if xp is np:
                # host: every post-GEMM step in one sweep over cache-sized chunks of x
                best, arg, ll, _ = _host_reduce(
                    x,
                    factors,
                    likelihood,
                    inv_norm,
                    argmax=("raw" if skip_norm else "normalised") if reduced_only else None,
                    workers=workers,
                    prior=None if prior is None else prior.part(m0, m1, s0, s1),
                    fill=fill,
                )
                if ll is not None:
                    ll_ms[m0:m1, s0:s1] = ll
                if reduced_only:
                    best_ms[m0:m1, s0:s1] = best
                    pose_ms[m0:m1, s0:s1] = arg
                    continue
                cc = x  # normalise in place
                with _errstate(xp):
                    cc *= inv_norm[:, :, None, :]
            else:
                part = None if prior is None else prior.part(m0, m1, s0, s1)
                if factors is not None:
                    ll_ms[m0:m1, s0:s1] = _integrated_log_likelihood(
                        x,
                        ixx,
                        iyy,
                        isx_all[m0:m1, s0:s1],
                        images.mask_overlap[m0:m1],
                        likelihood,
                        xp,
                        prior=part,
                    )
                if part is not None:  # excluded poses never win
                    x = xp.where(part.excluded[:, :, None, :], rdt.type(-np.inf), x)
                if skip_norm:
                    flat = x.reshape(mb, sb, n_d * n_w)
                    arg = xp.argmax(flat, axis=-1)
                    best = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
                    # the very factor the full normalisation gives this pose
                    best *= xp.take_along_axis(inv_norm, (arg % n_w)[..., None], axis=-1)[..., 0]
                    best_ms[m0:m1, s0:s1] = best
                    pose_ms[m0:m1, s0:s1] = arg
                    continue
                cc = x  # normalise in place
                with _errstate(xp):
                    cc *= inv_norm[:, :, None, :]
            if prior is not None:  # excluded poses never win (host: not yet masked)
                excluded = prior.part(m0, m1, s0, s1).excluded
                cc = xp.where(excluded[:, :, None, :], rdt.type(-np.inf), cc)
            flat = cc.reshape(mb, sb, n_d * n_w)
            arg = xp.argmax(flat, axis=-1)
            best_ms[m0:m1, s0:s1] = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
            pose_ms[m0:m1, s0:s1] = arg
            if full is not None:
                full[m0:m1, s0:s1] = cc
            if msw is not None:
                a = xp.argmax(cc, axis=2)
                msw_arg[m0:m1, s0:s1] = a
                msw[m0:m1, s0:s1] = xp.take_along_axis(cc, a[:, :, None, :], axis=2)[:, :, 0, :]
            if msd is not None:
                a = xp.argmax(cc, axis=3)
                msd_arg[m0:m1, s0:s1] = a
                msd[m0:m1, s0:s1] = xp.take_along_axis(cc, a[..., None], axis=3)[..., 0]

    if prior is not None and ll_ms is not None:
        with _errstate(xp):
            ll_ms += prior.log_template
    stats = None
    if comp is not None:
        outs = [best_ms, pose_ms, ll_ms, full, msw, msw_arg, msd, msd_arg]
        stats = _exact_fallback(
            templates, images, outputs, likelihood, prior, workers, work_bytes, bound_ms, outs
        )
    # an image with no allowed pose in this block has -inf (a pose prior): not an error
    bad = ~xp.isfinite(best_ms) if prior is None else xp.isnan(best_ms) | (best_ms == np.inf)
    if bool(xp.any(bad)):
        m_bad, s_bad = (int(v[0]) for v in xp.nonzero(bad))
        raise NonFiniteCrossCorrelationError(
            f"cross-correlation is not finite for image {m_bad} and template {s_bad} of this "
            "block: a template, an image or a CTF has zero norm or non-finite values"
        )
    result = _block_result(
        best_ms, pose_ms, ll_ms, log_prior, n_d, n_w, full, msw, msw_arg, msd, msd_arg
    )
    return result if stats is None else _with_stats(result, stats)


def _with_stats(result: BlockResult, stats: CompressionStats) -> BlockResult:
    """``result`` with its :class:`CompressionStats` attached."""
    object.__setattr__(result, "compression", stats)
    return result


#: Fraction of failing pairs above which the exact fallback recomputes the whole rectangle
#: (failing images × failing templates) in one call instead of template by template.
FALLBACK_RECTANGLE = 0.5


def _take_images(images: PreparedImages, index: Any) -> PreparedImages:
    """The prepared images ``index`` (a copy)."""
    return PreparedImages(
        images.spectrum[:, index],
        images.ctf_power_spectrum[:, index],
        images.ctf[index],
        images.norms[index],
        images.mask_overlap[index],
        images.isotropic_ctf,
    )


def _exact_fallback(
    templates: PreparedTemplates,
    images: PreparedImages,
    outputs: BlockOutputs,
    likelihood: LikelihoodConstants | None,
    prior: _BlockPrior | None,
    workers: int | None,
    work_bytes: int,
    bound_ms: Any,
    outs: list[Any],
) -> CompressionStats:
    """Recompute exactly, into ``outs``, the pairs whose bound exceeds the tolerance.

    ``outs``: ``best_ms, pose_ms, ll_ms, full, msw, msw_arg, msd, msd_arg`` of the block
    (``None`` for what is not computed); the exact spectra of the failing templates are
    rebuilt from the raw templates and translation kernel.
    """
    comp = templates.compressed
    assert comp is not None
    xp = array_module(bound_ms)
    tol = comp.tolerance
    before = float(xp.max(xp.where(xp.isnan(bound_ms), 0.0, bound_ms))) if bound_ms.size else 0.0
    fail = bound_ms > tol  # a NaN bound (zero norm) is reported by the non-finite check
    n_fail = int(xp.sum(fail))
    if n_fail:
        s_fail = xp.nonzero(xp.any(fail, axis=0))[0]
        exact = prepare_templates(
            comp.templates[s_fail],
            comp.translation,
            comp.grid,
            comp.precision,
            workers=workers,
            work_bytes=work_bytes,
        )
        m_any = xp.nonzero(xp.any(fail, axis=1))[0]
        if n_fail >= FALLBACK_RECTANGLE * int(m_any.shape[0]) * int(s_fail.shape[0]):
            groups = [(m_any, xp.arange(int(s_fail.shape[0])))]
        else:
            groups = [
                (xp.nonzero(fail[:, s_fail[k]])[0], xp.arange(k, k + 1))
                for k in range(int(s_fail.shape[0]))
            ]
        for m_idx, k_idx in groups:
            s_idx = s_fail[k_idx]
            sub_prior = None
            if prior is not None:
                rows, cols = m_idx[:, None], s_idx[None, :]
                sub_prior = _BlockPrior(
                    prior.log_template[rows, cols],
                    prior.log_rotation[rows, cols],
                    prior.weight_displacement,
                    prior.excluded[rows, cols],
                )
            sub = correlate_block(
                _take_templates(exact, k_idx),
                _take_images(images, m_idx),
                outputs,
                likelihood=likelihood,
                pose_prior=sub_prior,
                workers=workers,
                work_bytes=work_bytes,
            )
            values = [
                sub.cross_correlation_ms,
                sub.pose_ms,
                sub.log_likelihood_ms,
                sub.cross_correlation_msdw,
                sub.cross_correlation_msw,
                sub.displacement_index_msw,
                sub.cross_correlation_msd,
                sub.rotation_index_msd,
            ]
            rows, cols = m_idx[:, None], s_idx[None, :]
            for target, value in zip(outs, values, strict=True):
                if target is not None:
                    target[rows, cols] = value
            bound_ms[rows, cols] = 0.0
    after = float(xp.max(xp.where(xp.isnan(bound_ms), 0.0, bound_ms))) if bound_ms.size else 0.0
    return CompressionStats(
        tol, comp.work_fraction(), after, before, n_fail, int(bound_ms.size), bound_ms
    )


def _block_result(
    best_ms: Any, pose_ms: Any, ll_ms: Any, log_prior: Any, n_d: int, n_w: int, *rest: Any
) -> BlockResult:
    """The block's optimum over templates, and the log-sum with the templates' log prior."""
    xp = array_module(best_ms)
    n_m, n_s = best_ms.shape
    s_best = xp.argmax(best_ms, axis=1)
    rows = xp.arange(n_m)
    best = best_ms[rows, s_best]
    best_pose = s_best.astype(xp.int64) * (n_d * n_w) + pose_ms[rows, s_best]

    ll_sum = None
    if ll_ms is not None and log_prior is not None:
        prior = xp.asarray(log_prior).astype(best_ms.dtype)
        if prior.shape != (n_s,):
            raise ValueError(f"log_prior must have shape [{n_s}], got {tuple(prior.shape)}")
        ll_sum = logsumexp(ll_ms + prior[None, :], axis=1)
    return BlockResult(best, best_pose, best_ms, pose_ms, ll_ms, ll_sum, *rest)


@dataclass(frozen=True)
class _BlockPrior:
    """A pose prior on the device and in the working precision (see ``correlate_block``).

    ``keep``: indices of the templates some image may take, ``None`` when all may.
    """

    log_template: Any  # [M, S]
    log_rotation: Any  # [M, S, W]
    weight_displacement: Any  # [D], exp(log_displacement)
    excluded: Any  # [M, S, W] bool
    keep: Any = None

    @classmethod
    def of(cls, prior: Any, xp: Any, rdt: Any, shape: tuple[int, int, int], n_d: int):
        if isinstance(prior, _BlockPrior):  # a part already checked and converted
            return prior
        lt = xp.asarray(prior.log_template).astype(rdt)
        lr = xp.asarray(prior.log_rotation).astype(rdt)
        ld = xp.asarray(prior.log_displacement).astype(np.float64)
        if lt.shape != shape[:2] or lr.shape != shape or ld.shape != (n_d,):
            raise ValueError(
                f"pose prior of shapes {tuple(lt.shape)}, {tuple(lr.shape)}, {tuple(ld.shape)}"
                f" for {shape[0]} images, {shape[1]} templates, {n_d} displacements and "
                f"{shape[2]} rotations"
            )
        allowed = xp.isfinite(lt)
        excluded = ~(xp.isfinite(lr) & allowed[:, :, None])
        kept = xp.any(allowed, axis=0)
        keep = None if bool(xp.all(kept)) else xp.nonzero(kept)[0]
        return cls(lt, lr, xp.exp(ld).astype(rdt), excluded, keep)

    def part(self, m0: int, m1: int, s0: int, s1: int) -> _BlockPrior:
        return _BlockPrior(
            self.log_template[m0:m1, s0:s1],
            self.log_rotation[m0:m1, s0:s1],
            self.weight_displacement,
            self.excluded[m0:m1, s0:s1],
        )

    def take(self, index: Any) -> _BlockPrior:
        return _BlockPrior(
            self.log_template[:, index],
            self.log_rotation[:, index],
            self.weight_displacement,
            self.excluded[:, index],
        )


def _take_templates(templates: PreparedTemplates, index: Any) -> PreparedTemplates:
    """The prepared templates ``index`` (a copy)."""
    n_q, n_n = templates.power_spectrum.shape[:2]
    n_d = templates.n_displacements
    spectrum = compressed = None
    if templates.compressed is not None:
        compressed = templates.compressed.take(index)
    else:
        spectrum = templates.spectrum.reshape(n_q, n_n, templates.n_templates, n_d)[:, :, index]
        spectrum = spectrum.reshape(n_q, n_n, -1)
    return PreparedTemplates(
        spectrum,
        templates.power_spectrum[:, :, index],
        templates.mask_weighted[index],
        int(index.shape[0]),
        n_d,
        templates.n_shells,
        templates.n_inplanes,
        compressed=compressed,
    )


def _correlate_subset(
    templates: PreparedTemplates,
    images: PreparedImages,
    outputs: BlockOutputs,
    prior: _BlockPrior,
    likelihood: LikelihoodConstants | None,
    log_prior: Any,
    workers: int | None,
    work_bytes: int,
) -> BlockResult:
    """``correlate_block`` on the templates some image may take; the others get ``-inf``
    cross-correlations and likelihoods."""
    xp = array_module(templates.power_spectrum)
    n_m, n_s = images.n_images, templates.n_templates
    n_d, n_w = templates.n_displacements, templates.n_inplanes
    rdt = np.empty(0, dtype=templates.power_spectrum.dtype).real.dtype
    keep = prior.keep
    neg = rdt.type(-np.inf)
    best_ms = xp.full((n_m, n_s), neg, dtype=rdt)
    pose_ms = xp.zeros((n_m, n_s), dtype=xp.int64)
    ll_ms = xp.full((n_m, n_s), neg, dtype=rdt) if outputs.integrated_likelihood else None
    rest: list[Any] = [
        xp.full((n_m, n_s, n_d, n_w), neg, dtype=rdt) if outputs.full else None,
        xp.full((n_m, n_s, n_w), neg, dtype=rdt) if outputs.per_rotation else None,
        xp.zeros((n_m, n_s, n_w), dtype=xp.int64) if outputs.per_rotation else None,
        xp.full((n_m, n_s, n_d), neg, dtype=rdt) if outputs.per_displacement else None,
        xp.zeros((n_m, n_s, n_d), dtype=xp.int64) if outputs.per_displacement else None,
    ]
    stats = None
    if int(keep.shape[0]):
        sub = correlate_block(
            _take_templates(templates, keep),
            images,
            outputs,
            likelihood=likelihood,
            pose_prior=prior.take(keep),
            workers=workers,
            work_bytes=work_bytes,
        )
        best_ms[:, keep] = sub.cross_correlation_ms
        pose_ms[:, keep] = sub.pose_ms
        if ll_ms is not None:
            ll_ms[:, keep] = sub.log_likelihood_ms
        names = (
            "cross_correlation_msdw",
            "cross_correlation_msw",
            "displacement_index_msw",
            "cross_correlation_msd",
            "rotation_index_msd",
        )
        for k, name in enumerate(names):
            if rest[k] is not None:
                rest[k][:, keep] = getattr(sub, name)
        if sub.compression is not None:  # templates not computed: no error
            bound = xp.zeros((n_m, n_s), dtype=np.float64)
            bound[:, keep] = sub.compression.bound
            stats = replace(sub.compression, pairs=n_m * n_s, bound=bound)
    result = _block_result(best_ms, pose_ms, ll_ms, log_prior, n_d, n_w, *rest)
    return result if stats is None else _with_stats(result, stats)


def _mask_overlap(
    ctf: Any,
    mask_weighted: Any,
    xp: Any,
    workers: int | None = None,
    isotropic: bool = False,
    n_inplanes: int = 1,
) -> Any:
    """``Isx = C @ (ωI · mask · T)ᵀ`` ``[M, S]`` complex, with the real CTF ``[M, N·W]``.

    Two real GEMMs in one (real and imaginary parts side by side) instead of a complex GEMM
    on a complex copy of the CTF: the same products, a fifth of the time. An isotropic CTF
    is constant along the angle, so the masked templates are summed over the angle first
    (``W`` times less work).
    """
    n_m, n_s = ctf.shape[0], mask_weighted.shape[0]
    if isotropic:
        ctf = ctf.reshape(n_m, -1, n_inplanes)[:, :, 0]  # [M, N]
        mask_weighted = mask_weighted.reshape(n_s, -1, n_inplanes).sum(axis=-1)  # [S, N]
    parts = xp.concatenate([mask_weighted.real, mask_weighted.imag], axis=0)  # [2S, N·W]
    ctf = xp.ascontiguousarray(ctf.astype(parts.dtype, copy=False))
    both = matmul(xp, ctf, parts.T, workers=workers)  # [M, 2S]
    return (both[:, :n_s] + 1j * both[:, n_s:]).astype(mask_weighted.dtype, copy=False)


def _likelihood_factors(
    ixx: Any, iyy: Any, isx: Any, isy: Any, constants: LikelihoodConstants
) -> tuple[Any, Any, Any, Any]:
    """``(A [mb,S,W], k/Iss [mb,S], −Iss²/A [mb,S,W], C [mb])`` of the BioEM likelihood.

    With them ``D = (X − k/Iss)² · (−Iss²/A) − C`` per pose (see
    :func:`_integrated_log_likelihood`); ``k = Re(conj(Isx) Isy)``.
    """
    iss = constants.mask_integral
    rdt = ixx.dtype
    a = ixx * iss - (isx.real**2 + isx.imag**2)[:, :, None]  # [mb, S, W]
    k = (isx.real * isy.real[:, None] + isx.imag * isy.imag[:, None]).astype(rdt)
    c = ((isy.real**2 + isy.imag**2) - iyy * iss).astype(rdt)  # [mb]
    with _errstate(array_module(a)):
        scale = rdt.type(-(iss**2)) / a
    return a, k / rdt.type(iss), scale, c


def _log_likelihood_from_sums(
    d0: Any,
    sums: Any,
    a: Any,
    constants: LikelihoodConstants,
    xp: Any,
    log_rotation: Any = None,
) -> Any:
    """``logsumexp_w(−p ln D₀ + ln Σ_d (D₀/D)^p − ½ ln A [+ log prior_w]) + const``,
    ``[mb, S]``; a rotation of log prior ``-inf`` takes no part."""
    p = constants.exponent
    rdt = d0.dtype
    with _errstate(xp):
        per_w = rdt.type(-p) * xp.log(d0) + xp.log(sums) - rdt.type(0.5) * xp.log(a)
        per_w = xp.where(d0 == 0, rdt.type(np.inf), per_w)  # a pose with D = 0: L = +inf
        if log_rotation is not None:
            per_w = xp.where(xp.isfinite(log_rotation), per_w + log_rotation, rdt.type(-np.inf))
    return logsumexp(per_w, axis=-1) + rdt.type(constants.constant)


def _integrated_log_likelihood(
    x: Any,
    ixx: Any,
    iyy: Any,
    isx: Any,
    isy: Any,
    constants: LikelihoodConstants,
    xp: Any,
    prior: _BlockPrior | None = None,
) -> Any:
    """``logsumexp_{d,w}`` of the per-pose BioEM log-likelihood (spec §11); ``[mb, S]``.

    ``x`` is the raw correlation ``[mb, S, D, W]`` (not modified), ``ixx`` ``[mb, S, W]``,
    ``iyy`` ``[mb]``, ``isx`` ``[mb, S]`` and ``isy`` ``[mb]`` complex.

    Per pose ``L = −p ln D − ½ ln A`` with ``D = −(B²/A + C) > 0``, ``B = X·Iss − k``. The
    log-sum over displacements is taken first, for each rotation, without logarithms or
    exponentials of the large tensor: with ``D₀ = min_d D`` (the best displacement),
    ``logsumexp_d(−p ln D) = −p ln D₀ + ln Σ_d (D₀/D)^p`` and every ``(D₀/D)^p ∈ [0, 1]``
    (no overflow). Whole-tensor passes (the device path); on the host :func:`_host_reduce`
    does the same operations chunk by chunk.
    """
    a, shift, scale, c = _likelihood_factors(ixx, iyy, isx, isy, constants)
    rdt = x.dtype
    with _errstate(xp):
        # D = (X − k/Iss)² · (−Iss²/A) − C, in place on one temporary
        t = x - shift[:, :, None, None]
        t *= t
        t *= scale[:, :, None, :]
        t -= c[:, None, None, None]
        d0 = xp.min(t, axis=2)  # [mb, S, W]
        xp.divide(d0[:, :, None, :], t, out=t)
        xp.power(t, rdt.type(constants.exponent), out=t)
        if prior is not None:  # the displacements' prior weights
            t *= prior.weight_displacement[None, None, :, None]
        sums = xp.sum(t, axis=2)  # [mb, S, W]
    log_w = None if prior is None else prior.log_rotation
    return _log_likelihood_from_sums(d0, sums, a, constants, xp, log_w)


#: Elements of ``x`` per chunk of :func:`_host_reduce` (a few such buffers stay in L2).
HOST_CHUNK_ELEMENTS = 2**17


def _power_floor(dtype: Any, exponent: float) -> Any:
    """Smallest ratio kept by :func:`_host_reduce`: ``(tiny / eps)^(1/p)`` of ``dtype``.

    Below it ``(D₀/D)^p < tiny / eps`` (``2⁻¹⁰³`` in single precision): such ratios are raised
    to the floor, whose power is a normal number, because NumPy's vectorised power falls back
    to a scalar path ≈ 50-100 times slower for every element whose result is subnormal or
    zero (most elements when ``p = Npix/2 − 2`` is in the thousands and the likelihood is
    peaked). Each such term then adds at most ``tiny / eps`` to a sum that is at least 1 (the
    ``D₀`` term itself) and whose rounding step is ``eps``: the sums are unchanged.
    """
    fi = np.finfo(np.dtype(dtype))
    return fi.dtype.type(np.exp(np.log(float(fi.tiny) / float(fi.eps)) / exponent))


def _row_filler(rows: np.ndarray, out: np.ndarray, n_d: int) -> Callable[[int, int], None]:
    """``fill(p0, p1)``: the raw correlation of pairs ``p0 … p1`` (their ``D`` rows each)."""

    def fill(p0: int, p1: int) -> None:
        irfft_rows(rows[p0 * n_d : p1 * n_d], out.shape[-1], out[p0 * n_d : p1 * n_d])

    return fill


def _host_reduce(
    x: np.ndarray,
    factors: tuple[Any, Any, Any, Any] | None,
    constants: LikelihoodConstants | None,
    inv_norm: np.ndarray,
    *,
    argmax: str | None,
    workers: int | None,
    prior: _BlockPrior | None = None,
    fill: Callable[[int, int], None] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """Post-GEMM reductions of a NumPy batch in one sweep over cache-sized chunks.

    ``x`` is the raw correlation ``[mb, S, D, W]``. With ``factors``
    (:func:`_likelihood_factors`) and ``constants``: the integrated log-likelihood ``[mb, S]``
    by the operations of :func:`_integrated_log_likelihood`, element for element, but on
    chunks of a few (image, template) pairs that stay in cache instead of eight passes
    through memory, and ``Σ_d (D₀/D)^p`` ``[mb, S, W]``. ``argmax``: ``"raw"`` (isotropic
    CTF: arg-max of ``x``, only the best value normalised), ``"normalised"`` (``x *=
    inv_norm`` in place, then the arg-max) or ``None``; gives the best value and its flat
    ``d·W + w`` ``[mb, S]``. ``prior`` (the block's part of a pose prior): each
    displacement's term weighted, each rotation's log prior added before the log-sum over
    rotations, excluded rotations never the arg-max (``x`` is set to ``-inf`` there; the
    template factor is the caller's). ``fill(p0, p1)``, when given, first writes
    ``x[p0:p1]`` (pairs of the flattened ``[mb·S]``): the inverse FFT runs chunk by chunk
    beside the reductions, in cache. Chunks run on ``workers`` threads. Returns
    ``(best, arg, log_likelihood, sums)``, ``None`` for what was not asked.
    """
    mb, sb, n_d, n_w = x.shape
    n_p = mb * sb
    rdt = x.dtype
    x3 = x.reshape(n_p, n_d, n_w)
    inv_p = np.ascontiguousarray(inv_norm).reshape(n_p, n_w)
    best = np.empty(n_p, rdt) if argmax else None
    arg = np.empty(n_p, np.int64) if argmax else None
    ll = sums = None
    if factors is not None:
        assert constants is not None
        a, shift, scale, c = factors
        a_p = np.ascontiguousarray(a).reshape(n_p, n_w)
        shift_p = np.ascontiguousarray(shift).reshape(n_p)
        scale_p = np.ascontiguousarray(scale).reshape(n_p, n_w)
        c_p = np.repeat(c, sb)
        p = rdt.type(constants.exponent)
        floor = _power_floor(rdt, constants.exponent)
        d0 = np.empty((n_p, n_w), rdt)
        sums = np.empty((n_p, n_w), rdt)
        ll = np.empty(n_p, rdt)
    per = max(1, HOST_CHUNK_ELEMENTS // max(n_d * n_w, 1))
    w_d = lr_p = ex_p = None
    if prior is not None:
        w_d = prior.weight_displacement[None, :, None]
        lr_p = np.ascontiguousarray(prior.log_rotation).reshape(n_p, n_w)
        ex_p = np.ascontiguousarray(prior.excluded).reshape(n_p, n_w)

    def work(lo: int, hi: int) -> None:
        # error state is per thread: set it here (inf/NaN are handled by the caller)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t = np.empty((min(per, hi - lo), n_d, n_w), rdt) if factors is not None else None
            for c0 in range(lo, hi, per):
                c1 = min(hi, c0 + per)
                n = c1 - c0
                if fill is not None:
                    fill(c0, c1)
                xc = x3[c0:c1]
                if factors is not None:
                    tc = t[:n]
                    np.subtract(xc, shift_p[c0:c1, None, None], out=tc)
                    np.multiply(tc, tc, out=tc)
                    np.multiply(tc, scale_p[c0:c1, None, :], out=tc)
                    np.subtract(tc, c_p[c0:c1, None, None], out=tc)
                    np.min(tc, axis=1, out=d0[c0:c1])
                    np.divide(d0[c0:c1, None, :], tc, out=tc)
                    np.maximum(tc, floor, out=tc)
                    np.power(tc, p, out=tc)
                    if w_d is not None:
                        np.multiply(tc, w_d, out=tc)
                    np.sum(tc, axis=1, out=sums[c0:c1])
                if argmax is None:
                    continue
                if ex_p is not None:
                    np.copyto(xc, rdt.type(-np.inf), where=ex_p[c0:c1, None, :])
                if argmax == "normalised":
                    xc *= inv_p[c0:c1, None, :]
                flat = xc.reshape(n, n_d * n_w)
                am = np.argmax(flat, axis=1)
                rows = np.arange(n)
                b = flat[rows, am]
                if argmax == "raw":  # the very factor the full normalisation gives this pose
                    b *= inv_p[c0:c1][rows, am % n_w]
                best[c0:c1] = b
                arg[c0:c1] = am
            if factors is not None:  # rows are independent: same values as one call
                ll[lo:hi] = _log_likelihood_from_sums(
                    d0[lo:hi],
                    sums[lo:hi],
                    a_p[lo:hi],
                    constants,
                    np,
                    None if lr_p is None else lr_p[lo:hi],
                )

    run_ranges(work, n_p, workers)

    def shaped(v: Any, *tail: int) -> Any:
        return None if v is None else v.reshape(mb, sb, *tail)

    return shaped(best), shaped(arg), shaped(ll), shaped(sums, n_w)


class _errstate:
    def __init__(self, xp: Any):
        self._ctx = (
            np.errstate(divide="ignore", invalid="ignore", over="ignore") if xp is np else None
        )

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def decode_pose(pose: Any, n_displacements: int, n_inplanes: int) -> tuple[Any, Any, Any]:
    """Split packed pose indices ``s·D·W + d·W + w`` into ``(s, d, w)``."""
    per_template = n_displacements * n_inplanes
    return pose // per_template, (pose // n_inplanes) % n_displacements, pose % n_inplanes


def encode_pose(
    template: Any, displacement: Any, rotation: Any, n_displacements: int, n_inplanes: int
) -> Any:
    """Pack ``(s, d, w)`` into ``s·D·W + d·W + w`` (int64)."""
    return (template * n_displacements + displacement) * n_inplanes + rotation


def kernel_flops(
    n_images: int, n_templates: int, n_displacements: int, n_shells: int, n_inplanes: int
) -> float:
    """Real flops of the contraction (the dominant term): ``8 M S D N (W/2 + 1)``."""
    return 8.0 * n_images * n_templates * n_displacements * n_shells * n_orders(n_inplanes)


__all__ = [
    "BlockOutputs",
    "BlockResult",
    "NonFiniteCrossCorrelationError",
    "PreparedImages",
    "PreparedTemplates",
    "correlate_block",
    "decode_pose",
    "encode_pose",
    "image_batch_size",
    "kernel_flops",
    "prepare_images",
    "prepare_templates",
]
