"""Array-module dispatch: kernels run on NumPy or CuPy, chosen from the arrays they are given.

No global backend switch exists (one process may mix CPU and GPU work): every kernel calls
:func:`array_module` on its inputs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def array_module(*arrays: Any) -> ModuleType:
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if type(a).__module__.split(".", 1)[0] == "cupy":
            import cupy

            return cupy
    return np


def fft_module(xp: ModuleType) -> Any:
    """The FFT namespace for ``xp``: ``scipy.fft`` for NumPy (threaded), ``cupy.fft`` for CuPy."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft


def fft_kwargs(xp: ModuleType, workers: int | None) -> dict[str, Any]:
    """Extra keyword arguments for FFT calls (``workers`` exists only for ``scipy.fft``)."""
    return {"workers": workers} if (xp is np and workers is not None) else {}


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` (``x`` itself when it is already a NumPy array)."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    return get() if callable(get) else np.asarray(x)


def has_gpu() -> bool:
    """Whether CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError, missing driver libraries ...
        return False
