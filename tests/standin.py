"""Run code against the strict CuPy stand-in of ``tests/gpu_standin`` (no GPU needed)::

    with standin_cupy(n_gpus=2, visible_devices="1,0") as cupy:
        x = cupy.asarray(np.ones(3))  # an upload, counted
        assert cupy._standin.stats()["physical_device"] == 1

In a test module, ``from tests.standin import cupy_standin_fixture`` and take the fixture
``cupy_standin`` (parametrize it indirectly with a dict of :func:`standin_cupy` arguments).
For Dask worker processes, pass :func:`standin_environ` as their environment: it puts
:data:`STANDIN_PATH` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

#: The folder holding the stand-in package ``cupy`` (put it first on ``sys.path``/``PYTHONPATH``).
STANDIN_PATH = str(Path(__file__).resolve().parent / "gpu_standin")
#: Environment variables of the emulated machine (read by the stand-in at every call).
ENV_GPUS = "CRYOLIKE_STANDIN_GPUS"
ENV_MEMORY = "CRYOLIKE_STANDIN_GPU_MEMORY"
DEFAULT_MEMORY_BYTES = 16 * 2**30
_ENV = (ENV_GPUS, ENV_MEMORY, "CUDA_VISIBLE_DEVICES")


def standin_environ(
    n_gpus: int = 1,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    visible_devices: str | None = None,
    environ: dict[str, str] | None = None,
) -> dict[str, str]:
    """``environ`` (default ``os.environ``) for a process that imports the stand-in as cupy.

    ``STANDIN_PATH`` comes first on ``PYTHONPATH``; ``visible_devices`` is the
    ``CUDA_VISIBLE_DEVICES`` value, None to remove it (all ``n_gpus`` visible).
    """
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (STANDIN_PATH, env.get("PYTHONPATH")) if p)
    _set_machine(env, n_gpus, memory_bytes, visible_devices)
    return env


def _set_machine(
    env: dict[str, str] | os._Environ[str],
    n_gpus: int,
    memory_bytes: int,
    visible_devices: str | None,
) -> None:
    env[ENV_GPUS] = str(int(n_gpus))
    env[ENV_MEMORY] = str(int(memory_bytes))
    if visible_devices is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices


def _pop_cupy_modules() -> dict[str, ModuleType]:
    """Remove every imported ``cupy*`` module (cupy, cupyx, cupy_backends ...); return them."""
    names = [n for n in sys.modules if n.split(".", 1)[0].startswith("cupy")]
    return {n: sys.modules.pop(n) for n in names}


@contextmanager
def standin_cupy(
    n_gpus: int = 1,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    visible_devices: str | None = None,
) -> Iterator[ModuleType]:
    """The stand-in imported as ``cupy``, on an emulated machine of ``n_gpus`` GPUs.

    Puts :data:`STANDIN_PATH` first on ``sys.path``, sets ``CRYOLIKE_STANDIN_GPUS``,
    ``CRYOLIKE_STANDIN_GPU_MEMORY`` (bytes per GPU) and ``CUDA_VISIBLE_DEVICES``
    (``visible_devices``; None removes it, making all GPUs visible), drops already
    imported ``cupy*`` modules and yields a freshly imported stand-in (its counts at zero).
    ``sys.path``, the environment and ``sys.modules`` are restored afterwards.
    """
    saved_path = list(sys.path)
    saved_env = {k: os.environ.get(k) for k in _ENV}
    saved_modules = _pop_cupy_modules()
    try:
        _set_machine(os.environ, n_gpus, memory_bytes, visible_devices)
        sys.path.insert(0, STANDIN_PATH)
        importlib.invalidate_caches()
        cupy = importlib.import_module("cupy")
        if not str(cupy.__file__).startswith(STANDIN_PATH):
            raise RuntimeError(f"imported {cupy.__file__}, not the stand-in")
        yield cupy
    finally:
        _pop_cupy_modules()
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        importlib.invalidate_caches()


@pytest.fixture(name="cupy_standin")
def cupy_standin_fixture(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The stand-in as ``cupy`` for one test; ``request.param``: :func:`standin_cupy` kwargs."""
    with standin_cupy(**getattr(request, "param", {})) as cupy:
        yield cupy
