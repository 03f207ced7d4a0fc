"""Impossible or mistyped jobs are refused up front; failures leave nothing half-made."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from cryolike_dask.cli import main
from tests.conftest import reference_likelihood_args


@pytest.fixture(scope="module")
def on_cluster():
    """The user's default path for the refusals that reach the driver: a real LocalCluster
    with worker processes (``--scheduler-address``)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as c:
        yield ["--scheduler-address", c.scheduler_address]


def _one_line(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "distributed." not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _exit_code(fn, *args) -> int:
    try:
        return fn(*args)
    except SystemExit as exc:  # argparse reports bad option values this way
        return int(exc.code)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-workers", "0"], "must be at least 1, not 0"),
        (["--n-workers", "-1"], "must be at least 1, not -1"),
        (["--threads-per-worker", "0"], "must be at least 1"),
        (["--memory-limit", "4"], "'4' is 4 bytes, too little for a worker; give units"),
        (["--memory-limit", "lots"], "expected a size with units"),
        (["--images-per-block", "0"], "must be at least 1"),
        (
            ["--max-displacement-pixels", "40", "--n-displacements-x", "3"],
            "max_displacement_pixels = 40 reaches beyond the image: half the box is 16 pixels",
        ),
    ],
)
def test_option_bounds(reference_dir, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "out"
    code = _exit_code(main, reference_likelihood_args(reference_dir, out, *extra))
    _one_line(capsys, code, message)
    assert not out.exists()


def test_a_task_that_cannot_fit_a_worker_is_refused(reference_dir, tmp_path) -> None:
    out = tmp_path / "out"
    args = reference_likelihood_args(
        reference_dir,
        out,
        *("--n-displacements-x", "301", "--n-displacements-y", "301"),
        *("--max-displacement-pixels", "8"),
        *("--memory-limit", "1GB", "--n-workers", "1", "--no-dashboard", "--no-progress"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "cryolike_dask", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "one kernel task of" in done.stderr and "GiB but a worker thread has" in done.stderr
    assert "Traceback" not in done.stderr and "distributed." not in done.stderr
    assert not out.exists()


def test_outputs_larger_than_the_disk_are_refused(
    reference_dir, tmp_path, capsys, monkeypatch, on_cluster
):
    from cryolike_dask.pipeline import driver

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(driver.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out"
    code = main(
        reference_likelihood_args(
            reference_dir, out, "--full-cross-correlation", *on_cluster, "--no-progress"
        )
    )
    _one_line(capsys, code, "the outputs need ~", "GiB free")
    assert not out.exists()


def test_a_mistyped_viewing_distance_is_refused(tmp_path, capsys) -> None:
    code = main(
        [
            *("make-params", "--n-pixels", "32", "--pixel-size", "1.5"),
            *("--viewing-distance", "0.0001", "--output", str(tmp_path / "p.npz")),
        ]
    )
    _one_line(capsys, code, "gives ~1.26e+09 viewing directions", "--yes")
    assert not (tmp_path / "p.npz").exists()


def test_zero_density_map_on_a_local_cluster(reference_dir, tmp_path) -> None:
    """A failure found by a worker: one line naming the input, no worker log, no store."""
    import mrcfile

    with mrcfile.new(tmp_path / "zero.mrc") as m:
        m.set_data(np.zeros((32, 32, 32), np.float32))
        m.voxel_size = 1.5
    out = tmp_path / "templates"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cryolike_dask", "make-templates"),
            *("--params", str(reference_dir / "templates" / "parameters.npz")),
            *("--output", str(out), str(tmp_path / "zero.mrc")),
            *("--n-workers", "1", "--no-dashboard", "--no-progress"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "zero.mrc" in lines[0] and "zero norm" in lines[0], done.stderr
    assert not (out / "templates.zarr").exists()


def test_overwrite_replaces_a_conversion(reference_dir, tmp_path) -> None:
    raw = reference_dir / "raw"
    out = tmp_path / "particles"
    base = [
        *("convert-particles", "--params", str(reference_dir / "templates" / "parameters.npz")),
        *("--output", str(out), "--mrcs", str(raw / "particles.mrcs")),
        *("--star", str(raw / "particles.star"), "--scheduler", "sync", "--no-progress"),
    ]
    assert main([*base, "--batch-size", "6"]) == 0
    assert len(list((out / "fft").glob("*.pt"))) == 4
    assert main([*base, "--batch-size", "12", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "fft").glob("*.pt")) == [
        "particles_fourier_stack_000000.pt",
        "particles_fourier_stack_000001.pt",
    ]  # none of the old four stacks is left to be counted


def test_an_unfinished_conversion_is_refused(reference_dir, tmp_path, capsys, on_cluster) -> None:
    raw = reference_dir / "raw"
    out = tmp_path / "particles"
    params = reference_dir / "templates" / "parameters.npz"
    assert (
        main(
            [
                *("convert-particles", "--params", str(params), "--output", str(out)),
                *("--mrcs", str(raw / "particles.mrcs"), "--star", str(raw / "particles.star")),
                *("--scheduler", "sync", "--no-progress"),
            ]
        )
        == 0
    )
    import zarr

    zarr.open_group(out / "particles.zarr", mode="r+").attrs["complete"] = False  # as if killed
    for particles in (out, out / "particles.zarr"):  # the CryoLike folder and the store
        code = main(
            [
                *("likelihood", "--templates", str(reference_dir / "templates")),
                *("--particles", str(particles), "--params", str(params)),
                *("--output", str(tmp_path / "likelihood"), *on_cluster),
            ]
        )
        _one_line(capsys, code, "particles.zarr: incomplete", "--overwrite")
    assert not (tmp_path / "likelihood").exists()
    shutil.rmtree(out)
    assert not Path(out).exists()
