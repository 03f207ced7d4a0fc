"""Where a run executes: the user's Dask client, a running cluster, or a LocalCluster.

:func:`get_client` chooses, in this order: a local scheduler when asked (``sync`` /
``threads``); the ``client`` passed in; a scheduler address or file; the active client of the
session (``distributed.default_client()``, as dask-image, xarray and dask-ml use it); and only
then a new ``LocalCluster`` sized to the machine, which it says in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryolike_dask.errors import CryoLikeDaskError


@dataclass(frozen=True)
class ClusterOptions:
    """How to get a Dask client.

    Attributes
    ----------
    scheduler_address : str, optional
        Connect to this running scheduler (``tcp://host:8786``).
    scheduler_file : str, optional
        Connect through a scheduler file (``dask scheduler --scheduler-file``).
    n_workers, threads_per_worker : int, optional
        LocalCluster size; defaults depend on the device (see :func:`local_cluster_size`).
    memory_limit : str or int, optional
        Per-worker memory limit of the LocalCluster (default: machine memory / workers).
    scheduler : str, optional
        ``"sync"`` or ``"threads"`` to run without a distributed cluster (tests, debugging).
    dashboard : bool
        Start the LocalCluster's dashboard.
    processes : bool
        LocalCluster workers in their own processes (default); ``False`` runs them in this
        process (no spawned interpreters, so scripts need no ``__main__`` guard).
    """

    scheduler_address: str | None = None
    scheduler_file: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | int | None = None
    scheduler: str | None = None
    dashboard: bool = True
    processes: bool = True
    connect_timeout: str = "30s"


logger = logging.getLogger(__name__)


class ClusterError(CryoLikeDaskError):
    """The Dask cluster asked for cannot be reached or started."""


class _DropCancelledFeed(logging.Filter):
    """Drop the scheduler's CancelledError log of a progress bar's feed when a cluster closes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


def _quiet_cancelled_feeds() -> None:
    logger = logging.getLogger("distributed.scheduler")
    if not any(isinstance(f, _DropCancelledFeed) for f in logger.filters):
        logger.addFilter(_DropCancelledFeed())


def machine_memory() -> int:
    """Total physical memory in bytes (4 GiB if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


#: Seconds to wait for the first worker of a cluster before planning.
WORKER_TIMEOUT_S = 120.0
#: The worker resource a kernel task takes on GPU workers (one per GPU).
GPU_RESOURCE = "GPU"
#: Threads of a GPU worker we start: one runs the kernels (holding the GPU resource), the
#: other loads the next image block and stores results meanwhile.
GPU_WORKER_THREADS = 2


def visible_gpus() -> list[str]:
    """The GPUs this machine offers, as ``CUDA_VISIBLE_DEVICES`` entries.

    Counted without creating a CUDA context in this process: ``CUDA_VISIBLE_DEVICES`` when it
    is set, else NVML (``pynvml``) when installed, else CuPy asked in a subprocess; ``[]``
    when CuPy is not installed.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        out = []
        for d in (x.strip() for x in env.split(",")):
            if not d or d.startswith("-"):
                break  # CUDA ignores everything from the first invalid entry on
            out.append(d)
        return out
    if importlib.util.find_spec("cupy") is None:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(int(pynvml.nvmlDeviceGetCount()))]
    except Exception:  # not installed, or no NVML on this machine
        pass
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import cupy; print(cupy.cuda.runtime.getDeviceCount())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return [str(i) for i in range(int(done.stdout.strip() or 0))]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reported about itself (measured on the worker, see
    :func:`describe_workers`).

    Attributes
    ----------
    address : str
    nthreads : int
    memory_limit : int
        Bytes (0 = no limit).
    gpu : bool
        CuPy sees a CUDA device there.
    gpu_free, gpu_total : int
        Bytes of the worker's first visible GPU.
    device : str
        Its ``CUDA_VISIBLE_DEVICES`` first entry (which physical GPU it uses).
    """

    address: str
    nthreads: int
    memory_limit: int
    gpu: bool = False
    gpu_free: int = 0
    gpu_total: int = 0
    device: str = ""
    resources: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def kernel_slots(self) -> int:
        """Kernel tasks it runs at once: its :data:`GPU_RESOURCE` count on a GPU worker that
        has one (its other threads load and store meanwhile), else its threads."""
        if self.gpu and self.resources.get(GPU_RESOURCE, 0) >= 1:
            return int(self.resources[GPU_RESOURCE])
        return max(1, self.nthreads)


def _describe_self(dask_worker: Any = None) -> dict[str, Any]:
    """Runs on a worker: its threads, memory limit and GPU (this creates the worker's own
    CUDA context, on the GPU it will use)."""
    info: dict[str, Any] = {
        "nthreads": int(dask_worker.state.nthreads) if dask_worker is not None else 1,
        "memory_limit": int(getattr(dask_worker.memory_manager, "memory_limit", 0) or 0)
        if dask_worker is not None
        else 0,
        "gpu": False,
        "resources": dict(getattr(dask_worker.state, "total_resources", {}) or {})
        if dask_worker is not None
        else {},
    }
    if importlib.util.find_spec("cupy") is None:
        return info
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            free, total = cupy.cuda.runtime.memGetInfo()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            info.update(gpu=True, gpu_free=int(free), gpu_total=int(total), device=visible)
    except Exception:  # CuPy without a usable GPU
        pass
    return info


def describe_workers(client: Any, timeout: float | None = None) -> list[WorkerInfo]:
    """Ask every worker of ``client`` about itself, after waiting for the first one.

    Raises :class:`ClusterError` when no worker joins within ``timeout`` seconds (default
    :data:`WORKER_TIMEOUT_S`), e.g. a dask-jobqueue cluster whose jobs are still queued.
    """
    timeout = WORKER_TIMEOUT_S if timeout is None else timeout
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"no Dask worker joined the scheduler within {timeout:.0f} s (are the worker jobs "
            "still queued? scale the cluster or wait, then rerun)"
        ) from None
    answers = client.run(_describe_self)
    return [WorkerInfo(address=a, **v) for a, v in sorted(answers.items())]


def resolve_device(device: str, client: Any = None, workers: list[WorkerInfo] | None = None) -> str:
    """``"auto"`` → ``"gpu"`` when the kernels will run where CuPy sees a GPU, else ``"cpu"``.

    With a client the workers are asked (:func:`describe_workers`): the driver, often a login
    node, needs no GPU and creates no CUDA context. Without one (a local scheduler in this
    process) this machine's GPUs are counted without a context (:func:`visible_gpus`).
    ``"gpu"`` where there is none is an error; ``"cpu"`` is returned unchanged.
    """
    if device not in ("auto", "gpu"):
        return device
    if client is not None:
        workers = workers if workers is not None else describe_workers(client)
        gpu = any(w.gpu for w in workers)
    else:
        gpu = bool(visible_gpus())
    if device == "gpu" and not gpu:
        where = "any Dask worker" if client is not None else "this machine"
        raise ClusterError(f"device 'gpu' requested but CuPy sees no CUDA GPU on {where}")
    return "gpu" if gpu else "cpu"


def kernel_resources(workers: list[WorkerInfo] | None, device: str) -> dict[str, int] | None:
    """``{GPU_RESOURCE: 1}`` for the kernel tasks when every GPU worker advertises the
    resource (our clusters and deploy profiles do): one kernel per GPU at a time while the
    worker's other thread loads the next image block and stores results. ``None`` otherwise
    (a task asking for a resource no worker has would never run)."""
    if device != "gpu" or not workers:
        return None
    gpus = [w for w in workers if w.gpu]
    if gpus and all(w.resources.get(GPU_RESOURCE, 0) >= 1 for w in gpus):
        return {GPU_RESOURCE: 1}
    return None


def gpu_workers(workers: list[WorkerInfo]) -> list[str]:
    """Addresses of the workers with a GPU (where GPU work is sent)."""
    return [w.address for w in workers if w.gpu]


def local_cluster_size(
    device: str, n_workers: int | None = None, threads_per_worker: int | None = None
) -> tuple[int, int]:
    """``(workers, threads)``: one single-threaded worker per GPU; on CPUs, one worker
    process with a thread per core.

    On CPUs, threads share the worker's cache of prepared template blocks (each is prepared
    once per process, not once per core) and NumPy, BLAS and the FFTs release the GIL. Dask's
    nanny sets OMP/MKL/OpenBLAS threads to 1 in workers, so threads × workers = cores does not
    oversubscribe the machine. With ``n_workers`` alone, the cores are shared out.
    """
    if device == "gpu":
        return n_workers or 1, threads_per_worker or GPU_WORKER_THREADS
    cores = cpu_count()
    if n_workers is None and threads_per_worker is None:
        return 1, cores
    if threads_per_worker is None:
        return n_workers, max(1, cores // n_workers)
    return n_workers or max(1, cores // threads_per_worker), threads_per_worker


def gpu_cluster(options: ClusterOptions) -> Any:
    """A local cluster of one worker per visible GPU, each seeing its own GPU first
    (``CUDA_VISIBLE_DEVICES`` rotated, as dask-cuda does), with :data:`GPU_WORKER_THREADS`
    threads and one :data:`GPU_RESOURCE`: kernels take the resource, so one runs at a time
    while the other thread loads the next image block and stores finished results.

    dask-cuda's ``LocalCUDACluster`` when it is installed; otherwise a ``SpecCluster`` of
    ``Nanny`` workers with their own ``CUDA_VISIBLE_DEVICES``. ``options.n_workers`` (≤ the
    GPUs) uses the first GPUs only.
    """
    gpus = visible_gpus()
    if not gpus:
        raise ClusterError(
            "device 'gpu': no GPU visible on this machine (CUDA_VISIBLE_DEVICES, NVML, CuPy)"
        )
    n = min(options.n_workers or len(gpus), len(gpus))
    gpus = gpus[:n]
    threads = options.threads_per_worker or GPU_WORKER_THREADS
    memory = options.memory_limit or int(machine_memory() * 0.9 / n)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None:
        logger.info("no Dask client is active: starting dask-cuda's LocalCUDACluster on GPUs %s",
                    ",".join(gpus))  # fmt: skip
        return LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=",".join(gpus),
            threads_per_worker=threads,
            memory_limit=memory,
            resources={GPU_RESOURCE: 1},
            dashboard_address=":0",  # a free port: never "port 8787 in use"
        )
    from distributed import Nanny, Scheduler, SpecCluster

    logger.info(
        "no Dask client is active: starting one worker per GPU (%s; dask-cuda not installed)",
        ",".join(gpus),
    )
    workers = {}
    for i in range(n):
        order = gpus[i:] + gpus[:i]  # worker i sees GPU i first
        workers[f"gpu-{gpus[i]}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": threads,
                "memory_limit": memory,
                "resources": {GPU_RESOURCE: 1},
                "env": {"CUDA_VISIBLE_DEVICES": ",".join(order)},
            },
        }
    scheduler = {
        "cls": Scheduler,
        "options": {"dashboard": options.dashboard, "dashboard_address": ":0"},
    }
    return SpecCluster(
        scheduler=scheduler,
        workers=workers,
        name="cryolike-dask-gpu",
        silence_logs=logging.WARNING,  # as LocalCluster
    )


def active_client() -> Any:
    """The session's active ``distributed.Client``, or ``None``."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


_INTERRUPTED = threading.Event()


def interrupted() -> bool:
    """Whether Ctrl-C was pressed (see :func:`catch_interrupts`)."""
    return _INTERRUPTED.is_set()


def catch_interrupts() -> None:
    """Make Ctrl-C end the run once and cleanly: the first SIGINT raises KeyboardInterrupt in
    the main thread and sets a flag the executor polls (an interrupt that lands in a callback
    that swallows it still ends the run); further SIGINTs while it shuts down are ignored."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        if _INTERRUPTED.is_set():
            return
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    default_hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        # the interrupt landed in a callback that cannot raise (e.g. distributed's gc
        # diagnostics): the flag still ends the run, so say nothing
        if not (_INTERRUPTED.is_set() and issubclass(info.exc_type, KeyboardInterrupt)):
            default_hook(info)

    sys.unraisablehook = unraisable


def _quiet_shutdown() -> None:
    """After Ctrl-C: silence distributed's logs of the cluster being torn down."""
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def get_client(
    options: ClusterOptions | None = None, device: str = "cpu", client: Any = None
) -> Iterator[Any]:
    """Yield the ``distributed.Client`` to run on (``None`` for a local scheduler).

    Closes only what it opened: a client passed in or the session's active client is left as
    it is.
    """
    options = options or ClusterOptions()
    if options.scheduler in ("sync", "synchronous", "threads", "processes"):
        yield None
        return
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    _quiet_cancelled_feeds()
    if options.scheduler_address or options.scheduler_file:
        if options.scheduler_file and not os.path.exists(options.scheduler_file):
            raise ClusterError(f"{options.scheduler_file}: scheduler file not found")
        try:
            opened = Client(
                address=options.scheduler_address,
                scheduler_file=options.scheduler_file,
                timeout=options.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            where = options.scheduler_address or options.scheduler_file
            raise ClusterError(f"cannot reach the Dask scheduler at {where} ({exc})") from None
        try:
            yield opened
        except KeyboardInterrupt:
            _quiet_shutdown()
            raise
        finally:
            opened.close()
        return
    current = active_client()
    if current is not None:
        logger.info("using the active Dask client (%s)", getattr(current, "dashboard_link", ""))
        yield current
        return
    if device == "gpu":
        cluster = gpu_cluster(options)
    else:
        workers, threads = local_cluster_size(device, options.n_workers, options.threads_per_worker)
        memory = options.memory_limit or int(machine_memory() * 0.9 / workers)
        logger.info(
            "no Dask client is active: starting a LocalCluster of %d worker(s) × %d thread(s)%s",
            workers,
            threads,
            "" if options.processes else " in this process",
        )
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=options.processes,
            memory_limit=memory,
            dashboard_address=":0",  # a free port: never "port 8787 in use"
        )
    opened = Client(cluster)
    try:
        yield opened
    except KeyboardInterrupt:
        _quiet_shutdown()
        raise
    finally:
        opened.close()
        cluster.close()


def worker_memory(client: Any, device: str = "cpu", workers: list[WorkerInfo] | None = None) -> int:
    """Memory for one kernel task (bytes): the smallest worker's memory limit per thread
    and, on GPUs, its free GPU memory (both measured on the workers), times 0.8."""
    if client is None:
        return int(machine_memory() * 0.5)
    workers = workers if workers is not None else describe_workers(client)
    if device == "gpu":
        workers = [w for w in workers if w.gpu] or workers
    budgets = []
    for w in workers:
        per = (w.memory_limit or machine_memory()) // max(w.nthreads, 1)
        if device == "gpu" and w.gpu:
            # one kernel per GPU resource: the GPU is shared by the kernels, not the threads
            per = min(per, w.gpu_free // w.kernel_slots)
        budgets.append(per)
    return int(min(budgets) * 0.8) if budgets else int(machine_memory() * 0.5)


def total_threads(client: Any) -> int:
    """Worker threads of the cluster (1 for a local scheduler)."""
    if client is None:
        return 1
    info = (
        client.scheduler_info(n_workers=-1)
        if _accepts_n_workers(client)
        else client.scheduler_info()
    )
    return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))


def _accepts_n_workers(client: Any) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters
