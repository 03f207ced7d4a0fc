"""Functions that Dask runs on workers: load blocks, call kernels, shape their results.

No likelihood math lives here: it only moves data to the right device, keeps per-worker caches
of prepared template and image blocks, and calls :mod:`cryolike_dask.kernels`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from cryolike_dask.errors import write_error
from cryolike_dask.io.outputs import BY_NAME
from cryolike_dask.io.poses import PriorPoses
from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.kernels import (
    BlockOutputs,
    BlockResult,
    LikelihoodConstants,
    correlate_block,
    ctf_polar,
    decode_pose,
    optimal_pose_log_likelihood,
    prepare_images,
    prepare_templates,
    to_host,
    translation_kernel,
)
from cryolike_dask.kernels.reduction import LOG_SUM, POSE, SCORE, pack_partial
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.pipeline import pose_search
from cryolike_dask.precision import Precision

logger = logging.getLogger(__name__)


def _user_error_names() -> set[str]:
    from cryolike_dask.errors import CryoLikeDaskError

    names, todo = set(), [CryoLikeDaskError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class _QuietUserErrors(logging.Filter):
    """Drop a worker's "Compute Failed" log of an expected, user-facing error (bad input):
    the driver reports it as one clean line. Any other failure is logged as usual."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a record we cannot format is none of ours
            return True
        if not msg.startswith("Compute Failed"):
            return True
        return not any(
            f'Exception: "{n}(' in msg or f"Exception: '{n}(" in msg for n in _user_error_names()
        )


class _QuietCancellations(logging.Filter):
    """Drop a worker's warning about a task cancelled because the run stopped (Ctrl-C, an
    error elsewhere): the driver says why the run stopped."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return "ended with CancelledError" not in record.getMessage()
        except Exception:
            return True


def _install_filter() -> None:
    for name, cls in (
        ("distributed.worker", _QuietUserErrors),
        ("distributed.worker.state_machine", _QuietCancellations),
    ):
        log = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in log.filters):
            log.addFilter(cls())


_install_filter()  # runs in every worker process that unpickles a task of this module


@dataclass(frozen=True)
class KernelSettings:
    """Everything a kernel task needs besides its data (small, hashable, pickled into tasks).

    Attributes
    ----------
    parameters : ImageParameters
        Grids, box size and pixel count of the run.
    displacements : tuple of (x, y) pairs
        The displacement grid, Å.
    precision : str
        ``"single"`` or ``"double"``.
    device : str
        ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy).
    outputs : BlockOutputs
        Optional kernel outputs.
    work_bytes : int
        Kernel temporaries budget.
    template_cache_bytes : int
        Per-worker budget for prepared template blocks.
    fft_workers : int or None
        Threads for SciPy's FFT (CPU).
    device_pool_bytes : int or None
        Limit of CuPy's memory pool on each GPU worker (the planned budget).
    pose_prior : PosePriorSpec or None
        Search around each image's prior pose (:mod:`~cryolike_dask.pipeline.pose_search`).
    tolerance : float or None
        Bounded-error mode (``prepare_templates(tolerance=...)``); ``None``: exact.
    """

    parameters: ImageParameters
    displacements: tuple[tuple[float, float], ...]
    precision: str = "single"
    device: str = "cpu"
    outputs: BlockOutputs = field(default_factory=BlockOutputs)
    work_bytes: int = 256 * 2**20
    template_cache_bytes: int = 2 * 2**30
    fft_workers: int | None = None
    device_pool_bytes: int | None = None
    pose_prior: pose_search.PosePriorSpec | None = None
    tolerance: float | None = None

    @property
    def n_displacements(self) -> int:
        return len(self.displacements)

    @property
    def displacement_array(self) -> np.ndarray:
        """float32 ``[2, D]``."""
        return np.asarray(self.displacements, dtype=np.float32).T.copy()

    @property
    def likelihood(self) -> LikelihoodConstants:
        return LikelihoodConstants.for_grid(
            self.parameters.polar_grid, self.parameters.cartesian_grid.n_pixels_total
        )

    def xp(self) -> ModuleType:
        if self.device == "gpu":
            import cupy

            _limit_pool(cupy, self.device_pool_bytes)
            return cupy
        return np


_POOL_LIMIT: dict[str, int | None] = {}
#: Times a kernel call is retried with half the work budget after a GPU out-of-memory error.
OOM_RETRIES = 3


def _limit_pool(cupy: ModuleType, limit: int | None) -> None:
    """Limit CuPy's default memory pool of this worker to ``limit`` bytes (once per value)."""
    if limit and _POOL_LIMIT.get("bytes") != limit:
        cupy.get_default_memory_pool().set_limit(size=int(limit))
        _POOL_LIMIT["bytes"] = limit


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


@dataclass(frozen=True)
class ImageBlock:
    """Raw images ``[start, stop)`` of a source, on the host."""

    start: int
    stop: int
    images: np.ndarray
    lens: dict[str, np.ndarray]
    convention: str
    key: str
    #: The block's prior poses in the template frame (searches around prior poses), with
    #: ``images`` centred on the prior origins when the search asks for it.
    prior: pose_search.BlockPrior | None = None

    @property
    def n_images(self) -> int:
        return self.stop - self.start


def _register_sizes() -> None:
    """Tell Dask how large image blocks and kernel results are (for placement and memory
    accounting; by default an object counts as a few dozen bytes)."""
    from dask.sizeof import sizeof

    @sizeof.register(ImageBlock)
    def _block(block: ImageBlock) -> int:
        prior = 0 if block.prior is None else block.prior.nbytes
        return int(block.images.nbytes + sum(v.nbytes for v in block.lens.values()) + prior)

    @sizeof.register(BlockResult)
    def _result(result: BlockResult) -> int:
        return int(sum(getattr(v, "nbytes", 0) for v in result.__dict__.values()))


_register_sizes()


# ------------------------------------------------------------------------------ caches
class _LRU:
    """A small thread-safe LRU cache bounded by item count and bytes."""

    def __init__(self, max_items: int, max_bytes: int | None = None):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}

    def get_or_create(self, key: Any, make: Any, nbytes: Any) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key][0]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one thread builds a given entry; others wait for it
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    return self._data[key][0]
            value = make()
            size = int(nbytes(value))
            with self._lock:
                self._data[key] = (value, size)
                self._evict()
                self._key_locks.pop(key, None)
            return value

    def _evict(self) -> None:
        while len(self._data) > self.max_items or (
            self.max_bytes is not None
            and len(self._data) > 1
            and sum(s for _, s in self._data.values()) > self.max_bytes
        ):
            self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_TEMPLATE_CACHE = _LRU(max_items=4096)  # bounded by template_cache_bytes
_IMAGE_CACHE = _LRU(max_items=2)
_KERNEL_CACHE = _LRU(max_items=1)  # the run's translation kernel (CPU)
_STATS = {"templates_prepared": 0, "images_prepared": 0, "pairs_skipped": 0}


def _worker_threads() -> int:
    """Threads of the Dask worker running this task (1 outside a worker)."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def cache_stats() -> dict[str, int]:
    """How many template and image blocks this process has prepared (for tests and profiling)."""
    return dict(_STATS)


def clear_caches() -> None:
    """Drop every cached prepared block of this process."""
    _TEMPLATE_CACHE.clear()
    _IMAGE_CACHE.clear()
    _KERNEL_CACHE.clear()


# ------------------------------------------------------------------------------ tasks
def load_image_block(source: ImageSource, start: int, stop: int) -> ImageBlock:
    """Read images ``[start, stop)`` and their lens parameters from ``source``."""
    images, lens = source.read(start, stop)
    key = json.dumps([source.fingerprint(), start, stop], sort_keys=True, default=str)
    return ImageBlock(start, stop, images, lens, getattr(source, "convention", "cryolike"), key)


def pose_block_pairs(
    settings: KernelSettings,
    templates: TemplateSource,
    structure: int,
    source: ImageSource,
    image_ranges: Sequence[tuple[int, int]],
    template_ranges: Sequence[tuple[int, int]],
) -> np.ndarray:
    """bool ``[n_template_blocks, n_image_blocks]``: the pairs a search around prior poses
    computes (:func:`~.pose_search.block_pairs`; the images' priors read from ``source``,
    a few numbers per image). Images without a stored pose keep every pair; the prior task
    refuses them."""
    spec = settings.pose_prior
    assert spec is not None
    parts, ranges, n = [], [], 0
    for a, b in image_ranges:
        poses = source.prior_poses(a, b)
        if poses is None:
            return np.ones((len(template_ranges), len(image_ranges)), dtype=bool)
        parts.append(poses)
        ranges.append((n, n + (b - a)))
        n += b - a
    angles = templates.viewing_angles(structure)
    return pose_search.block_pairs(
        spec,
        PriorPoses.concat(parts),
        np.asarray(angles.azimus, np.float64),
        np.asarray(angles.polars, np.float64),
        template_ranges,
        ranges,
    )


def apply_pose_prior(
    settings: KernelSettings,
    templates: TemplateSource,
    structure: int,
    source: ImageSource,
    block: ImageBlock,
) -> ImageBlock:
    """The block with its prior poses in the template frame (:class:`~.pose_search.BlockPrior`)
    and, when the search uses the prior origins, its images centred on them (each image
    times the phase ramp that moves its content by minus its prior offset)."""
    spec = settings.pose_prior
    assert spec is not None
    poses = source.prior_poses(block.start, block.stop)
    if poses is None:
        from cryolike_dask.pipeline.spec import RunConfigurationError

        raise RunConfigurationError(f"{source.locate(block.start)}: no prior pose stored")
    angles = templates.viewing_angles(structure)
    grid = settings.parameters.polar_grid
    prior = pose_search.block_prior(
        spec,
        poses,
        np.asarray(angles.azimus, np.float64),
        np.asarray(angles.polars, np.float64),
        np.asarray(angles.log_normalized_weights, np.float64),
        grid.theta,
        settings.displacement_array.astype(np.float64),
    )
    images = block.images
    if spec.use_origin and np.any(prior.offset):
        ramp = translation_kernel(
            grid.x_points,
            grid.y_points,
            -prior.offset[:, 0],
            -prior.offset[:, 1],
            settings.parameters.box_size,
        )
        images = (images * ramp).astype(images.dtype, copy=False)
    key = json.dumps([block.key, spec.as_json(), structure], default=str)
    return ImageBlock(block.start, block.stop, images, block.lens, block.convention, key, prior)


def block_ctf(settings: KernelSettings, block: ImageBlock, xp: ModuleType) -> Any:
    """The images' CTF ``[m, N, W]`` on the device of ``xp``, float64."""
    grid = settings.parameters.polar_grid
    lens = block.lens
    return ctf_polar(
        xp.asarray(lens["defocus_u"]),
        xp.asarray(lens["defocus_v"]),
        xp.asarray(lens["defocus_angle"]),
        xp.asarray(lens["phase_shift"]),
        voltage_kv=xp.asarray(lens["voltage"]),
        spherical_aberration_mm=xp.asarray(lens["spherical_aberration"]),
        amplitude_contrast=xp.asarray(lens["amplitude_contrast"]),
        radii=grid.radii,
        theta=grid.theta,
        box_size=settings.parameters.box_size[0],
        convention=block.convention,
    )


def _prepared_templates(
    settings: KernelSettings, templates: TemplateSource, structure: int, t0: int, t1: int
) -> Any:
    key = (
        json.dumps(templates.fingerprint(structure), sort_keys=True),
        structure,
        t0,
        t1,
        settings.displacements,
        settings.precision,
        settings.device,
        settings.tolerance,
    )
    _TEMPLATE_CACHE.max_bytes = settings.template_cache_bytes

    def make() -> Any:
        xp = settings.xp()
        grid = settings.parameters.polar_grid
        kernel = _translation(settings)
        block = xp.asarray(templates.read(structure, t0, t1))
        _STATS["templates_prepared"] += 1
        # the worker's other threads wait for this block: let its FFTs use all of them
        return prepare_templates(
            block,
            kernel,
            grid,
            settings.precision,
            workers=settings.fft_workers or _worker_threads(),
            work_bytes=settings.work_bytes,
            tolerance=settings.tolerance,
        )

    return _TEMPLATE_CACHE.get_or_create(key, make, lambda v: v.nbytes)


def _translation(settings: KernelSettings) -> Any:
    """The translation kernel ``[D, N, W]`` of the run's displacements, in the working
    precision, as a view of an angle-major ``[W, N, D]`` array: the layout
    :func:`prepare_templates` works in, so it needs no transposed copy (68 MB at D = 257).
    Made once per worker process on the CPU (0.8 s at D = 257, N = 129, W = 256) and kept;
    on a GPU it is made per template block (fast there, and GPU memory is planned)."""

    def make() -> Any:
        xp = settings.xp()
        grid = settings.parameters.polar_grid
        d = settings.displacement_array
        kernel = translation_kernel(
            xp.asarray(grid.x_points),
            xp.asarray(grid.y_points),
            xp.asarray(d[0]),
            xp.asarray(d[1]),
            settings.parameters.box_size,
        )
        cdt = Precision.parse(settings.precision).resolve().complex_dtype
        angle_major = xp.ascontiguousarray(kernel.astype(cdt, copy=False).transpose(2, 1, 0))
        return angle_major.transpose(2, 1, 0)

    if settings.device == "gpu":
        return make()
    grid = settings.parameters.polar_grid
    key = (
        settings.displacements,
        settings.parameters.box_size,
        grid.shape,
        tuple(np.asarray(grid.radii, np.float64).tolist()),
        settings.precision,
    )
    return _KERNEL_CACHE.get_or_create(key, make, lambda v: v.nbytes)


def _prepared_images(settings: KernelSettings, block: ImageBlock) -> Any:
    key = (block.key, settings.precision, settings.device)

    def make() -> Any:
        xp = settings.xp()
        _STATS["images_prepared"] += 1
        return prepare_images(
            xp.asarray(block.images),
            block_ctf(settings, block, xp),
            settings.parameters.polar_grid,
            settings.precision,
            workers=settings.fft_workers,
        )

    return _IMAGE_CACHE.get_or_create(key, make, lambda v: v.nbytes)


def correlate_task(
    settings: KernelSettings,
    templates: TemplateSource,
    structure: int,
    t0: int,
    t1: int,
    block: ImageBlock,
) -> BlockResult:
    """Run the block kernel for templates ``[t0, t1)`` of a structure × one image block.

    Returns the :class:`BlockResult` on the host (pose indices local to the template block).
    """
    factors = None
    if block.prior is not None:
        assert settings.pose_prior is not None
        factors = pose_search.kernel_factors(
            settings.pose_prior,
            block.prior,
            t0,
            t1,
            settings.parameters.polar_grid.theta,
            settings.displacement_array.astype(np.float64),
        )
        if not factors.pairs.any():  # no image of the block may take these templates
            _STATS["pairs_skipped"] += 1
            return nothing_allowed(settings, block.n_images, t1 - t0)
    pi = _prepared_images(settings, block)  # first: another thread may be preparing templates
    pt = _prepared_templates(settings, templates, structure, t0, t1)
    log_prior = None
    if settings.outputs.integrated_likelihood:
        log_prior = templates.viewing_angles(structure).log_normalized_weights[t0:t1]
    if factors is not None:
        if settings.device == "gpu":
            xp = settings.xp()
            factors = type(factors)(
                *(xp.asarray(getattr(factors, k)) for k in factors.__dataclass_fields__)
            )
    work = settings.work_bytes
    for attempt in range(OOM_RETRIES + 1):
        try:
            result = correlate_block(
                pt,
                pi,
                settings.outputs,
                likelihood=settings.likelihood,
                log_prior=log_prior,
                pose_prior=factors,
                workers=settings.fft_workers,
                work_bytes=work,
            )
            break
        except Exception as exc:
            if settings.device != "gpu" or not _is_out_of_memory(exc) or attempt == OOM_RETRIES:
                raise
            settings.xp().get_default_memory_pool().free_all_blocks()
            work //= 2
            logger.warning(
                "GPU out of memory in templates %d-%d × images %d-%d; retrying with a work "
                "budget of %d MiB",
                t0,
                t1,
                block.start,
                block.stop,
                work // 2**20,
            )
    stats = result.compression  # bounded-error mode: what the run-time bound did
    if stats is not None and stats.fallback_pairs:
        logger.debug(
            "templates [%d, %d): %d of %d pairs recomputed exactly (bound %.2g > tolerance)",
            t0, t1, stats.fallback_pairs, stats.pairs, stats.max_bound_before_fallback,
        )  # fmt: skip
    values = (getattr(result, f.name) for f in dataclasses.fields(BlockResult))
    return BlockResult(*(None if v is None else to_host(v) for v in values))


def nothing_allowed(settings: KernelSettings, n_m: int, n_s: int) -> BlockResult:
    """The result of a block pair whose every pose the prior excludes (``-inf`` scores and
    likelihoods), without computing anything."""
    rdt = Precision.parse(settings.precision).resolve().real_dtype
    n_d, n_w = settings.n_displacements, settings.parameters.n_inplanes
    out = settings.outputs
    neg = rdt.type(-np.inf)
    ll = out.integrated_likelihood
    return BlockResult(
        np.full(n_m, neg, rdt),
        np.zeros(n_m, np.int64),
        np.full((n_m, n_s), neg, rdt),
        np.zeros((n_m, n_s), np.int64),
        np.full((n_m, n_s), neg, rdt) if ll else None,
        np.full(n_m, neg, rdt) if ll else None,
        np.full((n_m, n_s, n_d, n_w), neg, rdt) if out.full else None,
    )


def check_images(source: ImageSource, start: int, stop: int, max_report: int = 3) -> list[str]:
    """Problems of images ``[start, stop)``: non-finite values or zero norm (each located)."""
    images, lens = source.read(start, stop)
    problems = []
    finite = np.isfinite(images).all(axis=(1, 2))
    norms = np.sum(np.abs(images) ** 2, axis=(1, 2))
    for k in np.flatnonzero(~finite)[:max_report]:
        problems.append(f"{source.locate(start + int(k))} has NaN or infinite values")
    for k in np.flatnonzero(finite & ~(norms > 0))[:max_report]:
        problems.append(f"{source.locate(start + int(k))} is all zeros (zero norm)")
    for name, values in lens.items():
        bad = np.flatnonzero(~np.isfinite(values))[:max_report]
        for k in bad:
            problems.append(f"{source.locate(start + int(k))}: CTF parameter {name} is {values[k]}")
    return problems


def check_templates(
    templates: TemplateSource, structure: int, start: int, stop: int, max_report: int = 3
) -> list[str]:
    """Problems of templates ``[start, stop)`` of a structure: non-finite or zero norm."""
    block = templates.read(structure, start, stop)
    problems = []
    finite = np.isfinite(block).all(axis=(1, 2))
    norms = np.sum(np.abs(block) ** 2, axis=(1, 2))
    name = templates.names[structure]
    for k in np.flatnonzero(~finite)[:max_report]:
        problems.append(f"structure {name!r}: template {start + int(k)} has NaN or infinite values")
    for k in np.flatnonzero(finite & ~(norms > 0))[:max_report]:
        problems.append(f"structure {name!r}: template {start + int(k)} is all zeros")
    return problems


def partial_of(result: BlockResult, t0: int, n_displacements: int, n_inplanes: int) -> np.ndarray:
    """Packed partial ``[m, 3]`` with the pose made global (template offset ``t0``)."""
    pose = result.best_pose + t0 * n_displacements * n_inplanes
    return pack_partial(result.best_cross_correlation, pose, result.log_likelihood_sum)


def finalize_block(
    settings: KernelSettings,
    reduced: np.ndarray,
    prior: pose_search.BlockPrior | None = None,
) -> dict[str, np.ndarray]:
    """Decode reduced partials ``[m, 3]`` into the per-image quantities of the reduction.

    Returns ``{name: [m] array}`` for every ``source == "reduction"`` row of
    :data:`~cryolike_dask.io.outputs.OUTPUTS`: poses in Å and rad, the template index and
    the integrated likelihood (NaN unless it was computed). With the block's ``prior`` (a
    search around prior poses): the likelihood normalised by the prior, the displacement
    made total (prior origin + residual), the window-edge flag and the poses evaluated;
    without it the displacement is the searched (residual) one.
    """
    rdt = Precision.parse(settings.precision).resolve().real_dtype
    n_d = settings.n_displacements
    n_w = settings.parameters.n_inplanes
    pose = reduced[:, POSE].astype(np.int64)
    s, d, w = decode_pose(pose, n_d, n_w)
    disp = settings.displacement_array
    theta = settings.parameters.polar_grid.theta
    ill = reduced[:, LOG_SUM] - (math.log(n_d) + math.log(n_w))
    if not settings.outputs.integrated_likelihood:
        ill = np.full_like(ill, np.nan)
    dx, dy = disp[0, d].astype(np.float64), disp[1, d].astype(np.float64)
    out = {}
    if prior is not None:
        assert settings.pose_prior is not None
        ill = ill - prior.log_normaliser
        dx, dy = pose_search.total_displacement(prior, dx, dy, theta[w])
        out["optimal_pose_on_window_edge"] = pose_search.on_edge(
            settings.pose_prior, prior, s, theta[w], len(theta)
        ).astype(np.int64)
        out["evaluated_poses"] = prior.n_poses.astype(np.int64)
    return {
        "cross_correlation": reduced[:, SCORE].astype(rdt),
        "optimal_template": s.astype(np.int64),
        "optimal_displacement_x": dx.astype(rdt),
        "optimal_displacement_y": dy.astype(rdt),
        "optimal_inplane_rotation": theta[w].astype(rdt),
        "log_likelihood_integrated_fourier": ill.astype(rdt),
        **out,
    }


def optimal_likelihood_task(
    settings: KernelSettings,
    templates: TemplateSource,
    structure: int,
    block: ImageBlock,
    poses: dict[str, np.ndarray],
) -> np.ndarray:
    """Log-likelihood of each image of the block at its optimal pose (spec §12); ``[m]``."""
    xp = settings.xp()
    chosen = xp.asarray(templates.take(structure, poses["optimal_template"]))
    out = optimal_pose_log_likelihood(
        chosen,
        xp.asarray(block.images),
        block_ctf(settings, block, xp),
        xp.asarray(poses["optimal_displacement_x"]),
        xp.asarray(poses["optimal_displacement_y"]),
        xp.asarray(poses["optimal_inplane_rotation"]),
        settings.parameters.polar_grid,
        settings.parameters.box_size,
        settings.parameters.cartesian_grid.n_pixels_total,
        settings.precision,
    )
    return to_host(out.log_likelihood)


def per_template_of(settings: KernelSettings, result: BlockResult, name: str) -> np.ndarray:
    """One ``[m, s]`` per-template quantity of a kernel result (Å and rad for poses).

    ``name`` is a ``scope == "template"`` row of :data:`~cryolike_dask.io.outputs.OUTPUTS`.
    """
    n_w = settings.parameters.n_inplanes
    if name == "per_template_cross_correlation":
        return result.cross_correlation_ms
    if name == "per_template_log_likelihood_integrated_fourier":
        if result.log_likelihood_ms is None:
            raise ValueError("per-template integrated likelihood was not computed")
        return result.log_likelihood_ms
    d, w = result.pose_ms // n_w, result.pose_ms % n_w
    rdt = result.cross_correlation_ms.dtype
    if name == "per_template_optimal_displacement_x":
        return settings.displacement_array[0, d].astype(rdt)
    if name == "per_template_optimal_displacement_y":
        return settings.displacement_array[1, d].astype(rdt)
    if name == "per_template_optimal_inplane_rotation":
        return settings.parameters.polar_grid.theta[w].astype(rdt)
    raise KeyError(name)


def store_image_outputs(
    targets: dict[str, Any],
    settings: KernelSettings,
    structure: int,
    start: int,
    stop: int,
    reduced: np.ndarray | None,
    optimal_ll: np.ndarray | None,
    block: ImageBlock | None = None,
) -> None:
    """Write the per-image quantities of images ``[start, stop)`` of a structure.

    ``targets`` maps quantity names to their ``[structure, image]`` arrays (zarr); values
    come from the reduced partials ``[m, 3]`` (:func:`finalize_block`) and the optimal-pose
    likelihood ``[m]``.
    """
    prior = None if block is None else block.prior
    values = finalize_block(settings, reduced, prior) if reduced is not None else {}
    if optimal_ll is not None:
        values["log_likelihood_optimal_fourier"] = optimal_ll
    region = (slice(structure, structure + 1), slice(start, stop))
    _write_all([(target, region, values[name][None, :]) for name, target in targets.items()])


def store_template_outputs(
    targets: dict[str, Any],
    settings: KernelSettings,
    start: int,
    stop: int,
    t0: int,
    t1: int,
    result: BlockResult,
) -> None:
    """Write the per-template quantities (``[image, template]``) and the full tensor
    (``[image, template, displacement, rotation]``) of one kernel block."""
    writes = []
    for name, target in targets.items():
        if BY_NAME[name].source == "full":
            value = result.cross_correlation_msdw
        else:
            value = per_template_of(settings, result, name)
        writes.append((target, (slice(start, stop), slice(t0, t1)), value))
    _write_all(writes)


_WRITERS: Any = None
_WRITERS_LOCK = threading.Lock()


def _write_all(writes: list[tuple[Any, tuple, np.ndarray]]) -> None:
    """``target[region] = value`` for each write, the arrays written concurrently: each
    zarr write waits on I/O and on zarr's event loop, so several in flight take little more
    than one."""
    global _WRITERS
    if len(writes) <= 1:
        for target, region, value in writes:
            _write(target, region, value)
        return
    with _WRITERS_LOCK:
        if _WRITERS is None:
            from concurrent.futures import ThreadPoolExecutor

            _WRITERS = ThreadPoolExecutor(8, thread_name_prefix="cryolike-dask-store")
    futures = [_WRITERS.submit(_write, target, region, value) for target, region, value in writes]
    for future in futures:
        future.result()  # raises the first failed write's error


def _write(target: Any, region: tuple, value: np.ndarray) -> None:
    """``target[region] = value``; a full disk or another OS error names the array's path
    (a user-facing :class:`~cryolike_dask.errors.DiskFullError` when the disk is full)."""
    try:
        target[region] = value
    except OSError as exc:
        root = getattr(getattr(target, "store", None), "root", None)
        path = f"{root}/{target.path}" if root is not None else str(target)
        raise write_error(exc, path) from None


def export_stack_task(
    results_path: Any,
    layout: Any,
    structure: int,
    stacks: list[tuple[int, Any]],
    quantities: tuple,
    fingerprint: dict,
) -> None:
    """Export stacks ``[(index, StackInfo), ...]``: each one's ``.pt`` files and completion
    record from the results store (a task beside the batches, once every block of those
    stacks is stored)."""
    from cryolike_dask.io.exports import export_stack
    from cryolike_dask.io.zarr_stores import ResultsStore

    results = ResultsStore.open(results_path, mode="r")
    for i_stack, stack in stacks:
        export_stack(results, layout, structure, i_stack, stack, quantities, fingerprint)
