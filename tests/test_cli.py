"""The command line end to end on CryoLike's reference case, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import read_pt_tensor


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "cryolike_dask", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["likelihood"],
        ["import-cryolike"],
        ["make-params"],
        ["make-templates"],
        ["convert-particles"],
    ],
)
def test_help(command: list[str]) -> None:
    out = _cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: cryolike-dask" in out.stdout


def test_bad_input_is_one_clear_line(tmp_path, reference_dir) -> None:
    out = _cli(
        "likelihood",
        "--templates",
        str(reference_dir / "templates"),
        "--particles",
        str(reference_dir / "particles"),
        "--params",
        str(tmp_path / "missing.npz"),
        "--output",
        str(tmp_path / "out"),
    )
    assert out.returncode == 2
    assert "missing.npz: file not found" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()
    out = _cli(
        "likelihood",
        "--templates",
        str(reference_dir / "templates"),
        "--particles",
        str(reference_dir / "particles"),
        "--params",
        str(reference_dir / "templates" / "parameters.npz"),
        "--output",
        str(tmp_path / "out"),
        "--n-stacks",
        "5",
    )
    assert out.returncode == 2 and "5 particle stacks requested" in out.stderr
    assert "particles_fourier_stack_000002.pt" in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cli_run(reference_dir, tmp_path_factory):
    """`cryolike-dask likelihood` on the reference, run the way CryoLike's run was."""
    out = tmp_path_factory.mktemp("cli") / "likelihood"
    result = _cli(
        "likelihood",
        "--templates",
        "templates",
        "--particles",
        "particles",
        "--params",
        "templates/parameters.npz",
        "--output",
        str(out),
        "--n-stacks",
        "2",
        "--max-displacement-pixels",
        "1.5",
        "--n-displacements-x",
        "3",
        "--n-displacements-y",
        "3",
        "--integrated-likelihood",
        "--optimal-pose-likelihood",
        "--full-cross-correlation",
        "--per-template",
        "--images-per-block",
        "5",
        "--templates-per-block",
        "40",
        "--n-workers",
        "2",
        "--no-progress",
        cwd=reference_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_writes_every_file_cryolike_wrote(cli_run, reference_dir) -> None:
    out, result = cli_run
    assert "Dask dashboard: http" in result.stdout
    ref_root = reference_dir / "likelihood"
    for ref_file in sorted(ref_root.rglob("*.pt")):
        rel = ref_file.relative_to(ref_root)
        ours = out / rel
        assert ours.is_file(), rel
        if rel.name.startswith("cross_correlation_pose_msdw"):
            ref = read_pt_tensor(ref_file, "<f4", (12, 96, 9, 64))  # CryoLike's NamedTuple
        else:
            ref = np.asarray(torch.load(ref_file, weights_only=False))
        got = np.asarray(torch.load(ours, weights_only=False))
        assert (got.shape, got.dtype) == (ref.shape, ref.dtype), rel
        if "integrated" in rel.name:
            continue  # CryoLike wrote a constant there (bug §17.1): checked below
        if got.dtype == np.int64:
            np.testing.assert_array_equal(got, ref, err_msg=str(rel))
        elif "optimal_fourier" in rel.name:
            np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=str(rel))
        else:
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6, err_msg=str(rel))


def test_integrated_likelihood_is_the_real_one(cli_run, reference_dir) -> None:
    """Against the value derived from CryoLike's per-pair matrix with normalised log weights."""
    out, _ = cli_run
    extras = np.load(reference_dir / "numpy" / "extras.npz")
    weights = np.load(reference_dir / "numpy" / "inputs.npz")["viewing__weights_viewing"]
    ms = extras["t0_log_likelihood_integrated_MS"].astype(np.float64)
    log_w = np.log(weights / weights.sum())
    m = (ms + log_w).max(axis=1, keepdims=True)
    expected = (m[:, 0] + np.log(np.exp(ms + log_w - m).sum(axis=1))) - np.log(9) - np.log(64)
    name = "template0/log_likelihood/log_likelihood_integrated_fourier_stack_00000{}.pt"
    got = np.concatenate([torch.load(out / name.format(i)).numpy() for i in (0, 1)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_zarr_stores_give_the_same_results(cli_run, reference_dir, tmp_path) -> None:
    out, _ = cli_run
    stores = tmp_path / "stores"
    params = reference_dir / "templates" / "parameters.npz"
    imp = _cli(
        "import-cryolike",
        "--params",
        str(params),
        "--templates",
        str(reference_dir / "templates"),
        "--particles",
        str(reference_dir / "particles"),
        "--output",
        str(stores),
        "--images-per-chunk",
        "10",
        cwd=reference_dir,
    )
    assert imp.returncode == 0, imp.stderr
    run = _cli(
        "likelihood",
        "--templates",
        str(stores / "templates.zarr"),
        "--particles",
        str(stores / "particles.zarr"),
        "--params",
        str(params),
        "--output",
        str(tmp_path / "z"),
        "--max-displacement-pixels",
        "1.5",
        "--n-displacements-x",
        "3",
        "--n-displacements-y",
        "3",
        "--integrated-likelihood",
        "--scheduler",
        "sync",
        "--no-progress",
    )
    assert run.returncode == 0, run.stderr
    for name in (
        "optimal_pose/optimal_template",
        "cross_correlation/cross_correlation",
        "log_likelihood/log_likelihood_integrated_fourier",
    ):
        for i in (0, 1):
            a = torch.load(out / f"template0/{name}_stack_00000{i}.pt").numpy()
            b = torch.load(tmp_path / "z" / f"template0/{name}_stack_00000{i}.pt").numpy()
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 if "log" in name else 1e-6)


def test_convert_particles_pose_options(tmp_path) -> None:
    """--pose-source and --sort-by-pose reach the conversion; the log line counts the poses."""
    from cryolike_dask.io.zarr_stores import ImageStore
    from cryolike_dask.params import ImageParameters
    from tests.pipeline.test_convert_particles import _posed_pair

    mrcs, stars = _posed_pair(tmp_path)
    ImageParameters.from_values(16, 1.5, n_inplanes=16, resolution_factor=0.5).save(
        tmp_path / "parameters.npz"
    )
    common = ["convert-particles", "--params", str(tmp_path / "parameters.npz")]
    inputs = ["--mrcs", *map(str, mrcs), "--star", *map(str, stars), "--batch-size", "3"]
    run = ["--scheduler", "sync", "--no-progress"]
    out = _cli(*common, "--output", str(tmp_path / "s"), *inputs, "--sort-by-pose", *run)
    assert out.returncode == 0, out.stderr
    assert "angles for 8/9 particles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi)" in out.stdout
    store = ImageStore.open(tmp_path / "s" / "particles.zarr")
    np.testing.assert_array_equal(store.image_ids().source_row, [4, 3, 1, 0, 2, 3, 1, 0, 2])
    assert store.prior_poses().source == "star-refined"
    out = _cli(*common, "--output", str(tmp_path / "n"), *inputs, "--pose-source", "none", *run)
    assert out.returncode == 0, out.stderr
    assert ImageStore.open(tmp_path / "n" / "particles.zarr").prior_poses() is None
    out = _cli(*common, "--output", str(tmp_path / "p"), *inputs, "--pose-source", "prior", *run)
    assert out.returncode == 2 and "rlnAngleRotPrior" in out.stderr
