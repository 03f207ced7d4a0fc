"""Bad inputs get clear errors before any output; runs survive a lost worker and a killed driver.

Every bad-input case asserts the error's type, that its message names the file (or item) and
the field, and that no output file appeared - or, when an earlier run's outputs were there,
that they are byte-identical afterwards. docs/reliability.md lists these cases.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryolike_dask.cli import main
from cryolike_dask.io.particle_metadata import MetadataError, read_cs, read_star
from cryolike_dask.io.zarr_stores import ResultsStore
from cryolike_dask.params import ImageParameters, LensParameters, ParameterFileError
from cryolike_dask.params.npz import read_npz, write_npz
from tests.conftest import reference_likelihood_args

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ helpers
@pytest.fixture
def ref_copy(reference_dir, tmp_path) -> Path:
    """A writable copy of the CryoLike reference inputs (templates, particles)."""
    for sub in ("templates", "particles", "raw"):
        shutil.copytree(reference_dir / sub, tmp_path / sub)
    return tmp_path


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The user's default path: a real LocalCluster with worker processes, which every
    likelihood run of this module uses (``--scheduler-address``)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as c:
        _CLUSTER["address"] = c.scheduler_address
        yield c
    _CLUSTER.clear()


_CLUSTER: dict[str, str] = {}


def _on_cluster() -> list[str]:
    return ["--scheduler-address", _CLUSTER["address"]]


def _likelihood(folder: Path, out: Path, *extra: str) -> int:
    return main(_likelihood_args(folder, out, *extra))


def _likelihood_args(folder: Path, out: Path, *extra: str) -> list[str]:
    """``likelihood`` on the inputs in ``folder`` (3 × 3 displacements, the module cluster)."""
    return reference_likelihood_args(
        folder,
        out,
        *("--max-displacement-pixels", "1.5", "--n-displacements-x", "3"),
        *("--n-displacements-y", "3", *_on_cluster(), "--no-progress", *extra),
    )


def _snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _fails(capfd, code: int, *fragments: str) -> str:
    """Exit 2 and one clean message: no traceback, and no log line of distributed's (the
    workers' processes write to this process's stderr, which ``capfd`` captures)."""
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "distributed." not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


def _one_line(capfd, code: int, *fragments: str) -> str:
    """As :func:`_fails`, and the error is one line (warnings aside) holding every fragment."""
    err = _fails(capfd, code, *fragments)
    lines = [line for line in err.splitlines() if line.strip() and ": warning: " not in line]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _edit_npz(path: Path, **changes) -> None:
    fields = read_npz(path)
    for k, v in changes.items():
        if v is None:
            fields.pop(k, None)
        else:
            fields[k] = v
    write_npz(path, fields, overwrite=True)


STACK1 = Path("particles") / "fft" / "particles_fourier_stack_000001"


# ------------------------------------------------------------------------------ bad inputs
def test_stack_grid_differs_from_parameters(ref_copy, tmp_path, capfd) -> None:
    _edit_npz(ref_copy / f"{STACK1}.npz", pixel_size=np.array([1.6, 1.6]))
    out = tmp_path / "out"
    _fails(capfd, _likelihood(ref_copy, out), "particles_fourier_stack_000001.npz", "pixel_size")
    assert not out.exists()


def test_template_grid_differs(ref_copy, tmp_path, capfd) -> None:
    t = torch.load(ref_copy / "templates" / "templates_fourier_1uao.pt")
    torch.save(t[:, :30], ref_copy / "templates" / "templates_fourier_1uao.pt")
    out = tmp_path / "out"
    _fails(capfd, _likelihood(ref_copy, out), "templates_fourier_1uao.pt", "[S, 33, 64]")
    assert not out.exists()


def test_template_count_differs_from_viewing_directions(ref_copy, tmp_path, capfd) -> None:
    t = torch.load(ref_copy / "templates" / "templates_fourier_1uao.pt")
    torch.save(t[:90], ref_copy / "templates" / "templates_fourier_1uao.pt")
    _fails(capfd, _likelihood(ref_copy, tmp_path / "out"), "90 templates", "96 viewing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("value", "message"), [(np.nan, "NaN or infinite"), (0.0, "all zeros (zero norm)")]
)
def test_bad_image_values_are_located(ref_copy, tmp_path, capfd, value, message) -> None:
    path = ref_copy / f"{STACK1}.pt"
    images = torch.load(path)
    images[5] = value
    torch.save(images, path)
    _fails(
        capfd,
        _likelihood(ref_copy, tmp_path / "out"),
        "particles_fourier_stack_000001.pt: image 5 (image 17 of the run)",
        message,
    )
    assert not (tmp_path / "out").exists()


def test_infinite_template_is_located(ref_copy, tmp_path, capfd) -> None:
    path = ref_copy / "templates" / "templates_fourier_1uao.pt"
    t = torch.load(path)
    t[42, 3, 7] = complex(np.inf, 0)
    torch.save(t, path)
    _fails(capfd, _likelihood(ref_copy, tmp_path / "out"), "template 42", "NaN or infinite")
    assert not (tmp_path / "out").exists()


def test_missing_and_non_finite_lens_fields(ref_copy, tmp_path, capfd) -> None:
    _edit_npz(ref_copy / f"{STACK1}.npz", defocusV=None)
    _fails(
        capfd,
        _likelihood(ref_copy, tmp_path / "a"),
        "particles_fourier_stack_000001.npz",
        "'defocusV'",
    )
    _edit_npz(
        ref_copy / f"{STACK1}.npz",
        defocusV=np.full(12, 9000.0),
        defocusU=np.r_[np.full(11, 9e3), np.inf],
    )
    _fails(capfd, _likelihood(ref_copy, tmp_path / "b"), "'defocusU'", "non-finite", "image 11")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("voltage", 0.0, "field voltage (acceleration voltage, kV) must be positive, not 0"),
        ("voltage", -300.0, "field voltage (acceleration voltage, kV) must be positive"),
        ("sphericalAberration", -2.7, "field sphericalAberration (spherical aberration, mm)"),
        ("amplitudeContrast", 1.0, "field amplitudeContrast (amplitude contrast) must be in"),
        ("voltage", np.inf, "field 'voltage' is not finite (inf)"),
    ],
    ids=["voltage-0", "voltage-negative", "cs-negative", "amplitude-contrast-1", "voltage-inf"],
)
def test_impossible_microscope_constants_in_a_stack(
    ref_copy, tmp_path, capfd, field, value, message
) -> None:
    """Voltage, Cs or amplitude contrast the CTF cannot use: the stack's file and field."""
    _edit_npz(ref_copy / f"{STACK1}.npz", **{field: np.float64(value)})
    before = _snapshot(ref_copy)
    out = tmp_path / "out"
    _one_line(capfd, _likelihood(ref_copy, out), "particles_fourier_stack_000001.npz", message)
    assert not out.exists() and _snapshot(ref_copy) == before


def _star_with(path: Path, reference_dir: Path, column: int, value: str) -> Path:
    """The reference STAR file with column ``column`` (0-based) of every row set to ``value``."""
    lines = (reference_dir / "raw" / "particles.star").read_text().splitlines()
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 7 and not line.startswith("_"):
            parts[column] = value
            line = " ".join(parts)
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (0, "0", "column rlnVoltage (acceleration voltage, kV) must be positive, not 0"),
        (0, "-200", "column rlnVoltage (acceleration voltage, kV) must be positive, not -200"),
        (4, "-1", "column rlnSphericalAberration (spherical aberration, mm) must be 0 or"),
        (5, "1.5", "column rlnAmplitudeContrast (amplitude contrast) must be in [0, 1)"),
        (0, "nan", "column rlnVoltage has a non-finite value in row 0"),
    ],
    ids=["voltage-0", "voltage-negative", "cs-negative", "amplitude-contrast-1.5", "voltage-nan"],
)
def test_impossible_microscope_constants_in_a_star_file(
    tmp_path, reference_dir, capfd, column, value, message
) -> None:
    star = _star_with(tmp_path / "bad.star", reference_dir, column, value)
    before = star.read_bytes()
    code = main(
        [
            *("convert-particles", "--params", str(reference_dir / "templates" / "parameters.npz")),
            *(
                "--output",
                str(tmp_path / "out"),
                "--mrcs",
                str(reference_dir / "raw" / "particles.mrcs"),
            ),
            *("--star", str(star), "--no-progress"),
        ]
    )
    _one_line(capfd, code, "bad.star: ", message)
    assert not (tmp_path / "out").exists() and star.read_bytes() == before


def test_zero_pixel_size_in_a_star_file(tmp_path, reference_dir, capfd) -> None:
    star = tmp_path / "px.star"
    lines = (reference_dir / "raw" / "particles.star").read_text().splitlines()
    header_end = max(i for i, line in enumerate(lines) if line.startswith("_rln"))
    star.write_text(
        "\n".join(
            lines[: header_end + 1]
            + ["_rlnImagePixelSize #8"]
            + [line + " 0.0" for line in lines[header_end + 1 :] if line.strip()]
        )
    )
    code = main(
        [
            *("convert-particles", "--params", str(reference_dir / "templates" / "parameters.npz")),
            *(
                "--output",
                str(tmp_path / "out"),
                "--mrcs",
                str(reference_dir / "raw" / "particles.mrcs"),
            ),
            *("--star", str(star), "--no-progress"),
        ]
    )
    _one_line(capfd, code, "px.star: column rlnImagePixelSize (pixel size) must be positive, not 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ctf/accel_kv", 0.0, "field ctf/accel_kv (acceleration voltage, kV) must be positive"),
        ("ctf/cs_mm", -2.7, "field ctf/cs_mm (spherical aberration, mm) must be 0 or positive"),
        ("ctf/amp_contrast", -0.1, "field ctf/amp_contrast (amplitude contrast) must be in"),
        ("blob/psize_A", 0.0, "field blob/psize_A (pixel size) must be positive, not 0"),
    ],
    ids=["accel_kv-0", "cs_mm-negative", "amp_contrast-negative", "psize_A-0"],
)
def test_impossible_microscope_constants_in_a_cs_file(
    tmp_path, reference_dir, data_dir, capfd, field, value, message
) -> None:
    cs = np.load(data_dir / "real" / "empiar_10076_7.cs")
    cs[field] = value
    with open(tmp_path / "x.cs", "wb") as f:
        np.save(f, cs)
    code = main(
        [
            *("convert-particles", "--params", str(reference_dir / "templates" / "parameters.npz")),
            *("--output", str(tmp_path / "out"), "--cs", str(tmp_path / "x.cs")),
            *("--mrc-folder", str(data_dir / "real"), "--no-progress"),
        ]
    )
    _one_line(capfd, code, "x.cs: ", message)
    assert not (tmp_path / "out").exists()


def test_extra_field_in_parameters_file(ref_copy, tmp_path, capfd) -> None:
    _edit_npz(ref_copy / "templates" / "parameters.npz", n_pixel=np.array([32, 32]))
    _fails(
        capfd,
        _likelihood(ref_copy, tmp_path / "out"),
        "parameters.npz",
        "unexpected field(s) n_pixel",
    )
    assert not (tmp_path / "out").exists()


def test_truncated_and_corrupt_files(ref_copy, tmp_path, capfd) -> None:
    pt = ref_copy / f"{STACK1}.pt"
    pt.write_bytes(pt.read_bytes()[:500])
    _fails(
        capfd,
        _likelihood(ref_copy, tmp_path / "a"),
        "particles_fourier_stack_000001.pt",
        "not a readable .pt file",
    )
    npz = ref_copy / "particles" / "fft" / "particles_fourier_stack_000000.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    _fails(
        capfd,
        _likelihood(ref_copy, tmp_path / "b"),
        "particles_fourier_stack_000000.npz",
        "not a readable .npz file",
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_corrupt_mrc(tmp_path, reference_dir, capfd) -> None:
    mrc = tmp_path / "broken.mrcs"
    mrc.write_bytes((reference_dir / "raw" / "particles.mrcs").read_bytes()[:2000])
    code = main(
        [
            "convert-particles",
            "--params",
            str(reference_dir / "templates" / "parameters.npz"),
            "--output",
            str(tmp_path / "out"),
            "--mrcs",
            str(mrc),
            "--star",
            str(reference_dir / "raw" / "particles.star"),
            "--no-progress",
        ]
    )
    _fails(capfd, code, "broken.mrcs")
    assert not (tmp_path / "out").exists()


def test_corrupt_zarr_input(ref_copy, tmp_path, capfd) -> None:
    stores = tmp_path / "stores"
    params = ref_copy / "templates" / "parameters.npz"
    assert (
        main(
            [
                "import-cryolike",
                "--params",
                str(params),
                "--particles",
                str(ref_copy / "particles"),
                "--output",
                str(stores),
            ]
        )
        == 0
    )
    capfd.readouterr()
    (stores / "particles.zarr" / "zarr.json").write_text("{ not json")
    code = main(
        [
            "likelihood",
            "--templates",
            str(ref_copy / "templates"),
            "--particles",
            str(stores / "particles.zarr"),
            "--params",
            str(params),
            "--output",
            str(tmp_path / "out"),
            *_on_cluster(),
            "--no-progress",
        ]
    )
    _fails(capfd, code, "particles.zarr", "not a readable Zarr group")
    assert not (tmp_path / "out").exists()


def test_missing_star_column_and_cs_field(tmp_path, reference_dir, data_dir, capfd) -> None:
    star = tmp_path / "p.star"
    text = (reference_dir / "raw" / "particles.star").read_text()
    star.write_text(text.replace("_rlnDefocusV #3", "_rlnDefocusX #3"))
    params = str(reference_dir / "templates" / "parameters.npz")
    code = main(
        [
            "convert-particles",
            "--params",
            params,
            "--output",
            str(tmp_path / "a"),
            "--mrcs",
            str(reference_dir / "raw" / "particles.mrcs"),
            "--star",
            str(star),
            "--no-progress",
        ]
    )
    _fails(capfd, code, "p.star", "missing column rlnDefocusV")
    cs = np.load(data_dir / "real" / "empiar_10076_7.cs")
    names = [n for n in cs.dtype.names if n != "ctf/df_angle_rad"]
    slim = np.empty(cs.shape, dtype=[(n, cs.dtype[n]) for n in names])
    for n in names:
        slim[n] = cs[n]
    with open(tmp_path / "x.cs", "wb") as f:
        np.save(f, slim)
    code = main(
        [
            "convert-particles",
            "--params",
            params,
            "--output",
            str(tmp_path / "b"),
            "--cs",
            str(tmp_path / "x.cs"),
            "--mrc-folder",
            str(data_dir / "real"),
            "--no-progress",
        ]
    )
    _fails(capfd, code, "x.cs", "ctf/df_angle_rad")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_non_positive_and_conflicting_pixel_sizes(tmp_path, reference_dir, capfd) -> None:
    code = main(
        [
            "make-params",
            "--n-pixels",
            "32",
            "--pixel-size",
            "0",
            "--output",
            str(tmp_path / "p.npz"),
        ]
    )
    _fails(capfd, code, "pixel_size")
    assert not (tmp_path / "p.npz").exists()
    star = tmp_path / "a.star"
    text = (reference_dir / "raw" / "particles.star").read_text()
    lines = text.splitlines()
    header_end = max(i for i, line in enumerate(lines) if line.startswith("_rln"))
    star.write_text(
        "\n".join(
            lines[: header_end + 1]
            + [f"_rlnImagePixelSize #{8}"]
            + [line + " 1.7" for line in lines[header_end + 1 :] if line.strip()]
        )
    )
    with pytest.warns(UserWarning, match="differs from the metadata"):
        code = main(
            [
                "convert-particles",
                "--params",
                str(reference_dir / "templates" / "parameters.npz"),
                "--output",
                str(tmp_path / "out"),
                "--mrcs",
                str(reference_dir / "raw" / "particles.mrcs"),
                "--star",
                str(star),
                "--no-progress",
            ]
        )
    _fails(capfd, code, "pixel size is 1.7 Å", "pixel_size is 1.5 Å")
    assert not (tmp_path / "out").exists()


def test_indices_out_of_range(ref_copy, tmp_path, capfd) -> None:
    _fails(
        capfd,
        _likelihood(ref_copy, tmp_path / "a", "--i-template", "3"),
        "i_template 3 is out of range",
        "1uao",
    )
    _fails(
        capfd,
        _likelihood(ref_copy, tmp_path / "b", "--n-stacks", "4"),
        "4 particle stacks requested",
        "particles_fourier_stack_000002.pt",
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unwritable_output(ref_copy, tmp_path, capfd) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _fails(capfd, _likelihood(ref_copy, blocker / "out"), "a_file", "is a file")
    _fails(capfd, _likelihood(ref_copy, blocker), "exists and is not a folder")
    assert blocker.read_text() == "not a folder"


def test_earlier_outputs_untouched_by_a_failed_run(ref_copy, tmp_path, capfd) -> None:
    out = tmp_path / "out"
    assert _likelihood(ref_copy, out) == 0
    before = _snapshot(out)
    images = torch.load(ref_copy / f"{STACK1}.pt")
    images[0] = float("nan")
    torch.save(images, ref_copy / f"{STACK1}.pt")
    capfd.readouterr()
    # the inputs changed: another run, refused before anything is read or written
    _fails(capfd, _likelihood(ref_copy, out), "holds results of another run", "--overwrite")
    assert _snapshot(out) == before
    # asked to replace it, the run still checks the data before removing anything
    _fails(capfd, _likelihood(ref_copy, out, "--overwrite"), "NaN or infinite")
    assert _snapshot(out) == before


def test_inputs_are_not_overwritten(ref_copy, tmp_path, capfd) -> None:
    """make-templates, convert-particles, make-params and import refuse existing outputs."""
    params = ref_copy / "templates" / "parameters.npz"
    before = _snapshot(ref_copy)
    code = main(["make-params", "--n-pixels", "32", "--pixel-size", "1.5", "--output", str(params)])
    _fails(capfd, code, "parameters.npz", "overwrite")
    code = main(
        [
            "convert-particles",
            "--params",
            str(params),
            "--output",
            str(ref_copy / "particles"),
            "--mrcs",
            str(ref_copy / "raw" / "particles.mrcs"),
            "--star",
            str(ref_copy / "raw" / "particles.star"),
            "--no-progress",
        ]
    )
    _fails(capfd, code, "particles_fourier_stack_000000.pt", "overwrite")
    assert _snapshot(ref_copy) == before


# ------------------------------------------------------------------------------ run CONFIG
def _run_config(tmp_path: Path, reference_dir: Path, section: str, **changes) -> Path:
    """A pipeline config on the reference inputs with ``changes`` in one section."""
    import yaml

    data = {
        "output": "out",
        "parameters": {"file": str(reference_dir / "templates" / "parameters.npz")},
        "templates": {"inputs": [str(reference_dir / "inputs_pdb" / "1uao.pdb")]},
        "particles": {
            "mrcs": [str(reference_dir / "raw" / "particles.mrcs")],
            "star": [str(reference_dir / "raw" / "particles.star")],
            "batch_size": 12,
        },
        "likelihood": {
            "max_displacement_pixels": 1.5,
            "n_displacements_x": 3,
            "n_displacements_y": 3,
        },
        "cluster": {"scheduler": "sync"},
    }
    data[section].update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("section", "changes", "fragments"),
    [
        ("particles", {"star": ["missing.star"]}, ["particles.star: ", "missing.star: file not"]),
        ("particles", {"mrcs": ["missing.mrcs"]}, ["particles.mrcs: ", "missing.mrcs"]),
        (
            "particles",
            {"pixel_size": 1.7},
            ["particles: the images' pixel size is 1.7 Å but the parameters' pixel_size is 1.5"],
        ),
        ("templates", {"inputs": ["gone.pdb"]}, ["templates.inputs: ", "gone.pdb: file not found"]),
        (
            "likelihood",
            {"structures": [3]},
            ["likelihood.structures: structure 3 is out of range", "1 structure(s) (1uao)"],
        ),
        (
            "likelihood",
            {"n_stacks": 5},
            ["likelihood.n_stacks: 5 stacks requested but the conversion makes 2"],
        ),
        (
            "likelihood",
            {"max_displacement_pixels": 40},
            ["likelihood.max_displacement_pixels: ", "reaches beyond the image"],
        ),
        ("likelihood", {"n_stacks": 0}, ["likelihood.n_stacks: Input should be greater than 0"]),
        ("likelihood", {"precision": "triple"}, ["likelihood.precision: Input should be"]),
    ],
    ids=[
        "missing-star",
        "missing-mrcs",
        "pixel-size-conflict",
        "missing-model",
        "structure-out-of-range",
        "n_stacks-too-many",
        "displacement-beyond-box",
        "n_stacks-0",
        "bad-precision",
    ],
)
def test_run_config_checks_every_step_first(
    tmp_path, reference_dir, capfd, section, changes, fragments
) -> None:
    """A later step's bad input is reported before the first step works: nothing written."""
    config = _run_config(tmp_path, reference_dir, section, **changes)
    inputs = {sub: _snapshot(reference_dir / sub) for sub in ("raw", "templates", "inputs_pdb")}
    line = _one_line(capfd, main(["run", str(config), "--no-progress"]), *fragments)
    assert line.startswith(f"cryolike-dask run: error: {config}: "), line
    assert not (tmp_path / "out").exists()  # no templates folder, no parameters, nothing
    assert {sub: _snapshot(reference_dir / sub) for sub in inputs} == inputs


# ------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs with ~1.75 MiB taken by a filler file; unmounted afterwards.

    Mounting needs root (CI runs as root); elsewhere the test is skipped.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        (mount / "filler").write_bytes(b"\0" * (1792 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_conversion(small_disk, reference_dir, capfd) -> None:
    """The workers' writes fail with ENOSPC: one line naming the file, nothing left that
    looks complete, the inputs unchanged."""
    raw = reference_dir / "raw"
    before = _snapshot(raw)
    out = small_disk / "particles"
    code = main(
        [
            *("convert-particles", "--params", str(reference_dir / "templates" / "parameters.npz")),
            *("--output", str(out), "--mrcs", str(raw / "particles.mrcs")),
            *("--star", str(raw / "particles.star"), "--batch-size", "6"),
            *_on_cluster(),
            "--no-progress",
        ]
    )
    _one_line(capfd, code, f": error: {out}", "no space left on device", "ENOSPC")
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not any(p.suffix in (".pt", ".npz") for p in left), left  # no stack looks complete
    assert not (out / "particles.zarr").exists()
    assert _snapshot(raw) == before


def test_disk_full_during_likelihood(small_disk, ref_copy, capfd, monkeypatch) -> None:
    """The free-space check passed (patched in the driver) but the writes do not fit: the
    store tasks on the cluster's workers fail; one line naming results.zarr, no worker log
    line; no block marked done, no stack's completion record, inputs unchanged."""
    from collections import namedtuple

    from cryolike_dask.pipeline import driver

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(driver.shutil, "disk_usage", lambda path: usage(2**40, 0, 2**40))
    (small_disk / "filler").unlink()  # 2 MiB: less than one block's full tensor (2.5 MiB)
    out = small_disk / "likelihood"
    before = [_snapshot(ref_copy / sub) for sub in ("templates", "particles")]
    args = [
        *("likelihood", "--templates", str(ref_copy / "templates")),
        *("--particles", str(ref_copy / "particles")),
        *("--params", str(ref_copy / "templates" / "parameters.npz"), "--output", str(out)),
        *("--max-displacement-pixels", "1.5", "--n-displacements-x", "3"),
        *("--n-displacements-y", "3", "--full-cross-correlation", *_on_cluster()),
        "--no-progress",
    ]
    _one_line(
        capfd, main(args), f": error: {out}/results.zarr", "no space left on device", "ENOSPC"
    )
    assert not list(out.glob(".cryolike_dask/template*/stack_*.json"))  # no stack complete
    assert not list(out.glob("template*/**/*.pt"))
    if (out / "results.zarr").exists():
        done = ResultsStore.open(out / "results.zarr", mode="r").done()
        assert not np.any(done > 0), done
    assert [_snapshot(ref_copy / sub) for sub in ("templates", "particles")] == before


def test_outputs_larger_than_a_small_disk(small_disk, ref_copy, capfd) -> None:
    """The full cross-correlation tensor cannot fit: refused before any output is written."""
    out = small_disk / "likelihood"
    before = [_snapshot(ref_copy / sub) for sub in ("templates", "particles")]
    _one_line(
        capfd,
        _likelihood(ref_copy, out, "--full-cross-correlation"),
        str(out),
        "the outputs need ~",
        "GiB free",
    )
    assert (
        not out.exists()
        and [_snapshot(ref_copy / sub) for sub in ("templates", "particles")] == before
    )


# ------------------------------------------------------------------------------ very large runs
#: 7 × 7 displacements on the reference data: 24 images × 96 templates × 49 × 64 poses.
_MANY_DISPLACEMENTS = ("--max-displacement-pixels", "3", "--n-displacements-x", "7")
_MANY_DISPLACEMENTS += ("--n-displacements-y", "7")


@pytest.mark.parametrize("limit", ["hours", "outputs"])
def test_a_very_large_run_needs_yes(ref_copy, tmp_path, capfd, monkeypatch, limit) -> None:
    """A run estimated over a day on the workers (here: at a fake GEMM rate of 1 kflop/s) or
    over the output limit (here: lowered to 1 kB) is refused with its estimate before anything
    is read or written; with --yes it runs to the end."""
    from cryolike_dask.kernels import backend
    from cryolike_dask.pipeline import _size_guard

    if limit == "hours":
        monkeypatch.setattr(backend, "gemm_rate", lambda *args, **kwargs: 1e3)
        over = "(over 24 h)"
    else:
        monkeypatch.setattr(_size_guard, "MAX_OUTPUT_BYTES", 1000)
        over = "GiB of outputs)"
    out = tmp_path / "out"
    line = _one_line(
        capfd,
        _likelihood(ref_copy, out, *_MANY_DISPLACEMENTS),
        "cryolike-dask likelihood: error: a very large run: ~7.23e+06 pose evaluations, ~",
        " h on 2 CPU thread(s) at this machine's GEMM rate",
        " GiB of outputs, ~",
        " GiB per kernel task",
        over,
        "pass --yes (likelihood.yes: true in a run config, yes=True in Python)",
    )
    if limit == "hours":  # 9.8e8 flops at 0.4 kflop/s on each of 2 threads: ~340 h
        hours = float(line.split(" pose evaluations, ~")[1].split(" h on")[0])
        assert 300 < hours < 400, line
    assert not out.exists()
    assert _likelihood(ref_copy, out, *_MANY_DISPLACEMENTS, "--yes") == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "error" not in err, err
    assert ResultsStore.open(out / "results.zarr", mode="r").done().all()
    for i in range(2):  # both stacks exported, with their completion records
        assert (out / f".cryolike_dask/template0/stack_{i:06d}.json").is_file()
        assert (out / f"template0/cross_correlation/cross_correlation_stack_{i:06d}.pt").is_file()


@pytest.mark.parametrize("confirm", ["flag", "config-key"])
def test_a_very_large_run_config_needs_yes(
    tmp_path, reference_dir, capfd, monkeypatch, confirm
) -> None:
    """``run CONFIG``: the likelihood step of a very large run (here: any run, the limit
    lowered to 0 h) is refused with the estimate; ``run --yes`` or ``likelihood.yes: true``
    in the config confirms it, and the run resumes to the end."""
    import yaml

    from cryolike_dask.pipeline import _size_guard

    monkeypatch.setattr(_size_guard, "MAX_HOURS", 0.0)
    config = _run_config(tmp_path, reference_dir, "likelihood")
    data = yaml.safe_load(config.read_text())
    data["plots"] = False
    config.write_text(yaml.safe_dump(data))
    _one_line(
        capfd,
        main(["run", str(config), "--no-progress"]),
        "cryolike-dask run: error: a very large run: ",
        "pose evaluations",
        "(over 0 h); pass --yes (likelihood.yes: true in a run config",
    )
    assert not (tmp_path / "out" / "likelihood" / "results.zarr").exists()
    if confirm == "flag":
        code = main(["run", str(config), "--no-progress", "--yes"])
    else:
        data["likelihood"]["yes"] = True
        config.write_text(yaml.safe_dump(data))
        code = main(["run", str(config), "--no-progress"])
    assert code == 0, capfd.readouterr().err
    assert ResultsStore.open(tmp_path / "out" / "likelihood" / "results.zarr").done().all()


# ------------------------------------------------------------------------------ internal errors
def _internal_error_line(capfd, code: int, command: str) -> Path:
    """Exit 1 and one line naming the log file (which holds the traceback); its path."""
    err = capfd.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    prefix = f"cryolike-dask {command}: internal error: RuntimeError: a bug (details in "
    assert lines[0].startswith(prefix) and lines[0].endswith("; please report it)"), lines[0]
    log = Path(lines[0][len(prefix) :].removesuffix("; please report it)"))
    text = log.read_text()
    from cryolike_dask import __version__

    for fragment in (
        "Traceback (most recent call last)",
        "RuntimeError: a bug\nsecond line",
        "in buggy",
        f"cryolike-dask {__version__}",
        f"command: cryolike-dask {command} ",
        "python: 3.",
        "platform: ",
        "numpy ",
        "dask ",
    ):
        assert fragment in text, (fragment, text)
    return log


def test_internal_error_goes_to_a_log_file(tmp_path, capfd, monkeypatch) -> None:
    """A bug (not a user error) is one line naming a log file, exit status 1: the file is in
    the output folder when it exists, else in the temp folder; --debug and
    CRYOLIKE_DASK_DEBUG=1 show the traceback instead."""
    import tempfile

    from cryolike_dask import cli

    def buggy(args):
        raise RuntimeError("a bug\nsecond line")

    monkeypatch.setattr(cli, "_cmd_stitch", buggy)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    out = tmp_path / "out"
    out.mkdir()
    log = _internal_error_line(capfd, main(["stitch", str(out)]), "stitch")
    assert log.parent == out / ".cryolike_dask.logs" and log.name.startswith("error-"), log
    assert log.name.endswith(f"-{os.getpid()}.log")
    assert not list(temp.iterdir())
    log = _internal_error_line(capfd, main(["stitch", str(tmp_path / "missing")]), "stitch")
    assert log.parent == temp and log.name.startswith("cryolike-dask-error-"), log
    assert not (tmp_path / "missing").exists()
    for argv in (["--debug", "stitch", str(out)], ["stitch", str(out), "--debug"]):
        with pytest.raises(RuntimeError, match="a bug"):
            main(argv)
    monkeypatch.setenv("CRYOLIKE_DASK_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["stitch", str(out)])
    assert len(list(temp.iterdir())) == 1 and len(list(out.iterdir())) == 1  # no more logs


def test_user_error_writes_no_log(tmp_path, capfd, monkeypatch) -> None:
    """A user error stays one line with exit status 2, and writes no log file."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    out = tmp_path / "out"
    out.mkdir()
    _one_line(capfd, main(["stitch", str(out)]), "cryolike-dask stitch: error: ", str(out))
    assert not list(out.iterdir()) and not list(temp.iterdir())


# ------------------------------------------------------------------------------ fault tolerance
def _results(out: Path) -> dict[str, np.ndarray]:
    g = ResultsStore.open(out / "results.zarr", mode="r").group
    return {
        k: np.asarray(g[k][:])
        for k in (
            "cross_correlation",
            "optimal_template",
            "optimal_inplane_rotation",
            "log_likelihood_integrated_fourier",
        )
    }


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """A Zarr run slow enough to interrupt: 480 random images × 96 templates, 64 px."""
    from cryolike_dask.grids import ViewingAngles
    from cryolike_dask.io.zarr_stores import ImageStore, StackInfo, TemplateStore
    from tests.conftest import random_hermitian_stack

    root = tmp_path_factory.mktemp("bigger")
    params = ImageParameters.from_values(64, 2.0, n_inplanes=128, viewing_distance=8 / (4 * np.pi))
    params.save(root / "parameters.npz")
    g = params.polar_grid
    rng = np.random.default_rng(3)
    angles = ViewingAngles.from_viewing_distance(params.viewing_distance)
    ts = TemplateStore.create(root / "templates.zarr", params)
    ts.add_structure(
        "random", random_hermitian_stack(rng, angles.n_angles, g.n_shells, g.n_inplanes), angles
    )
    ts.mark_complete()
    m = 480
    store = ImageStore.create(
        root / "images.zarr",
        params,
        m,
        chunk_images=48,
        stacks=[StackInfo(f"s{i}", 120 * i, 120 * (i + 1)) for i in range(4)],
    )
    lens = LensParameters(
        rng.uniform(8e3, 2e4, m), rng.uniform(8e3, 2e4, m), rng.uniform(0, 3, m), np.zeros(m)
    )
    store.write(0, random_hermitian_stack(rng, m, g.n_shells, g.n_inplanes), lens)
    store.mark_complete()
    args = [
        "likelihood",
        "--templates",
        str(root / "templates.zarr"),
        "--particles",
        str(root / "images.zarr"),
        "--params",
        str(root / "parameters.npz"),
        "--max-displacement-pixels",
        "1",
        "--n-displacements-x",
        "3",
        "--n-displacements-y",
        "3",
        "--integrated-likelihood",
        "--images-per-block",
        "24",
        "--templates-per-block",
        "32",
        "--no-progress",
    ]
    reference = root / "reference"
    assert main([*args, "--output", str(reference), "--scheduler", "sync"]) == 0
    return args, reference


@pytest.mark.slow
def test_worker_killed_mid_run(bigger, tmp_path) -> None:
    from distributed import Client, LocalCluster

    args, reference = bigger
    out = tmp_path / "out"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        result: dict = {}
        runner = threading.Thread(
            target=lambda: result.setdefault(
                "code",
                main(
                    [
                        *args,
                        "--output",
                        str(out),
                        "--scheduler-address",
                        cluster.scheduler_address,
                        "--max-tasks-per-graph",
                        "15",
                    ]
                ),
            )
        )
        runner.start()
        killed_with_work_left = False
        deadline = time.time() + 120
        while time.time() < deadline and runner.is_alive():
            store = out / "results.zarr"
            if store.exists():
                try:
                    done = ResultsStore.open(store, mode="r").done()
                except Exception:
                    done = None
                if done is not None and 0 < int((done > 0).sum()) < done.size:
                    pids = client.run(os.getpid)
                    os.kill(next(iter(pids.values())), signal.SIGKILL)
                    killed_with_work_left = True
                    break
            time.sleep(0.05)
        runner.join(timeout=300)
    assert killed_with_work_left, "the run ended before a worker could be killed"
    assert result.get("code") == 0
    got, want = _results(out), _results(reference)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_driver_sigkill_then_resume(bigger, tmp_path) -> None:
    """The driver (a CLI process on a running LocalCluster, as on HPC) is SIGKILLed
    part-way; a rerun with --skip-exist on the same cluster finishes the run exactly."""
    args, reference = bigger
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "cryolike_dask",
        *args,
        "--output",
        str(out),
        *_on_cluster(),
        "--max-tasks-per-graph",
        "3",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_at_kill = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        store = out / "results.zarr"
        if store.exists():
            try:
                done = ResultsStore.open(store, mode="r").done()
            except Exception:
                done = None
            if done is not None and int((done > 0).sum()) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                done_at_kill = int((done > 0).sum())
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert done_at_kill is not None and done_at_kill < 20, "not interrupted part-way"
    total = 20  # 480 images in blocks of 24
    again = subprocess.run([*cmd, "--skip-exist"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    summary = next(line for line in again.stdout.splitlines() if line.startswith("done in"))
    computed = int(summary.split(": ")[1].split(" blocks computed")[0])
    skipped = int(summary.split("blocks computed, ")[1].split(" already done")[0])
    assert skipped >= done_at_kill and computed + skipped == total
    got, want = _results(out), _results(reference)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for name in ("optimal_template", "cross_correlation"):
        for i in range(4):
            folder = "optimal_pose" if name == "optimal_template" else "cross_correlation"
            a = torch.load(out / f"template0/{folder}/{name}_stack_{i:06d}.pt")
            b = torch.load(reference / f"template0/{folder}/{name}_stack_{i:06d}.pt")
            assert torch.equal(a, b)


def test_conversion_killed_then_refused_and_redone(reference_dir, tmp_path, capfd) -> None:
    """``convert-particles`` (a CLI process on the module's LocalCluster, its workers
    converting each stack 0.3 s slower) SIGKILLed after its first stack: ``likelihood``
    refuses the folder and its store; ``--overwrite`` then gives an uninterrupted
    conversion's outputs."""
    from distributed import Client

    from cryolike_dask.io.zarr_stores import ImageStore

    raw = reference_dir / "raw"
    params = reference_dir / "templates" / "parameters.npz"
    before = _snapshot(raw)
    args = [
        *("convert-particles", "--params", str(params)),
        *("--mrcs", str(raw / "particles.mrcs"), "--star", str(raw / "particles.star")),
        *("--batch-size", "2", *_on_cluster(), "--no-progress"),
    ]
    out = tmp_path / "particles"
    slow = ("cryolike_dask.pipeline.convert_particles", "convert_stack")
    with Client(_CLUSTER["address"], set_as_default=False) as client:
        client.run(_slow_on_worker, *slow, 0.3, False)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cryolike_dask", *args, "--output", str(out)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            ready = lambda: bool(list((out / "fft").glob("particles_fourier_stack_*.pt")))  # noqa: E731
            _kill_when(proc, ready, "conversion")
            time.sleep(0.5)  # the stacks under way end on their workers; their run is gone
        finally:
            client.run(_slow_on_worker, *slow, 0.0, False)
    assert 1 <= len(list((out / "fft").glob("*.pt"))) < 12  # part-way: 12 stacks in all
    for particles in (out, out / "particles.zarr"):
        code = main(
            [
                *("likelihood", "--templates", str(reference_dir / "templates")),
                *("--particles", str(particles), "--params", str(params)),
                *("--output", str(tmp_path / "likelihood"), *_on_cluster()),
            ]
        )
        _one_line(capfd, code, "particles.zarr: incomplete (the run that made it did not finish)")
    assert not (tmp_path / "likelihood").exists()
    # without --overwrite the half-made folder is not silently reused
    _one_line(capfd, main([*args, "--output", str(out)]), "exists; pass --overwrite")
    assert main([*args, "--output", str(out), "--overwrite"]) == 0
    reference = tmp_path / "reference"
    assert main([*args, "--output", str(reference)]) == 0
    names = sorted(p.name for p in (reference / "fft").iterdir())
    assert sorted(p.name for p in (out / "fft").iterdir()) == names and len(names) == 24
    for name in names:
        a, b = out / "fft" / name, reference / "fft" / name
        if name.endswith(".pt"):
            assert torch.equal(torch.load(a), torch.load(b)), name
        else:
            fa, fb = read_npz(a), read_npz(b)
            assert sorted(fa) == sorted(fb), name
            for k in fa:
                np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    got, want = (
        ImageStore.open(out / "particles.zarr"),
        ImageStore.open(reference / "particles.zarr"),
    )
    (ia, la), (ib, lb) = got.read(0, 24), want.read(0, 24)
    np.testing.assert_array_equal(ia, ib)
    for k in lb:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
    assert _snapshot(raw) == before


#: ``cryolike-dask ARGS`` with ``MODULE.NAME`` made to sleep a minute ``before`` or ``after``
#: its first call (argv: MODULE NAME before|after ARGS...), so that the process can be killed
#: there.
_SLEEP_AT = """
import importlib, sys, time
module, name, when = sys.argv[1:4]
target = importlib.import_module(module)
original = getattr(target, name)

def sleepy(*args, **kwargs):
    if when == "before":
        time.sleep(60)
    result = original(*args, **kwargs)
    if when == "after":
        time.sleep(60)
    return result

setattr(target, name, sleepy)
sys.argv = ["cryolike-dask", *sys.argv[4:]]
from cryolike_dask.cli import run
run()
"""

#: Fixed blocks, so that every run (killed, resumed, uninterrupted) splits the work alike.
_KILL_ARGS = ("--integrated-likelihood", "--images-per-block", "6", "--templates-per-block", "48")


def _sleeping(function: str, when: str, args: list[str]) -> subprocess.Popen:
    """``cryolike-dask ARGS`` in a child process, ``function`` (``module.name``) sleeping
    ``when`` it is first called."""
    module, name = function.rsplit(".", 1)
    return subprocess.Popen(
        [sys.executable, "-c", _SLEEP_AT, module, name, when, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL ``proc`` once ``ready()`` holds (within a minute)."""
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    if proc.poll() is None and ready():
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (what, proc.stderr.read().decode()[-3000:])


def _assert_same_outputs(out: Path, reference: Path) -> None:
    """Every array of ``results.zarr`` and every ``.pt`` file of ``out`` equal those of
    ``reference``; no temporary file is left."""
    import zarr

    got = zarr.open_group(out / "results.zarr", mode="r")
    want = zarr.open_group(reference / "results.zarr", mode="r")
    names = sorted(k for k, v in want.members(max_depth=None) if isinstance(v, zarr.Array))
    assert sorted(k for k, v in got.members(max_depth=None) if isinstance(v, zarr.Array)) == names
    assert "bookkeeping/done" in names and "cross_correlation" in names, names
    for k in names:
        np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(want[k][...]), k)
    files = sorted(str(p.relative_to(reference)) for p in reference.glob("template*/**/*.pt"))
    assert sorted(str(p.relative_to(out)) for p in out.glob("template*/**/*.pt")) == files
    assert len(files) == 2 * 6, files  # 2 stacks × 6 quantities
    for name in files:
        assert torch.equal(torch.load(out / name), torch.load(reference / name)), name
    for i in range(2):
        assert (out / f".cryolike_dask/template0/stack_{i:06d}.json").is_file()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], list(out.rglob("*"))


def test_kill_during_results_store_creation_then_resume(ref_copy, tmp_path, capfd) -> None:
    """The driver (a CLI process on the module's LocalCluster) is SIGKILLed while it builds
    ``results.zarr`` (under its temporary name): no store is left that looks made, and a
    rerun with --skip-exist gives an uninterrupted run's outputs."""
    out, reference = tmp_path / "out", tmp_path / "reference"
    args = _likelihood_args(ref_copy, out, *_KILL_ARGS)
    proc = _sleeping("cryolike_dask.io.zarr_stores._write_coord", "before", args)
    _kill_when(proc, lambda: bool(list(out.glob(".results.zarr.tmp-*"))), "store creation")
    assert list(out.glob(".results.zarr.tmp-*")) and not (out / "results.zarr").exists()
    capfd.readouterr()
    assert _likelihood(ref_copy, out, *_KILL_ARGS, "--skip-exist") == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyError" not in err and " error" not in err, err
    assert _likelihood(ref_copy, reference, *_KILL_ARGS) == 0
    _assert_same_outputs(out, reference)


def _slow_on_worker(module: str, name: str, seconds: float, first_only: bool) -> None:
    """Runs on a worker (``client.run``): ``module.name`` pauses ``seconds`` after it returns
    (after its first call only, or every call), so that the driver can be killed while the
    worker is at it; ``seconds=0`` undoes it."""
    import importlib
    import time as _time

    target = importlib.import_module(module)
    saved = f"_unpatched_{name}"
    original = getattr(target, saved, getattr(target, name))
    if seconds <= 0:
        setattr(target, name, original)
        return
    first = [True]

    def slow(*args, **kwargs):
        out = original(*args, **kwargs)
        if first[0] or not first_only:
            first[0] = False
            _time.sleep(seconds)
        return out

    setattr(target, saved, original)
    setattr(target, name, slow)


def test_kill_during_export_then_resume(ref_copy, tmp_path, capfd) -> None:
    """The driver (a CLI process on the module's LocalCluster) is SIGKILLed while a stack's
    export runs on a worker (its first ``.pt`` written, no stack complete): a rerun with
    --skip-exist gives an uninterrupted run's outputs."""
    from distributed import Client

    out, reference = tmp_path / "out", tmp_path / "reference"
    args = _likelihood_args(ref_copy, out, *_KILL_ARGS)
    with Client(_CLUSTER["address"], set_as_default=False) as client:
        client.run(_slow_on_worker, "cryolike_dask.io.exports", "save_tensor", 3.0, True)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cryolike_dask", *args],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _kill_when(proc, lambda: bool(list(out.glob("template0/**/*.pt"))), "export")
            assert not list(out.glob(".cryolike_dask/template0/stack_*.json"))  # none complete
            time.sleep(3.5)  # the export under way ends on its worker; its run is gone
        finally:
            client.run(_slow_on_worker, "cryolike_dask.io.exports", "save_tensor", 0.0, True)
    capfd.readouterr()
    assert _likelihood(ref_copy, out, *_KILL_ARGS, "--skip-exist") == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyError" not in err and " error" not in err, err
    assert _likelihood(ref_copy, reference, *_KILL_ARGS) == 0
    _assert_same_outputs(out, reference)


# ------------------------------------------------------------------------------ fuzzing
FUZZ = settings(
    max_examples=int(os.environ.get("CRYOLIKE_DASK_FUZZ_EXAMPLES", "60")),  # more: set it higher
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

_star_tokens = st.sampled_from(
    [
        "data_",
        "data_optics",
        "data_particles",
        "loop_",
        "_rlnDefocusU",
        "_rlnDefocusV",
        "_rlnDefocusAngle",
        "_rlnVoltage",
        "_rlnSphericalAberration",
        "_rlnImageName",
        "_rlnOpticsGroup",
        "1@a.mrcs",
        "300",
        "2.7",
        "1e4",
        "nan",
        "-1",
        "#1",
        "x",
        "",
        "\u00e9",
        "0.1",
    ]
)


@FUZZ
@given(st.lists(st.lists(_star_tokens, max_size=6).map(" ".join), max_size=25))
def test_star_reader_fuzz(tmp_path, lines) -> None:
    path = tmp_path / "f.star"
    path.write_text("\n".join(lines))
    try:
        rec = read_star(path)
    except MetadataError as exc:
        assert str(path) in str(exc)
    except ParameterFileError as exc:  # from lens validation, which names its field
        assert "lens parameters" in str(exc) or str(path) in str(exc)
    else:
        assert rec.n_particles >= 1 and np.all(np.isfinite(rec.lens.defocus_u))


_cs_fields = st.sampled_from(
    [
        "ctf/df1_A",
        "ctf/df2_A",
        "ctf/df_angle_rad",
        "ctf/cs_mm",
        "ctf/accel_kv",
        "ctf/amp_contrast",
        "blob/path",
        "blob/idx",
        "blob/psize_A",
        "other",
    ]
)


@FUZZ
@given(
    st.sets(_cs_fields, max_size=10),
    st.integers(0, 4),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4),
    st.booleans(),
)
def test_cs_reader_fuzz(tmp_path, fields, n, values, garbage) -> None:
    path = tmp_path / "f.cs"
    if garbage:
        path.write_bytes(bytes(values.__repr__(), "utf8"))
    else:
        dtype = [
            (f, "S8") if f == "blob/path" else (f, "i8") if f == "blob/idx" else (f, "f8")
            for f in sorted(fields)
        ] or [("x", "f8")]
        arr = np.zeros(n, dtype=dtype)
        for f in fields:
            if f not in ("blob/path", "blob/idx") and n:
                arr[f] = np.resize(values, n)
        with open(path, "wb") as fh:
            np.save(fh, arr)
    try:
        rec = read_cs(path)
    except (MetadataError, ParameterFileError) as exc:
        assert str(path) in str(exc) or "lens parameters" in str(exc)
    else:
        assert rec.n_particles == n


_npz_keys = st.sampled_from(
    [
        "n_pixels",
        "pixel_size",
        "radius_max",
        "dist_radii",
        "n_inplanes",
        "precision",
        "viewing_distance",
        "atom_shape",
        "defocusU",
        "defocusV",
        "defocusAngle",
        "voltage",
        "sphericalAberration",
        "x",
    ]
)
_npz_values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 300),
    st.text(max_size=5),
    st.lists(st.floats(-1e5, 1e5), min_size=0, max_size=3),
)


@FUZZ
@given(st.dictionaries(_npz_keys, _npz_values, max_size=10), st.booleans())
def test_npz_readers_fuzz(tmp_path, fields, garbage) -> None:
    path = tmp_path / "f.npz"
    if garbage:
        path.write_bytes(repr(fields).encode())
    else:
        np.savez(
            path,
            **{
                k: np.array(v, dtype=object) if v is None else np.asarray(v)
                for k, v in fields.items()
            },
        )
    for reader in (ImageParameters.load, LensParameters.load):
        try:
            reader(path)
        except ParameterFileError as exc:
            assert str(path) in str(exc) or "lens parameters" in str(exc)
