"""Peak memory of an optimal-pose run does not grow with the number of images.

Each run is a fresh process; the images are streamed block by block from Zarr and the
``[M, S, D, W]`` tensor is never built. From 2000 to 8000 images the image data grow by
~100 MiB and the full tensor would grow by ~2.5 GiB; the peak must grow by far less.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryolike_dask.grids import ViewingAngles
from cryolike_dask.io.zarr_stores import ImageStore, StackInfo, TemplateStore
from cryolike_dask.params import ImageParameters, LensParameters
from tests.conftest import random_hermitian_stack

ROOT = Path(__file__).resolve().parents[2]


def _make_images(path: Path, params: ImageParameters, n: int) -> None:
    grid = params.polar_grid
    store = ImageStore.create(path, params, n, chunk_images=500, stacks=[StackInfo("all", 0, n)])
    rng = np.random.default_rng(n)
    for a in range(0, n, 1000):
        m = min(1000, n - a)
        lens = LensParameters(
            rng.uniform(8e3, 2e4, m), rng.uniform(8e3, 2e4, m), rng.uniform(0, 3, m), np.zeros(m)
        )
        store.write(a, random_hermitian_stack(rng, m, grid.n_shells, grid.n_inplanes), lens)
    store.mark_complete()


def _peak(images: Path, templates: Path, out: Path) -> float:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.pipeline.memory_probe",
            str(images),
            str(templates),
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.slow
def test_peak_memory_is_flat_in_the_number_of_images(tmp_path) -> None:
    params = ImageParameters.from_values(32, 1.5, n_inplanes=64, viewing_distance=8 / (4 * np.pi))
    grid = params.polar_grid
    angles = ViewingAngles.from_viewing_distance(params.viewing_distance)
    tstore = TemplateStore.create(tmp_path / "templates.zarr", params)
    rng = np.random.default_rng(0)
    tstore.add_structure(
        "random",
        random_hermitian_stack(rng, angles.n_angles, grid.n_shells, grid.n_inplanes),
        angles,
    )
    tstore.mark_complete()
    peaks = {}
    for n in (2000, 8000):
        _make_images(tmp_path / f"images_{n}.zarr", params, n)
        peaks[n] = _peak(
            tmp_path / f"images_{n}.zarr", tmp_path / "templates.zarr", tmp_path / f"out_{n}"
        )
    data_growth = 6000 * grid.n_points * 8 / 2**20  # the extra images, MiB
    assert data_growth > 90
    assert peaks[8000] - peaks[2000] < 0.3 * data_growth, peaks
