"""The Dask graph of one batch of image blocks for one structure.

::

    load-images[i] ─► cc-kernel[t, i] ─► partial[t, i] ─► best-pose[i]  (tree over t)
                             │                                  │
                             ├─► per-template[i, t] (optional)  ├─► poses[i]
                             └─► full[i, t, d, w]   (optional)  └─► optimal-ll[i] (optional)

Built lazily from block indices only (no data in the graph); the data are read inside the
tasks. Reduction over template blocks uses ``dask.array.reduction`` with the associative
(best, pose, log-sum) monoid, never a blockwise contraction (which would concatenate all
templates into one task).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.kernels.reduction import reduce_packed
from cryolike_dask.pipeline import tasks
from cryolike_dask.precision import Precision

POSE_FIELDS = (
    "cross_correlation",
    "optimal_template",
    "optimal_displacement_x",
    "optimal_displacement_y",
    "optimal_inplane_rotation",
    "log_likelihood_integrated_fourier",
)


@dataclass(frozen=True)
class BatchGraph:
    """Lazy outputs of one batch: per image (1-D over the batch's images), and optional ones.

    Attributes
    ----------
    poses : dict of str to dask.array.Array
        :data:`POSE_FIELDS`, each ``[M_batch]``.
    optimal_likelihood : dask.array.Array or None
        ``[M_batch]``.
    per_template : dict of str to dask.array.Array
        ``[M_batch, S]`` each (empty unless asked for).
    full : dask.array.Array or None
        ``[M_batch, S, D, W]``.
    n_kernel_tasks : int
    """

    poses: dict[str, da.Array]
    optimal_likelihood: da.Array | None
    per_template: dict[str, da.Array]
    full: da.Array | None
    n_kernel_tasks: int


def _one(value: Any, ndim: int) -> np.ndarray:
    out = np.empty((1,) * ndim, dtype=object)
    out[(0,) * ndim] = value
    return out


def _load(chunk: np.ndarray, source: ImageSource, ranges: tuple) -> np.ndarray:
    start, stop = ranges[int(chunk[0])]
    return _one(tasks.load_image_block(source, start, stop), 1)


def _kernel(t_chunk, block_chunk, settings, templates, structure, t_ranges) -> np.ndarray:
    t0, t1 = t_ranges[int(t_chunk[0])]
    return _one(tasks.correlate_task(settings, templates, structure, t0, t1, block_chunk[0]), 2)


def _partial(kernel_chunk, t_chunk, settings, t_ranges) -> np.ndarray:
    t0 = t_ranges[int(t_chunk[0])][0]
    result = kernel_chunk[0, 0]
    packed = tasks.partial_of(result, t0, settings.n_displacements, settings.parameters.n_inplanes)
    return packed[None]


def _identity(x: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return x


def _field(reduced: np.ndarray, settings: tasks.KernelSettings, field_name: str) -> np.ndarray:
    return getattr(tasks.finalize_block(settings, reduced), field_name)


def _optimal_ll(block_chunk, reduced, settings, templates, structure) -> np.ndarray:
    poses = tasks.finalize_block(settings, reduced)
    return tasks.optimal_likelihood_task(settings, templates, structure, block_chunk[0], poses)


def _per_template(kernel_chunk, settings, field_name) -> np.ndarray:
    return tasks.per_template_of(settings, kernel_chunk[0, 0], field_name)


def _full(kernel_chunk) -> np.ndarray:
    return kernel_chunk[0, 0].cross_correlation_msdw


def build_batch_graph(
    settings: tasks.KernelSettings,
    templates: TemplateSource,
    structure: int,
    images: ImageSource,
    image_ranges: list[tuple[int, int]],
    template_ranges: list[tuple[int, int]],
    *,
    optimal_likelihood: bool = False,
    per_template: bool = False,
    split_every: int = 8,
) -> BatchGraph:
    """Build (lazily) the graph of one batch.

    Parameters
    ----------
    image_ranges : list of (start, stop)
        The image blocks of the batch (any blocks; the outputs concatenate them in order).
    template_ranges : list of (start, stop)
        The template blocks of the structure, covering ``[0, S)`` in order.
    optimal_likelihood, per_template : bool
        Optional outputs (the full tensor follows ``settings.outputs.full``).
    split_every : int
        Fan-in of the reduction tree over template blocks.
    """
    rdt = Precision.parse(settings.precision).resolve().real_dtype
    n_i, n_t = len(image_ranges), len(template_ranges)
    isizes = tuple(b - a for a, b in image_ranges)
    tsizes = tuple(b - a for a, b in template_ranges)
    token = tokenize(settings, templates, structure, images, image_ranges, template_ranges)

    def key(layer: str) -> str:  # dashboard groups tasks by this prefix
        return f"{layer}-{token}"

    i_idx = da.arange(n_i, chunks=1)
    t_idx = da.arange(n_t, chunks=1)
    obj1, obj2 = np.empty((0,), object), np.empty((0, 0), object)
    with warnings.catch_warnings():
        # an outer product of blocks multiplies the chunk count on purpose
        warnings.simplefilter("ignore", da.PerformanceWarning)
        blocks = da.map_blocks(
            _load,
            i_idx,
            source=images,
            ranges=tuple(image_ranges),
            dtype=object,
            meta=obj1,
            name=key("load-images"),
        )
        kernel = da.blockwise(
            _kernel,
            "ti",
            t_idx,
            "t",
            blocks,
            "i",
            settings=settings,
            templates=templates,
            structure=structure,
            t_ranges=tuple(template_ranges),
            dtype=object,
            meta=obj2,
            name=key("cc-kernel"),
        )
        partials = da.blockwise(
            _partial,
            "tif",
            kernel,
            "ti",
            t_idx,
            "t",
            settings=settings,
            t_ranges=tuple(template_ranges),
            new_axes={"f": 3},
            adjust_chunks={"i": isizes},
            align_arrays=False,
            dtype=np.float64,
            meta=np.empty((0, 0, 0)),
            name=key("partial"),
        )
        reduced = da.reduction(
            partials,
            chunk=_identity,
            combine=reduce_packed,
            aggregate=reduce_packed,
            axis=0,
            split_every=split_every,
            dtype=np.float64,
            concatenate=True,
            meta=np.empty((0, 0)),
            name=key("best-pose"),
        )
        poses = {}
        for name in POSE_FIELDS:
            dtype = np.int64 if name == "optimal_template" else rdt
            poses[name] = reduced.map_blocks(
                _field,
                settings=settings,
                field_name=name,
                drop_axis=1,
                dtype=dtype,
                meta=np.empty((0,), dtype),
                name=key("pose-" + name.replace("_", "-")),
            )
        opt = None
        if optimal_likelihood:
            opt = da.blockwise(
                _optimal_ll,
                "i",
                blocks,
                "i",
                reduced,
                "if",
                settings=settings,
                templates=templates,
                structure=structure,
                adjust_chunks={"i": isizes},
                align_arrays=False,
                concatenate=True,
                dtype=rdt,
                meta=np.empty((0,), rdt),
                name=key("optimal-ll"),
            )
        extra = {}
        if per_template:
            names = [
                "cross_correlation",
                "optimal_displacement_x",
                "optimal_displacement_y",
                "optimal_inplane_rotation",
            ]
            if settings.outputs.integrated_likelihood:
                names.append("log_likelihood_integrated_fourier")
            for name in names:
                extra[name] = da.blockwise(
                    _per_template,
                    "it",
                    kernel,
                    "ti",
                    settings=settings,
                    field_name=name,
                    adjust_chunks={"i": isizes, "t": tsizes},
                    dtype=rdt,
                    meta=np.empty((0, 0), rdt),
                    name=key("per-template-" + name.replace("_", "-")),
                )
        full = None
        if settings.outputs.full:
            n_d, n_w = settings.n_displacements, settings.parameters.n_inplanes
            full = da.blockwise(
                _full,
                "itdw",
                kernel,
                "ti",
                new_axes={"d": n_d, "w": n_w},
                adjust_chunks={"i": isizes, "t": tsizes},
                dtype=rdt,
                meta=np.empty((0, 0, 0, 0), rdt),
                name=key("full-cc"),
            )
    return BatchGraph(poses, opt, extra, full, n_i * n_t)
