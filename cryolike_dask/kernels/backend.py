"""Array-module dispatch: kernels run on NumPy or CuPy, chosen from the arrays they are given.

No global backend switch exists (one process may mix CPU and GPU work): every kernel calls
:func:`array_module` on its inputs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
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


# ------------------------------------------------------------------------------ CPU libraries
# On NumPy inputs the two big steps of the kernel - the batched complex GEMM and the inverse
# real FFT over the orders - run fastest through torch's MKL (benchmarks/cpu_paths.py). torch is
# imported lazily, only here, and only sees NumPy memory through zero-copy ``from_numpy``
# views; CuPy inputs stay on CuPy; NumPy/SciPy are the fallback without torch.

#: Route NumPy GEMMs and inverse FFTs through torch when it imports (set False to measure or
#: to force the NumPy/SciPy fallback).
USE_TORCH = True

_TORCH: list[Any] = []
_TORCH_DTYPES = (np.dtype(np.complex64), np.dtype(np.complex128))
#: GEMMs also take real operands (one BLAS in the process: OpenBLAS threads that spin after
#: a NumPy GEMM slow down the next MKL one on the same cores)
_MATMUL_DTYPES = (*_TORCH_DTYPES, np.dtype(np.float32), np.dtype(np.float64))


def _torch() -> Any:
    """The ``torch`` module, or ``None`` when it does not import (cached)."""
    if not _TORCH:
        try:
            import torch
        except Exception:  # ImportError, broken installs
            torch = None
        _TORCH.append(torch)
    return _TORCH[0]


def _torch_ok(*arrays: Any, dtypes: tuple[np.dtype, ...] = _TORCH_DTYPES) -> bool:
    return (
        USE_TORCH
        and _torch() is not None
        and all(
            isinstance(a, np.ndarray)
            and a.dtype in dtypes
            and a.flags.writeable  # torch warns on read-only memory (memory-mapped inputs)
            and min(a.strides, default=0) >= 0
            for a in arrays
        )
    )


class _TorchThreads:
    """Run torch ops with ``workers`` intra-op threads.

    ``torch.set_num_threads`` is process-global (MKL's count is global too), so:

    * ``workers`` given: that many threads; restored on exit only on the main thread - a
      Dask task thread leaves it set, so that concurrent task threads asking for the same
      count never undo each other mid-GEMM;
    * ``workers=None``: on the main thread torch's own setting (``OMP_NUM_THREADS`` or all
      cores, as NumPy's BLAS); on any other thread (Dask task threads, which share the
      cores) one thread, as SciPy's FFTs and the nanny-pinned BLAS.
    """

    def __init__(self, workers: int | None):
        self.workers = workers
        self.old: int | None = None

    def __enter__(self) -> None:
        import threading

        torch = _torch()
        main = threading.current_thread() is threading.main_thread()
        n = self.workers if self.workers is not None else (None if main else 1)
        if n is not None and n > 0 and torch.get_num_threads() != n:
            if main:
                self.old = torch.get_num_threads()
            torch.set_num_threads(n)

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            _torch().set_num_threads(self.old)
            self.old = None


def matmul(xp: ModuleType, a: Any, b: Any, *, out: Any = None, workers: int | None = None) -> Any:
    """``xp.matmul(a, b, out=out)``; NumPy float inputs go through torch's MKL (zero-copy).

    Same values as NumPy/OpenBLAS to float rounding (both are exact GEMMs). ``out``
    (C-contiguous, of the result's shape and dtype) saves the page faults of a fresh result.
    """
    if xp is np and _torch_ok(a, b, dtypes=_MATMUL_DTYPES) and a.dtype == b.dtype:
        torch = _torch()
        shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        if out is None or out.shape != shape or out.dtype != a.dtype or not out.flags.c_contiguous:
            out = np.empty(shape, dtype=a.dtype)
        n_batch = out.shape[0] if out.ndim == 3 and a.ndim == 3 and b.ndim == 3 else 1
        if workers is not None and workers > 1 and n_batch > 1 and _one_thread():
            # inside one_library_thread: the batch split over our threads, one torch thread each
            def part(lo: int, hi: int) -> None:
                torch.matmul(
                    torch.from_numpy(a[lo:hi]),
                    torch.from_numpy(b[lo:hi]),
                    out=torch.from_numpy(out[lo:hi]),
                )

            run_ranges(part, n_batch, workers)
            return out
        with _TorchThreads(1 if _one_thread() else workers):
            torch.matmul(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
        return out
    return xp.matmul(a, b) if out is None else xp.matmul(a, b, out=out)


def irfft(
    xp: ModuleType, x: Any, n: int, *, axis: int = -1, out: Any = None, workers: int | None = None
) -> Any:
    """``irfft(x, n, axis, norm="forward")`` (CryoLike's inverse); real result.

    NumPy complex inputs go through ``torch.fft.irfft`` (MKL), which reads strided views
    without a copy, into ``out`` when given (C-contiguous, right shape and dtype); else
    SciPy's pocketfft (threaded by ``workers``) or ``cupy.fft``.
    """
    if xp is np and _torch_ok(x):
        torch = _torch()
        shape = list(x.shape)
        shape[axis] = n
        real = np.empty(0, x.dtype).real.dtype
        ok = (
            out is not None
            and tuple(out.shape) == tuple(shape)
            and out.dtype == real
            and out.flags.c_contiguous
        )
        if axis in (-1, x.ndim - 1) and x.ndim >= 2 and x.strides[-1] != x.itemsize:
            if not ok:
                out = np.empty(shape, dtype=real)
            rows = x.reshape(-1, x.shape[-1])  # a view for the kernel's transposed outputs
            if np.shares_memory(rows, x):
                _irfft_gathered(torch, rows, n, out.reshape(-1, n), workers)
                return out
        with _TorchThreads(1 if _one_thread() else workers):
            tx = torch.from_numpy(x)
            if ok:
                torch.fft.irfft(tx, n=n, dim=axis, norm="forward", out=torch.from_numpy(out))
                return out
            return torch.fft.irfft(tx, n=n, dim=axis, norm="forward").numpy()
    return fft_module(xp).irfft(x, n=n, axis=axis, norm="forward", **fft_kwargs(xp, workers))


#: Rows of a strided ``irfft`` input gathered into one contiguous, cache-sized buffer at a time
GATHER_BYTES = 256 * 2**10


def _irfft_gathered(torch: Any, rows: Any, n: int, out: Any, workers: int | None) -> None:
    """``out[r] = irfft(rows[r], n, norm="forward")`` for rows whose elements are far apart.

    The kernel's inverse transform reads the GEMM result ``[Q, m, s·D]`` along ``Q``: every
    element of a row lies in a different page. Transforming it in place makes MKL gather the
    whole tensor at once (about 3× slower); here each thread copies a cache-sized group of
    rows into a contiguous buffer and transforms it while it is still in cache, with one
    torch thread per range.
    """
    n_rows = rows.shape[0]
    step = max(1, GATHER_BYTES // (rows.shape[1] * rows.itemsize))
    threads = max(1, min(int(workers or 1), -(-n_rows // step)))
    with _TorchThreads(1 if threads > 1 or _one_thread() else workers):
        run_ranges(lambda lo, hi: irfft_rows(rows[lo:hi], n, out[lo:hi]), n_rows, threads)


def irfft_rows(rows: np.ndarray, n: int, out: np.ndarray) -> None:
    """``out[r] = irfft(rows[r], n, norm="forward")`` on the calling thread alone (NumPy).

    ``rows`` ``[R, Q]`` complex, any strides (the kernel's GEMM result read along its
    orders); ``out`` ``[R, n]`` real, C-contiguous. Rows are gathered in cache-sized groups
    into a contiguous buffer and transformed there (torch's MKL with the calling thread's
    torch setting - one thread inside :func:`one_library_thread` - or SciPy single-threaded).
    For host threads that each transform and then reduce their own rows while in cache.
    """
    n_rows, q = rows.shape
    step = max(1, GATHER_BYTES // (q * rows.itemsize))
    torch = _torch() if _torch_ok(rows) else None
    if torch is None:
        import scipy.fft

        out[...] = scipy.fft.irfft(rows, n=n, axis=-1, norm="forward", workers=1)
        return
    buf = np.empty((min(step, n_rows), q), dtype=rows.dtype)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        b = buf[: r1 - r0]
        np.copyto(b, rows[r0:r1])
        torch.fft.irfft(
            torch.from_numpy(b), n=n, dim=-1, norm="forward", out=torch.from_numpy(out[r0:r1])
        )


_LOCAL = threading.local()


def _one_thread() -> bool:
    """Whether the calling thread is inside :func:`one_library_thread`."""
    return bool(getattr(_LOCAL, "one", False))


@contextlib.contextmanager
def one_library_thread(workers: int | None) -> Iterator[None]:
    """Host work of one kernel call, parallel over our own threads only.

    With ``workers > 1`` and torch routing: torch runs one intra-op thread inside (set
    once, restored on exit on the main thread: each change of torch's process-wide thread
    count costs ~2 ms), and :func:`matmul` splits its batch over ``workers`` threads
    instead. Otherwise a no-op.
    """
    torch = _torch() if USE_TORCH else None
    if torch is None or workers is None or workers <= 1:
        yield
        return
    before = _one_thread()
    with _TorchThreads(1):
        _LOCAL.one = True
        try:
            yield
        finally:
            _LOCAL.one = before


def eigh(xp: ModuleType, a: Any) -> tuple[Any, Any]:
    """Eigenvalues (ascending) and eigenvectors of Hermitian ``a [..., n, n]``, on ``a``'s device.

    Solved on the host with NumPy/LAPACK: the matrices it is used for are small (``n`` is
    the number of shells), so the transfer costs less than a device solver's launches.
    """
    values, vectors = np.linalg.eigh(to_host(a))
    if xp is np:
        return values, vectors
    return xp.asarray(values), xp.asarray(vectors)


def run_ranges(fn: Any, n_items: int, workers: int | None) -> None:
    """Call ``fn(lo, hi)`` on contiguous ranges covering ``range(n_items)``, on host threads.

    ``workers`` threads (one when ``None``: a Dask task thread shares the cores, as SciPy's
    FFTs do); ``fn`` must release the GIL for most of its time (NumPy ufuncs do) and must not
    share writable state between ranges. Four ranges per thread, taken as threads free up,
    so that a core busy with other work delays only its share. Exceptions propagate.
    """
    n = max(1, min(int(workers or 1), n_items))
    if n == 1:
        fn(0, n_items)
        return
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    tasks = min(n_items, 4 * n)
    bounds = [round(i * n_items / tasks) for i in range(tasks + 1)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(fn, lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
        for f in futures:
            f.result()
