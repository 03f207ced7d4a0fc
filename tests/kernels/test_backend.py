"""The library routing of kernels/backend.py gives NumPy's and SciPy's results."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from cryolike_dask.kernels import backend


@pytest.fixture(params=[True, False], ids=["torch", "numpy"])
def routed(request, monkeypatch):
    monkeypatch.setattr(backend, "USE_TORCH", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_matmul_equals_numpy(routed, dtype) -> None:
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((5, 7, 9)) + 1j * rng.standard_normal((5, 7, 9))).astype(dtype)
    b = (rng.standard_normal((5, 9, 4)) + 1j * rng.standard_normal((5, 9, 4))).astype(dtype)
    want = np.einsum("qmn,qnk->qmk", a.astype(np.complex128), b.astype(np.complex128))
    tol = 1e-5 if dtype == np.complex64 else 1e-12
    got = backend.matmul(np, a, b)
    assert isinstance(got, np.ndarray) and got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    out = np.empty((5, 7, 4), dtype)
    assert backend.matmul(np, a, b, out=out) is out
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("axis", [0, -1])
def test_irfft_equals_scipy(routed, axis) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((9, 6)) + 1j * rng.standard_normal((9, 6))).astype(np.complex64)
    x = x if axis == 0 else np.ascontiguousarray(x.T)
    want = scipy.fft.irfft(x.astype(np.complex128), n=16, axis=axis, norm="forward")
    got = backend.irfft(np, x, 16, axis=axis)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("workers", [None, 1, 2, 3])
@pytest.mark.parametrize("gather_bytes", [64, 1000, 2**20])
def test_irfft_of_transposed_view_equals_scipy(monkeypatch, workers, gather_bytes) -> None:
    """The kernel's ``[Q, m, j] -> [m, j, Q]`` view, transformed in gathered groups of rows."""
    monkeypatch.setattr(backend, "GATHER_BYTES", gather_bytes)
    rng = np.random.default_rng(3)
    q, m, j, n = 9, 5, 7, 16
    xq = (rng.standard_normal((q, m, j)) + 1j * rng.standard_normal((q, m, j))).astype(np.complex64)
    view = xq.transpose(1, 2, 0)
    want = scipy.fft.irfft(view.astype(np.complex128), n=n, axis=-1, norm="forward")
    out = np.full((m, j, n), np.nan, np.float32)
    assert backend.irfft(np, view, n, out=out, workers=workers) is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    got = backend.irfft(np, view, n, workers=workers)  # no buffer given
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_matmul_split_over_the_batch_equals_numpy(routed, workers) -> None:
    """Inside one_library_thread a batched GEMM runs as ranges of its batch on our threads."""
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((7, 5, 6)) + 1j * rng.standard_normal((7, 5, 6))).astype(np.complex64)
    b = (rng.standard_normal((7, 6, 3)) + 1j * rng.standard_normal((7, 6, 3))).astype(np.complex64)
    want = np.einsum("qmn,qnk->qmk", a.astype(np.complex128), b.astype(np.complex128))
    with backend.one_library_thread(workers):
        with backend.one_library_thread(workers):  # nested: the outer setting survives
            pass
        assert backend._one_thread() is (routed and workers > 1)
        got = backend.matmul(np, a, b, workers=workers)
    assert not backend._one_thread()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gather_bytes", [64, 2**20])
def test_irfft_rows_equals_scipy(routed, monkeypatch, gather_bytes) -> None:
    monkeypatch.setattr(backend, "GATHER_BYTES", gather_bytes)
    rng = np.random.default_rng(5)
    xq = (rng.standard_normal((9, 11)) + 1j * rng.standard_normal((9, 11))).astype(np.complex64)
    rows = xq.T  # strided rows, as the kernel's GEMM result read along its orders
    out = np.full((11, 16), np.nan, np.float32)
    backend.irfft_rows(rows, 16, out)
    want = scipy.fft.irfft(rows.astype(np.complex128), n=16, axis=-1, norm="forward")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
