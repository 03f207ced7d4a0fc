"""Shared fixtures: the CryoLike reference case, random Hermitian stacks, GPU skipping."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from cryolike_dask.kernels.backend import has_gpu

REFERENCE_DIR = Path(__file__).parent / "data" / "cryolike_reference_small"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The small reference case computed by CryoLike itself (see its README.txt)."""
    return REFERENCE_DIR


def read_pt_tensor(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read a C-contiguous tensor from a ``.pt`` zip without torch or cryolike (README recipe)."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data/0"))
        return np.frombuffer(z.read(name), dtype=dtype).reshape(shape).copy()


def random_hermitian_stack(
    rng: np.random.Generator, count: int, n_shells: int, n_inplanes: int
) -> np.ndarray:
    """Random complex128 ``[count, N, W]`` with the symmetry of real images.

    ``F[n, w + W/2] = conj(F[n, w])`` (W even): what the polar transform of any real image has.
    """
    half = n_inplanes // 2
    f = np.empty((count, n_shells, n_inplanes), np.complex128)
    f[..., :half] = rng.normal(size=(count, n_shells, half)) + 1j * rng.normal(
        size=(count, n_shells, half)
    )
    f[..., half:] = np.conj(f[..., :half])
    return f


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261123)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real and model test files (tests/data/{real,models,star}; see their READMEs)."""
    return Path(__file__).parent / "data"


def reference_likelihood_args(reference: Path, out: Path, *extra: str) -> list[str]:
    """``likelihood`` command-line arguments for the reference case into ``out``."""
    return [
        "likelihood",
        "--templates",
        str(reference / "templates"),
        "--particles",
        str(reference / "particles"),
        "--params",
        str(reference / "templates" / "parameters.npz"),
        "--output",
        str(out),
        *extra,
    ]
