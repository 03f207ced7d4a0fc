"""Templates: projections of a structure along viewing directions, on the polar grid (spec §5).

For viewing angles (α, β, γ) and grid angle θ the slice direction is
``u(θ) = Rz(α) Ry(β) Rz(γ) (cos θ, sin θ, 0)`` (cosines of float32 angles, as CryoLike), and
the template is the 3-D Fourier transform of the density at ``r_n · u(θ_w)``.
"""

from __future__ import annotations

import numpy as np

from cryolike_dask.errors import ParameterError
from cryolike_dask.grids.polar import PolarGrid
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.precision import Precision
from cryolike_dask.preprocess.nufft import volume_at_points


def slice_directions(angles: ViewingAngles, grid: PolarGrid) -> np.ndarray:
    """Unit directions ``u`` of every (template, angle): float64 ``[S, W, 3]``.

    ``u = (cos α cos β cos θ' − sin α sin θ', sin α cos β cos θ' + cos α sin θ', −sin β cos θ')``
    with ``θ' = θ + γ``; cos/sin of α, β, γ are evaluated in float32 (CryoLike's tensors).
    """
    f32 = np.float32
    ca, sa = np.cos(angles.azimus.astype(f32)), np.sin(angles.azimus.astype(f32))
    cb, sb = np.cos(angles.polars.astype(f32)), np.sin(angles.polars.astype(f32))
    th = grid.theta[None, :] + angles.gammas.astype(np.float64)[:, None]
    ct, st = np.cos(th), np.sin(th)
    ca, sa, cb, sb = (v.astype(np.float64)[:, None] for v in (ca, sa, cb, sb))
    return np.stack([ca * cb * ct - sa * st, sa * cb * ct + ca * st, -sb * ct], axis=-1)


def slice_points(angles: ViewingAngles, grid: PolarGrid) -> np.ndarray:
    """Slice points ``r_n u(θ_w)`` in polar units: float64 ``[S, N, W, 3]``."""
    u = slice_directions(angles, grid)
    return grid.radii[None, :, None, None] * u[:, None, :, :]


def _offset_shape(grid: PolarGrid) -> np.ndarray:
    """``sinc(2 x_p) sinc(2 y_p)``: the FT of the box, used for DC-offset removal."""
    return np.sinc(2.0 * grid.x_points) * np.sinc(2.0 * grid.y_points)


def templates_from_atoms(
    coordinates: np.ndarray,
    radii: np.ndarray,
    angles: ViewingAngles,
    grid: PolarGrid,
    box_size: float,
    atom_shape: str = "gaussian",
    precision: str | Precision = "single",
    work_bytes: int = 128 * 2**20,
    method: str = "auto",
) -> np.ndarray:
    """Templates of atoms at ``coordinates`` (Å, ``[A, 3]``) with ``radii`` (Å, ``[A]``).

    ``atom_shape="gaussian"``: each atom a normalised 3-D Gaussian of standard deviation
    ``ρ_a = 2 r_a / box`` (polar units), minus the DC offset ``sinc(2x)sinc(2y) Σ e^{ℓ_a}``;
    ``"hard-sphere"``: uniform balls of radius ``ρ_a``, no DC offset (as CryoLike). Not
    normalised; complex ``[S, N, W]`` of the precision's dtype. ``box_size`` in Å.

    ``method="direct"`` sums ``S·N·W·A`` exponentials (CryoLike's way), chunked so temporaries
    stay within ``work_bytes``. ``"nufft"`` groups atoms of equal radius: within a group the
    sum over atoms is one type-3 NUFFT (finufft ``nufft3d3``) at all slice points, and the
    radial factor multiplies it - the same numbers, in ``O((A + S·N·W) log)`` work.
    ``"auto"`` (default) picks the NUFFT for large problems.
    """
    prec = Precision.parse(precision).resolve()
    x = np.asarray(coordinates, dtype=np.float64)
    rho = 2.0 * np.asarray(radii, dtype=np.float64) / box_size  # [A]
    n_atoms = x.shape[0]
    r = grid.radii
    if atom_shape == "gaussian":
        log_a = -1.5 * np.log(2 * np.pi) - 3.0 * np.log(rho) - np.log(n_atoms)
        radial = np.exp(-2.0 * np.pi**2 * rho[None, :] ** 2 * r[:, None] ** 2 + log_a)  # [N, A]
    elif atom_shape in ("hard-sphere", "default"):
        kappa = 2.0 * np.pi * r[:, None] * rho[None, :]
        radial = (
            (np.sin(kappa) - kappa * np.cos(kappa))
            * r[:, None] ** -3
            * 3.0
            / (8.0 * np.pi**2 * n_atoms)
        )
    else:
        raise ParameterError(f"atom_shape must be 'gaussian' or 'hard-sphere', not {atom_shape!r}")
    u = slice_directions(angles, grid)  # [S, W, 3]
    n_s, n_n, n_w = angles.n_angles, grid.n_shells, grid.n_inplanes
    if method == "auto":
        method = "nufft" if n_atoms * n_s * n_n * n_w > 2e7 else "direct"
    if method == "nufft":
        t = _atom_sums_nufft(x, rho, radial, u, grid, box_size, prec, work_bytes)
        if atom_shape == "gaussian":
            t -= _offset_shape(grid)[None] * np.exp(log_a).sum()
        return t.astype(prec.complex_dtype)
    if method != "direct":
        raise ParameterError(f"method must be 'auto', 'direct' or 'nufft', not {method!r}")
    t = np.zeros((n_s, n_n, n_w), dtype=np.complex128)
    # Σ_a radial[n, a] exp(i φ[s, n, w, a]) in chunks of atoms and templates (bounded memory)
    per_atom = max(1, n_n * n_w * 16 * 3)
    atoms_step = max(1, min(n_atoms, work_bytes // per_atom))
    s_step = max(1, work_bytes // (per_atom * atoms_step))
    k = -2.0 * np.pi * (2.0 / box_size) * r  # [N]
    for a0 in range(0, n_atoms, atoms_step):
        a1 = min(n_atoms, a0 + atoms_step)
        proj = np.einsum("swk,ak->swa", u, x[a0:a1])  # u · X  (Å)
        for s0 in range(0, n_s, s_step):
            s1 = min(n_s, s0 + s_step)
            phase = k[None, :, None, None] * proj[s0:s1, None]  # [s, N, W, a]
            t[s0:s1] += np.einsum("na,snwa->snw", radial[:, a0:a1], np.exp(1j * phase))
    if atom_shape == "gaussian":
        t -= _offset_shape(grid)[None] * np.exp(log_a).sum()
    return t.astype(prec.complex_dtype)


def _atom_sums_nufft(
    x: np.ndarray,
    rho: np.ndarray,
    radial: np.ndarray,
    u: np.ndarray,
    grid: PolarGrid,
    box_size: float,
    prec: Precision,
    work_bytes: int,
) -> np.ndarray:
    """``Σ_a radial[n, a] exp(−2πi (2/box) r_n u·X_a)`` by one type-3 NUFFT per atom radius."""
    import finufft

    from cryolike_dask.preprocess.nufft import tolerance

    n_s, n_w = u.shape[0], u.shape[1]
    n_n = grid.n_shells
    out = np.zeros((n_s, n_n, n_w), dtype=np.complex128)
    k = 2.0 * np.pi * (2.0 / box_size) * grid.radii  # [N]
    groups = np.unique(rho, return_inverse=True)[1]
    step = max(1, int(work_bytes // (n_n * n_w * 8 * 8)))
    for s0 in range(0, n_s, step):
        s1 = min(n_s, s0 + step)
        targets = k[None, :, None, None] * u[s0:s1, None, :, :]  # [s, N, W, 3]
        tx, ty, tz = (np.ascontiguousarray(targets[..., i].ravel()) for i in range(3))
        for g in range(groups.max() + 1):
            members = np.flatnonzero(groups == g)
            src = x[members]
            weights = np.ones(members.size, dtype=np.complex128)
            sums = finufft.nufft3d3(
                src[:, 0].copy(),
                src[:, 1].copy(),
                src[:, 2].copy(),
                weights,
                tx,
                ty,
                tz,
                isign=-1,
                eps=tolerance(prec, 1e-12),
            )
            out[s0:s1] += radial[None, :, members[0], None] * sums.reshape(s1 - s0, n_n, n_w)
    return out


def templates_from_volume(
    volume: np.ndarray,
    angles: ViewingAngles,
    grid: PolarGrid,
    scale: tuple[float, float, float] | None = None,
    precision: str | Precision = "single",
) -> np.ndarray:
    """Templates of a density map ``[a, b, c]`` (axes = x, y, z), not normalised.

    ``T = V(r u) − sinc(2x)sinc(2y) V(0)`` (the projection's mean over the box removed, spec
    §5.2). ``scale[ax] = voxel_ax / image_box`` places the map physically; the default ``1/n``
    assumes the map spans the image box exactly (CryoLike's assumption).
    """
    prec = Precision.parse(precision).resolve()
    vol = np.asarray(volume)
    s = np.asarray(scale if scale is not None else [1.0 / n for n in vol.shape], dtype=np.float64)
    pts = slice_points(angles, grid).reshape(-1, 3)
    values = volume_at_points(vol, np.vstack([pts, np.zeros((1, 3))]), s, prec)
    dc = values[-1]
    t = values[:-1].reshape(angles.n_angles, *grid.shape)
    t = t - _offset_shape(grid)[None] * dc
    return t.astype(prec.complex_dtype)


def normalize_templates(templates: np.ndarray, grid: PolarGrid) -> np.ndarray:
    """Each template divided by ``sqrt(Σ ωI |T|²)`` (unit norm under ωI)."""
    w = grid.integration_weights
    norms = np.sqrt(np.sum(np.abs(templates.astype(np.complex128)) ** 2 * w, axis=(1, 2)))
    if np.any(~(norms > 0)):
        raise ParameterError(f"template {int(np.flatnonzero(~(norms > 0))[0])} has zero norm")
    return (templates / norms[:, None, None]).astype(templates.dtype)
