"""The Dask graph of one batch of image blocks for one structure.

::

    load-images[i] ─► cc-kernel[t, i] ─► best-pose[i]  (over t, a tree past split_every)
                             │                │
                             │                ├─► optimal-ll[i]      (optional)
                             │                └─► store-images[i]    (the driver's writes)
                             └─► store-templates[t, i] (per-template / full tensor, optional)

Built lazily from block indices only (no data in the graph); the data are read inside the
tasks. The reduction over template blocks uses the associative (best, pose, log-sum) monoid
of :mod:`cryolike_dask.kernels.reduction`; its leaves take the kernel results directly, so a
block costs one load, one kernel per template block, one reduction and one store task (seven
tasks for four template blocks), which keeps the scheduler's per-task cost small at many
workers.

:func:`build_batch_graph` gives the lazy outputs (dask arrays, what
:func:`cryolike_dask.likelihood` returns); :func:`store_units` adds the tasks that write a
batch's outputs straight into the results store, one per image block, without
materialising the output arrays as dask chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.kernels.reduction import reduce_packed
from cryolike_dask.pipeline import tasks
from cryolike_dask.pipeline.spec import OutputRequest
from cryolike_dask.precision import Precision


@dataclass(frozen=True)
class BatchGraph:
    """One batch: its task graph and its lazy outputs, keyed by quantity name (rows of
    :data:`~cryolike_dask.io.outputs.OUTPUTS` selected by the request).

    Attributes
    ----------
    n_kernel_tasks : int
    kernel_name : str
        Key prefix of the kernel tasks (progress counts them).
    graph : HighLevelGraph
        Loads, kernels, reduction and optimal-pose likelihood (no output layers).
    names : dict of str to str
        Layer names: ``load``, ``kernel``, ``reduced``, ``optimal_ll`` (when requested).
    image_ranges, template_ranges : tuple of (start, stop)
        The batch's image blocks and the structure's template blocks.
    settings : KernelSettings
    structure : int
    request : OutputRequest
    """

    n_kernel_tasks: int
    kernel_name: str
    graph: HighLevelGraph
    names: dict[str, str]
    image_ranges: tuple[tuple[int, int], ...]
    template_ranges: tuple[tuple[int, int], ...]
    settings: tasks.KernelSettings
    structure: int
    request: OutputRequest

    @functools.cached_property
    def outputs(self) -> dict[str, da.Array]:
        """The lazy outputs (dask arrays), built on first use (the driver stores through
        :func:`store_units` and never needs them). Scope ``image``: ``[M_batch]``;
        ``template``: ``[M_batch, S]``; ``full``: ``[M_batch, S, D, W]``. Images are the
        batch's blocks, concatenated in order."""
        return _lazy_outputs(
            self.graph,
            self.names,
            self.settings,
            self.request,
            self.image_ranges,
            self.template_ranges,
        )

    @property
    def n_tasks(self) -> int:
        """Tasks of the batch's own layers (loads, kernels, reduction, optimal likelihood)."""
        return sum(len(layer) for layer in self.graph.layers.values())


# ------------------------------------------------------------------------------ task bodies
# Module-level functions that look ``tasks.*`` up when they run, so the graph holds names,
# not data, and a benchmark may replace a task body in-process.
def _load(source: ImageSource, start: int, stop: int) -> tasks.ImageBlock:
    return tasks.load_image_block(source, start, stop)


def _prior(settings, templates, structure, images, block) -> tasks.ImageBlock:
    return tasks.apply_pose_prior(settings, templates, structure, images, block)


def _kernel(settings, templates, structure, t0, t1, block) -> Any:
    return tasks.correlate_task(settings, templates, structure, t0, t1, block)


def _nothing_allowed(settings, n_m: int, n_s: int) -> Any:
    return tasks.nothing_allowed(settings, n_m, n_s)


def _reduce_kernels(results: list, t_starts: tuple[int, ...], n_d: int, n_w: int) -> np.ndarray:
    """Packed partial ``[m, 3]`` of several kernel results (template offsets ``t_starts``)."""
    packed = [tasks.partial_of(r, t0, n_d, n_w) for r, t0 in zip(results, t_starts, strict=True)]
    return reduce_packed(np.stack(packed))


def _combine(packed: list[np.ndarray]) -> np.ndarray:
    return reduce_packed(np.stack(packed))


def _optimal_ll(block, reduced, settings, templates, structure) -> np.ndarray:
    poses = tasks.finalize_block(settings, reduced)
    return tasks.optimal_likelihood_task(settings, templates, structure, block, poses)


def _field(reduced: np.ndarray, settings: tasks.KernelSettings, field_name: str) -> np.ndarray:
    return tasks.finalize_block(settings, reduced)[field_name]


def _field_of_prior_block(
    reduced: np.ndarray, blocks: Any, settings: tasks.KernelSettings, field_name: str
) -> np.ndarray:
    """``_field`` of a search around prior poses: the block's prior decodes too."""
    block = blocks[0] if isinstance(blocks, (list, np.ndarray)) else blocks
    return tasks.finalize_block(settings, reduced, block.prior)[field_name]


def _per_template(result, settings, field_name) -> np.ndarray:
    return tasks.per_template_of(settings, result, field_name)


def _full(result) -> np.ndarray:
    return result.cross_correlation_msdw


def _noop(*args: Any) -> None:
    return None


#: Scheduler priority of the tasks that finish a block (reduction, optimal-pose likelihood,
#: stores): ahead of queued loads and kernels, so that a block's results are written, and
#: its kernel results freed, as soon as they exist; side tasks (exports) come next
#: (:data:`~cryolike_dask.pipeline.executor.SIDE_PRIORITY`).
FINISHING_PRIORITY = 2


def _finishing(tasks_of_layer: dict, more: dict | None = None) -> MaterializedLayer:
    annotations = {"priority": FINISHING_PRIORITY, **(more or {})}
    return MaterializedLayer(tasks_of_layer, annotations=annotations)


# ------------------------------------------------------------------------------ the graph
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
    kernel_resources: dict[str, int] | None = None,
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
        Fan-in of the reduction tree over template blocks (≥ 2).
    kernel_resources : dict, optional
        Worker resources each kernel (and optimal-pose likelihood) task takes, e.g.
        ``{"GPU": 1}`` (:func:`~cryolike_dask.pipeline.cluster.kernel_resources`): one per
        GPU at a time, the worker's other threads free for loads and stores.
    """
    image_ranges = tuple((int(a), int(b)) for a, b in image_ranges)
    template_ranges = tuple((int(a), int(b)) for a, b in template_ranges)
    split_every = max(2, int(split_every))
    n_i, n_t = len(image_ranges), len(template_ranges)
    token = tokenize(settings, templates, structure, images, image_ranges, template_ranges)

    def key(layer: str) -> str:  # dashboard groups tasks by this prefix
        return f"{layer}-{token}"

    names = {"load": key("load-images"), "kernel": key("cc-kernel"), "reduced": key("best-pose")}
    layers: dict[str, dict] = {}
    deps: dict[str, set[str]] = {}
    load, kern = names["load"], names["kernel"]
    layers[load] = {(load, i): (_load, images, a, b) for i, (a, b) in enumerate(image_ranges)}
    deps[load] = set()
    block = load  # the layer whose tasks give the image blocks the kernels take
    if settings.pose_prior is not None:  # prior poses in the template frame, images centred
        block = names["prior"] = key("pose-prior")
        layers[block] = {
            (block, i): (_prior, settings, templates, structure, images, (load, i))
            for i in range(n_i)
        }
        deps[block] = {load}
    on_device = {"resources": kernel_resources} if kernel_resources else None
    # a search around prior poses computes only the pairs some image's window reaches; the
    # others are left out (or, where per-template outputs need every pair, a task that makes
    # the empty result without loading anything)
    pairs = np.ones((n_t, n_i), dtype=bool)
    if settings.pose_prior is not None:
        pairs = tasks.pose_block_pairs(
            settings, templates, structure, images, image_ranges, template_ranges
        )
        pairs[0, ~pairs.any(axis=0)] = True  # (never: each image keeps its nearest template)
    kernel_layer: dict = {}
    for t, (t0, t1) in enumerate(template_ranges):
        for i, (a, b) in enumerate(image_ranges):
            if pairs[t, i]:
                kernel_layer[(kern, t, i)] = (
                    _kernel, settings, templates, structure, t0, t1, (block, i)
                )  # fmt: skip
            elif request.per_template or request.full:
                kernel_layer[(kern, t, i)] = (_nothing_allowed, settings, b - a, t1 - t0)
    layers[kern] = MaterializedLayer(kernel_layer, annotations=on_device)
    deps[kern] = {block}
    n_d, n_w = settings.n_displacements, settings.parameters.n_inplanes
    if request.needs_reduction:
        _reduction_layers(names, layers, deps, key, template_ranges, pairs, n_d, n_w, split_every)
    if request.optimal_likelihood:
        opt, red = key("optimal-ll"), names["reduced"]
        names["optimal_ll"] = opt
        layers[opt] = _finishing(
            {
                (opt, i): (_optimal_ll, (block, i), (red, i, 0), settings, templates, structure)
                for i in range(n_i)
            },
            on_device,
        )
        deps[opt] = {block, red}
    graph = HighLevelGraph(layers, deps)
    return BatchGraph(
        len(kernel_layer),
        kern,
        graph,
        names,
        image_ranges,
        template_ranges,
        settings,
        structure,
        request,
    )


def _reduction_layers(names, layers, deps, key, template_ranges, pairs, n_d, n_w, split_every):
    """``best-pose[i, 0]``: the packed partial over the template blocks of image block ``i``
    that the graph computes (``pairs [n_t, n_i]``, every one for a global search); the
    leaves reduce up to ``split_every`` kernel results each, upper levels combine
    ``split_every`` partials, so one task per block when ``n_t ≤ split_every``."""
    kern, final = names["kernel"], names["reduced"]
    levels: list[dict] = []
    for i in range(pairs.shape[1]):
        present = [int(t) for t in np.flatnonzero(pairs[:, i])]
        groups = [present[a : a + split_every] for a in range(0, len(present), split_every)]
        level, below = 0, kern
        while True:
            last = len(groups) == 1
            if not last and len(levels) <= level:
                levels.append({})
            layer = layers.setdefault(final, {}) if last else levels[level]
            name = final if last else f"{final}-level{level}"
            for g, members in enumerate(groups):
                out_key = (name, i, 0) if last else (name, g, i)
                if level == 0:
                    starts = tuple(template_ranges[t][0] for t in members)
                    inputs = [(kern, t, i) for t in members]
                    layer[out_key] = (_reduce_kernels, inputs, starts, n_d, n_w)
                else:
                    layer[out_key] = (_combine, [(below, t, i) for t in members])
            if last:
                break
            n_groups = len(groups)
            groups = [
                list(range(a, min(n_groups, a + split_every)))
                for a in range(0, n_groups, split_every)
            ]
            below, level = name, level + 1
    for level, layer in enumerate(levels):
        name = f"{final}-level{level}"
        layers[name] = _finishing(layer)
        deps[name] = {kern if level == 0 else f"{final}-level{level - 1}"}
    layers[final] = _finishing(layers[final])
    deps[final] = {kern} | {f"{final}-level{level}" for level in range(len(levels))}


def _lazy_outputs(
    graph: HighLevelGraph,
    names: dict[str, str],
    settings: tasks.KernelSettings,
    request: OutputRequest,
    image_ranges: tuple[tuple[int, int], ...],
    template_ranges: tuple[tuple[int, int], ...],
) -> dict[str, da.Array]:
    """The requested quantities as dask arrays over the batch's graph (for the lazy API)."""
    rdt = Precision.parse(settings.precision).resolve().real_dtype
    n_i, n_t = len(image_ranges), len(template_ranges)
    isizes = tuple(b - a for a, b in image_ranges)
    tsizes = tuple(b - a for a, b in template_ranges)
    obj2 = np.empty((0, 0), object)
    kernel = da.Array(graph, names["kernel"], chunks=((1,) * n_t, (1,) * n_i), meta=obj2)
    reduced = None
    if request.needs_reduction:
        reduced = da.Array(graph, names["reduced"], chunks=(isizes, (3,)), dtype=np.float64)
    out: dict[str, da.Array] = {}
    for q in request.quantities:
        dtype = np.int64 if q.kind == "int" else rdt
        label = q.name.replace("_", "-")
        name = f"{label}-{tokenize(names['kernel'], q.name)}"
        if q.source == "reduction" and "prior" in names:  # the block's prior decodes too
            blocks = da.Array(graph, names["prior"], chunks=(isizes,), meta=np.empty(0, object))
            out[q.name] = da.blockwise(
                _field_of_prior_block,
                "i",
                reduced,
                "ij",
                blocks,
                "i",
                concatenate=True,
                settings=settings,
                field_name=q.name,
                dtype=dtype,
                meta=np.empty((0,), dtype),
                name=name,
            )
        elif q.source == "reduction":
            out[q.name] = reduced.map_blocks(
                _field,
                settings=settings,
                field_name=q.name,
                drop_axis=1,
                dtype=dtype,
                meta=np.empty((0,), dtype),
                name=name,
            )
        elif q.source == "optimal_likelihood":
            out[q.name] = da.Array(graph, names["optimal_ll"], chunks=(isizes,), dtype=dtype)
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
                name=name,
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
                name=name,
            )
        else:  # pragma: no cover - the table and this builder must agree
            raise ValueError(f"no graph for output source {q.source!r} ({q.name})")
    return out


# ------------------------------------------------------------------------------ store tasks
def store_units(
    graph: BatchGraph,
    request: OutputRequest,
    targets: dict[str, Any],
    units: list[list[int]],
) -> list[Delayed]:
    """Tasks that write the batch's outputs into the results store; one ``Delayed`` per
    unit (a list of indices into the batch's image blocks) that finishes when every output of
    its blocks is written.

    ``targets`` maps each requested quantity's name to its array (a ``zarr.Array``): for
    scope ``image`` the ``[structure, image]`` array, otherwise the structure's own array.
    Every write covers whole chunks (the store is chunked by the plan's blocks), so tasks
    never write the same chunk.
    """
    names = graph.names
    k = graph.structure
    per_image = [q for q in request.quantities if q.scope == "image"]
    per_block = [q for q in request.quantities if q.scope != "image"]
    token = tokenize(graph.kernel_name, {n: str(t) for n, t in targets.items()}, units)
    s_img, s_tpl, done = (f"{p}-{token}" for p in ("store-images", "store-templates", "stored"))
    layers: dict[str, dict] = {}
    deps: dict[str, set[str]] = {}
    image_targets = {q.name: targets[q.name] for q in per_image}
    block_targets = {q.name: targets[q.name] for q in per_block}
    if per_image:
        layer = {}
        for i, (a, b) in enumerate(graph.image_ranges):
            reduced = (names["reduced"], i, 0) if request.needs_reduction else None
            optimal = (names["optimal_ll"], i) if "optimal_ll" in names else None
            prior = (names["prior"], i) if "prior" in names else None
            layer[(s_img, i)] = (
                tasks.store_image_outputs,
                image_targets,
                graph.settings,
                k,
                a,
                b,
                reduced,
                optimal,
                prior,
            )
        layers[s_img] = _finishing(layer)
        deps[s_img] = {names[n] for n in ("reduced", "optimal_ll", "prior") if n in names}
    if per_block:
        layers[s_tpl] = _finishing(
            {
                (s_tpl, t, i): (
                    tasks.store_template_outputs,
                    block_targets,
                    graph.settings,
                    a,
                    b,
                    t0,
                    t1,
                    (names["kernel"], t, i),
                )
                for t, (t0, t1) in enumerate(graph.template_ranges)
                for i, (a, b) in enumerate(graph.image_ranges)
            }
        )
        deps[s_tpl] = {names["kernel"]}
    n_t = len(graph.template_ranges)
    keys_of_unit = []
    for unit in units:
        ks = [(s_img, i) for i in unit] if per_image else []
        if per_block:
            ks += [(s_tpl, t, i) for i in unit for t in range(n_t)]
        keys_of_unit.append(ks)
    marker = {(done, u): (_noop, *ks) for u, ks in enumerate(keys_of_unit) if len(ks) > 1}
    if marker:
        layers[done] = _finishing(marker)
        deps[done] = set(layers) - {done}
    hlg = HighLevelGraph.merge(graph.graph, HighLevelGraph(layers, deps))
    out = []
    for u, ks in enumerate(keys_of_unit):
        key = (done, u) if len(ks) > 1 else ks[0]
        out.append(Delayed(key, hlg, layer=key[0]))
    return out
