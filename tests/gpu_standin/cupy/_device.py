"""The emulated machine of the CuPy test stand-in: devices, memory and the accounting.

Nothing here touches a GPU. The machine is described by environment variables, read at
every call (so worker processes inherit it):

* ``CRYOLIKE_STANDIN_GPUS`` - physical GPUs of the machine (default 1);
* ``CUDA_VISIBLE_DEVICES`` - honoured as CUDA does: the visible physical ids, in order,
  up to the first invalid entry;
* ``CRYOLIKE_STANDIN_GPU_MEMORY`` - bytes of memory of each GPU (default 16 GiB).

:data:`state` counts uploads, host syncs and device calls and tracks the bytes of live
device arrays per device (with :func:`weakref.finalize` on each buffer) and their peak.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from typing import Any

import numpy as np

ENV_GPUS = "CRYOLIKE_STANDIN_GPUS"
ENV_MEMORY = "CRYOLIKE_STANDIN_GPU_MEMORY"
DEFAULT_MEMORY = 16 * 2**30

_CUDA_ERRORS = {
    2: ("cudaErrorMemoryAllocation", "out of memory"),
    100: ("cudaErrorNoDevice", "no CUDA-capable device is detected"),
    101: ("cudaErrorInvalidDevice", "invalid device ordinal"),
}


class CUDARuntimeError(RuntimeError):
    """Stand-in for ``cupy.cuda.runtime.CUDARuntimeError`` (same message format)."""

    def __init__(self, status: int):
        self.status = status
        name, text = _CUDA_ERRORS.get(status, ("cudaErrorUnknown", "unknown error"))
        super().__init__(f"{name}: {text}")


CUDARuntimeError.__module__ = "cupy.cuda.runtime"


class OutOfMemoryError(MemoryError):
    """Stand-in for ``cupy.cuda.memory.OutOfMemoryError`` (same arguments and message)."""

    def __init__(self, size: int, total: int, limit: int = 0):
        msg = f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
        msg += f", limit set to: {limit:,} bytes)." if limit else ")."
        super().__init__(msg)


OutOfMemoryError.__module__ = "cupy.cuda.memory"


# ------------------------------------------------------------------------------ the machine
def physical_gpus() -> int:
    """GPUs of the emulated machine (``CRYOLIKE_STANDIN_GPUS``)."""
    return int(os.environ.get(ENV_GPUS, "1"))


def visible_devices() -> list[int]:
    """Physical ids of the visible devices; device ordinal ``i`` is ``visible_devices()[i]``."""
    n = physical_gpus()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(n))
    out: list[int] = []
    for entry in env.split(","):
        try:
            i = int(entry.strip())
        except ValueError:
            break  # CUDA ignores everything from the first invalid entry on
        if not 0 <= i < n or i in out:
            break
        out.append(i)
    return out


def device_memory() -> int:
    """Bytes of memory of each emulated GPU (``CRYOLIKE_STANDIN_GPU_MEMORY``)."""
    return int(os.environ.get(ENV_MEMORY, str(DEFAULT_MEMORY)))


def _owner(host: np.ndarray) -> np.ndarray:
    """The array that owns the buffer of ``host`` (``host`` itself unless it is a view)."""
    while isinstance(host.base, np.ndarray):
        host = host.base
    return host


class _State:
    """Per-process accounting of the emulated devices."""

    COUNTERS = ("uploads", "upload_bytes", "host_syncs", "sync_bytes", "device_calls")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()  # current device ordinal and stream, per thread
        self._released: collections.deque[tuple[int, int, int]] = collections.deque()
        self._owners: dict[int, int] = {}  # id(buffer owner) -> device ordinal
        self.live: collections.Counter[int] = collections.Counter()  # device -> bytes
        self.limits: dict[int, int] = {}  # device -> memory-pool limit (0: none)
        self.reset()

    def reset(self) -> None:
        """Zero the counters; the peak restarts from the bytes live now."""
        with self._lock:
            self._drain()
            self.counts = dict.fromkeys(self.COUNTERS, 0)
            self.allocations = 0
            self.peak = sum(self.live.values())

    # -- counters
    def count(self, upload: int | None = None, sync: int | None = None) -> None:
        """One device call; with ``upload``/``sync`` bytes, also an upload / a host sync."""
        with self._lock:
            self.counts["device_calls"] += 1
            if upload is not None:
                self.counts["uploads"] += 1
                self.counts["upload_bytes"] += int(upload)
            if sync is not None:
                self.counts["host_syncs"] += 1
                self.counts["sync_bytes"] += int(sync)

    # -- devices
    def current_device(self) -> int:
        """The current device ordinal of this thread (raises without a visible device)."""
        count = len(visible_devices())
        if count == 0:
            raise CUDARuntimeError(100)
        device = getattr(self._local, "device", 0)
        if device >= count:
            raise CUDARuntimeError(101)
        return device

    def set_device(self, device: int) -> None:
        if not 0 <= device < len(visible_devices()):
            raise CUDARuntimeError(101)
        self._local.device = device

    # -- memory
    def _drain(self) -> None:
        """Apply the releases queued by finalizers (they may run at any bytecode)."""
        while self._released:
            key, device, nbytes = self._released.popleft()
            if self._owners.get(key) == device:
                del self._owners[key]
                self.live[device] -= nbytes

    def live_bytes(self, device: int | None = None) -> int:
        with self._lock:
            self._drain()
            return sum(self.live.values()) if device is None else self.live[device]

    def reserve(self, nbytes: int, device: int | None = None) -> None:
        """Raise ``OutOfMemoryError`` if ``nbytes`` more would not fit on ``device``."""
        device = self.current_device() if device is None else device
        with self._lock:
            self._drain()
            self._check(nbytes, device)

    def _check(self, nbytes: int, device: int) -> None:
        limit = self.limits.get(device, 0)
        cap = min(limit, device_memory()) if limit else device_memory()
        if self.live[device] + nbytes > cap:
            raise OutOfMemoryError(nbytes, self.live[device], limit)

    def allocate(self, host: np.ndarray) -> int:
        """Account for the buffer of ``host`` (once per buffer); its device ordinal."""
        owner = _owner(host)
        key = id(owner)
        with self._lock:
            self._drain()
            if key in self._owners:
                return self._owners[key]
        device = self.current_device()
        nbytes = int(owner.nbytes)
        with self._lock:
            self._drain()
            self._check(nbytes, device)
            self._owners[key] = device
            self.live[device] += nbytes
            self.allocations += 1
            self.peak = max(self.peak, sum(self.live.values()))
        weakref.finalize(owner, self._released.append, (key, device, nbytes)).atexit = False
        return device

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._drain()
            visible = visible_devices()
            device = getattr(self._local, "device", 0)
            return {
                **self.counts,
                "allocations": self.allocations,
                "live_bytes": sum(self.live.values()),
                "peak_bytes": self.peak,
                "physical_device": visible[device] if device < len(visible) else None,
                "pid": os.getpid(),
            }


#: The accounting of this process.
state = _State()


# ------------------------------------------------------------------------------ cupy.cuda
class Device:
    """Stand-in for ``cupy.cuda.Device``: a visible device ordinal."""

    def __init__(self, device: Any = None):
        if device is None:
            device = state.current_device()
        self.id = int(device.id if isinstance(device, Device) else device)
        self._previous: list[int] = []

    def use(self) -> Device:
        state.count()
        state.set_device(self.id)
        return self

    def __enter__(self) -> Device:
        self._previous.append(getattr(state._local, "device", 0))
        return self.use()

    def __exit__(self, *exc: object) -> None:
        state._local.device = self._previous.pop()

    def synchronize(self) -> None:
        state.count(sync=0)

    @property
    def mem_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes of this device."""
        state.count()
        if not 0 <= self.id < len(visible_devices()):
            raise CUDARuntimeError(101)
        total = device_memory()
        return total - state.live_bytes(self.id), total

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def pci_bus_id(self) -> str:
        """``"0000:XX:00.0"`` with XX the physical id of the device."""
        return f"0000:{visible_devices()[self.id]:02X}:00.0"

    def __int__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


Device.__module__ = "cupy.cuda.device"


class MemoryPool:
    """Stand-in for ``cupy.cuda.MemoryPool``; it caches no blocks (total = used bytes)."""

    def used_bytes(self) -> int:
        return state.live_bytes(state.current_device())

    def total_bytes(self) -> int:
        return self.used_bytes()

    def free_bytes(self) -> int:
        return 0

    def n_free_blocks(self) -> int:
        return 0

    def free_all_blocks(self, stream: Any = None) -> None:
        state.count()

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        """Limit the current device's allocations (``size`` bytes or a ``fraction`` of it)."""
        if size is not None and fraction is not None:
            raise ValueError("size and fraction cannot be specified at one time")
        if fraction is not None:
            if not 0 <= fraction <= 1:
                raise ValueError(f"memory limit fraction out of range: {fraction}")
            size = int(device_memory() * fraction)
        state.limits[state.current_device()] = int(size or 0)

    def get_limit(self) -> int:
        return state.limits.get(state.current_device(), 0)


MemoryPool.__module__ = "cupy.cuda.memory"


class PinnedMemoryPool:
    """Stand-in for ``cupy.cuda.PinnedMemoryPool`` (nothing is ever pinned)."""

    def n_free_blocks(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


PinnedMemoryPool.__module__ = "cupy.cuda.pinned_memory"

MEMORY_POOL = MemoryPool()
PINNED_MEMORY_POOL = PinnedMemoryPool()


class Event:
    """Stand-in for ``cupy.cuda.Event``: always done."""

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess=False):
        self.done = True

    def record(self, stream: Stream | None = None) -> None:
        state.count()

    def synchronize(self) -> None:
        state.count(sync=0)


class Stream:
    """Stand-in for ``cupy.cuda.Stream``: work is done when it is issued."""

    null: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int = 0):
        self.ptr = 0 if null else ptr
        self.done = True
        self._previous: list[Stream] = []

    def use(self) -> Stream:
        state._local.stream = self
        return self

    def __enter__(self) -> Stream:
        self._previous.append(get_current_stream())
        return self.use()

    def __exit__(self, *exc: object) -> None:
        state._local.stream = self._previous.pop()

    def synchronize(self) -> None:
        state.count(sync=0)

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event


Stream.null = Stream(null=True)
Stream.__module__ = Event.__module__ = "cupy.cuda.stream"


def get_current_stream(device_id: int = -1) -> Stream:
    """The stream of this thread (``Stream.null`` unless one is in use)."""
    return getattr(state._local, "stream", Stream.null)
