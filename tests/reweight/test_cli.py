"""``cryolike-dask reweight`` end to end: the summary it prints, the files, and one-line
errors (exit status 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryolike_dask.cli import main
from tests.reweight.conftest import mixture_loglik

pytestmark = pytest.mark.filterwarnings("ignore::cryolike_dask._reweight.ReweightWarning")
FAST = ["--samples", "60", "--warmup", "20", "--chains", "2", "--no-plots", "--folds", "3"]


@pytest.fixture
def matrix_csv(tmp_path: Path) -> Path:
    """A 40 × 2 structures-by-images CSV (header: structure, image names)."""
    ll, _ = mixture_loglik(np.random.default_rng(2), 40, [0.75, 0.25])
    path = tmp_path / "ll.csv"
    lines = ["structure," + ",".join(f"img{i}" for i in range(40))]
    lines += [
        f"{name}," + ",".join(repr(float(v)) for v in ll[:, k])
        for k, name in enumerate(["apo", "holo"])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reweight_command_end_to_end(matrix_csv: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["reweight", str(matrix_csv), "--output", str(out), *FAST, "--bootstrap", "3",
                 "--truth", "apo=0.75", "holo=0.25"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "apo" in text and "holo" in text and "95% interval" in text and "R-hat" in text
    assert "Frank–Wolfe gap" in text and "held-out log density (3 folds)" in text
    assert f"weights: {out / 'weights.csv'}" in text
    for name in ("weights.csv", "intervals.csv", "summary.json", "posterior_samples.npz",
                 "reweighting_factor.txt", "reweighted_prob.txt"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "responsibilities.zarr").is_dir()
    # again into the same folder: refused, then replaced
    assert main(["reweight", str(matrix_csv), "--output", str(out), *FAST]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["reweight", str(matrix_csv), "--output", str(out), *FAST, "--overwrite"]) == 0
    # options reach the model: prior counts, a none column, a subset of structures
    counts = tmp_path / "counts.txt"
    counts.write_text("5\n1\n")
    assert main(["reweight", str(matrix_csv), "--output", str(tmp_path / "o2"), *FAST,
                 "--prior-counts", str(counts), "--alpha", "2"]) == 0  # fmt: skip
    assert main(["reweight", str(matrix_csv), "--output", str(tmp_path / "o3"), *FAST,
                 "--none-column", "holo"]) == 0  # fmt: skip
    assert "none_of_these" in capsys.readouterr().out
    assert main(["reweight", str(matrix_csv), "--output", str(tmp_path / "o4"), *FAST,
                 "--prior-counts", "2", "1", "--structures", "1", "0"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        ("plain", [], "give --layout images-by-structures"),
        ("nan", ["--layout", "images-by-structures"], "image 2 (image 2) and structure 1"),
        (
            "plain",
            ["--layout", "images-by-structures", "--none-column", "zz"],
            "neither a structure",
        ),
        ("plain", ["--layout", "images-by-structures", "--alpha", "0"], "alpha"),
        ("missing", [], "no such file or folder"),
    ],
    ids=["ambiguous", "nan", "none-column", "alpha", "missing"],
)
def test_errors_are_one_line(
    tmp_path: Path, capsys, make: str, extra: list[str], message: str
) -> None:
    ll = np.random.default_rng(0).normal(size=(6, 2))
    if make == "nan":
        ll[2, 1] = np.nan
    path = tmp_path / "m.npy"
    if make != "missing":
        np.save(path, ll)
    code = main(["reweight", str(path), "--output", str(tmp_path / "o"), *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cryolike-dask reweight: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written for a bad input


def test_error_in_a_fresh_process_has_no_traceback(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.zeros((5, 3)))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "cryolike_dask", "reweight", str(tmp_path / "m.npy"), "--output",
         str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"cryolike-dask reweight: error: {tmp_path / 'm.npy'}: a 5×3 matrix with nothing saying "
        "which axis holds the images; give --layout images-by-structures (rows are images) or "
        "--layout structures-by-images (rows are structures)"
    ]


def test_help_lists_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["reweight", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--layout", "--kind", "--alpha", "--prior-counts", "--none-column",
                   "--chains", "--samples", "--bootstrap", "--folds", "--overwrite"):  # fmt: skip
        assert option in text, option
    with pytest.raises(SystemExit):
        main(["reweight", "x.npy", "--output", "o", "--truth", "apo"])
    assert "expected NAME=WEIGHT" in capsys.readouterr().err
