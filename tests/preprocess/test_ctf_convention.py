"""Particles converted from RELION metadata get RELION's CTF exactly (spec §7.4).

The test builds a real image whose 2-D DFT is RELION's astigmatic CTF, evaluated on the
Cartesian FFT grid with RELION's formula as RELION writes it (``getDeltaF``/``getCTF``:
frequency X along MRC X = array axis 1, Y along MRC Y = array axis 0, angle measured from X),
converts that image with our particle pipeline (NUFFT to the polar grid) and compares it with
our polar CTF. With the "relion" convention the two agree; with CryoLike's they do not.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.kernels.ctf import ctf_polar
from cryolike_dask.params import ImageParameters
from cryolike_dask.preprocess.nufft import images_to_polar

N, PIXEL = 95, 2.0  # odd: every frequency and pixel has its mirror, so the image is even
VOLTAGE, CS, AC = 300.0, 2.7, 0.1


def relion_ctf(fx: np.ndarray, fy: np.ndarray, u: float, v: float, angle_deg: float) -> np.ndarray:
    """RELION's CTF at spatial frequencies (fx along MRC X, fy along MRC Y), 1/Å."""
    volt = VOLTAGE * 1e3
    lam = 12.2643247 / np.sqrt(volt * (1.0 + volt * 0.978466e-6))  # RELION's wavelength (Å)
    defocus_average = -(u + v) * 0.5
    defocus_deviation = -(u - v) * 0.5
    k1 = np.pi * lam
    k2 = np.pi / 2 * CS * 1e7 * lam**3
    k3 = np.arctan(AC / np.sqrt(1 - AC**2))
    ang = np.arctan2(fy, fx) - np.deg2rad(angle_deg)
    deltaf = defocus_average + defocus_deviation * np.cos(2 * ang)
    u2 = fx**2 + fy**2
    return -np.sin(k1 * deltaf * u2 + k2 * u2**2 - k3)


@pytest.mark.parametrize(
    ("u", "v", "angle"), [(9000.0, 6000.0, 30.0), (6000.0, 9000.0, -70.0), (8000.0, 7000.0, 110.0)]
)
def test_converted_relion_ctf_is_our_relion_ctf(u: float, v: float, angle: float) -> None:
    freq = np.fft.fftfreq(N, d=PIXEL)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")  # axis 0 = MRC Y, axis 1 = MRC X
    ctf_cart = relion_ctf(fx, fy, u, v, angle)
    image = np.fft.fftshift(np.fft.ifft2(ctf_cart)).real  # origin at index N//2, as the NUFFT's
    params = ImageParameters.from_values(N, PIXEL, n_inplanes=128, resolution_factor=0.6)
    grid = params.polar_grid
    converted = images_to_polar(image[None], grid, "double")[0] / (4 * np.pi / N)  # NUFFT scale
    kw = dict(
        voltage_kv=VOLTAGE,
        spherical_aberration_mm=CS,
        amplitude_contrast=AC,
        radii=grid.radii,
        theta=grid.theta,
        box_size=N * PIXEL,
    )
    ours = ctf_polar([u], [v], [np.deg2rad(angle)], [0.0], convention="relion", **kw)[0]
    cryolike = ctf_polar([u], [v], [np.deg2rad(angle)], [0.0], convention="cryolike", **kw)[0]
    assert np.abs(converted.imag).max() < 1e-10  # a real, even image has a real FT

    def corr(a, b):
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    # the converted image is the sampled CTF interpolated between grid frequencies; the
    # point-spread function of ~8000 Å of defocus wraps around the box, so the interpolation
    # error is up to ~3e-2 (measured 2.0-2.6e-2) - against ≥ 0.9 for the other convention
    assert np.abs(converted.real - ours).max() < 5e-2
    assert corr(converted.real, ours) > 0.9999
    # CryoLike's reading of the same angle gives another CTF
    assert np.abs(converted.real - cryolike).max() > 0.5
    assert corr(converted.real, cryolike) < 0.95
