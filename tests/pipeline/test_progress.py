"""Progress display and interruption: plain lines off a terminal, one line on Ctrl-C."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from cryolike_dask.pipeline import _progress
from cryolike_dask.pipeline._progress import Progress
from tests.conftest import reference_likelihood_args


def test_plain_lines_when_not_a_terminal(caplog, monkeypatch) -> None:
    monkeypatch.setattr(_progress, "LINE_INTERVAL", 0.0)
    with caplog.at_level(logging.INFO, logger="cryolike_dask.progress"):
        with Progress(10, "likelihood 'apo'", "kernel block") as bar:
            for _ in range(10):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("likelihood 'apo': 10/10 kernel blocks (100%)")
    assert any(line.startswith("likelihood 'apo': 3/10 kernel blocks (30%)") for line in lines)
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_lines_are_rate_limited(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cryolike_dask.progress"):
        with Progress(1000, "x") as bar:
            for _ in range(1000):
                bar.update(1)
    assert len(caplog.records) == 1  # the closing line only: the loop took < 5 s


def test_disabled_shows_nothing(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cryolike_dask.progress"):
        with Progress(5, "x", enabled=False) as bar:
            bar.update(5)
    assert not caplog.records


def test_ctrl_c_ends_with_one_line(reference_dir, tmp_path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "cryolike_dask",
        *reference_likelihood_args(
            reference_dir,
            tmp_path / "out",
            *("--n-displacements-x", "20", "--n-displacements-y", "20"),
            *("--images-per-block", "2", "--full-cross-correlation", "--n-workers", "1"),
            *("--threads-per-worker", "1", "--no-dashboard"),
        ),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until the kernel tasks are running
        seen.append(line)
        if "kernel tasks per graph" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seen, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["cryolike-dask likelihood: interrupted (rerun with --skip-exist to resume)"], (
        err
    )
