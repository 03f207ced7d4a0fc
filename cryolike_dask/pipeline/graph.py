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
from cryolike_dask.pipeline.spec import OutputRequest
from cryolike_dask.precision import Precision


@dataclass(frozen=True)
class BatchGraph:
    """Lazy outputs of one batch, keyed by quantity name (rows of
    :data:`~cryolike_dask.io.outputs.OUTPUTS` selected by the request).

    Attributes
    ----------
    outputs : dict of str to dask.array.Array
        Scope ``image``: ``[M_batch]``; ``template``: ``[M_batch, S]``; ``full``:
        ``[M_batch, S, D, W]``. Images are the batch's blocks, concatenated in order.
    n_kernel_tasks : int
    kernel_name : str
        Key prefix of the kernel tasks (progress counts them).
    """

    outputs: dict[str, da.Array]
    n_kernel_tasks: int
    kernel_name: str


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
    return tasks.finalize_block(settings, reduced)[field_name]


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
    request: OutputRequest,
    *,
    split_every: int = 8,
) -> BatchGraph:
    """Build (lazily) the graph of one batch.

    Parameters
    ----------
    image_ranges : list of (start, stop)
        The image blocks of the batch (any blocks; the outputs concatenate them in order).
    template_ranges : list of (start, stop)
        The template blocks of the structure, covering ``[0, S)`` in order.
    request : OutputRequest
        Which quantities to build (``settings.outputs`` must agree: full tensor, integrated).
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
    out: dict[str, da.Array] = {}
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
        reduced = None
        if request.needs_reduction:
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
        for q in request.quantities:
            dtype = np.int64 if q.kind == "int" else rdt
            label = q.name.replace("_", "-")
            if q.source == "reduction":
                out[q.name] = reduced.map_blocks(
                    _field,
                    settings=settings,
                    field_name=q.name,
                    drop_axis=1,
                    dtype=dtype,
                    meta=np.empty((0,), dtype),
                    name=key("pose-" + label),
                )
            elif q.source == "optimal_likelihood":
                out[q.name] = da.blockwise(
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
                    dtype=dtype,
                    meta=np.empty((0,), dtype),
                    name=key("optimal-ll"),
                )
            elif q.source == "per_template":
                out[q.name] = da.blockwise(
                    _per_template,
                    "it",
                    kernel,
                    "ti",
                    settings=settings,
                    field_name=q.name,
                    adjust_chunks={"i": isizes, "t": tsizes},
                    dtype=dtype,
                    meta=np.empty((0, 0), dtype),
                    name=key(label),
                )
            elif q.source == "full":
                n_d, n_w = settings.n_displacements, settings.parameters.n_inplanes
                out[q.name] = da.blockwise(
                    _full,
                    "itdw",
                    kernel,
                    "ti",
                    new_axes={"d": n_d, "w": n_w},
                    adjust_chunks={"i": isizes, "t": tsizes},
                    dtype=dtype,
                    meta=np.empty((0, 0, 0, 0), dtype),
                    name=key("full-cc"),
                )
            else:  # pragma: no cover - the table and this builder must agree
                raise ValueError(f"no graph for output source {q.source!r} ({q.name})")
    return BatchGraph(out, n_i * n_t, key("cc-kernel"))
