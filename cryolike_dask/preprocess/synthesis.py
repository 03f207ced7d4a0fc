"""Synthetic particles at known poses, with CTF and noise, as real-space images.

Used by the round-trip tests and the demo. Two ways to choose poses:

* :func:`synthesize_particles` (grid poses): a template of a stack, a displacement and an
  in-plane rotation of the search grids. The forward model is the likelihood's own
  (``model_at_pose``: shift, then in-plane rotation, then CTF).
* :func:`synthesize_particles_at_poses` (continuous poses, as real particles): the atomic
  model projected along any viewing direction, any in-plane rotation and any shift
  (:class:`Poses`, e.g. :meth:`Poses.random`). The same forward model, evaluated off the grids:
  ``model(r, θ) = CTF(r, θ) · T(r, θ+γ) · exp(−2πi (2/box) r (cos(θ+γ) dx + sin(θ+γ) dy))``
  (spec §9), with ``T(·, θ+γ)`` the template of viewing angles ``(α, β, γ)`` (spec §5.1).

Either is taken to real space with the type-1 NUFFT of spec §3.2, plus white Gaussian noise at
a given SNR per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.kernels.ctf import ctf_from_lens
from cryolike_dask.kernels.likelihood import model_at_pose
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.preprocess.nufft import polar_to_images
from cryolike_dask.preprocess.templates import (
    normalize_templates,
    slice_directions,
    templates_from_atoms,
)


@dataclass(frozen=True)
class SyntheticParticles:
    """Images ``[m, nx, ny]`` float32 and the truth they were made from.

    Grid poses: ``template_index`` into the template stack. Continuous poses:
    ``template_index`` is None and ``azimuth``, ``polar`` give the viewing direction (rad).
    """

    images: np.ndarray
    template_index: np.ndarray | None
    displacement_x: np.ndarray
    displacement_y: np.ndarray
    rotation: np.ndarray
    lens: LensParameters
    noise_sigma: np.ndarray
    azimuth: np.ndarray | None = None
    polar: np.ndarray | None = None


def _f32(a: np.ndarray) -> np.ndarray:
    """float64 values that float32 holds exactly (ViewingAngles store float32 angles)."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


@dataclass(frozen=True)
class Poses:
    """Continuous poses of ``M`` particles, arrays ``[M]`` float64.

    ``azimuth`` α and ``polar`` β (rad) give the viewing direction
    ``(cos α sin β, sin α sin β, cos β)``; ``rotation`` γ (rad) is the in-plane rotation and
    ``(displacement_x, displacement_y)`` (Å) the shift in the template frame, as the
    likelihood's poses (spec §9): the particle is the projection of viewing angles
    ``(α, β, γ)`` (orientation ``Rz(α) Ry(β) Rz(γ)``), centred at ``Rot(−γ) d`` in the image.
    Angles are rounded to float32 (what :class:`ViewingAngles` holds), so that the recorded
    truth is exactly what was projected.
    """

    azimuth: np.ndarray
    polar: np.ndarray
    rotation: np.ndarray
    displacement_x: np.ndarray
    displacement_y: np.ndarray

    def __post_init__(self) -> None:
        for name in ("azimuth", "polar", "rotation"):
            object.__setattr__(self, name, _f32(np.atleast_1d(getattr(self, name))))
        for name in ("displacement_x", "displacement_y"):
            value = np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64))
            object.__setattr__(self, name, value)
        sizes = {getattr(self, f).size for f in self.__dataclass_fields__}
        if len(sizes) != 1:
            raise ValueError(f"poses: all arrays must have the same length, got {sorted(sizes)}")

    @property
    def n_poses(self) -> int:
        return int(self.azimuth.size)

    @classmethod
    def random(
        cls,
        n: int,
        max_displacement: float,
        rng: np.random.Generator,
        *,
        region: str = "square",
    ) -> Poses:
        """``n`` poses: directions uniform on the sphere, rotations uniform in ``[0, 2π)``,
        shifts uniform in the square ``|dx|, |dy| ≤ max_displacement`` Å (the search grid's
        range) or, with ``region="disk"``, in the disk of that radius."""
        azimuth = rng.uniform(0.0, 2.0 * np.pi, n)
        polar = np.arccos(rng.uniform(-1.0, 1.0, n))
        rotation = rng.uniform(0.0, 2.0 * np.pi, n)
        if region == "square":
            dx, dy = rng.uniform(-max_displacement, max_displacement, (2, n))
        elif region == "disk":
            radius = max_displacement * np.sqrt(rng.uniform(0.0, 1.0, n))
            phi = rng.uniform(0.0, 2.0 * np.pi, n)
            dx, dy = radius * np.cos(phi), radius * np.sin(phi)
        else:
            raise ValueError(f"region must be 'square' or 'disk', not {region!r}")
        # float32 rounding can give exactly 2π; keep rotations in [0, 2π)
        rotation = np.where(_f32(rotation) >= 2.0 * np.pi, 0.0, rotation)
        return cls(azimuth, polar, rotation, dx, dy)

    def viewing_angles(self) -> ViewingAngles:
        """The viewing angles ``(α, β, γ)`` of each particle's template."""
        return ViewingAngles.uniform_weights(self.azimuth, self.polar, self.rotation)


def _gaussian_atom_templates(
    coordinates: np.ndarray,
    radii: np.ndarray,
    angles: ViewingAngles,
    params: ImageParameters,
    dc_offset: bool = True,
    tol: float = 1e-8,
    max_voxels: int = 200,
    chunk: int = 2048,
) -> np.ndarray | None:
    """``templates_from_atoms(..., "gaussian")`` by quadrature on a real-space grid, complex128.

    The Gaussian atoms' density is sampled on a grid of spacing ``h`` and its Fourier transform
    at the slice points is one type-2 NUFFT of the samples. The grid covers every atom to
    ``sqrt(2 ln 1/tol)`` standard deviations, and ``h`` is fine enough that the aliases of the
    transform (the quadrature's only error, at ``ν + 1/h``) are below ``tol``: so it agrees with
    the direct sum to ~``tol``, in ``O(A n³ + S N W)`` work instead of ``O(groups · S N W)``.
    Returns None when the grid would exceed ``max_voxels`` per axis (tiny atoms). Without
    ``dc_offset``, the projection itself (no box term, see :func:`atom_templates`).
    """
    import finufft

    grid = params.polar_grid
    box = max(params.box_size)
    x = np.asarray(coordinates, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    n_atoms = x.shape[0]
    log_a = -1.5 * np.log(2 * np.pi) - 3.0 * np.log(2.0 * r / box) - np.log(n_atoms)
    weights = np.exp(log_a)
    nu_max = 2.0 * float(np.max(grid.radii)) / box  # cycles / Å
    lt = np.log(1.0 / tol)
    h = 1.0 / (nu_max + np.sqrt(lt / (2 * np.pi**2)) / float(r.min()))
    reach = np.sqrt(2 * lt) * float(r.max())
    lo, hi = x.min(axis=0) - reach, x.max(axis=0) + reach
    n = int(np.ceil(float(np.max(hi - lo)) / h)) + 1
    n += n % 2
    if n > max_voxels:
        return None
    centre = (lo + hi) / 2
    k = np.arange(n) - n // 2
    # normalised 1-D Gaussians of standard deviation r_a (Å) along each axis, times h
    prof = [
        np.exp(-((centre[i] + k[None, :] * h - x[:, i : i + 1]) ** 2) / (2 * r[:, None] ** 2))
        * (h / np.sqrt(2 * np.pi * r[:, None] ** 2))
        for i in range(3)
    ]
    prof[0] *= weights[:, None]
    vol = np.zeros((n, n, n))
    step = 8
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        # atoms within reach of the slab (beyond it their Gaussian is below tol)
        xs = centre[0] + k[[i0, i1 - 1]] * h
        near = np.flatnonzero((x[:, 0] >= xs[0] - reach) & (x[:, 0] <= xs[1] + reach))
        if near.size == 0:
            continue
        g = (prof[0][near, i0:i1, None] * prof[1][near, None, :]).reshape(near.size, -1)
        vol[i0:i1] = (g.T @ prof[2][near]).reshape(i1 - i0, n, n)
    vol = vol.astype(np.complex128)
    t = np.empty((angles.n_angles, grid.n_shells, grid.n_inplanes), dtype=np.complex128)
    for s0 in range(0, angles.n_angles, chunk):  # bounded temporaries
        part = angles.subset(slice(s0, s0 + chunk))
        nu = (2.0 / box) * grid.radii[None, :, None, None] * slice_directions(part, grid)[:, None]
        pts = [np.ascontiguousarray((2 * np.pi * h * nu[..., i]).ravel()) for i in range(3)]
        f = finufft.nufft3d2(*pts, vol, isign=-1, eps=max(tol, 1e-14))
        f *= np.exp(-2j * np.pi * (nu.reshape(-1, 3) @ centre))
        t[s0 : s0 + part.n_angles] = f.reshape(part.n_angles, grid.n_shells, grid.n_inplanes)
    return t - _box_term(coordinates, radii, params) if dc_offset else t


def _box_term(coordinates: np.ndarray, radii: np.ndarray, params: ImageParameters) -> np.ndarray:
    """The DC-offset term of Gaussian atom templates, ``sinc(2x) sinc(2y) Σ_a e^ℓ_a`` (spec
    §5.3), ``[1, N, W]``: what ``templates_from_atoms`` subtracts (a mean over the box)."""
    grid = params.polar_grid
    rho = 2.0 * np.asarray(radii, dtype=np.float64) / max(params.box_size)
    n_atoms = np.asarray(coordinates).shape[0]
    log_a = -1.5 * np.log(2 * np.pi) - 3.0 * np.log(rho) - np.log(n_atoms)
    box = np.sinc(2.0 * grid.x_points) * np.sinc(2.0 * grid.y_points)
    return box[None] * np.exp(log_a).sum()


def atom_templates(
    coordinates: np.ndarray,
    radii: np.ndarray,
    angles: ViewingAngles,
    params: ImageParameters,
    atom_shape: str | None = None,
    method: str = "auto",
    *,
    dc_offset: bool = True,
) -> np.ndarray:
    """Normalised templates (complex128 ``[S, N, W]``) of atoms at any ``angles``, as
    ``make-templates`` makes them (its atom shape, normalisation), in double precision.

    ``method="atoms"``: :func:`templates_from_atoms`; ``"quadrature"`` (Gaussian atoms only):
    the same numbers (to ~1e-8) several times faster for many directions; ``"auto"``: the
    quadrature where it applies. ``dc_offset=False`` leaves out the Gaussian templates' box
    term (spec §5.3: minus the projection's mean over the box, in the frame of the template,
    so that it turns with the template's γ): the projection itself, as a particle is before
    ``convert-particles`` removes its mean in the image's own frame.
    """
    shape = atom_shape or params.atom_shape
    shape = "hard-sphere" if shape == "default" else shape
    if method not in ("auto", "atoms", "quadrature"):
        raise ValueError(f"method must be 'auto', 'atoms' or 'quadrature', not {method!r}")
    t = None
    if method != "atoms" and shape == "gaussian":
        t = _gaussian_atom_templates(coordinates, radii, angles, params, dc_offset)
    if t is None:
        if method == "quadrature":
            raise ValueError("the quadrature needs Gaussian atoms of moderate size")
        t = templates_from_atoms(
            coordinates,
            radii,
            angles,
            params.polar_grid,
            max(params.box_size),
            shape,
            "double",
        )
        if shape == "gaussian" and not dc_offset:
            t = t + _box_term(coordinates, radii, params)
    return normalize_templates(t.astype(np.complex128), params.polar_grid)


def _add_noise(
    model: np.ndarray, params: ImageParameters, snr: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Real-space float32 images of polar ``model`` plus noise, and the noise sigma."""
    clean = polar_to_images(model, params.polar_grid, params.n_pixels)
    if snr is None:
        return clean.astype(np.float32), np.zeros(clean.shape[0])
    sigma = np.sqrt(np.mean(clean**2, axis=(1, 2)) / snr)
    noisy = clean + rng.normal(size=clean.shape) * sigma[:, None, None]
    return noisy.astype(np.float32), sigma


def synthesize_particles(
    templates: np.ndarray,
    params: ImageParameters,
    template_index: np.ndarray,
    displacement_x: np.ndarray,
    displacement_y: np.ndarray,
    rotation: np.ndarray,
    lens: LensParameters,
    snr: float | None,
    rng: np.random.Generator,
) -> SyntheticParticles:
    """Particles from ``templates[template_index]`` shifted by ``(dx, dy)`` Å, rotated by
    ``rotation`` rad (rounded to the grid's step), with each image's CTF (its lens
    parameters and convention), plus noise of variance ``mean(clean²) / snr`` (none if
    ``snr`` is None). Grid poses; see :func:`synthesize_particles_at_poses` for any pose.
    """
    grid = params.polar_grid
    ctf = ctf_from_lens(lens, grid.radii, grid.theta, params.box_size[0])
    idx = np.asarray(template_index)
    model = model_at_pose(
        np.asarray(templates)[idx].astype(np.complex128),
        ctf,
        displacement_x,
        displacement_y,
        rotation,
        grid,
        params.box_size,
    )
    images, sigma = _add_noise(model, params, snr, rng)
    return SyntheticParticles(
        images,
        idx,
        np.asarray(displacement_x),
        np.asarray(displacement_y),
        np.asarray(rotation),
        lens,
        sigma,
    )


def model_at_continuous_pose(
    templates: np.ndarray,
    ctf: np.ndarray,
    poses: Poses,
    params: ImageParameters,
) -> np.ndarray:
    """``CTF · T(θ+γ) · K_d(θ+γ)`` (spec §9) for ``templates`` ``[M, N, W]`` already made at
    the viewing angles ``(α, β, γ)`` of ``poses`` (so ``T(θ+γ)`` is the template itself): the
    translation kernel is evaluated at the rotated points ``r (cos(θ+γ), sin(θ+γ))``.
    Equals ``model_at_pose`` of the ``γ = 0`` templates when ``γ`` is on the grid."""
    grid = params.polar_grid
    bx, by = params.box_size
    angle = grid.theta[None, None, :] + poses.rotation[:, None, None]  # [M, 1, W]
    rr = grid.radii[None, :, None]
    phase = rr * np.cos(angle) * (2.0 * poses.displacement_x[:, None, None] / bx) + rr * np.sin(
        angle
    ) * (2.0 * poses.displacement_y[:, None, None] / by)
    return templates * np.exp(-2j * np.pi * phase) * ctf


def synthesize_particles_at_poses(
    coordinates: np.ndarray,
    radii: np.ndarray,
    params: ImageParameters,
    poses: Poses,
    lens: LensParameters,
    snr: float | None,
    rng: np.random.Generator,
    *,
    atom_shape: str | None = None,
    method: str = "auto",
) -> SyntheticParticles:
    """Particles of the atoms (``coordinates`` ``[A, 3]``, ``radii`` ``[A]`` Å, e.g. from
    :func:`~cryolike_dask.io.models.read_atoms`) at continuous ``poses``: each projected along
    its own direction (:func:`atom_templates` at its viewing angles, without the templates'
    box term: the mean is removed by ``convert-particles``, as for real particles), shifted
    and rotated by its own continuous amounts (:func:`model_at_continuous_pose`), with its
    CTF, plus noise of variance ``mean(clean²) / snr`` (none if ``snr`` is None)."""
    grid = params.polar_grid
    templates = atom_templates(
        coordinates, radii, poses.viewing_angles(), params, atom_shape, method, dc_offset=False
    )
    ctf = ctf_from_lens(lens, grid.radii, grid.theta, params.box_size[0])
    model = model_at_continuous_pose(templates, ctf, poses, params)
    images, sigma = _add_noise(model, params, snr, rng)
    return SyntheticParticles(
        images,
        None,
        poses.displacement_x,
        poses.displacement_y,
        poses.rotation,
        lens,
        sigma,
        poses.azimuth,
        poses.polar,
    )
