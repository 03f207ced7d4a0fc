"""Lens (CTF) parameters from CryoLike's stack .npz files (spec §7.1, §14.3)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.params import LensParameters, ParameterFileError
from cryolike_dask.params.npz import read_npz, write_npz


def test_load_reference_stack(reference_dir) -> None:
    path = reference_dir / "particles" / "fft" / "particles_fourier_stack_000000.npz"
    lens = LensParameters.load(path)
    ref = np.load(reference_dir / "numpy" / "inputs.npz")
    assert lens.n_images == 12
    np.testing.assert_array_equal(lens.defocus_u, ref["lens__defocusU"][:12])
    np.testing.assert_array_equal(lens.defocus_angle, ref["lens__defocusAngle"][:12])
    assert lens.voltage == 300.0 and lens.spherical_aberration == 2.7
    assert lens.amplitude_contrast == 0.1
    assert lens.astigmatism_convention == "cryolike"


def test_round_trip_and_subset(tmp_path, reference_dir) -> None:
    path = reference_dir / "particles" / "fft" / "particles_fourier_stack_000001.npz"
    lens = LensParameters.load(path).with_convention("relion")
    out = write_npz(tmp_path / "lens.npz", lens.to_dict())
    again = LensParameters.load(out)
    assert again.astigmatism_convention == "relion"
    np.testing.assert_array_equal(again.defocus_v, lens.defocus_v)
    sub = lens.subset(slice(2, 5))
    assert sub.n_images == 3
    np.testing.assert_array_equal(sub.defocus_u, lens.defocus_u[2:5])
    assert LensParameters.load(out, astigmatism_convention="cryolike").astigmatism_convention == (
        "cryolike"
    )


def test_scalar_phase_shift_broadcasts() -> None:
    lens = LensParameters(np.ones(3) * 1e4, np.ones(3) * 9e3, np.zeros(3), 0.0)
    assert lens.phase_shift.shape == (3,)


def test_errors_name_file_and_field(tmp_path, reference_dir) -> None:
    fields = read_npz(reference_dir / "particles" / "fft" / "particles_fourier_stack_000000.npz")
    bad = dict(fields)
    bad["defocusV"] = np.array(fields["defocusV"])
    bad["defocusV"][3] = np.nan
    write_npz(tmp_path / "nan.npz", bad)
    with pytest.raises(ParameterFileError, match=r"nan\.npz.*'defocusV'.*non-finite.*image 3"):
        LensParameters.load(tmp_path / "nan.npz")
    missing = {k: v for k, v in fields.items() if k != "voltage"}
    write_npz(tmp_path / "missing.npz", missing)
    with pytest.raises(ParameterFileError, match=r"missing\.npz.*'voltage'"):
        LensParameters.load(tmp_path / "missing.npz")
    short = dict(fields)
    short["defocusAngle"] = np.zeros(5)
    write_npz(tmp_path / "short.npz", short)
    with pytest.raises(ParameterFileError, match=r"short\.npz.*'defocusAngle'.*5 values.*12"):
        LensParameters.load(tmp_path / "short.npz")
    two = dict(fields)
    two["voltage"] = np.array([300.0, 200.0])
    write_npz(tmp_path / "two.npz", two)
    with pytest.raises(ParameterFileError, match="single value"):
        LensParameters.load(tmp_path / "two.npz")
