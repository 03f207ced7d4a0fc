"""Reruns never mix results; the CryoLike drop-in runs as CryoLike scripts are written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cryolike_dask.cli import main
from cryolike_dask.io.stitch import StitchError, stitch
from tests.conftest import reference_likelihood_args


def _likelihood(ref: Path, out: Path, *extra: str) -> int:
    sync = ("--scheduler", "sync", "--no-progress")
    return main(reference_likelihood_args(ref, out, "--n-stacks", "2", *sync, *extra))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(reference_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rerun") / "out"
    code = _likelihood(
        reference_dir,
        out,
        "--max-displacement-pixels",
        "1.5",
        "--n-displacements-x",
        "3",
        "--n-displacements-y",
        "3",
        "--integrated-likelihood",
        "--per-template",
    )
    assert code == 0
    return out


def test_rerun_with_other_settings_is_refused_and_changes_nothing(
    finished, reference_dir, tmp_path, capsys
) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = _digest(out)
    capsys.readouterr()
    for extra in ([], ["--skip-exist"]):  # other displacements: a different run
        code = _likelihood(reference_dir, out, "--n-displacements-x", "5", *extra)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "holds results of another run (other displacements)" in err
        assert "--overwrite" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert _digest(out) == before


def test_overwrite_leaves_no_file_of_the_old_run(finished, reference_dir, tmp_path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    import time

    assert (out / "template0" / "per_template").is_dir()
    start = time.time_ns()
    assert _likelihood(reference_dir, out, "--overwrite", "--n-displacements-x", "5") == 0
    new = _digest(out)
    assert not any("per_template" in name or "log_likelihood" in name for name in new)
    # every file in the folder was written by this run: nothing of the old one is left
    older = [n for n in new if (out / n).stat().st_mtime_ns < start]
    assert older == [], older
    disp = torch.load(out / "displacements_set.pt", weights_only=False)
    assert disp.shape == (2, 5)


def test_a_folder_of_unknown_outputs_is_refused(reference_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    (out / "template0" / "optimal_pose").mkdir(parents=True)
    (out / "template0" / "optimal_pose" / "mine.pt").write_bytes(b"user data")
    capsys.readouterr()
    assert _likelihood(reference_dir, out) == 2
    assert "without the results.zarr" in capsys.readouterr().err
    assert (out / "template0" / "optimal_pose" / "mine.pt").read_bytes() == b"user data"


def test_stitch_refuses_files_that_disagree_with_results(finished, tmp_path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    assert stitch(out, optimal=False)  # consistent: fine
    victim = out / "template0/cross_correlation/cross_correlation_stack_000001.pt"
    values = torch.load(victim, weights_only=False)
    torch.save(values * 0.5, victim)  # as if another run had written it
    with pytest.raises(StitchError, match=r"cross_correlation_stack_000001.pt: differs from"):
        stitch(out, optimal=False)


def test_prefix_of_the_stacks_is_the_same_run(finished, reference_dir, tmp_path) -> None:
    """CryoLike scripts run the full tensor for the first stacks into the same folder."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    cc = torch.load(out / "template0/cross_correlation/cross_correlation_stack_000001.pt")
    code = main(
        reference_likelihood_args(
            reference_dir,
            out,
            *("--n-stacks", "1", "--max-displacement-pixels", "1.5"),
            *("--n-displacements-x", "3", "--n-displacements-y", "3"),
            *("--full-cross-correlation", "--scheduler", "sync", "--no-progress"),
        )
    )
    assert code == 0
    full = out / "template0/cross_correlation/cross_correlation_pose_msdw_stack_000000.pt"
    assert torch.load(full, weights_only=False).shape == (12, 96, 9, 64)
    again = torch.load(out / "template0/cross_correlation/cross_correlation_stack_000001.pt")
    np.testing.assert_array_equal(again, cc)  # stack 1 of the first run untouched
    assert stitch(out, optimal=False)


def test_drop_in_script_without_main_guard(reference_dir, tmp_path) -> None:
    """A CryoLike script as its users write it: top level, no ``if __name__ == ...``."""
    out = tmp_path / "likelihood"
    script = tmp_path / "run_cryolike.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from cryolike_dask.run_likelihood import (
                configure_displacement, configure_likelihood_files, run_likelihood_optimal_pose,
            )
            file_config = configure_likelihood_files(
                folder_templates="templates/", folder_particles="particles/",
                folder_output={str(out)!r}, n_stacks=2, i_template=0,
            )
            displacer = configure_displacement(
                max_displacement_pixels=1.5, n_displacements_x=3, n_displacements_y=3
            )
            run_likelihood_optimal_pose(
                file_config, "templates/parameters.npz", displacer, template_index=0,
                n_stacks=2, return_likelihood_optimal_pose_fourier=True,
                return_likelihood_integrated_pose_fourier=True,
            )
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=reference_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "bootstrapping" not in result.stderr
    ref = reference_dir / "likelihood" / "template0"
    for name in (
        "optimal_pose/optimal_template",
        "optimal_pose/optimal_inplane_rotation",
        "optimal_pose/optimal_displacement_x",
        "optimal_pose/optimal_displacement_y",
    ):
        for stack in (0, 1):
            rel = f"{name}_stack_{stack:06d}.pt"
            np.testing.assert_array_equal(
                np.asarray(torch.load(out / "template0" / rel)),
                np.asarray(torch.load(ref / rel)),
                err_msg=rel,
            )
    for stack in (0, 1):
        rel = f"cross_correlation/cross_correlation_stack_{stack:06d}.pt"
        np.testing.assert_allclose(
            np.asarray(torch.load(out / "template0" / rel)),
            np.asarray(torch.load(ref / rel)),
            rtol=0,
            atol=1e-6,
        )


def test_two_runs_into_one_folder_at_once(reference_dir, tmp_path) -> None:
    """Exactly one of two runs started together on one folder runs; the other is refused."""
    out = tmp_path / "out"
    args = reference_likelihood_args(
        reference_dir,
        out,
        *("--n-stacks", "2", "--max-displacement-pixels", "1.5"),
        *("--n-displacements-x", "15", "--n-displacements-y", "15", "--integrated-likelihood"),
        *("--n-workers", "1", "--threads-per-worker", "1", "--no-dashboard", "--no-progress"),
    )
    cmd = [sys.executable, "-m", "cryolike_dask", *args]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another run is writing into this folder (pid" in refused
    assert len(refused.strip().splitlines()) == 1 and "Traceback" not in refused
    single = tmp_path / "single"
    assert (
        main([*reference_likelihood_args(reference_dir, single, *args[9:]), "--scheduler", "sync"])
        == 0
    )
    import xarray as xr

    a = xr.open_zarr(out / "results.zarr").compute()
    b = xr.open_zarr(single / "results.zarr").compute()
    np.testing.assert_array_equal(a.optimal_template, b.optimal_template)
    np.testing.assert_allclose(a.cross_correlation, b.cross_correlation, rtol=0, atol=1e-6)
    assert not (out / ".cryolike_dask.lock.json").exists()  # released


def test_a_dead_runs_lock_does_not_block(reference_dir, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cryolike_dask.lock").write_text("")
    (out / ".cryolike_dask.lock.json").write_text('{"pid": 999999, "host": "x", "started": "t"}')
    assert _likelihood(reference_dir, out) == 0  # the OS released the dead holder's lock
