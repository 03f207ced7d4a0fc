"""``cupy.cuda`` of the CuPy test stand-in: emulated devices, streams and memory pools.

The names are those of real CuPy's ``cupy.cuda`` (which the API dump does not list); see
:mod:`cupy._device` for the emulated machine.
"""

from cupy._device import (
    Device,
    Event,
    MemoryPool,
    PinnedMemoryPool,
    Stream,
    get_current_stream,
)
from cupy._device import state as _state
from cupy.cuda import memory, runtime


def get_device_id():
    """The current device ordinal."""
    _state.count()
    return _state.current_device()


def is_available():
    """Whether a device is visible (never raises)."""
    try:
        return runtime.getDeviceCount() > 0
    except Exception:
        return False


def __getattr__(name):
    raise AttributeError(f"module 'cupy.cuda' has no attribute '{name}' (in the stand-in)")


__all__ = [
    "Device",
    "Event",
    "MemoryPool",
    "PinnedMemoryPool",
    "Stream",
    "get_current_stream",
    "get_device_id",
    "is_available",
    "memory",
    "runtime",
]
