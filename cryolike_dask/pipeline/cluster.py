"""Where a run executes: the user's Dask client, a running cluster, or a LocalCluster.

:func:`get_client` chooses, in this order: a local scheduler when asked (``sync`` /
``threads``); the ``client`` passed in; a scheduler address or file; the active client of the
session (``distributed.default_client()``, as dask-image, xarray and dask-ml use it); and only
then a new ``LocalCluster`` sized to the machine, which it says in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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


def _worker_has_gpu() -> bool:
    from cryolike_dask.kernels.backend import has_gpu

    return bool(has_gpu())


def resolve_device(device: str, client: Any = None) -> str:
    """``"auto"`` → ``"gpu"`` when CuPy sees a CUDA GPU where the kernels run, else ``"cpu"``.

    With a client the workers are asked (``client.run``), so a driver on a login node needs no
    GPU; ``"gpu"`` on workers without one is an error. Other values are returned unchanged.
    """
    if device not in ("auto", "gpu"):
        return device
    if client is not None:
        answers = client.run(_worker_has_gpu)
        gpu = bool(answers) and all(answers.values())
    else:
        gpu = _worker_has_gpu()
    if device == "gpu" and not gpu:
        where = "the workers" if client is not None else "this process"
        raise ClusterError(f"device 'gpu' requested but CuPy sees no CUDA GPU on {where}")
    return "gpu" if gpu else "cpu"


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
        return n_workers or 1, threads_per_worker or 1
    cores = cpu_count()
    if n_workers is None and threads_per_worker is None:
        return 1, cores
    if threads_per_worker is None:
        return n_workers, max(1, cores // n_workers)
    return n_workers or max(1, cores // threads_per_worker), threads_per_worker


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
        dashboard_address=":0" if options.dashboard else None,
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


def worker_memory(client: Any, options: ClusterOptions, device: str) -> int:
    """Memory available to one worker thread, for block planning (bytes)."""
    if client is None:
        return int(machine_memory() * 0.5)
    info = (
        client.scheduler_info(n_workers=-1)
        if _accepts_n_workers(client)
        else client.scheduler_info()
    )
    workers = list(info.get("workers", {}).values())
    if not workers:
        return int(machine_memory() * 0.5)
    per = min(w.get("memory_limit") or machine_memory() for w in workers)
    threads = max(w.get("nthreads", 1) for w in workers)
    budget = per // max(threads, 1)
    if device == "gpu":
        budget = min(budget, gpu_free_memory())
    return int(budget * 0.8)


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


def gpu_free_memory() -> int:
    """Free memory of the current GPU in bytes."""
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    return int(free)
