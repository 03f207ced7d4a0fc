"""The run driver: batches of image blocks, results in Zarr, exports in CryoLike's layout.

For each structure the driver splits the pending image blocks into batches (at most
``max_tasks`` kernel tasks per graph), builds the batch's graph, stores its outputs into the
results store's regions, and only then marks those blocks done (the driver is the only writer
of the done mask). Stacks whose blocks are all done are exported as ``.pt`` files with a
completion record. A rerun with ``skip_exist`` skips done blocks and verified stacks, so a run
killed part-way resumes where it stopped and ends with the same outputs.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.io.cryolike import OutputLayout
from cryolike_dask.io.exports import OutputRequest, export_stack, verify_stack, write_displacements
from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.io.zarr_stores import ResultsStore, StoreError, params_to_json
from cryolike_dask.kernels import BlockOutputs
from cryolike_dask.pipeline import plan as planning
from cryolike_dask.pipeline.cluster import (
    ClusterOptions,
    get_client,
    total_threads,
    worker_memory,
)
from cryolike_dask.pipeline.graph import POSE_FIELDS, BatchGraph, build_batch_graph
from cryolike_dask.pipeline.tasks import KernelSettings
from cryolike_dask.precision import Precision

RESULTS_NAME = "results.zarr"


class RunConfigurationError(ValueError):
    """The run's inputs or options are inconsistent (reported before any work starts)."""


class InputDataError(ValueError):
    """Images or templates hold values the likelihood cannot use (NaN, Inf, zero norm)."""


@dataclass(frozen=True)
class LikelihoodRun:
    """One likelihood run: which data, which outputs, how split.

    Attributes
    ----------
    templates : TemplateSource
        Structures (template stacks).
    images : ImageSource
        Images with their CTF parameters.
    output : Path
        Output folder (CryoLike layout plus ``results.zarr``).
    structures : tuple of int
        Indices of the structures (template files) to run.
    displacements : DisplacementGrid
    request : OutputRequest
    precision : str
        ``"single"`` or ``"double"``.
    device : str
        ``"cpu"`` or ``"gpu"``.
    templates_per_block, images_per_block : int, optional
        Block sizes (default: planned from the worker memory).
    skip_exist : bool
        Skip stacks whose outputs are complete (verified) and blocks already done.
    export_pt : bool
        Write CryoLike's ``.pt`` files (``results.zarr`` is always written).
    split_every : int
        Fan-in of the reduction tree over template blocks.
    max_tasks : int
        Kernel tasks per submitted graph.
    work_bytes : int
        Kernel temporaries budget per task.
    validate_data : bool
        Check every image and template (finite, non-zero) before the likelihood starts.
    """

    templates: TemplateSource
    images: ImageSource
    output: Path
    structures: tuple[int, ...] = (0,)
    displacements: DisplacementGrid = field(
        default_factory=lambda: DisplacementGrid(np.zeros(1), np.zeros(1))
    )
    request: OutputRequest = field(default_factory=OutputRequest)
    precision: str = "single"
    device: str = "cpu"
    templates_per_block: int | None = None
    images_per_block: int | None = None
    skip_exist: bool = False
    export_pt: bool = True
    split_every: int = 8
    max_tasks: int = planning.MAX_TASKS_PER_GRAPH
    work_bytes: int = 256 * 2**20
    validate_data: bool = True


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

    @property
    def poses_per_second(self) -> float:
        return self.pose_evaluations / self.compute_seconds if self.compute_seconds else 0.0


def fingerprint(run: LikelihoodRun) -> dict[str, Any]:
    """What determines the numbers of a run (not how it is split or where it runs)."""
    fp = {
        "parameters": params_to_json(run.templates.parameters),
        "displacements": run.displacements.as_array().tolist(),
        "precision": Precision.parse(run.precision).resolve().value,
        "images": run.images.fingerprint(),
        "templates": [run.templates.fingerprint(k) for k in range(run.templates.n_structures)],
    }
    return json.loads(json.dumps(fp, default=str))


def validate(run: LikelihoodRun) -> None:
    """Check the run before any work starts; raise :class:`RunConfigurationError`."""
    if not run.structures:
        raise RunConfigurationError("no structure (template file) selected")
    for k in run.structures:
        if not 0 <= k < run.templates.n_structures:
            raise RunConfigurationError(
                f"i_template {k} is out of range: the template list has "
                f"{run.templates.n_structures} file(s) ({', '.join(run.templates.names)})"
            )
    diffs = run.templates.parameters.incompatibilities(run.images.parameters)
    if diffs:
        raise RunConfigurationError("templates and images use different grids: " + "; ".join(diffs))
    if run.images.n_images < 1:
        raise RunConfigurationError("no images to process")
    if run.device not in ("cpu", "gpu"):
        raise RunConfigurationError(f"device must be 'cpu' or 'gpu', not {run.device!r}")
    if run.device == "gpu":
        from cryolike_dask.kernels.backend import has_gpu

        if not has_gpu():
            raise RunConfigurationError("device 'gpu' requested but CuPy sees no CUDA GPU")
    Precision.parse(run.precision)
    _check_writable(run.output)


def _check_writable(output: Path) -> None:
    import os

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise RunConfigurationError(f"{output}: exists and is not a folder")
    probe = (
        output if output.exists() else next((p for p in output.parents if p.exists()), Path("."))
    )
    if not probe.is_dir():
        raise RunConfigurationError(f"{output}: cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK):
        raise RunConfigurationError(f"{output}: cannot write here ({probe} is not writable)")


def _settings(run: LikelihoodRun, template_cache: int) -> KernelSettings:
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
    )


def _open_results(run: LikelihoodRun, fp: dict, plan: planning.BlockPlan, log) -> ResultsStore:
    path = Path(run.output) / RESULTS_NAME
    n_templates = [run.templates.n_templates(k) for k in range(run.templates.n_structures)]
    if path.exists():
        try:
            store = ResultsStore.open(path)
        except StoreError as exc:
            raise RunConfigurationError(
                f"{path}: exists but is not a results store of this package ({exc}); "
                "choose another output folder"
            ) from exc
        if store.fingerprint == fp and store.n_templates == n_templates:
            return store
        if run.skip_exist:
            changed = sorted(k for k in fp if store.fingerprint.get(k) != fp[k])
            raise RunConfigurationError(
                f"{path}: holds results of a run with other {', '.join(changed) or 'inputs'}; "
                "with --skip-exist only the same run can be resumed (drop --skip-exist to "
                "recompute, or choose another output folder)"
            )
        log(f"{path}: inputs or settings changed since it was written; starting it afresh")
    return ResultsStore.create(
        path,
        structures=list(run.templates.names),
        n_templates=n_templates,
        n_images=run.images.n_images,
        image_block=plan.image_block,
        template_block=plan.template_block,
        displacements=run.displacements.as_array(),
        n_inplanes=run.templates.parameters.n_inplanes,
        real_dtype=Precision.parse(run.precision).resolve().real_dtype,
        fingerprint=fp,
        stacks=list(run.images.stacks),
        overwrite=True,
    )


def _validate_data(
    run: LikelihoodRun, plan: planning.BlockPlan, client: Any, scheduler: str | None
) -> None:
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
    if client is not None:
        results = client.gather(client.compute(checks))
    else:
        results = dask.compute(*checks, scheduler=scheduler or "threads")
    problems = [p for block in results for p in block]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InputDataError(
            "inputs the likelihood cannot use:\n  " + "\n  ".join(problems[:10]) + more
        )


def _contiguous(blocks: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _store_batch(
    graph: BatchGraph,
    results: ResultsStore,
    structure: int,
    blocks: list[int],
    request: OutputRequest,
) -> list[da.Array]:
    sources, targets, regions = [], [], []
    offset = 0
    for run_blocks in _contiguous(blocks):
        a = results.block_range(run_blocks[0])[0]
        b = results.block_range(run_blocks[-1])[1]
        sl = slice(offset, offset + (b - a))
        offset += b - a
        names = list(POSE_FIELDS if request.integrated else POSE_FIELDS[:-1])
        for name in names:
            sources.append(graph.poses[name][sl][None, :])
            targets.append(results.group[name])
            regions.append((slice(structure, structure + 1), slice(a, b)))
        if graph.optimal_likelihood is not None:
            sources.append(graph.optimal_likelihood[sl][None, :])
            targets.append(results.group["log_likelihood_optimal_fourier"])
            regions.append((slice(structure, structure + 1), slice(a, b)))
        for name, arr in graph.per_template.items():
            sources.append(arr[sl])
            targets.append(results.per_template_array(structure, name))
            regions.append((slice(a, b), slice(None)))
        if graph.full is not None:
            sources.append(graph.full[sl])
            targets.append(results.full_array(structure))
            regions.append((slice(a, b), slice(None), slice(None), slice(None)))
    stored = da.store(sources, targets, regions=regions, lock=False, compute=False)
    return list(stored) if isinstance(stored, (tuple, list)) else [stored]


def _compute(stored: list, client: Any, scheduler: str | None, progress: bool) -> None:
    if client is None:
        if progress:
            import sys

            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=1.0, dt=0.1 if sys.stdout.isatty() else 5.0):
                dask.compute(*stored, scheduler=scheduler or "threads")
        else:
            dask.compute(*stored, scheduler=scheduler or "threads")
        return
    futures = client.compute(stored)
    if progress:
        import sys

        from distributed import progress as dprogress

        # a terminal gets a live bar; a log file gets an update every few seconds
        dprogress(futures, notebook=False, interval="100ms" if sys.stdout.isatty() else "2s")
    client.gather(futures)


def _stack_blocks(results: ResultsStore, start: int, stop: int) -> list[int]:
    return list(range(start // results.image_block, -(-stop // results.image_block)))


def execute(
    run: LikelihoodRun,
    client: Any = None,
    *,
    scheduler: str | None = None,
    memory_bytes: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_batches: int | None = None,
) -> RunReport:
    """Run the likelihood with an existing client (or a local ``scheduler`` when ``None``).

    ``stop_after_batches`` ends the run early after that many graphs (for tests of resuming).
    """
    t_start = time.perf_counter()
    validate(run)
    report = RunReport()
    fp = fingerprint(run)
    n_templates = [run.templates.n_templates(k) for k in run.structures]
    params = run.templates.parameters
    grid = params.polar_grid
    budget = memory_bytes or worker_memory(client, ClusterOptions(scheduler=scheduler), run.device)

    def plan_for(templates_per_block: int | None, images_per_block: int | None):
        return planning.plan_blocks(
            run.images.n_images,
            max(n_templates),
            grid.n_shells,
            grid.n_inplanes,
            run.displacements.n_displacements,
            complex_bytes=Precision.parse(run.precision).resolve().complex_dtype.itemsize,
            memory_bytes=budget,
            templates_per_block=templates_per_block,
            images_per_block=images_per_block,
            full=run.request.full,
            work_bytes=run.work_bytes,
            max_tasks=run.max_tasks,
            split_every=run.split_every,
            min_tasks=2 * total_threads(client),
        )

    plan = plan_for(run.templates_per_block, run.images_per_block)
    if run.validate_data:  # before anything is written
        _validate_data(run, plan, client, scheduler)
    results = _open_results(run, fp, plan, log)
    if (results.image_block, results.template_block) != (plan.image_block, plan.template_block):
        log(
            f"resuming {results.path}: keeping its blocks of {results.image_block} images and "
            f"{results.template_block} templates"
        )
        plan = plan_for(results.template_block, results.image_block)
    report.plan = plan
    log(planning.describe(plan))
    layout = OutputLayout(Path(run.output))
    if run.export_pt:
        write_displacements(layout, run.displacements.as_array())
    settings = _settings(run, template_cache=max(budget // 2, plan.task_bytes))
    bits = run.request.bits
    image_ranges = plan.image_ranges()
    graphs = 0
    for k in run.structures:
        n_t = run.templates.n_templates(k)
        t_ranges = [
            (a, min(n_t, a + plan.template_block)) for a in range(0, n_t, plan.template_block)
        ]
        if not run.skip_exist:
            results.clear_done(k, list(range(results.n_blocks)))
        done = results.done()[k]
        pending = [b for b in range(results.n_blocks) if (int(done[b]) & bits) != bits]
        report.blocks_skipped += results.n_blocks - len(pending)
        exported: set[int] = set()
        computed: set[int] = set()
        for batch in plan.batches(pending):
            if stop_after_batches is not None and graphs >= stop_after_batches:
                report.seconds = time.perf_counter() - t_start
                return report
            graph = build_batch_graph(
                settings,
                run.templates,
                k,
                run.images,
                [image_ranges[b] for b in batch],
                t_ranges,
                optimal_likelihood=run.request.optimal_likelihood,
                per_template=run.request.per_template,
                split_every=plan.split_every,
            )
            stored = _store_batch(graph, results, k, batch, run.request)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", da.PerformanceWarning)
                _compute(stored, client, scheduler, progress)
            report.compute_seconds += time.perf_counter() - t0
            results.mark_done(k, batch, bits)
            computed.update(batch)
            graphs += 1
            report.graphs += 1
            report.kernel_tasks += graph.n_kernel_tasks
            report.blocks_computed += len(batch)
            m = sum(image_ranges[b][1] - image_ranges[b][0] for b in batch)
            report.pose_evaluations += (
                float(m) * n_t * run.displacements.n_displacements * grid.n_inplanes
            )
            if run.export_pt:
                _export_ready(run, results, layout, k, fp, exported, computed, report)
        if run.export_pt:
            _export_ready(run, results, layout, k, fp, exported, computed, report)
    report.seconds = time.perf_counter() - t_start
    return report


def _export_ready(
    run: LikelihoodRun,
    results: ResultsStore,
    layout: OutputLayout,
    structure: int,
    fp: dict,
    exported: set[int],
    computed: set[int],
    report: RunReport,
) -> None:
    """Export every stack whose blocks are all done, unless its files are valid and none of
    its blocks was computed by this run."""
    done = results.done()[structure]
    bits = run.request.bits
    for i_stack, info in enumerate(run.images.stacks):
        if i_stack in exported:
            continue
        blocks = _stack_blocks(results, info.start, info.stop)
        if any((int(done[b]) & bits) != bits for b in blocks):
            continue
        if run.skip_exist and not computed.intersection(blocks):
            ok, _ = verify_stack(layout, structure, i_stack, run.request, fp)
            if ok:
                exported.add(i_stack)
                report.stacks_skipped += 1
                continue
        export_stack(results, layout, structure, i_stack, info, run.request, fp)
        exported.add(i_stack)
        report.stacks_exported += 1


def run_likelihood(
    run: LikelihoodRun,
    cluster: ClusterOptions | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunReport:
    """Validate, start or connect to a cluster, and :func:`execute` the run."""
    validate(run)
    cluster = cluster or ClusterOptions()
    with get_client(cluster, run.device) as client:
        link = getattr(client, "dashboard_link", None) if client is not None else None
        if link:
            log(f"Dask dashboard: {link}")
        report = execute(run, client, scheduler=cluster.scheduler, progress=progress, log=log)
        report.dashboard_link = link
    return report
