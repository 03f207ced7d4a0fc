"""CTF on the polar grid: golden values (spec §7.2) and the astigmatism conventions (§7.4)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import PolarGrid
from cryolike_dask.kernels.ctf import ctf_from_lens, ctf_polar, electron_wavelength
from cryolike_dask.params import ImageParameters, LensParameters


def _golden_ctf(**kw):
    grid = PolarGrid(8.0, 0.25, 64)
    args = dict(voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1)
    args.update(kw)
    return ctf_polar(
        np.array([10200.0]),
        np.array([9800.0]),
        np.array([np.deg2rad(30.0)]),
        np.array([0.0]),
        radii=grid.radii,
        theta=grid.theta,
        box_size=64.0,
        **args,
    )


def test_wavelengths() -> None:
    assert electron_wavelength(300) == pytest.approx(0.019687489, abs=1e-9)
    assert electron_wavelength(200) == pytest.approx(0.025079340, abs=1e-9)


def test_golden_values() -> None:
    ctf = _golden_ctf()
    assert ctf.shape == (1, 33, 64) and ctf.dtype == np.float64
    assert ctf[0, 0, 0] == pytest.approx(0.10039080856693414, rel=1e-12)
    assert ctf[0, 10, 0] == pytest.approx(0.6233636100889488, rel=1e-12)
    assert ctf[0, 10, 16] == pytest.approx(0.6594059395759182, rel=1e-12)
    assert ctf[0, 32, 5] == pytest.approx(0.4550242303789229, rel=1e-12)


def test_equals_cryolike_on_reference(reference_dir) -> None:
    params = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    grid = params.polar_grid
    ref = np.load(reference_dir / "numpy" / "inputs.npz")["ctf"]
    for i in (0, 1):
        lens = LensParameters.load(
            reference_dir / "particles" / "fft" / f"particles_fourier_stack_00000{i}.npz"
        )
        ctf = ctf_from_lens(lens, grid.radii, grid.theta, params.box_size[0])
        np.testing.assert_allclose(ctf, ref[12 * i : 12 * (i + 1)], rtol=0, atol=1e-14)


def test_isotropic_is_mean_defocus() -> None:
    grid = PolarGrid(8.0, 0.25, 64)
    u, v = np.array([12000.0, 8000.0]), np.array([11000.0, 8000.0])
    a, ph = np.array([0.3, 1.0]), np.zeros(2)
    kw = dict(
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.07,
        radii=grid.radii,
        theta=grid.theta,
        box_size=64.0,
    )
    iso = ctf_polar(u, v, a, ph, anisotropic=False, **kw)
    assert iso.shape == (2, 33, 1)
    mean = (u + v) / 2
    np.testing.assert_allclose(iso[..., 0], ctf_polar(mean, mean, a, ph, **kw)[..., 0], rtol=1e-13)
    # with no astigmatism the anisotropic CTF does not depend on the angle
    flat = ctf_polar(mean, mean, a, ph, **kw)
    np.testing.assert_allclose(flat, np.repeat(flat[..., :1], 64, axis=2), rtol=1e-13)


@pytest.mark.parametrize("angle_deg", [-70.0, -20.0, 0.0, 33.0, 80.0])
def test_relion_convention_identity(angle_deg: float) -> None:
    """CryoLike's CTF equals RELION's at 90° − a when U ≥ V and at −a when U < V (spec §7.4)."""
    grid = PolarGrid(8.0, 0.25, 64)
    kw = dict(
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=48.0,
    )
    a = np.deg2rad(angle_deg)
    for u, v, relion_angle in ((15000.0, 14000.0, np.pi / 2 - a), (14000.0, 15000.0, -a)):
        cry = ctf_polar([u], [v], [a], [0.0], convention="cryolike", **kw)
        rel = ctf_polar([u], [v], [relion_angle], [0.0], convention="relion", **kw)
        np.testing.assert_allclose(cry, rel, rtol=0, atol=1e-12)
    # and the two conventions do differ in general
    cry = ctf_polar([15000.0], [14000.0], [a], [0.0], convention="cryolike", **kw)
    rel = ctf_polar([15000.0], [14000.0], [a], [0.0], convention="relion", **kw)
    if abs(angle_deg - 45.0) > 1:
        assert np.abs(cry - rel).max() > 1e-3


def test_phase_shift_and_cs_corrected() -> None:
    base = _golden_ctf()
    assert not np.allclose(base, _golden_ctf(cs_corrected=True))
    grid = PolarGrid(8.0, 0.25, 64)
    # a phase shift of π flips the sign of the whole CTF
    flipped = ctf_polar(
        [10200.0],
        [9800.0],
        [np.deg2rad(30)],
        [np.pi],
        voltage_kv=300,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        radii=grid.radii,
        theta=grid.theta,
        box_size=64.0,
    )
    np.testing.assert_allclose(flipped, -base, atol=1e-12)


def test_bad_arguments() -> None:
    grid = PolarGrid(8.0, 0.25, 64)
    with pytest.raises(ValueError, match="convention"):
        ctf_polar(
            [1.0],
            [1.0],
            [0.0],
            [0.0],
            voltage_kv=300,
            spherical_aberration_mm=2.7,
            amplitude_contrast=0.1,
            radii=grid.radii,
            theta=grid.theta,
            box_size=64.0,
            convention="eman",
        )
    with pytest.raises(ValueError, match="box_size"):
        ctf_polar(
            [1.0],
            [1.0],
            [0.0],
            [0.0],
            voltage_kv=300,
            spherical_aberration_mm=2.7,
            amplitude_contrast=0.1,
            radii=grid.radii,
            theta=grid.theta,
            box_size=0.0,
        )
