"""The kernels' GPU code path on every CI run, without a GPU: the CuPy stand-in.

``tests/gpu_standin/cupy`` is as strict as CuPy (stricter where that catches host/device
mix-ups), counts uploads, host syncs and device memory, and emulates the devices of a
machine; on it the kernels give NumPy's results, as on a real GPU (``test_cupy.py``).
"""

from __future__ import annotations

import copy
import inspect
import json
import operator
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from cryolike_dask.kernels import (
    BlockOutputs,
    LikelihoodConstants,
    array_module,
    correlate_block,
    has_gpu,
    optimal_pose_log_likelihood,
    prepare_images,
    prepare_templates,
    to_host,
)
from tests.kernels.device_inputs import DEVICE_BOX, device_inputs
from tests.standin import (
    DEFAULT_MEMORY_BYTES,
    STANDIN_PATH,
    cupy_standin_fixture,  # noqa: F401 - the fixture ``cupy_standin``
    standin_cupy,
    standin_environ,
)

BOX = DEVICE_BOX
NUMPY_REFUSED = re.escape("Unsupported type <class 'numpy.ndarray'>")
TWO_GPUS = pytest.mark.parametrize(
    "cupy_standin", [{"n_gpus": 2, "visible_devices": "1,0"}], indirect=True
)


def _public(namespace) -> set[str]:
    return {n for n in vars(namespace) if not n.startswith("_")}


# ------------------------------------------------------------------------------ strictness
def test_no_implicit_conversion_to_numpy(cupy_standin) -> None:
    cp = cupy_standin
    x = cp.asarray(np.arange(6.0))
    assert type(x).__module__.startswith("cupy") and array_module(x) is cp
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    with pytest.raises(TypeError, match=r"numpy\.sum called on a device array"):
        np.sum(x)
    with pytest.raises(TypeError, match=r"numpy\.iscomplexobj"):
        np.iscomplexobj(x)
    np.testing.assert_array_equal(x.get(), np.arange(6.0))  # the explicit way


@pytest.mark.parametrize(
    "op",
    [operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.lt],
)
def test_numpy_operands_are_refused(cupy_standin, op) -> None:
    cp = cupy_standin
    x, h = cp.ones(3), np.ones(3)
    with pytest.raises(TypeError, match=NUMPY_REFUSED):
        op(x, h)
    with pytest.raises(TypeError, match=NUMPY_REFUSED):
        op(h, x)


def test_numpy_arrays_refused_everywhere_but_scalars_allowed(cupy_standin) -> None:
    cp = cupy_standin
    x, h = cp.arange(4.0), np.arange(4.0)
    refused = [
        lambda: x.__iadd__(h),
        lambda: h.__iadd__(x),
        lambda: cp.exp(h),
        lambda: cp.sum(h),
        lambda: cp.where(x > 0, x, h),
        lambda: cp.fft.fft(h),
        lambda: x[np.array([0, 1])],
        lambda: x.__setitem__(slice(None), h),
        lambda: np.add(x, h),
    ]
    for attempt in refused:
        with pytest.raises(TypeError):
            attempt()
    # scalars (Python, NumPy, 0-d NumPy arrays) are fine, and results stay on the device
    for y in (2 * x, x * np.float32(2), np.float64(2) * x, np.array(2.0) * x, np.exp(x), -x):
        assert isinstance(y, cp.ndarray)
    assert isinstance(x.sum(), cp.ndarray) and x.sum().ndim == 0  # CuPy's 0-d results
    x[1:3] = cp.zeros(2)
    x[0] = np.float64(7.0)
    np.testing.assert_array_equal(x.get(), [7.0, 0.0, 0.0, 3.0])


def test_device_arrays_cannot_be_pickled(cupy_standin) -> None:
    cp = cupy_standin
    x = cp.ones((2, 3))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(x)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps({"block": [x]})
    cp._standin.reset()
    y = copy.deepcopy(x)  # a device copy: allowed, no host sync
    assert isinstance(y, cp.ndarray) and y is not x
    assert cp._standin.stats()["host_syncs"] == 0


def test_only_names_real_cupy_has(cupy_standin) -> None:
    cp = cupy_standin
    api = cp._api.api()
    with pytest.raises(AttributeError, match="module 'cupy' has no attribute 'not_a_name'"):
        _ = cp.not_a_name
    with pytest.raises(AttributeError, match=r"module 'cupy\.fft' has no attribute 'fftw'"):
        _ = cp.fft.fftw
    with pytest.raises(AttributeError, match="not emulated"):  # real, but not in the stand-in
        _ = cp.ElementwiseKernel
    assert _public(cp) <= set(api["cupy"]), sorted(_public(cp) - set(api["cupy"]))
    assert _public(cp.fft) <= set(api["cupy.fft"]), sorted(_public(cp.fft) - set(api["cupy.fft"]))
    generated = {"__firstlineno__", "__static_attributes__"}  # set by Python >= 3.13
    attrs = {n for n in vars(cp.ndarray) if not n.startswith("_") or n.startswith("__")}
    assert attrs - generated <= set(api["ndarray"]), sorted(attrs - generated - set(api["ndarray"]))
    # the kernels' own needs are there
    for name in ("asarray", "empty", "matmul", "take_along_axis", "ascontiguousarray", "fft"):
        assert name in _public(cp)


def test_signatures_are_cupys(cupy_standin) -> None:
    cp = cupy_standin
    checked = 0
    for module, namespace in (("cupy", cp), ("cupy.fft", cp.fft)):
        for name in sorted(_public(namespace)):
            obj = getattr(namespace, name)
            expected = cp._api.signature(module, name)
            if expected is None or not inspect.isfunction(obj):
                continue
            got = inspect.signature(obj)
            assert [(p.name, p.kind) for p in got.parameters.values()] == [
                (p.name, p.kind) for p in expected.parameters.values()
            ], f"{module}.{name}{got} is not CuPy's {expected}"
            checked += 1
    assert checked > 150
    x = cp.ones(8)
    for call in (
        lambda: cp.fft.fft(x, workers=2),  # SciPy's keyword: CuPy has none
        lambda: cp.fft.rfft(x, axis=0, overwrite_x=True),
        lambda: cp.sum(x, where=x > 0),
        lambda: cp.exp(x, where=x > 0),
    ):
        with pytest.raises(TypeError):
            call()


# ------------------------------------------------------------------------------ accounting
def test_uploads_and_host_syncs_are_counted(cupy_standin) -> None:
    cp = cupy_standin
    stats = cp._standin.stats
    cp._standin.reset()
    h = np.arange(1000.0)
    x = cp.asarray(h)
    assert (stats()["uploads"], stats()["upload_bytes"], stats()["host_syncs"]) == (1, 8000, 0)
    assert cp.asarray(x) is x and cp.asarray(x, dtype=np.float64) is x
    y = (x * 2.0).sum()  # device work only
    assert stats()["uploads"] == 1 and stats()["host_syncs"] == 0
    back = x.get()
    assert isinstance(back, np.ndarray) and back is not h
    np.testing.assert_array_equal(back, h)
    assert (stats()["host_syncs"], stats()["sync_bytes"]) == (1, 8000)
    assert float(y) == 999000.0
    assert (stats()["host_syncs"], stats()["sync_bytes"]) == (2, 8008)
    cp.asnumpy(x[:10])
    assert int(x[3]) == 3 and bool(x[1] > 0) and x[:2].tolist() == [0.0, 1.0]
    assert x[5].item() == 5.0
    assert stats()["host_syncs"] == 7 and stats()["sync_bytes"] == 8008 + 80 + 8 + 1 + 16 + 8
    assert stats()["device_calls"] > 0


def test_live_and_peak_bytes(cupy_standin) -> None:
    cp = cupy_standin
    stats = cp._standin.stats
    cp._standin.reset()
    base = stats()["live_bytes"]
    a = cp.zeros(1_000_000)  # 8 MB
    views = [a[::2], a.reshape(1000, 1000).T, a.real]  # views hold no new memory
    assert stats()["live_bytes"] == base + 8_000_000
    b = cp.ones(2_000_000, dtype=cp.float32)  # 8 MB more
    assert stats()["live_bytes"] == base + 16_000_000
    assert stats()["peak_bytes"] >= base + 16_000_000
    free, total = cp.cuda.runtime.memGetInfo()
    assert total == DEFAULT_MEMORY_BYTES and free == total - stats()["live_bytes"]
    assert cp.get_default_memory_pool().used_bytes() == stats()["live_bytes"]
    del a
    assert stats()["live_bytes"] == base + 16_000_000  # the views keep the buffer alive
    del views
    assert stats()["live_bytes"] == base + 8_000_000
    del b
    assert stats()["live_bytes"] == base
    assert stats()["peak_bytes"] >= base + 16_000_000
    cp._standin.reset()
    assert stats()["peak_bytes"] == base


@pytest.mark.parametrize("cupy_standin", [{"memory_bytes": 2**20}], indirect=True)
def test_out_of_memory(cupy_standin) -> None:
    cp = cupy_standin
    oom = cp.cuda.memory.OutOfMemoryError
    assert issubclass(oom, MemoryError)
    with pytest.raises(oom, match=r"Out of memory allocating 2,097,152 bytes"):
        cp.empty(2**18)  # 2 MiB of float64 on a 1 MiB device
    pool = cp.get_default_memory_pool()
    pool.set_limit(size=1024)
    assert pool.get_limit() == 1024
    with pytest.raises(oom, match=r"limit set to: 1,024 bytes"):
        cp.asarray(np.ones(200))
    x = cp.ones(100)  # 800 bytes fit
    with pytest.raises(oom):
        x + 1.0  # 800 more do not
    pool.set_limit(fraction=0.5)
    assert pool.get_limit() == 2**19
    pool.set_limit()
    assert pool.get_limit() == 0
    assert isinstance(x + 1.0, cp.ndarray)


# ------------------------------------------------------------------------------ devices
@TWO_GPUS
def test_visible_devices(cupy_standin) -> None:
    cp = cupy_standin
    runtime = cp.cuda.runtime
    assert runtime.getDeviceCount() == 2
    assert runtime.getDevice() == 0
    assert cp._standin.stats()["physical_device"] == 1  # CUDA_VISIBLE_DEVICES="1,0"
    with cp.cuda.Device(1) as device:
        assert device.id == 1 and runtime.getDevice() == 1
        assert cp._standin.stats()["physical_device"] == 0
        x = cp.ones(10)
        assert x.device == cp.cuda.Device(1)
        free, total = device.mem_info
        assert free == total - 80
    assert runtime.getDevice() == 0 and cp.cuda.Device(0).mem_info[0] == total
    with pytest.raises(runtime.CUDARuntimeError, match="cudaErrorInvalidDevice"):
        cp.cuda.Device(2).use()


def test_device_environment() -> None:
    with standin_cupy() as cp:
        assert has_gpu() and cp.is_available()
    with standin_cupy(n_gpus=4, visible_devices="2,x,3") as cp:  # CUDA stops at "x"
        assert cp.cuda.runtime.getDeviceCount() == 1
        assert cp._standin.stats()["physical_device"] == 2
    with standin_cupy(n_gpus=0) as cp:
        assert not has_gpu() and not cp.is_available()
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="cudaErrorNoDevice"):
            cp.cuda.runtime.getDeviceCount()
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError):
            cp.asarray(np.ones(3))


def test_context_restores_path_environment_and_modules() -> None:
    path, env = list(sys.path), dict(os.environ)
    imported = {n for n in sys.modules if n.startswith("cupy")}
    with standin_cupy(n_gpus=3, visible_devices="0") as cp:
        assert sys.path[0] == STANDIN_PATH and sys.modules["cupy"] is cp
        assert os.environ["CRYOLIKE_STANDIN_GPUS"] == "3"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert sys.path == path and dict(os.environ) == env
    assert {n for n in sys.modules if n.startswith("cupy")} == imported


def test_worker_process_imports_the_standin() -> None:
    """What a Dask worker started with :func:`standin_environ` sees."""
    code = (
        "import json, cupy; cupy.asarray([1.0, 2.0]);"
        "print(json.dumps([cupy.cuda.runtime.getDeviceCount(), cupy._standin.stats()]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=standin_environ(n_gpus=2, visible_devices="1,0"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    count, stats = json.loads(done.stdout)
    assert count == 2 and stats["physical_device"] == 1
    assert stats["uploads"] == 1 and stats["upload_bytes"] == 16 and stats["pid"] != os.getpid()


# ------------------------------------------------------------------------------ kernels
def test_ctf_and_translation_kernel_equal_numpy(cupy_standin) -> None:
    cp = cupy_standin
    cp._standin.reset()
    *_, ctf_np, kernel_np = device_inputs(np)
    assert cp._standin.stats()["device_calls"] == 0  # the NumPy path never touches the device
    *_, ctf, kernel = device_inputs(cp)
    assert isinstance(ctf, cp.ndarray) and isinstance(kernel, cp.ndarray)
    assert ctf.dtype == ctf_np.dtype and kernel.dtype == kernel_np.dtype
    np.testing.assert_allclose(to_host(ctf), ctf_np, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(to_host(kernel), kernel_np, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("precision", "tol"), [("single", 2e-6), ("double", 1e-12)])
def test_correlate_block_equals_numpy(cupy_standin, precision: str, tol: float) -> None:
    cp = cupy_standin
    outputs = BlockOutputs(
        full=True, per_rotation=True, per_displacement=True, integrated_likelihood=True
    )
    results = {}
    for xp in (np, cp):
        grid, _disp, t, y, ctf, kernel = device_inputs(xp)
        cp._standin.reset()
        pt = prepare_templates(t, kernel, grid, precision)
        pi = prepare_images(y, ctf, grid, precision)
        consts = LikelihoodConstants.for_grid(grid, 1024)
        results[xp.__name__] = correlate_block(
            pt, pi, outputs, likelihood=consts, log_prior=xp.full(12, -np.log(12))
        )
    stats = cp._standin.stats()
    assert stats["sync_bytes"] <= 16 * stats["host_syncs"]  # only scalars come back
    a, b = results["numpy"], results["cupy"]
    for name, value in vars(b).items():
        assert isinstance(value, cp.ndarray), name  # every result stays on the device
        assert value.dtype == getattr(a, name).dtype, name
    np.testing.assert_allclose(
        to_host(b.cross_correlation_msdw), a.cross_correlation_msdw, atol=tol
    )
    np.testing.assert_allclose(
        to_host(b.best_cross_correlation), a.best_cross_correlation, atol=tol
    )
    np.testing.assert_array_equal(to_host(b.best_pose), a.best_pose)
    np.testing.assert_array_equal(to_host(b.pose_ms), a.pose_ms)
    np.testing.assert_allclose(
        to_host(b.log_likelihood_ms),
        a.log_likelihood_ms,
        rtol=1e-6 if precision == "single" else 1e-12,
    )
    np.testing.assert_allclose(
        to_host(b.log_likelihood_sum),
        a.log_likelihood_sum,
        rtol=1e-6 if precision == "single" else 1e-12,
    )
    np.testing.assert_allclose(to_host(b.cross_correlation_msw), a.cross_correlation_msw, atol=tol)
    np.testing.assert_array_equal(to_host(b.displacement_index_msw), a.displacement_index_msw)
    np.testing.assert_allclose(to_host(b.cross_correlation_msd), a.cross_correlation_msd, atol=tol)
    np.testing.assert_array_equal(to_host(b.rotation_index_msd), a.rotation_index_msd)


def test_optimal_pose_likelihood_equals_numpy(cupy_standin) -> None:
    cp = cupy_standin
    outs = []
    for xp in (np, cp):
        grid, disp, t, y, ctf, _ = device_inputs(xp)
        idx = xp.arange(9) % 12
        outs.append(
            optimal_pose_log_likelihood(
                t[idx],
                y,
                ctf,
                xp.asarray(disp.x[:9]),
                xp.asarray(disp.y[:9]),
                xp.asarray(grid.theta[:9]),
                grid,
                BOX,
                1024,
                "double",
            )
        )
    a, b = outs
    for name in ("log_likelihood", "cross_correlation", "squared_distance"):
        value = getattr(b, name)
        assert isinstance(value, cp.ndarray), name
        np.testing.assert_allclose(to_host(value), getattr(a, name), rtol=1e-12)
