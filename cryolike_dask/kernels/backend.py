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


_GEMM_RATE: dict[str, float] = {}


def gemm_rate(size: int = 256, repeats: int = 3) -> float:
    """Complex64 GEMM rate of this process on the CPU, flop/s (measured once, ~0.1 s).

    Used only for cost estimates printed before long work.
    """
    if "cpu" not in _GEMM_RATE:
        import time

        rng = np.random.default_rng(0)
        a = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))).astype(
            np.complex64
        )
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        _GEMM_RATE["cpu"] = 8.0 * size**3 / max(best, 1e-9)
    return _GEMM_RATE["cpu"]
