"""``cupy.cuda.runtime`` of the CuPy test stand-in: the CUDA runtime queries it emulates.

Every call counts as a device call (:func:`cupy._standin.stats`).
"""

from cupy._device import CUDARuntimeError, device_memory, visible_devices
from cupy._device import state as _state

is_hip = False


def getDeviceCount():
    """Visible devices; ``CUDARuntimeError`` (cudaErrorNoDevice) when there are none."""
    _state.count()
    n = len(visible_devices())
    if n == 0:
        raise CUDARuntimeError(100)
    return n


def getDevice():
    _state.count()
    return _state.current_device()


def setDevice(device):
    _state.count()
    _state.set_device(int(device))


def memGetInfo():
    """``(free, total)`` bytes of the current device."""
    _state.count()
    device = _state.current_device()
    total = device_memory()
    return total - _state.live_bytes(device), total


def deviceSynchronize():
    _state.count(sync=0)


def getDeviceProperties(device):
    _state.count()
    visible = visible_devices()
    if not 0 <= device < len(visible):
        raise CUDARuntimeError(101)
    return {
        "name": b"cryolike_dask stand-in GPU",
        "totalGlobalMem": device_memory(),
        "major": 9,
        "minor": 0,
        "multiProcessorCount": 132,
        "pciBusID": visible[device],
        "pciDeviceID": 0,
        "pciDomainID": 0,
    }


def runtimeGetVersion():
    return 12080


def driverGetVersion():
    return 12080


__all__ = [
    "CUDARuntimeError",
    "deviceSynchronize",
    "driverGetVersion",
    "getDevice",
    "getDeviceCount",
    "getDeviceProperties",
    "is_hip",
    "memGetInfo",
    "runtimeGetVersion",
    "setDevice",
]
