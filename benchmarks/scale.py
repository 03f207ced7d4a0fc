"""A simulated many-GPU run: the real driver on many emulated workers (issue 16).

The real planner, graph builder, driver loop (:func:`cryolike_dask.pipeline.driver.execute`)
and a real ``results.zarr`` on disk, on a ``LocalCluster`` of in-process workers with
``--threads`` (2) threads and one ``GPU`` resource each, as our GPU clusters start them.
Only the work inside the tasks is replaced, in this process (the workers are in-process, so
the patch reaches them):

- ``tasks.correlate_task`` sleeps ``m·s·D·W / rate × time_factor`` seconds and returns a
  :class:`BlockResult` with the real per-image arrays (``best_cross_correlation``,
  ``best_pose``, ``log_likelihood_sum`` of length ``m``), the rest ``None``;
- ``tasks.load_image_block`` sleeps the block's bytes / ``--load-gbps`` (× the time factor)
  and returns an :class:`ImageBlock` without pixels whose ``dask.sizeof`` is the real
  block's (``M·N·W`` complex64 and the CTF fields), so the scheduler places kernel tasks as
  it would with real blocks;
- ``driver.describe_workers`` reports every worker as a GPU worker with ``--worker-memory``
  of free GPU memory (the planner then uses the GPU memory model).

Everything else (graph, reduction tree, the store tasks writing ``results.zarr``, done
marks, exports with ``--export``) is the production code. Structures are scaled down
(``--structures`` of ``--total-structures``) and the results scaled up: every structure is
the same graph; the driver keeps two batches (here: structures) in flight. The prediction
uses the steady state (every worker between its first and last kernel) and adds what the run
paid once.

    .venv/bin/python -m benchmarks.scale                      # 100 workers, 10⁶ images
    .venv/bin/python -m benchmarks.scale --workers 10 --time-factor 0.1

The last line is ``simulated N workers: makespan X s vs ideal Y s, overhead Z%``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import heapq
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.io.zarr_stores import ResultsStore, StackInfo
from cryolike_dask.kernels import BlockResult
from cryolike_dask.params import ImageParameters
from cryolike_dask.pipeline import driver, tasks
from cryolike_dask.pipeline import graph as graph_module
from cryolike_dask.pipeline.cluster import WorkerInfo
from cryolike_dask.pipeline.executor import Executor
from cryolike_dask.pipeline.spec import LikelihoodRun, OutputRequest

GIB = 2**30


# ------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class SyntheticImages(ImageSource):
    """``n_images`` images in stacks; never read (``load_image_block`` is replaced)."""

    def read(self, start: int, stop: int):
        raise AssertionError("the simulation reads no images")

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "synthetic", "stacks": [[s.name, s.start, s.stop] for s in self.stacks]}


@dataclass(frozen=True)
class SyntheticTemplates(TemplateSource):
    """``count`` templates per structure; never read (``correlate_task`` is replaced)."""

    count: int = 1

    def n_templates(self, structure: int) -> int:
        return self.count

    def read(self, structure: int, start: int, stop: int):
        raise AssertionError("the simulation reads no templates")

    def fingerprint(self, structure: int) -> dict[str, Any]:
        return {"kind": "synthetic", "structure": structure, "count": self.count}


@dataclass(frozen=True)
class EmulatedImageBlock(tasks.ImageBlock):
    """An image block without pixels that Dask sizes as the real one."""

    emulated_nbytes: int = 0


def _register_emulated_size() -> None:
    from dask.sizeof import sizeof

    @sizeof.register(EmulatedImageBlock)
    def _size(block: EmulatedImageBlock) -> int:
        return block.emulated_nbytes


_register_emulated_size()


# ------------------------------------------------------------------------------ recorders
@dataclass
class Recorder:
    """Timings collected from the driver thread, the workers and the sampler."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    kernels: list = field(default_factory=list)  # (batch, worker, start, stop, modelled s)
    loads: int = 0
    others: list = field(default_factory=list)  # (kind, worker, start, stop) of other tasks
    batch_of: dict = field(default_factory=dict)  # (structure, block start) → batch
    batch: int = -1
    batches: list = field(default_factory=list)  # dicts of phase seconds, one per batch
    setup: dict = field(default_factory=dict)  # phase seconds outside any batch
    zarr_write: dict = field(
        default_factory=lambda: {k: [0.0, 0, 0] for k in ("setup", "results", "done")}
    )
    zarr_read_done: list = field(default_factory=lambda: [0.0, 0])
    rss_peak: int = 0
    sched_tasks_peak: int = 0
    cpu: dict = field(default_factory=dict)  # CPU seconds by thread kind over the run

    active: int | None = None  # the batch whose callback runs now (batches overlap)

    def add(self, name: str, seconds: float) -> None:
        if self.active is not None:
            cur = self.batches[self.active]
        else:
            cur = self.batches[-1] if self.batches else self.setup
        cur[name] = cur.get(name, 0.0) + seconds


REC = Recorder()


def _worker() -> str:
    """The emulated worker running the current task (its threads share one address)."""
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:  # not in a worker (a local scheduler)
        return str(threading.get_ident())


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            REC.add(name, time.perf_counter() - t0)

    return wrapper


def install_patches(
    n_d: int, n_w: int, rate: float, factor: float, worker_gib: float, load_gbps: float
) -> list:
    """Replace the task bodies and wrap the driver's phases; returns the undo list."""
    import zarr

    undo = []

    def patch(obj, name, value):
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def load_image_block(source, start, stop):
        with REC.lock:
            REC.loads += 1
        # no pixels, but Dask is told the real block's size (placement, memory accounting)
        n = (stop - start) * int(np.prod(source.parameters.polar_grid.shape))
        nbytes = n * np.dtype(np.complex64).itemsize + (stop - start) * 7 * 8
        if load_gbps > 0:  # reading the block from shared storage
            time.sleep(nbytes / (load_gbps * 1e9) * factor)
        empty = np.empty((0,), np.complex64)
        return EmulatedImageBlock(start, stop, empty, {}, "cryolike", "", nbytes)

    def correlate_task(settings, templates, structure, t0, t1, block):
        m, s = block.stop - block.start, t1 - t0
        modelled = m * s * n_d * n_w / rate
        start = time.perf_counter()
        time.sleep(modelled * factor)
        stop = time.perf_counter()
        with REC.lock:
            batch = REC.batch_of.get((structure, block.start), -1)
            REC.kernels.append((batch, _worker(), start, stop, modelled))
        return BlockResult(
            best_cross_correlation=np.zeros(m, np.float32),
            best_pose=np.zeros(m, np.int64),
            cross_correlation_ms=None,
            pose_ms=None,
            log_likelihood_ms=None,
            log_likelihood_sum=np.zeros(m, np.float32),
            cross_correlation_msdw=None,
            cross_correlation_msw=None,
            displacement_index_msw=None,
            cross_correlation_msd=None,
            rotation_index_msd=None,
        )

    def describe_workers(client, timeout=None):
        info = client.scheduler_info(n_workers=-1)["workers"]
        mem = int(worker_gib * GIB)
        return [
            WorkerInfo(a, int(w["nthreads"]), 8 * mem, True, mem, mem, str(i), dict(w["resources"]))
            for i, (a, w) in enumerate(sorted(info.items()))
        ]

    def recorded(kind, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stop = time.perf_counter()
                with REC.lock:
                    REC.others.append((kind, _worker(), start, stop))

        return wrapper

    patch(tasks, "store_image_outputs", recorded("store", tasks.store_image_outputs))
    export_task = recorded("export", tasks.export_stack_task)
    patch(tasks, "export_stack_task", export_task)
    patch(driver, "export_stack_task", export_task)
    patch(graph_module, "_reduce_kernels", recorded("reduce", graph_module._reduce_kernels))
    patch(tasks, "load_image_block", recorded("load", load_image_block))
    patch(tasks, "correlate_task", correlate_task)
    patch(driver, "describe_workers", describe_workers)
    build = driver.build_batch_graph

    def build_batch_graph(settings, templates, k, images, image_ranges, *args, **kwargs):
        REC.batch += 1
        for a, _ in image_ranges:
            REC.batch_of[(k, a)] = REC.batch
        REC.batches.append({"t_build": time.perf_counter()})
        t0 = time.perf_counter()
        graph = build(settings, templates, k, images, image_ranges, *args, **kwargs)
        REC.add("graph build", time.perf_counter() - t0)
        return graph

    patch(driver, "build_batch_graph", build_batch_graph)
    timed_store = _timed("store graphs", driver.store_units)

    def store_units(*args, **kwargs):
        out = timed_store(*args, **kwargs)
        REC.batches[-1]["tasks"] = len(out[0].dask) if out else 0  # the batch's whole graph
        return out

    patch(driver, "store_units", store_units)
    patch(driver, "_export_ready", _timed("exports", driver._export_ready))
    patch(driver, "_open_results", _timed("create results.zarr", driver._open_results))
    patch(ResultsStore, "write_done", _timed("done marks", ResultsStore.write_done))
    patch(ResultsStore, "clear_done", _timed("clear done", ResultsStore.clear_done))

    make = driver.Batch

    def batch(units, bar=None, on_done=None, on_complete=None):
        b = REC.batch
        cur = REC.batches[b]
        cur["n_units"] = len(units)

        def done(i):
            REC.active = b
            t0 = time.perf_counter()
            try:
                on_done(i)
            finally:
                cur["on_done"] = cur.get("on_done", 0.0) + time.perf_counter() - t0
                cur["t_last_done"] = time.perf_counter()
                REC.active = None

        def complete():
            cur["t_end"] = time.perf_counter()
            REC.active = b
            t0 = time.perf_counter()
            try:
                on_complete()
            finally:
                cur["on_complete"] = time.perf_counter() - t0
                REC.active = None

        return make(units, bar, done, complete)

    patch(driver, "Batch", batch)
    run_batches = Executor.run_batches

    def timed_run_batches(self, batches, *, depth=2):
        client = self.client
        compute = client.compute
        submitted = [0]

        def timed_compute(*a, **k):
            cur = REC.batches[submitted[0]]
            submitted[0] += 1
            t0 = time.perf_counter()
            futures = compute(*a, **k)
            cur["submit"] = time.perf_counter() - t0
            cur["t_submitted"] = time.perf_counter()
            return futures

        client.compute = timed_compute
        try:
            return run_batches(self, batches, depth=depth)
        finally:
            del client.compute

    patch(Executor, "run_batches", timed_run_batches)

    setitem, getitem = zarr.Array.__setitem__, zarr.Array.__getitem__

    def timed_setitem(self, selection, value):
        t0 = time.perf_counter()
        setitem(self, selection, value)
        dt = time.perf_counter() - t0
        kind = "done" if "bookkeeping" in self.path else "results"
        if REC.batch < 0:
            kind = "setup"  # coordinates written when the store is created
        with REC.lock:
            acc = REC.zarr_write[kind]
            acc[0] += dt
            acc[1] += 1
            acc[2] += int(np.asarray(value).nbytes)

    def timed_getitem(self, selection):
        t0 = time.perf_counter()
        out = getitem(self, selection)
        if "bookkeeping" in self.path:
            with REC.lock:
                REC.zarr_read_done[0] += time.perf_counter() - t0
                REC.zarr_read_done[1] += 1
        return out

    patch(zarr.Array, "__setitem__", timed_setitem)
    patch(zarr.Array, "__getitem__", timed_getitem)
    return undo


@contextlib.contextmanager
def sampler(scheduler: Any, every: float = 0.2):
    """Peak RSS of this process (driver + scheduler + in-process workers) and of the
    scheduler's task count."""
    import psutil

    proc, stop = psutil.Process(), threading.Event()
    base = {t.id: t.user_time + t.system_time for t in proc.threads()}
    last: dict[int, tuple[str, float]] = {}

    def cpu():
        names = {t.native_id: t.name for t in threading.enumerate()}
        for t in proc.threads():
            name = names.get(t.id, last.get(t.id, ("?", 0))[0])
            last[t.id] = (name, t.user_time + t.system_time)

    def loop():
        while not stop.is_set():
            REC.rss_peak = max(REC.rss_peak, proc.memory_info().rss)
            REC.sched_tasks_peak = max(REC.sched_tasks_peak, len(scheduler.tasks))
            cpu()
            stop.wait(every)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        cpu()
        main = threading.main_thread().native_id
        for tid, (name, c) in last.items():
            if tid == main:
                kind = "driver (main thread)"
            elif name == "IO loop":
                kind = "event loop (scheduler + workers)"
            elif "Dask-Default-Threads" in name:
                kind = "worker task threads"
            elif "Offload" in name:
                kind = "offload threads"
            else:
                kind = "other: " + name.rstrip("0123456789_-")
            REC.cpu[kind] = REC.cpu.get(kind, 0.0) + c - base.get(tid, 0.0)


# ------------------------------------------------------------------------------ analysis
def list_schedule(durations: list[float], workers: int) -> float:
    """Makespan of greedy longest-first list scheduling (a barrier-bound batch)."""
    heap = [0.0] * min(workers, len(durations))
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(heap, heap[0] + d)
    return max(heap) if heap else 0.0


def run_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_run(args: argparse.Namespace, out: Path) -> LikelihoodRun:
    params = ImageParameters.from_values(args.box, 1.0, n_inplanes=args.rotations)
    size = args.stack_size
    stacks = tuple(
        StackInfo(f"stack_{i:06d}", a, min(args.images, a + size), "")
        for i, a in enumerate(range(0, args.images, size))
    )
    images = SyntheticImages(params, stacks)
    names = tuple(f"structure_{k:03d}" for k in range(args.structures))
    templates = SyntheticTemplates(params, names, args.templates)
    d = args.displacements
    disp = DisplacementGrid(np.linspace(-4, 4, d), np.linspace(4, -4, d))
    return LikelihoodRun(
        templates=templates,
        images=images,
        output=out,
        structures=tuple(range(args.structures)),
        displacements=disp,
        request=OutputRequest(),
        precision="single",
        device="gpu",
        export_pt=args.export,
        validate_data=False,  # it reads every image: not what this measures
        templates_per_block=args.templates_per_block,
        images_per_block=args.images_per_block,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--images", type=int, default=10**6)
    ap.add_argument("--stack-size", type=int, default=1000)
    ap.add_argument("--structures", type=int, default=3, help="simulated (≤ total)")
    ap.add_argument("--total-structures", type=int, default=100, help="of the full job")
    ap.add_argument("--templates", type=int, default=2370)
    ap.add_argument("--displacements", type=int, default=257)
    ap.add_argument("--rotations", type=int, default=256, help="W")
    ap.add_argument("--box", type=int, default=128, help="image size, px (gives N shells)")
    ap.add_argument("--worker-memory", type=float, default=80.0, help="GiB of GPU memory")
    ap.add_argument("--rate", type=float, default=3.7e10, help="pose evaluations/s per GPU")
    ap.add_argument("--time-factor", type=float, default=1.0, help="sleep = modelled × this")
    ap.add_argument("--templates-per-block", type=int, default=None)
    ap.add_argument("--images-per-block", type=int, default=None)
    ap.add_argument("--export", action="store_true", help="write the .pt exports too")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads per worker (2, as our GPU workers: kernels take the one GPU resource, "
        "the other thread loads and stores; 1 serialises loads with kernels)",
    )
    ap.add_argument(
        "--load-gbps",
        type=float,
        default=1.0,
        help="GB/s a worker reads an image block at (× the time factor; 0: instant)",
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=0.0005,
        help="Python's GIL switch interval in the emulation, s (default 0.5 ms; Python's own "
        "is 5 ms): the emulated workers share one process, where every hand-off between its "
        "threads waits up to this long",
    )
    ap.add_argument("--keep", type=Path, default=None, help="output folder (kept)")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    for name in ("distributed", "cryolike_dask", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import dask
    from distributed import Client, LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix="scale-")) if args.keep is None else args.keep
    out = tmp / "run"
    run = build_run(args, out)
    grid = run.parameters.polar_grid
    n_d, n_w = args.displacements, grid.n_inplanes
    undo = install_patches(
        n_d, n_w, args.rate, args.time_factor, args.worker_memory, args.load_gbps
    )
    t0 = time.perf_counter()
    # emulation only: in-process workers share this process's event loop and GIL with the
    # scheduler and the driver; their per-worker profiler (every 10 ms) and system monitor
    # are off so that they steal less of it, and the GIL is handed between threads more
    # often (production workers run in their own processes, with their own GIL)
    sys.setswitchinterval(args.switch_interval)
    dask.config.set(
        {
            "distributed.admin.tick.limit": "1h",
            "distributed.worker.profile.enabled": False,
            "distributed.admin.system-monitor.interval": "60s",
        }
    )
    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=args.threads,
        resources={"GPU": 1},  # as our GPU clusters and deploy profiles
        processes=False,
        memory_limit=0,
        dashboard_address=None,
    )
    client = Client(cluster)
    cluster_s = time.perf_counter() - t0
    import psutil

    proc = psutil.Process()
    time.sleep(1.0)
    c0, w0 = sum(proc.cpu_times()[:2]), time.perf_counter()
    time.sleep(3.0)
    idle_cpu = (sum(proc.cpu_times()[:2]) - c0) / (time.perf_counter() - w0)
    rss_base = proc.memory_info().rss
    try:
        with sampler(cluster.scheduler):
            t0 = time.perf_counter()
            report = driver.execute(run, client, progress=False)
            total_s = time.perf_counter() - t0
        results_bytes = run_bytes(out / driver.RESULTS_NAME)
        export_bytes = run_bytes(out) - results_bytes
    finally:
        client.close()
        cluster.close()
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    numbers = analyse(
        args, run, report, total_s, cluster_s, rss_base, results_bytes, export_bytes, idle_cpu
    )
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1, default=float))
    return 0


def analyse(args, run, report, total_s, cluster_s, rss_base, results_bytes, export_bytes, idle_cpu):
    plan = report.plan
    w = args.workers
    f = args.time_factor
    kern = np.array([k[2:] for k in REC.kernels]) if REC.kernels else np.zeros((0, 3))
    batch_of = np.array([k[0] for k in REC.kernels])
    rows = []
    for b, cur in enumerate(REC.batches):
        if "t_end" not in cur:
            continue
        sel = batch_of == b
        start = cur.get("t_submitted", cur["t_build"])
        first = kern[sel, 0].min() - start if sel.any() else 0.0
        last = kern[sel, 1].max() if sel.any() else cur["t_end"]
        keys = ("graph build", "store graphs", "submit", "on_done", "on_complete")
        serial = sum(cur.get(k, 0.0) for k in keys)
        rows.append(
            dict(
                n_kernel=int(sel.sum()),
                units=cur["n_units"],
                wall=cur["t_end"] - cur["t_build"],
                ideal=float(kern[sel, 2].sum()) * f / w,
                first_start=first,
                tail=cur["t_end"] - last,
                build=cur.get("graph build", 0.0),
                store=cur.get("store graphs", 0.0),
                submit=cur.get("submit", 0.0),
                on_done=cur.get("on_done", 0.0),
                marks=cur.get("done marks", 0.0),
                exports=cur.get("exports", 0.0),
                on_complete=cur.get("on_complete", 0.0),
                serial=serial,
            )
        )
    n_kernel = sum(r["n_kernel"] for r in rows)
    done_batches = [c for c in REC.batches if "t_end" in c]
    t_first = min(c["t_build"] for c in done_batches)
    t_last = max(c["t_end"] for c in done_batches)
    makespan = t_last - t_first
    modelled_total = float(kern[:, 2].sum()) if len(kern) else 0.0
    ideal = modelled_total * f / w
    # batches overlap: the bound is one list schedule of every kernel task, no barriers
    bound = list_schedule(list(kern[:, 2] * f), w)
    overhead = (makespan - ideal) / makespan if makespan else 0.0
    fill = rows[0]["first_start"] + rows[0]["build"] + rows[0]["store"] + rows[0]["submit"]
    tail = t_last - (float(kern[:, 1].max()) if len(kern) else t_last)
    steady = max(0.0, makespan - bound - fill - tail)  # overheads paid per structure
    absolute = makespan - bound  # overheads that do not scale with the kernel time
    n_b = len(rows)
    setup = total_s - makespan

    # steady state: from the moment every worker has started its first kernel until the first
    # worker has run its last, no worker is waiting for the run to start or to end, so the
    # share of worker time spent in kernels there is what a long run keeps; the rest of the
    # makespan (fill, the last waves, the drain) is paid once per run
    util, window = 1.0 - overhead, 0.0
    if len(kern):
        first_k: dict[int, float] = {}
        last_k: dict[int, float] = {}
        for _, wid, a, b, _m in REC.kernels:
            first_k[wid] = min(first_k.get(wid, np.inf), a)
            last_k[wid] = max(last_k.get(wid, 0.0), b)
        lo, hi = max(first_k.values()), min(last_k.values())
        window = hi - lo
        if window > 0:
            busy = np.clip(kern[:, 1], lo, hi) - np.clip(kern[:, 0], lo, hi)
            util = max(1e-9, float(busy.sum()) / (w * window))
    one_off = max(0.0, makespan - ideal / util)

    # the full job: every structure is the same graph; the pipeline fills and drains once
    per_struct_model = modelled_total / args.structures
    full_ideal = per_struct_model * args.total_structures / w
    full_wall = full_ideal / util + one_off + setup
    gpu_h = full_wall * w / 3600
    ideal_gpu_h = per_struct_model * args.total_structures / 3600

    wr, wd = REC.zarr_write["results"], REC.zarr_write["done"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
    p = print
    p(
        f"job: {args.images} images × {args.structures}/{args.total_structures} structures × "
        f"{args.templates} templates × D={args.displacements} × W={run.parameters.n_inplanes} "
        f"(N={run.parameters.polar_grid.n_shells}), {w} workers of {args.worker_memory:g} GiB, "
        f"{args.rate:.3g} poses/s, time factor {f:g}"
    )
    p(f"plan: {driver.planning.describe(plan)}; {len(plan.batches())} batch(es) per structure")
    p(
        f"cluster start {cluster_s:.1f} s; setup outside batches {setup:.2f} s "
        f"(create results.zarr {REC.setup.get('create results.zarr', 0):.2f} s, clear done "
        f"{sum(b.get('clear done', 0) for b in [REC.setup, *REC.batches]):.2f} s)"
    )
    p("")
    p("| per batch (mean) | seconds | % of batch compute |")
    p("|---|---:|---:|")
    for label, key in (
        ("batch wall (build → last unit stored; batches overlap)", "wall"),
        ("batch compute (modelled kernel time / workers)", "ideal"),
        ("graph build", "build"),
        ("store tasks (`store_units`)", "store"),
        ("submit (`client.compute`)", "submit"),
        ("first kernel start after submit", "first_start"),
        ("on_done total (done marks + exports)", "on_done"),
        ("  of which done marks", "marks"),
        ("  of which exports (finding complete stacks, submitting their tasks)", "exports"),
        ("on_complete (end of structure)", "on_complete"),
        ("driver serial work (build+store+submit+on_done+on_complete)", "serial"),
    ):
        v = mean.get(key, 0.0)
        pct = 100 * v / mean["ideal"] if mean.get("ideal") else 0.0
        p(f"| {label} | {v:.3f} | {pct:.2f} |")
    p("")
    p(
        f"run: makespan {makespan:.2f} s (first graph build → last unit stored), ideal "
        f"{ideal:.2f} s, list-schedule bound {bound:.2f} s; pipeline fill (build → first "
        f"kernel) {fill:.2f} s, tail (last kernel end → stored) {tail:.2f} s, steady-state "
        f"overhead {steady:.2f} s over {n_b} batch(es)"
    )
    p(
        f"steady state (every worker between its first and last kernel, {window:.1f} s): "
        f"workers "
        f"{100 * util:.1f}% in kernels, overhead {100 * (1 - util):.1f}%; paid once per run "
        f"(fill, last waves, drain): {one_off:.1f} s"
    )
    p(f"kernel tasks: {n_kernel} in {n_b} batch(es), {mean.get('units', 0):.0f} units per batch")
    by_worker: dict[str, list] = {}
    for _, wid, a, b, _m in REC.kernels:
        by_worker.setdefault(wid, []).append((a, b))
    gaps = []
    for ks in by_worker.values():
        ks.sort()
        gaps += [s2 - e1 for (_, e1), (s2, _) in itertools.pairwise(ks)]
    gaps_ms = 1e3 * np.array(gaps) if gaps else np.zeros(1)
    p(
        f"scheduler: gap between consecutive kernels on a worker: median "
        f"{np.median(gaps_ms):.1f} ms, mean {gaps_ms.mean():.1f} ms, 90th percentile "
        f"{np.percentile(gaps_ms, 90):.1f} ms; peak tasks held {REC.sched_tasks_peak}; "
        f"absolute overhead (makespan − list bound) {absolute:.2f} s = "
        f"{1e3 * absolute / max(1, n_kernel):.2f} ms per kernel task"
    )
    span = makespan * w
    busy_k = float((kern[:, 1] - kern[:, 0]).sum()) if len(kern) else 0.0
    by_kind: dict[str, list[float]] = {}
    for kind, _, a, b in REC.others:
        by_kind.setdefault(kind, []).append(b - a)
    p(
        f"worker time over the makespan ({span:.0f} worker-s): kernels {100 * busy_k / span:.1f}%"
        f", no kernel running {100 * (span - busy_k) / span:.1f}%; other tasks (beside the "
        f"kernels with {args.threads} threads per worker, between them with 1): "
        + ", ".join(
            f"{kind} {100 * sum(v) / span:.2f}% ({len(v)} × {1e3 * np.mean(v):.1f} ms)"
            for kind, v in sorted(by_kind.items())
        )
    )
    if len(kern):
        last_end: dict[int, float] = {}
        first_start: dict[int, float] = {}
        for _, wid, a, b, _m in REC.kernels:
            last_end[wid] = max(last_end.get(wid, 0.0), b)
            first_start[wid] = min(first_start.get(wid, np.inf), a)
        ends = np.array(list(last_end.values())) - t_first
        starts = np.array(list(first_start.values())) - t_first
        idle_end = float(np.sum(t_last - t_first - ends))
        idle_start = float(np.sum(starts))
        p(
            f"workers' first kernel start: median {np.median(starts):.2f} s, last "
            f"{starts.max():.2f} s; last kernel end: first {ends.min():.1f} s, median "
            f"{np.median(ends):.1f} s of {makespan:.1f} s; idle before the first kernel "
            f"{100 * idle_start / span:.1f}%, after the last {100 * idle_end / span:.1f}%, "
            f"between kernels {100 * (span - busy_k - idle_start - idle_end) / span:.1f}% "
            "(including the other tasks)"
        )
    p(
        "CPU seconds by thread over the run: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(REC.cpu.items(), key=lambda kv: -kv[1]))
    )
    loop = REC.cpu.get("event loop (scheduler + workers)", 0.0)
    busy = max(0.0, loop - idle_cpu * total_s)
    n_graph = sum(c.get("tasks", 0) for c in REC.batches) or 1
    p(
        f"event loop: {idle_cpu:.2f} cores busy with the cluster idle before the run; during it "
        f"{loop / total_s:.2f} cores; above idle {busy:.1f} s ≈ {1e3 * busy / n_graph:.2f} ms "
        f"per graph task (~{n_graph} tasks, {n_graph / max(1, n_kernel):.1f} per kernel task; "
        "scheduler and worker side together)"
    )
    p(
        f"memory: process RSS {rss_base / 2**20:.0f} MiB after the cluster started, peak "
        f"{REC.rss_peak / 2**20:.0f} MiB (driver + scheduler + {w} in-process workers; growth "
        f"{(REC.rss_peak - rss_base) / 2**20:.0f} MiB)"
    )
    p(
        f"results.zarr: {results_bytes / 2**20:.1f} MiB on disk (creation wrote "
        f"{REC.zarr_write['setup'][2] / 2**20:.1f} MiB in {REC.zarr_write['setup'][0]:.2f} s); "
        f"output stores {wr[1]} in "
        f"{wr[0]:.2f} s ({wr[2] / 2**20:.1f} MiB); done marks {wd[1]} writes in {wd[0]:.2f} s "
        f"({wd[2] / 2**20:.1f} MiB rewritten), {REC.zarr_read_done[1]} done reads in "
        f"{REC.zarr_read_done[0]:.2f} s"
        + (f"; exports {export_bytes / 2**20:.1f} MiB" if args.export else "")
    )
    in_bytes = args.images * run.parameters.polar_grid.n_shells * run.parameters.n_inplanes * 8
    struct_s = full_wall / args.total_structures
    p(
        f"inputs: {in_bytes / GIB:.0f} GiB of images per structure ({in_bytes / GIB / struct_s:.1f}"
        f" GiB/s at the predicted {struct_s:.0f} s per structure); each image block feeds "
        f"{plan.n_template_blocks} kernel tasks"
    )
    p(
        f"prediction, {args.total_structures} structures: {full_wall / 3600:.2f} h wall, "
        f"{gpu_h:.0f} GPU-hours (ideal {full_ideal / 3600:.2f} h, {ideal_gpu_h:.0f} GPU-hours)"
    )
    p(
        f"simulated {w} workers: makespan {makespan:.1f} s vs ideal {ideal:.1f} s, overhead "
        f"{100 * overhead:.1f}%"
    )
    sys.stdout.flush()
    return dict(
        rows=rows,
        makespan=makespan,
        ideal=ideal,
        bound=bound,
        overhead=overhead,
        fill=fill,
        tail=tail,
        steady=steady,
        steady_utilisation=util,
        one_off=one_off,
        setup=setup,
        full_wall_s=full_wall,
        gpu_hours=gpu_h,
        ideal_gpu_hours=ideal_gpu_h,
        rss_base=rss_base,
        rss_peak=REC.rss_peak,
        sched_tasks_peak=REC.sched_tasks_peak,
        results_bytes=results_bytes,
        zarr_write=REC.zarr_write,
        zarr_read_done=REC.zarr_read_done,
        loads=REC.loads,
        cpu=REC.cpu,
        idle_cpu=idle_cpu,
        pid=os.getpid(),
    )


if __name__ == "__main__":
    sys.exit(main())
