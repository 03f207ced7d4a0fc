"""Contrast transfer function on the polar grid (spec §7.2, §7.4).

``CTF = −sqrt(1 − A²) sin γ + A cos γ`` with
``γ = −π λ s² Δ(θ) + (π/2) Cs λ³ s⁴ − phase_shift`` and ``s = 2 r / box`` (1/Å). The CTF is
real and, like CryoLike's, has no B-factor envelope.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from cryolike_dask.kernels.backend import array_module

# CODATA constants as used by CryoLike (SI units).
PLANCK = 6.62607015e-34
ELECTRON_CHARGE = 1.60217663e-19
ELECTRON_MASS = 9.1093837015e-31
SPEED_OF_LIGHT = 2.99792458e8

CONVENTIONS = ("cryolike", "relion")


def electron_wavelength(voltage_kv: Any) -> Any:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV.

    0.019687489 Å at 300 kV, 0.025079340 Å at 200 kV. Scalars give a float, arrays an array.
    """
    xp = array_module(voltage_kv)
    v = xp.asarray(voltage_kv, dtype=xp.float64) * 1e3
    m, e, c = ELECTRON_MASS, ELECTRON_CHARGE, SPEED_OF_LIGHT
    lam = PLANCK / xp.sqrt(2.0 * m * e * v) / xp.sqrt(1.0 + e * v / (2.0 * m * c**2)) * 1e10
    return float(lam) if lam.ndim == 0 else lam


def ctf_polar(
    defocus_u: Any,
    defocus_v: Any,
    defocus_angle: Any,
    phase_shift: Any,
    *,
    voltage_kv: Any,
    spherical_aberration_mm: Any,
    amplitude_contrast: Any,
    radii: Any,
    theta: Any,
    box_size: float,
    anisotropic: bool = True,
    convention: str = "cryolike",
    cs_corrected: bool = False,
) -> Any:
    """CTF of ``M`` images on the polar grid.

    Parameters
    ----------
    defocus_u, defocus_v : array ``[M]``
        Defocus along the two principal axes, Å.
    defocus_angle : array ``[M]``
        Astigmatism angle, radians. ``convention="cryolike"`` uses CryoLike's formula
        ``Δ̄ + |U − V|/2 · cos(2(θ − a))`` (θ from array axis 0); ``"relion"`` gives RELION's
        CTF exactly: RELION measures ``a`` from array axis 1 (MRC X), so in our frame its
        defocus is ``Δ̄ + (U − V)/2 · cos(2(θ − (π/2 − a)))`` (spec §7.4).
    phase_shift : array ``[M]`` or scalar
        Phase shift, radians.
    voltage_kv, spherical_aberration_mm, amplitude_contrast : float or array ``[M]``
        Microscope constants (kV, mm, dimensionless), one value or one per image.
    radii : array ``[N]``
        Shell radii, polar units.
    theta : array ``[W]``
        Grid angles, radians.
    box_size : float
        Box edge in Å, so that the spatial frequency is ``2 r / box_size``.
    anisotropic : bool
        If False, the mean defocus is used and the result has a unit angle axis.
    cs_corrected : bool
        Drop the spherical-aberration term.

    Returns
    -------
    array
        float64 ``[M, N, W]`` (``[M, N, 1]`` if not anisotropic), on the array module of
        ``defocus_u`` (NumPy or CuPy).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"CTF convention must be one of {CONVENTIONS}, not {convention!r}")
    if not (math.isfinite(box_size) and box_size > 0):
        raise ValueError(f"box_size must be positive (Å), not {box_size!r}")
    xp: ModuleType = array_module(defocus_u)
    f64 = xp.float64
    u = xp.atleast_1d(xp.asarray(defocus_u, dtype=f64))
    v = xp.atleast_1d(xp.asarray(defocus_v, dtype=f64))
    angle = xp.atleast_1d(xp.asarray(defocus_angle, dtype=f64))
    phase = xp.broadcast_to(xp.atleast_1d(xp.asarray(phase_shift, dtype=f64)), u.shape)
    r = xp.asarray(radii, dtype=f64)
    th = xp.asarray(theta, dtype=f64)

    def per_image(value: Any) -> Any:  # scalar or [M] → [M, 1, 1]
        return xp.broadcast_to(xp.asarray(value, dtype=f64).reshape(-1), u.shape)[:, None, None]

    lam = per_image(electron_wavelength(xp.asarray(voltage_kv, dtype=f64)))
    cs = per_image(spherical_aberration_mm) * 1e7
    a = per_image(amplitude_contrast)
    s2 = (2.0 * r / float(box_size)) ** 2  # [N], (1/Å)²

    mean = (u + v) / 2.0
    if anisotropic:
        if convention == "cryolike":
            half_astig, axis = xp.abs(u - v) / 2.0, angle
        else:
            half_astig, axis = (u - v) / 2.0, np.pi / 2.0 - angle
        defocus = mean[:, None] + half_astig[:, None] * xp.cos(2.0 * (th[None, :] - axis[:, None]))
        defocus = defocus[:, None, :]  # [M, 1, W]
    else:
        defocus = mean[:, None, None]  # [M, 1, 1]
    gamma = -np.pi * lam * s2[None, :, None] * defocus - phase[:, None, None]
    if not cs_corrected:
        gamma = gamma + (np.pi / 2.0) * cs * lam**3 * (s2**2)[None, :, None]
    return -xp.sqrt(1.0 - a * a) * xp.sin(gamma) + a * xp.cos(gamma)


def ctf_from_lens(
    lens: Any,
    radii: Any,
    theta: Any,
    box_size: float,
    *,
    xp: ModuleType = np,
    anisotropic: bool = True,
    convention: str | None = None,
) -> Any:
    """:func:`ctf_polar` for a :class:`~cryolike_dask.params.LensParameters`.

    The convention defaults to the lens parameters' own ``astigmatism_convention``; ``xp``
    chooses where the result lives. Returns float64 ``[M, N, W]``.
    """
    return ctf_polar(
        xp.asarray(lens.defocus_u),
        xp.asarray(lens.defocus_v),
        xp.asarray(lens.defocus_angle),
        xp.asarray(lens.phase_shift),
        voltage_kv=lens.voltage,
        spherical_aberration_mm=lens.spherical_aberration,
        amplitude_contrast=lens.amplitude_contrast,
        radii=radii,
        theta=theta,
        box_size=box_size,
        anisotropic=anisotropic,
        convention=convention or lens.astigmatism_convention,
    )
