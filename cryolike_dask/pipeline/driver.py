"""The resumable driver: an executor over the likelihood graph, writing ``results.zarr`` and
CryoLike's ``.pt`` layout.

For each structure the driver splits the pending image blocks into batches (at most
``max_tasks`` kernel tasks per graph), builds the batch's graph (the same graph
:func:`cryolike_dask.likelihood` returns lazily), stores each block's outputs into its region
of the results store and, as each block finishes, marks it done (the driver is the only writer
of the done mask) and exports every stack whose blocks are all done, with a completion record.
A rerun with ``skip_exist`` skips done blocks and verified stacks, so a run killed part-way
resumes where it stopped and ends with the same outputs.

An output folder holding results of another run (other inputs or settings) is refused unless
``overwrite``, which removes every output of the earlier run first: the results of two runs
never mix in one folder.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np

from cryolike_dask.io.cryolike import OutputLayout
from cryolike_dask.io.exports import export_stack, verify_stack, write_displacements
from cryolike_dask.io.locks import output_lock
from cryolike_dask.io.zarr_stores import ResultsStore, StoreError
from cryolike_dask.kernels import BlockOutputs
from cryolike_dask.pipeline import plan as planning
from cryolike_dask.pipeline._progress import Progress
from cryolike_dask.pipeline._size_guard import check_confirmed
from cryolike_dask.pipeline.cluster import (
    ClusterOptions,
    WorkerInfo,
    describe_workers,
    get_client,
    gpu_workers,
    kernel_resources,
    resolve_device,
    worker_memory,
)
from cryolike_dask.pipeline.executor import Batch, Executor
from cryolike_dask.pipeline.graph import build_batch_graph, store_units
from cryolike_dask.pipeline.pose_search import outside_window
from cryolike_dask.pipeline.spec import (
    InputDataError,
    LikelihoodRun,
    OutputRequest,
    RunConfigurationError,
    differences,
    fingerprint,
    same_run,
    validate,
)
from cryolike_dask.pipeline.tasks import KernelSettings, export_stack_task
from cryolike_dask.precision import Precision

RESULTS_NAME = "results.zarr"
#: At most this many separately tracked units (progress, done marks) per batch.
MAX_UNITS_PER_BATCH = 256
#: Batches submitted at once: the next is built and submitted while the current one runs.
BATCHES_IN_FLIGHT = 2
#: Done marks are written at most this often (and at the end of every batch, and on a
#: failure or an interruption): a run killed in between recomputes those blocks on resume,
#: with the same results.
DONE_FLUSH_SECONDS = 10.0
#: Stacks one export task writes (the driver submits one task per few stacks, not per stack).
STACKS_PER_EXPORT_TASK = 8

logger = logging.getLogger(__name__)


class OutputFolderInUseError(RunConfigurationError):
    """The output folder holds results of another run (refused without ``overwrite``)."""


@dataclass
class RunReport:
    """What a run did, with timings."""

    plan: planning.BlockPlan | None = None
    blocks_computed: int = 0
    blocks_skipped: int = 0
    stacks_exported: int = 0
    stacks_skipped: int = 0
    kernel_tasks: int = 0
    graphs: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0
    pose_evaluations: float = 0.0
    dashboard_link: str | None = None
    removed: list[str] = dataclasses.field(default_factory=list)

    @property
    def poses_per_second(self) -> float:
        return self.pose_evaluations / self.compute_seconds if self.compute_seconds else 0.0


def kernel_settings(
    run: LikelihoodRun, template_cache: int, device_pool: int | None = None
) -> KernelSettings:
    """The settings every kernel task of ``run`` carries (``device_pool``: CuPy's pool limit
    on each GPU worker)."""
    request = run.request
    disp = run.displacements
    return KernelSettings(
        parameters=run.templates.parameters,
        displacements=tuple(zip(disp.x.tolist(), disp.y.tolist(), strict=True)),
        precision=Precision.parse(run.precision).resolve().value,
        device=run.device,
        outputs=BlockOutputs(full=request.full, integrated_likelihood=request.integrated),
        work_bytes=run.work_bytes,
        template_cache_bytes=template_cache,
        device_pool_bytes=device_pool,
        pose_prior=run.pose_prior,
        tolerance=run.tolerance,
    )


def _cache_and_pool(
    run: LikelihoodRun, plan: planning.BlockPlan, budget: int
) -> tuple[int, int | None]:
    """Bytes of prepared template blocks a worker caches, and CuPy's pool limit. On a GPU the
    cache lives in the pool beside the running task, so it keeps about one block."""
    if run.device == "gpu":
        return budget // 4, budget
    return max(budget // 2, plan.task_bytes), None


#: Images per block of a search around prior poses (unless given): with particles sorted
#: by direction, a block then needs the templates of a small patch of the sphere only.
LOCAL_IMAGES_PER_BLOCK = 64


def plan_run(
    run: LikelihoodRun,
    client: Any,
    memory_bytes: int | None = None,
    workers: list[WorkerInfo] | None = None,
    **fixed: Any,
):
    """The block plan of ``run`` for the workers of ``client`` (``fixed`` block sizes kept);
    returns ``(plan, memory budget per task)``. ``workers`` as :func:`describe_workers` gives
    them (asked when omitted)."""
    grid = run.parameters.polar_grid
    if client is not None and workers is None:
        workers = describe_workers(client)
    budget = memory_bytes or worker_memory(client, run.device, workers)
    threads = sum(w.kernel_slots for w in workers) if workers else 1
    images_per_block = fixed.get("images_per_block", run.images_per_block)
    if images_per_block is None and run.pose_prior is not None:
        # a block's images share few directions (sorted particles): few templates per block
        images_per_block = min(run.images.n_images, LOCAL_IMAGES_PER_BLOCK)
    return planning.plan_blocks(
        run.images.n_images,
        max(run.templates.n_templates(k) for k in run.structures),
        grid.n_shells,
        grid.n_inplanes,
        run.displacements.n_displacements,
        complex_bytes=Precision.parse(run.precision).resolve().complex_dtype.itemsize,
        memory_bytes=budget,
        templates_per_block=fixed.get("templates_per_block", run.templates_per_block),
        images_per_block=images_per_block,
        full=run.request.full,
        work_bytes=run.work_bytes,
        max_tasks=run.max_tasks,
        split_every=run.split_every,
        min_tasks=2 * threads,
        device=run.device,
    ), budget


def describe_cost(run: LikelihoodRun, threads: int) -> str:
    """Pose evaluations of the run and the time they take at this machine's measured rate."""
    from cryolike_dask.kernels.backend import gemm_rate
    from cryolike_dask.kernels.cross_correlation import kernel_flops

    grid = run.parameters.polar_grid
    n_t = sum(run.templates.n_templates(k) for k in run.structures)
    poses = run.pose_evaluations()
    flops = kernel_flops(
        run.images.n_images, n_t, run.displacements.n_displacements, grid.n_shells, grid.n_inplanes
    )
    text = (
        f"{run.images.n_images} images × {n_t} templates × {run.displacements.n_displacements} "
        f"displacements × {grid.n_inplanes} rotations = {poses:.3g} pose evaluations"
    )
    if run.device == "cpu":
        # the kernel runs at ~40 % of the complex GEMM rate (docs/performance.md)
        seconds = flops / (0.4 * gemm_rate() * max(1, threads))
        text += f"; ~{_duration(seconds)} on {threads} CPU thread(s) at this machine's GEMM rate"
    return text


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# ------------------------------------------------------------------------------ size guard
def output_bytes(run: LikelihoodRun) -> int:
    """Bytes the run writes (``results.zarr`` and, when exported, the ``.pt`` copies)."""
    m = run.images.n_images
    r = Precision.parse(run.precision).resolve().real_dtype.itemsize
    total = 0
    for q in run.request.quantities:
        size = 8 if q.kind == "int" else r
        if q.scope == "image":
            total += len(run.templates.names) * m * size
            continue
        for k in run.structures:
            n = m * run.templates.n_templates(k) * size
            if q.scope == "full":
                n *= run.displacements.n_displacements * run.parameters.n_inplanes
            total += n
    return total * (2 if run.export_pt else 1)


def check_sizes(run: LikelihoodRun, plan: planning.BlockPlan, budget: int, state: str) -> None:
    """Refuse, with the numbers, a run whose single task cannot fit a worker or whose outputs
    cannot fit the disk (before anything is written)."""
    if plan.task_bytes > budget / 0.8:  # the budget keeps a 20 % margin
        raise RunConfigurationError(
            f"one kernel task of {plan.image_block} image(s) × {plan.template_block} "
            f"template(s) needs ~{plan.task_bytes / 2**30:.2f} GiB but a worker thread has "
            f"~{budget / 0.8 / 2**30:.2f} GiB: use fewer displacements "
            f"({run.displacements.n_displacements} now), or workers with more memory"
        )
    need = output_bytes(run)
    out = Path(run.output)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if state == "replace":
        free += sum(_size(p) for p in OutputLayout(out).run_outputs())
    if need > free:
        raise RunConfigurationError(
            f"{out}: the outputs need ~{need / 2**30:.2f} GiB but {probe} has "
            f"{free / 2**30:.2f} GiB free (drop --full-cross-correlation or --per-template, "
            "or --no-pt, or choose another disk)"
        )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ output folder
def check_output_folder(run: LikelihoodRun, fp: dict) -> str:
    """What to do with the output folder: ``"new"``, ``"same"`` (results of this run) or
    ``"replace"`` (``overwrite``); raises :class:`OutputFolderInUseError` otherwise."""
    out = Path(run.output)
    existing = OutputLayout(out).run_outputs()
    if not existing:
        return "new"
    if run.overwrite:
        return "replace"
    path = out / RESULTS_NAME
    hint = (
        "pass --overwrite to replace them (every output of that run is removed first), or "
        "choose another output folder"
    )
    if not path.exists():
        names = ", ".join(p.name for p in existing[:4])
        raise OutputFolderInUseError(
            f"{out}: holds likelihood outputs ({names}) without the {RESULTS_NAME} that says "
            f"which run made them; {hint}"
        )
    try:
        store = ResultsStore.open(path, mode="r")
    except StoreError as exc:
        raise OutputFolderInUseError(
            f"{path}: exists but is not a results store this version can resume ({exc}); {hint}"
        ) from None
    if same_run(store.fingerprint, fp) and store.n_templates == run.n_templates:
        return "same"
    changed = differences(store.fingerprint, fp) or ["templates"]
    raise OutputFolderInUseError(
        f"{out}: holds results of another run (other {', '.join(changed)}); --skip-exist "
        f"resumes only the same run; {hint}"
    )


def _remove(paths: list[Path]) -> list[str]:
    removed = []
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(str(p))
    return removed


def _open_results(run: LikelihoodRun, fp: dict, plan: planning.BlockPlan, state: str):
    path = Path(run.output) / RESULTS_NAME
    if state == "same":
        return ResultsStore.open(path)
    params = run.parameters
    return ResultsStore.create(
        path,
        structures=list(run.templates.names),
        n_templates=run.n_templates,
        n_images=run.images.n_images,
        image_block=plan.image_block,
        template_block=plan.template_block,
        displacements=run.displacements.as_array(),
        rotations=params.polar_grid.theta,
        real_dtype=Precision.parse(run.precision).resolve().real_dtype,
        fingerprint=fp,
        stacks=list(run.images.stacks),
        image_ids=run.images.image_ids(),
    )


# ------------------------------------------------------------------------------ data checks
def validate_data(run: LikelihoodRun, plan: planning.BlockPlan, executor: Executor) -> None:
    """One parallel pass over the inputs: NaN/Inf or all-zero images and templates, and
    non-finite CTF parameters, reported with their files and indices before any compute."""
    from cryolike_dask.pipeline.tasks import check_images, check_templates

    checks = [dask.delayed(check_images)(run.images, a, b) for a, b in plan.image_ranges()]
    for k in run.structures:
        n_t = run.templates.n_templates(k)
        checks += [
            dask.delayed(check_templates)(run.templates, k, a, min(n_t, a + plan.template_block))
            for a in range(0, n_t, plan.template_block)
        ]
    if executor.client is not None:
        results = executor.client.gather(executor.client.compute(checks))
    else:
        results = dask.compute(*checks, scheduler=executor.scheduler)
    problems = [p for block in results for p in block]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InputDataError(
            "inputs the likelihood cannot use:\n  " + "\n  ".join(problems[:10]) + more
        )


# ------------------------------------------------------------------------------ batches
def _units(blocks: list[int]) -> list[list[int]]:
    """Blocks of a batch grouped into at most :data:`MAX_UNITS_PER_BATCH` tracked units."""
    size = -(-len(blocks) // MAX_UNITS_PER_BATCH)
    return [blocks[i : i + size] for i in range(0, len(blocks), size)]


def _stack_blocks(plan: planning.BlockPlan, start: int, stop: int) -> list[int]:
    return list(range(start // plan.image_block, -(-stop // plan.image_block)))


def _done(done_row: np.ndarray, start: int, stop: int, bits: int) -> bool:
    return bool(np.all((done_row[start:stop] & bits) == bits))


def _stacks_touching(starts: list[int], start: int, stop: int) -> range:
    """Indices of the stacks (first images ``starts``, in order) with images in
    ``[start, stop)``."""
    import bisect

    first = max(0, bisect.bisect_right(starts, start) - 1)
    last = bisect.bisect_left(starts, stop)
    return range(first, min(last, len(starts)))


def execute(
    run: LikelihoodRun,
    client: Any = None,
    *,
    scheduler: str | None = None,
    memory_bytes: int | None = None,
    progress: bool = True,
    stop_after_batches: int | None = None,
) -> RunReport:
    """Run the likelihood on ``client`` (or a local ``scheduler`` when ``None``).

    ``stop_after_batches`` ends the run early after that many graphs (for tests of resuming).
    The output folder is locked for the whole run (:func:`~cryolike_dask.io.locks.output_lock`).
    """
    validate(run)
    with output_lock(run.output):
        return _execute(run, client, scheduler, memory_bytes, progress, stop_after_batches)


def _execute(
    run: LikelihoodRun,
    client: Any,
    scheduler: str | None,
    memory_bytes: int | None,
    progress: bool,
    stop_after_batches: int | None,
    fp: dict | None = None,
    state: str | None = None,
) -> RunReport:
    """:func:`execute` after validation, with the lock held (``fp``/``state``: the
    fingerprint and output-folder state when the caller has them already)."""
    t_start = time.perf_counter()
    workers = describe_workers(client) if client is not None else None
    run = dataclasses.replace(run, device=resolve_device(run.device, client, workers))
    report = RunReport()
    fp = fp if fp is not None else fingerprint(run)
    state = state if state is not None else check_output_folder(run, fp)
    # on a cluster that mixes GPU and CPU workers, GPU work goes to the GPU workers only
    gpus = gpu_workers(workers) if (workers and run.device == "gpu") else []
    restrict = gpus if gpus and len(gpus) < len(workers) else None
    executor = Executor(client, scheduler, progress, workers=restrict)
    plan, budget = plan_run(run, client, memory_bytes, workers)
    threads = sum(w.kernel_slots for w in workers) if workers else 1
    logger.info(describe_cost(run, threads))
    check_sizes(run, plan, budget, state)  # before anything is read or written
    check_confirmed(run, plan, workers)  # a very large run needs --yes
    if run.validate_data:  # before anything is written
        validate_data(run, plan, executor)
    if state == "replace":
        report.removed = _remove(OutputLayout(Path(run.output)).run_outputs())
        logger.info("%s: removed %d outputs of the earlier run", run.output, len(report.removed))
    results = _open_results(run, fp, plan, state)
    if (results.image_block, results.template_block) != (plan.image_block, plan.template_block):
        logger.info(
            "resuming %s: keeping its blocks of %d images and %d templates",
            results.path,
            results.image_block,
            results.template_block,
        )
        plan, _ = plan_run(
            run,
            client,
            budget,
            workers,
            templates_per_block=results.template_block,
            images_per_block=results.image_block,
        )
    report.plan = plan
    logger.info(planning.describe(plan))
    results.require(run.request.quantities, run.structures)
    layout = OutputLayout(Path(run.output))
    if run.export_pt:
        write_displacements(layout, run.displacements.as_array())
    settings = kernel_settings(run, *_cache_and_pool(run, plan, budget))
    image_ranges = plan.image_ranges()

    def st_ranges(k: int) -> list[tuple[int, int]]:
        n_t, tb = run.templates.n_templates(k), plan.template_block
        return [(a, min(n_t, a + tb)) for a in range(0, n_t, tb)]

    resources = kernel_resources(workers, run.device)
    states: list[_Structure] = []

    def batches() -> Iterator[Batch]:
        """The run's batches, structure after structure, each built only when the executor
        asks for it (while the batch before it is still running)."""
        graphs = 0
        for k in run.structures:
            st = _Structure(run, results, plan, layout, k, fp, report, progress, executor)
            states.append(st)
            todo = plan.batches(st.pending)
            for j, batch in enumerate(todo):
                if stop_after_batches is not None and graphs >= stop_after_batches:
                    return
                graph = build_batch_graph(
                    settings,
                    run.templates,
                    k,
                    run.images,
                    [image_ranges[b] for b in batch],
                    st.t_ranges,
                    run.request,
                    split_every=plan.split_every,
                    kernel_resources=resources,
                )
                units = _units(list(range(len(batch))))
                stored = store_units(graph, run.request, st.targets, units)
                weights = [len(u) * len(st.t_ranges) for u in units]
                graphs += 1
                yield Batch(
                    list(zip(stored, weights, strict=True)),
                    st.bar,
                    functools.partial(st.unit_done, [[batch[u] for u in unit] for unit in units]),
                    functools.partial(st.batch_done, batch, j == len(todo) - 1),
                )
            if not todo:
                st.finish()

    t0 = time.perf_counter()
    try:
        executor.run_batches(batches(), depth=BATCHES_IN_FLIGHT)
    finally:
        for st in states:
            st.bar.close()
            try:  # what finished before a failure or an interruption stays done
                st.flush()
            except Exception as exc:  # the original error matters more  # pragma: no cover
                logger.warning("could not write the done marks of %s: %s", results.path, exc)
    report.compute_seconds += time.perf_counter() - t0
    if run.pose_prior is not None and run.request.optimal_pose:
        _check_frame(run, results)
        if run.check_frame:
            for k in run.structures:
                _compare_with_global(run, results, settings, st_ranges(k), k, executor)
    report.seconds = time.perf_counter() - t_start
    return report


#: Fraction of images whose best pose lies on the prior window's edge above which a search
#: around prior poses warns (the window is too small, or the structure is not in the frame
#: of the poses).
EDGE_WARNING = 0.25


def _compare_with_global(
    run: LikelihoodRun,
    results: ResultsStore,
    settings: Any,
    template_ranges: list[tuple[int, int]],
    k: int,
    executor: Any,
) -> float:
    """``--check-frame K``: search ``K`` evenly spaced images of structure ``k`` over every
    direction and rotation (same centring, same residual displacements) and compare with the
    local search's best directions; warn when the global optimum of many lies outside the
    window. Returns the fraction outside (also logged)."""
    spec = run.pose_prior
    assert spec is not None
    n = run.images.n_images
    idx = np.unique(np.linspace(0, n - 1, min(n, run.check_frame)).round().astype(int))
    wide = dataclasses.replace(spec, mode="window", half_width=np.pi, shift_radius=None)
    g_settings = dataclasses.replace(settings, pose_prior=wide, outputs=BlockOutputs())
    graph = build_batch_graph(
        g_settings, run.templates, k, run.images, [(int(i), int(i) + 1) for i in idx],
        template_ranges, OutputRequest(pose_prior=True),
    )  # fmt: skip
    best = graph.outputs["optimal_template"]
    if executor.client is not None:
        glob = np.asarray(executor.client.compute(best).result())
    else:
        glob = np.asarray(best.compute(scheduler=executor.scheduler))
    local = np.asarray(results.group["optimal_template"][k, idx])
    angles = run.templates.viewing_angles(k)
    az, po = np.asarray(angles.azimus, float), np.asarray(angles.polars, float)
    outside = float(np.mean(outside_window(spec, az, po, glob, local)))
    msg = (
        f"structure {run.templates.names[k]!r}: check-frame on {idx.size} images: the global "
        f"search's best direction lies outside the prior's window for {outside:.0%}"
    )
    logger.info(msg)
    if outside > EDGE_WARNING:
        msg += "; check that the structure is in the frame of the poses (--pose-frame map|model)"
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return outside


def _check_frame(run: LikelihoodRun, results: ResultsStore) -> None:
    """Warn, per structure, when many best poses lie on the edge of the prior's window."""
    edge = results.group["optimal_pose_on_window_edge"]
    for k in run.structures:
        flags = np.asarray(edge[k, : run.images.n_images])
        flags = flags[flags >= 0]  # computed images only
        if flags.size and flags.mean() > EDGE_WARNING:
            msg = (
                f"structure {run.templates.names[k]!r}: the best pose of {flags.mean():.0%} of "
                "the images lies on the edge of the prior's window: widen the window, or "
                "check that the structure is in the frame of the poses (--pose-frame map|model)"
            )
            logger.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)


class _Structure:
    """The driver's state for one structure: its done bits (kept in memory; the driver is
    their only writer), its progress display, what it has computed and exported."""

    def __init__(
        self,
        run: LikelihoodRun,
        results: ResultsStore,
        plan: planning.BlockPlan,
        layout: OutputLayout,
        k: int,
        fp: dict,
        report: RunReport,
        progress: bool,
        executor: Executor,
    ):
        self.run, self.results, self.plan, self.layout = run, results, plan, layout
        self.executor = executor
        self.k, self.fp, self.report = k, fp, report
        self.bits = run.request.bits
        self.image_ranges = plan.image_ranges()
        self.n_t = run.templates.n_templates(k)
        tb = plan.template_block
        self.t_ranges = [(a, min(self.n_t, a + tb)) for a in range(0, self.n_t, tb)]
        self.targets = _targets(results, run, k)
        self.starts = [info.start for info in run.images.stacks]
        n = run.images.n_images
        if not run.skip_exist:
            results.clear_done(k, 0, n, self.bits)
        # the store's whole row: a run on the first stacks shares the store of a longer one
        self.done_row = results.done_images(k, 0, results.n_images)
        row, bits = self.done_row, self.bits
        self.pending = [
            b for b, (a, e) in enumerate(self.image_ranges) if not _done(row, a, e, bits)
        ]
        report.blocks_skipped += len(self.image_ranges) - len(self.pending)
        self.exported: set[int] = set()
        self.computed: set[int] = set()
        self._dirty: list[tuple[int, int]] = []  # marked in the row, not yet written
        self._flushed = time.monotonic()
        label = f"likelihood {run.templates.names[k]!r}"
        self.bar = Progress(len(self.pending) * len(self.t_ranges), label, "kernel block", progress)

    def unit_done(self, units: list[list[int]], i: int) -> None:
        """Unit ``i`` (blocks ``units[i]``) is stored: mark it done, export completed stacks."""
        ranges = [self.image_ranges[b] for b in units[i]]
        for a, e in ranges:
            self.done_row[a:e] |= np.uint8(self.bits)
        self._dirty.extend(ranges)
        if time.monotonic() - self._flushed >= DONE_FLUSH_SECONDS:
            self.flush()
        self.computed.update(units[i])
        if self.run.export_pt:  # only the stacks this unit touched can have completed
            self._export(_stacks_touching(self.starts, ranges[0][0], ranges[-1][1]))

    def flush(self) -> None:
        """Write the done marks made since the last flush (whole done chunks)."""
        if self._dirty and len(self.done_row):
            self.results.write_done(self.k, self._dirty, self.done_row)
            self._dirty.clear()
        self._flushed = time.monotonic()

    def batch_done(self, batch: list[int], last: bool) -> None:
        """Every unit of ``batch`` is stored (``last``: the structure's last batch)."""
        self.flush()
        report, run = self.report, self.run
        report.graphs += 1
        report.kernel_tasks += len(batch) * len(self.t_ranges)
        report.blocks_computed += len(batch)
        m = sum(self.image_ranges[b][1] - self.image_ranges[b][0] for b in batch)
        poses_per_image = self.n_t * run.displacements.n_displacements * run.parameters.n_inplanes
        report.pose_evaluations += float(m) * poses_per_image
        if last:
            self.finish()

    def finish(self) -> None:
        """The structure is done: close its display, export whatever is left to export, and
        let go of its done row (the driver's memory stays one row per structure in flight)."""
        self.bar.close()
        self.flush()
        if self.run.export_pt:
            self._export(range(len(self.run.images.stacks)))
        self.done_row = np.zeros(0, np.uint8)

    def _export(self, candidates: Any) -> None:
        _export_ready(
            self.run,
            self.results,
            self.plan,
            self.layout,
            self.k,
            self.fp,
            self.exported,
            self.computed,
            self.report,
            self.done_row,
            candidates,
            self.executor.submit_side,
        )


def _targets(results: ResultsStore, run: LikelihoodRun, structure: int) -> dict[str, Any]:
    """The results-store array each requested quantity of ``structure`` is written to."""
    return {
        q.name: results.array(q) if q.scope == "image" else results.array(q, structure)
        for q in run.request.quantities
    }


def _export_ready(
    run: LikelihoodRun,
    results: ResultsStore,
    plan: planning.BlockPlan,
    layout: OutputLayout,
    structure: int,
    fp: dict,
    exported: set[int],
    computed: set[int],
    report: RunReport,
    done_row: np.ndarray,
    candidates: Any,
    submit: Any = None,
) -> None:
    """Export every stack of ``candidates`` whose images are all done (``done_row``: the
    structure's done bits), unless its files are valid and none of its blocks was computed by
    this run. ``submit(fn, *args)`` runs each export (on the cluster, beside the batches);
    without it the exports run here."""
    bits = run.request.bits
    quantities = run.request.quantities
    todo: list[tuple[int, Any]] = []
    for i_stack in candidates:
        info = run.images.stacks[i_stack]
        if i_stack in exported:
            continue
        if not _done(done_row, info.start, info.stop, bits):
            continue
        blocks = _stack_blocks(plan, info.start, info.stop)
        if run.skip_exist and not computed.intersection(blocks):
            ok, _ = verify_stack(layout, structure, i_stack, quantities, fp)
            if ok:
                exported.add(i_stack)
                report.stacks_skipped += 1
                continue
        if submit is None:
            export_stack(results, layout, structure, i_stack, info, quantities, fp)
        else:
            todo.append((i_stack, info))
        exported.add(i_stack)
        report.stacks_exported += 1
    for i in range(0, len(todo), STACKS_PER_EXPORT_TASK):  # a few stacks per task
        group = todo[i : i + STACKS_PER_EXPORT_TASK]
        submit(export_stack_task, results.path, layout, structure, group, tuple(quantities), fp)


def run_likelihood(
    run: LikelihoodRun,
    cluster: ClusterOptions | None = None,
    *,
    client: Any = None,
    progress: bool = True,
) -> RunReport:
    """Validate, then :func:`execute` the run on ``client``, the session's active client, the
    cluster of ``cluster`` or a new LocalCluster (in that order; see
    :func:`~cryolike_dask.pipeline.cluster.get_client`)."""
    validate(run)
    cluster = cluster or ClusterOptions()
    with output_lock(run.output):  # one writer per folder, before a cluster starts
        fp = fingerprint(run)
        state = check_output_folder(run, fp)
        hint = run.device if run.device != "auto" else resolve_device("auto")
        with get_client(cluster, hint, client) as c:
            link = getattr(c, "dashboard_link", None) if c is not None else None
            link = link if cluster.dashboard else None
            if link:
                logger.info("Dask dashboard: %s", link)
            report = _execute(run, c, cluster.scheduler, None, progress, None, fp=fp, state=state)
            report.dashboard_link = link
    return report
