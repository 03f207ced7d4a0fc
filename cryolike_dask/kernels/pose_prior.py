"""Searches limited by prior poses (RELION / cryoSPARC refinements): the pure-NumPy math.

Conventions (spec §5.1, §9). A template ``s`` has viewing angles (azimuth ``α_s``, polar
``β_s``); at in-plane rotation index ``w`` (``γ_w = 2π w / W``) the model is the projection
along z of ``ρ(R·y)`` with ``R = Rz(α) Ry(β) Rz(γ_w)``, so an atom at ``r`` (structure frame)
appears at image position ``(Rᵀ r)[:2]`` = (axis 0, axis 1) = (array row, array column).

Structure frame: for templates made from an MRC map our axes (0, 1, 2) are the map array's
(MRC Z, Y, X); for templates made from an atomic model they are the model's (x, y, z).

RELION pose ``(rot, tilt, psi)`` (degrees): ``M = Rz(rot) Ry(tilt) Rz(psi)``; RELION puts the
3-D point ``r`` (X, Y, Z = MRC X, Y, Z = model x, y, z) at image ``(x, y) = (Mᵀ r)[:2]`` with
x = column, y = row. Our template-frame rotation of that pose is ``Q = Π M Σ`` with
``Σ = [[0,1,0],[1,0,0],[0,0,1]]`` (our (row, col) → RELION (x=col, y=row)) and ``Π`` the axis
reversal for a map, the identity for a model; for a model ``det(Q) = −1`` and the sign of
``Q``'s third column is flipped (a projection along z cannot see it), making ``Q`` proper.
Then ``(Qᵀ r')[:2] = (y, x)`` of RELION for the structure-frame coordinates ``r'`` of ``r``.

RELION's origin (Å): the particle's centre is at box centre − origin, so its offset from the
centre in our image frame is ``p = (−origin_y, −origin_x)``. Our displacement ``d`` lives in the
template frame (the model is ``Rot(−γ)[Shift(+d)[template]]``), so the displacement matching
``p`` at rotation ``γ`` is ``d = Rot(+γ) p`` (``Rot(φ)`` the 2-D rotation by ``φ`` from axis 0
towards axis 1).

A prior is a set of separable log weights over (template, rotation, displacement)
(:class:`PriorFactors`), ``−inf`` marking poses that are not evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_SIGMA = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
_PI_MAP = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
_GAUSSIAN_CUT = 3.0  # Gaussian factors are cut at this many standard deviations
_RADIUS_TOL = 1e-6  # relative tolerance of the shift-radius test


def _rz(t: np.ndarray) -> np.ndarray:
    c, s, z, o = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    return np.stack(
        [np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2
    )


def _ry(t: np.ndarray) -> np.ndarray:
    c, s, z, o = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    return np.stack(
        [np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2
    )


def _as_1d(v: np.ndarray | float | Sequence[float]) -> np.ndarray:
    return np.atleast_1d(np.asarray(v, dtype=np.float64)).ravel()


def wrap_angle(a: np.ndarray | float) -> np.ndarray:
    """Angles (rad) wrapped to ``(−π, π]``; float64, same shape."""
    return np.pi - np.mod(np.pi - np.asarray(a, dtype=np.float64), 2.0 * np.pi)


# ----------------------------------------------------------------------------------- frames
def relion_matrices(
    rot: np.ndarray | float, tilt: np.ndarray | float, psi: np.ndarray | float
) -> np.ndarray:
    """RELION's ``M = Rz(rot) Ry(tilt) Rz(psi)`` from angles in **degrees** ``[n]``.

    Returns float64 ``[n, 3, 3]`` (the angles broadcast to a common length ``n``); equals
    ``scipy.spatial.transform.Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True)``.
    """
    a, b, g = np.broadcast_arrays(*(np.radians(_as_1d(v)) for v in (rot, tilt, psi)))
    return _rz(a) @ _ry(b) @ _rz(g)


def template_frame(matrices: np.ndarray, structure: str = "map") -> np.ndarray:
    """Our template-frame rotation ``Q = Π M Σ`` of RELION matrices ``M`` ``[n, 3, 3]``.

    ``structure="map"``: ``Π`` reverses the axes (our axes are the map array's Z, Y, X);
    ``"model"``: ``Π = I`` and the third column is negated so that ``det Q = +1`` (the image,
    a projection along that column, is unchanged). Returns float64 ``[n, 3, 3]`` with
    ``(Qᵀ r')[:2] = (RELION y, RELION x) = (row, column)``.
    """
    m = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    if structure == "map":
        return _PI_MAP @ m @ _SIGMA
    if structure == "model":
        q = m @ _SIGMA
        flip = np.linalg.det(q) < 0
        q[flip, :, 2] *= -1.0
        return q
    raise ValueError(f"structure must be 'map' or 'model', not {structure!r}")


def template_rotations(azimuth: np.ndarray, polar: np.ndarray) -> np.ndarray:
    """``R_s = Rz(α_s) Ry(β_s)`` (radians ``[S]``) of the templates; float64 ``[S, 3, 3]``.

    Its third column is the projection direction ``(cos α sin β, sin α sin β, cos β)``.
    """
    a, b = np.broadcast_arrays(_as_1d(azimuth), _as_1d(polar))
    return _rz(a) @ _ry(b)


def image_offset(origin_x: np.ndarray | float, origin_y: np.ndarray | float) -> np.ndarray:
    """Particle offset from the box centre in our image frame, ``p = (−origin_y, −origin_x)``.

    ``origin_x``, ``origin_y``: RELION ``rlnOriginXAngst``/``rlnOriginYAngst`` (Å) ``[n]``.
    Returns float64 ``[n, 2]`` Å, (axis 0 = row, axis 1 = column).
    """
    ox, oy = np.broadcast_arrays(_as_1d(origin_x), _as_1d(origin_y))
    return np.stack([-oy, -ox], axis=-1)


def template_displacement(p: np.ndarray, gamma: np.ndarray | float) -> np.ndarray:
    """Template-frame displacement ``d = Rot(+γ) p`` matching image offset ``p`` at rotation ``γ``.

    ``p``: float ``[n, 2]`` Å; ``gamma``: ``[n]`` rad. Returns float64 ``[n, 2]`` Å, so that
    ``Rot(−γ) d = p``.
    """
    p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
    g = np.broadcast_to(_as_1d(gamma), (p.shape[0],))
    c, s = np.cos(g), np.sin(g)
    return np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], axis=-1)


def relative_pose(q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direction angle and in-plane phase of templates ``r`` relative to prior poses ``q``.

    ``q``: prior rotations ``[m, 3, 3]`` (:func:`template_frame`); ``r``: template rotations
    ``[S, 3, 3]`` (:func:`template_rotations`). Returns float64 ``(direction, phase)``, each
    ``[m, S]``, radians:

    * ``direction`` = angle between the projection directions ``q[:, :, 2]`` and ``r[:, :, 2]``
      (``[0, π]``);
    * ``phase`` = ``φ0`` in ``(−π, π]`` such that the in-plane difference of pose ``(s, w)``
      from the prior is ``ψ = wrap(φ0 + γ_w)``: with ``C`` the shortest rotation carrying
      ``R_s ẑ`` onto ``Q ẑ`` (a half-turn about ``R_s x̂`` for opposite directions),
      ``Qᵀ C R_s Rz(γ_w) = Rz(ψ)``. For a prior equal to grid pose ``(s, w0)``, ``φ0 = −γ_w0``.
    """
    q = np.asarray(q, dtype=np.float64).reshape(-1, 3, 3)
    r = np.asarray(r, dtype=np.float64).reshape(-1, 3, 3)
    qx, qy, qz = (q[:, None, :, k] for k in range(3))  # [m, 1, 3]
    rx, rz = r[None, :, :, 0], r[None, :, :, 2]  # [1, S, 3]
    axis = np.cross(rz, qz)  # |axis| = sin(direction)
    cos = np.sum(rz * qz, axis=-1, keepdims=True)
    direction = np.arctan2(np.linalg.norm(axis, axis=-1), cos[..., 0])
    # Rodrigues without normalising the axis: C v = cos v + k × v + k (k·v) / (1 + cos)
    safe = np.maximum(1.0 + cos, 1e-12)
    carried = cos * rx + np.cross(axis, rx) + axis * np.sum(axis * rx, -1, keepdims=True) / safe
    carried = np.where(1.0 + cos < 1e-9, rx, carried)  # antipodal: half-turn about R_s x̂
    phase = np.arctan2(np.sum(qy * carried, -1), np.sum(qx * carried, -1))
    return direction, wrap_angle(phase)


# ----------------------------------------------------------------------------------- priors
@dataclass(frozen=True)
class PriorFactors:
    """Separable log prior weights of a limited search (``−inf`` = not evaluated).

    Attributes
    ----------
    log_template : numpy.ndarray
        float64 ``[m, S]``: log weight ``a_ms`` of template ``s`` for image ``m``.
    log_rotation : numpy.ndarray
        float64 ``[m, S, W]``: log weight ``b_msw`` of in-plane rotation ``w``.
    log_displacement : numpy.ndarray
        float64 ``[D_kept]``: log weight ``c_d`` of each kept displacement.
    displacement_kept : numpy.ndarray
        bool ``[D_full]``: which points of the full displacement grid are searched.
    """

    log_template: np.ndarray
    log_rotation: np.ndarray
    log_displacement: np.ndarray
    displacement_kept: np.ndarray

    @property
    def n_kept(self) -> int:
        """Number of searched displacements ``D_kept``."""
        return int(np.count_nonzero(self.displacement_kept))

    @property
    def pairs(self) -> np.ndarray:
        """bool ``[m, S]``: (image, template) pairs with at least one evaluated pose."""
        rot_any = np.any(np.isfinite(self.log_rotation), axis=-1)
        return np.isfinite(self.log_template) & rot_any & (self.n_kept > 0)

    @property
    def n_poses(self) -> np.ndarray:
        """int64 ``[m]``: poses evaluated per image, ``Σ_s Σ_w [a_ms + b_msw finite] · D_kept``."""
        ok = np.isfinite(self.log_template)[:, :, None] & np.isfinite(self.log_rotation)
        return np.count_nonzero(ok, axis=(1, 2)).astype(np.int64) * self.n_kept


def _displacement_norm(displacements: np.ndarray) -> np.ndarray:
    d = np.asarray(displacements, dtype=np.float64).reshape(2, -1)
    return np.hypot(d[0], d[1])


def _inplane(phase: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``|wrap(φ0 + θ_w)|``: float64 ``[m, S, W]``."""
    ph = np.asarray(phase, dtype=np.float64)
    return np.abs(wrap_angle(ph[..., None] + np.asarray(theta, dtype=np.float64)))


def window_prior(
    direction: np.ndarray,
    phase: np.ndarray,
    theta: np.ndarray,
    displacements: np.ndarray,
    half_width_rad: float,
    shift_radius_angstrom: float | None = None,
) -> PriorFactors:
    """Flat window around the prior: log weights 0 on the support, ``−inf`` outside.

    ``direction``, ``phase``: ``[m, S]`` rad (:func:`relative_pose`); ``theta``: ``[W]`` rad
    (``PolarGrid.theta``); ``displacements``: ``[2, D]`` Å (template frame). Template ``s``
    is allowed iff ``direction ≤ half_width``; rotation ``w`` iff ``|wrap(φ0 + θ_w)| ≤
    half_width``; displacement ``d`` is kept iff ``|d| ≤ radius (1 + 1e-6)``, all when
    ``shift_radius_angstrom`` is None.
    """
    hw = float(half_width_rad)
    direction = np.asarray(direction, dtype=np.float64)
    a = np.where(direction <= hw, 0.0, -np.inf)
    b = np.where(_inplane(phase, theta) <= hw, 0.0, -np.inf)
    norm = _displacement_norm(displacements)
    if shift_radius_angstrom is None:
        kept = np.ones(norm.shape, dtype=bool)
    else:
        kept = norm <= float(shift_radius_angstrom) * (1.0 + _RADIUS_TOL)
    return PriorFactors(a, b, np.zeros(int(kept.sum())), kept)


def gaussian_prior(
    direction: np.ndarray,
    phase: np.ndarray,
    theta: np.ndarray,
    displacements: np.ndarray,
    sigma_rad: float,
    shift_sigma_angstrom: float | None = None,
) -> PriorFactors:
    """Gaussian prior around the pose, each factor cut at 3σ (beyond: ``−inf``).

    Arguments as :func:`window_prior`. Log weights ``−δ²/(2σ²)`` for the direction angle and
    for the in-plane difference ``wrap(φ0 + θ_w)`` (both rad, ``sigma_rad``), and
    ``−|d|²/(2σ_d²)`` for displacements (Å, ``shift_sigma_angstrom``; no shift factor and
    all displacements kept when None).
    """
    sig = float(sigma_rad)
    cut = _GAUSSIAN_CUT * sig
    direction = np.asarray(direction, dtype=np.float64)
    a = np.where(direction <= cut, -0.5 * (direction / sig) ** 2, -np.inf)
    dpsi = _inplane(phase, theta)
    b = np.where(dpsi <= cut, -0.5 * (dpsi / sig) ** 2, -np.inf)
    norm = _displacement_norm(displacements)
    if shift_sigma_angstrom is None:
        kept = np.ones(norm.shape, dtype=bool)
        c = np.zeros(norm.size)
    else:
        sd = float(shift_sigma_angstrom)
        kept = norm <= _GAUSSIAN_CUT * sd * (1.0 + _RADIUS_TOL)
        c = -0.5 * (norm[kept] / sd) ** 2
    return PriorFactors(a, b, c, kept)


def _log_mean_exp(x: np.ndarray, axis: int) -> np.ndarray:
    """``log(mean(exp(x)))`` along ``axis`` (``−inf`` where all are ``−inf``)."""
    n = x.shape[axis]
    if n == 0:
        return np.full(np.delete(x.shape, axis), -np.inf)
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - top), axis=axis) / n)
    return out + np.squeeze(top, axis=axis)


def log_normaliser(factors: PriorFactors, log_viewing_weights: np.ndarray) -> np.ndarray:
    """``κ_m = log Z_m − ln D_kept − ln W``, the normaliser of the prior; float64 ``[m]``.

    ``Z_m = Σ_s w_s e^{a_ms} Σ_w e^{b_msw} Σ_d e^{c_d}`` with ``w_s = exp(log_viewing_weights)``
    ``[S]``, normalised here to sum 1 over the ``S`` templates given (pass the whole
    structure's templates). The integrated likelihood of image ``m`` is then
    ``logsumexp_{s,d,w}(LL + ln w_s + a + b + c) − ln D_kept − ln W − κ_m``. ``κ_m`` is exactly
    0.0 when every factor is 0 and nothing is excluded (mean-based sums), ``−inf`` when
    every pose of image ``m`` is excluded.
    """
    lw = np.asarray(log_viewing_weights, dtype=np.float64).ravel()
    a = np.asarray(factors.log_template, dtype=np.float64)
    b = np.asarray(factors.log_rotation, dtype=np.float64)
    lw = lw - np.max(lw)
    w = np.exp(lw)[None, :]  # [1, S]
    per_template = a + _log_mean_exp(b, axis=-1)  # [m, S]
    top = np.max(per_template, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    num = np.sum(w * np.exp(per_template - top), axis=1)
    den = np.sum(w * np.ones((1, lw.size)), axis=1)  # same summation as num
    with np.errstate(divide="ignore"):
        ratio = np.log(num / den)
    c = np.asarray(factors.log_displacement, dtype=np.float64)
    lc = _log_mean_exp(c, axis=0) if c.size else -np.inf
    return ratio + top[:, 0] + lc


def on_edge(
    direction: np.ndarray,
    inplane_difference: np.ndarray,
    half_width_rad: float,
    template_spacing_rad: float,
    rotation_step_rad: float,
) -> np.ndarray:
    """Flag best poses at the boundary of a window (an allowed pose with no allowed neighbour
    beyond it, so the optimum may lie outside the search).

    ``direction``, ``inplane_difference``: the best pose's direction angle and in-plane
    difference ``wrap(φ0 + γ_w)`` (rad, any equal shape). A pose is on the edge when
    ``direction > half_width − template_spacing / 2`` (the nearest template farther out is
    excluded; ``template_spacing`` is the typical angle between neighbouring directions, so
    this is approximate) or ``|inplane_difference| > half_width − rotation_step`` (the next
    rotation outwards is excluded; exact for the rotation grid). Never true when
    ``half_width ≥ π`` (nothing is excluded). Returns bool, the broadcast shape.
    """
    hw = float(half_width_rad)
    d = np.asarray(direction, dtype=np.float64)
    p = np.abs(np.asarray(inplane_difference, dtype=np.float64))
    edge = (d > hw - 0.5 * float(template_spacing_rad)) | (p > hw - float(rotation_step_rad))
    if hw >= np.pi:
        edge = np.zeros_like(edge)
    return edge


def allowed_directions(
    q: np.ndarray, r: np.ndarray, limit_rad: float, slack_rad: float = 0.0
) -> np.ndarray:
    """bool ``[m, S]``: templates ``r`` (``[S, 3, 3]``) whose projection direction lies within
    ``limit_rad`` (+ ``slack_rad``) of the priors' ``q`` (``[m, 3, 3]``), the nearest one
    always (within ``slack_rad`` of the smallest angle). A direction test only: one
    ``[m, 3] @ [3, S]`` product, no in-plane phase (cheaper than :func:`relative_pose`)."""
    qz = np.asarray(q, dtype=np.float64).reshape(-1, 3, 3)[:, :, 2]
    rz = np.asarray(r, dtype=np.float64).reshape(-1, 3, 3)[:, :, 2]
    angle = np.arccos(np.clip(qz @ rz.T, -1.0, 1.0))
    nearest = np.min(angle, axis=1, keepdims=True)
    return (angle <= float(limit_rad) + slack_rad) | (angle <= nearest + slack_rad)


def block_pairs(
    allowed: np.ndarray | PriorFactors,
    template_ranges: Sequence[tuple[int, int]],
    image_ranges: Sequence[tuple[int, int]],
    half_width_rad: float | None = None,
) -> np.ndarray:
    """Which (template block, image block) pairs hold at least one allowed (image, template).

    ``allowed``: :class:`PriorFactors` (its :attr:`~PriorFactors.pairs`), a bool ``[m, S]``,
    or direction angles ``[m, S]`` rad together with ``half_width_rad`` (allowed iff
    ``direction ≤ half_width``). ``template_ranges``/``image_ranges``: ``(start, stop)`` index
    ranges of the blocks. Returns bool ``[n_template_blocks, n_image_blocks]``.
    """
    if isinstance(allowed, PriorFactors):
        ok = allowed.pairs
    else:
        arr = np.asarray(allowed)
        if arr.dtype == bool:
            ok = arr
        elif half_width_rad is None:
            raise ValueError("block_pairs: direction angles need half_width_rad")
        else:
            ok = arr.astype(np.float64) <= float(half_width_rad)
    out = np.zeros((len(template_ranges), len(image_ranges)), dtype=bool)
    for i, (t0, t1) in enumerate(template_ranges):
        cols = np.any(ok[:, t0:t1], axis=1)  # [m]
        for j, (m0, m1) in enumerate(image_ranges):
            out[i, j] = bool(np.any(cols[m0:m1]))
    return out
