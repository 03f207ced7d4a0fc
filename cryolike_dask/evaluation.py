"""Compare recovered poses with known ones (synthetic data, the demo).

Conventions (spec §5.1, §9). A pose (template ``s`` of viewing angles ``(α_s, β_s, γ_s)``,
in-plane rotation ``γ``, displacement ``d``) is the orientation
``R = Rz(α_s) Ry(β_s) Rz(γ_s + γ)``: the model image is the projection along ``R ẑ``,
rotated in the image plane by ``γ``, with its centre (the model's origin) at ``Rot(−γ) d``
in the image, ``Rot(−γ) = [[cos γ, sin γ], [−sin γ, cos γ]]``.

Errors of a recovered pose against the truth:

* viewing direction: the great-circle angle between the two projection directions ``R ẑ``;
* in-plane rotation: the angle about the true direction between the two in-plane frames,
  once the recovered frame is carried onto the true direction by the shortest rotation. For
  equal directions this is the circular difference of ``γ``; it stays meaningful near the
  poles, where the azimuth and ``γ`` trade off (``Rz(α) Rz(γ) = Rz(α + γ)`` at ``β = 0``);
* shift: the distance (Å) between the two image-frame centres ``Rot(−γ) d``.

Each is set against its grid step and against the *quantisation floor*: the error of the
nearest grid pose, which no search on these grids can beat (about half a step for continuous
truth, zero for truth on the grids). A search centred on each image's prior origin (offset
``p``, image frame) reaches the centres ``p + Rot(−γ) g`` of the residual grid points ``g``:
its shift floor is that of the shifted grid.

A structure with (near) point-group symmetry ``G`` (rotations ``g`` with ``ρ(g x) ≈ ρ(x)``)
looks the same in orientations ``R`` and ``g R``, so a search may land on any of them. With a
symmetry (:attr:`Truth.symmetry`, e.g. from :func:`chain_symmetry`), the errors are also given
up to it (:attr:`PoseErrors.modulo_symmetry`): against the equivalent true orientation
nearest the recovered one, with the floor of the equivalent orientation nearest the grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cryolike_dask.grids.sphere import ViewingAngles


@dataclass(frozen=True)
class Truth:
    """Known poses of synthetic particles (``truth.npz``): arrays ``[M]``.

    ``structure`` is the index (in the template list) of the structure they came from.
    Grid poses give ``template_index`` (directions of the template grid); continuous poses
    give ``azimuth`` and ``polar`` (rad) instead, and ``template_index`` is None.
    ``rotation`` (rad) and ``displacement_x``/``_y`` (Å, template frame) follow the search's
    convention (spec §9). ``symmetry``: optional ``[G, 3, 3]`` rotations (model frame) under
    which the structure is (nearly) unchanged, for errors up to symmetry. ``images``:
    which images of the stack these are, when only some came from ``structure`` (a mixture);
    None means all of them, in order.
    """

    structure: int
    template_index: np.ndarray | None
    displacement_x: np.ndarray
    displacement_y: np.ndarray
    rotation: np.ndarray
    azimuth: np.ndarray | None = None
    polar: np.ndarray | None = None
    symmetry: np.ndarray | None = None
    images: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.template_index is None and (self.azimuth is None or self.polar is None):
            raise ValueError("truth: give template_index (grid poses) or azimuth and polar")
        if self.symmetry is not None:
            g = np.asarray(self.symmetry, dtype=np.float64)
            if g.ndim != 3 or g.shape[1:] != (3, 3):
                raise ValueError(f"truth: symmetry must be [G, 3, 3] rotations, not {g.shape}")
            object.__setattr__(self, "symmetry", g)

    def with_symmetry(self, symmetry: np.ndarray | None) -> Truth:
        """The same truth with the structure's symmetry rotations ``[G, 3, 3]``."""
        return replace(self, symmetry=symmetry)

    @classmethod
    def continuous(
        cls,
        structure: int,
        azimuth: np.ndarray,
        polar: np.ndarray,
        rotation: np.ndarray,
        displacement_x: np.ndarray,
        displacement_y: np.ndarray,
        symmetry: np.ndarray | None = None,
    ) -> Truth:
        """Truth of particles at continuous poses (off the grids)."""
        f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        return cls(
            int(structure),
            None,
            f(displacement_x),
            f(displacement_y),
            f(rotation),
            f(azimuth),
            f(polar),
            symmetry,
        )

    @property
    def on_grid(self) -> bool:
        """Whether the viewing directions are those of the template grid."""
        return self.azimuth is None

    def orientations(self, angles: ViewingAngles) -> np.ndarray:
        """Orientation matrices ``[M, 3, 3]`` (``angles``: the template grid, for grid poses)."""
        if self.on_grid:
            t = np.asarray(self.template_index)
            return orientation_matrices(
                angles.azimus[t],
                angles.polars[t],
                angles.gammas[t].astype(np.float64) + self.rotation,
            )
        return orientation_matrices(self.azimuth, self.polar, self.rotation)

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        fields = {
            "structure": self.structure,
            "displacement_x": self.displacement_x,
            "displacement_y": self.displacement_y,
            "rotation": self.rotation,
        }
        for name in ("template_index", "azimuth", "polar", "symmetry", "images"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        np.savez(p, **fields)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Truth:
        with np.load(path) as d:
            get = lambda k: d[k] if k in d.files else None  # noqa: E731
            return cls(
                int(d["structure"]),
                get("template_index"),
                d["displacement_x"],
                d["displacement_y"],
                d["rotation"],
                get("azimuth"),
                get("polar"),
                get("symmetry"),
                get("images"),
            )


def orientation_matrices(azimuth, polar, gamma) -> np.ndarray:
    """``Rz(α) Ry(β) Rz(γ)`` (spec §5.1), float64 ``[M, 3, 3]``; its columns are the image
    axes x, y and the projection direction in the model frame."""
    a, b, g = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (azimuth, polar, gamma))
    a, b, g = np.broadcast_arrays(a, b, g)

    def rz(t):
        c, s, z, o = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
        return np.stack(
            [np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2
        )

    c, s, z, o = np.cos(b), np.sin(b), np.zeros_like(b), np.ones_like(b)
    ry = np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)
    return rz(a) @ ry @ rz(g)


def great_circle_deg(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle (degrees) between unit vectors ``u`` and ``v`` ``[..., 3]``, stable near 0°."""
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v), axis=-1), np.sum(u * v, axis=-1)))


def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Angles (rad) wrapped to ``[−π, π)``."""
    return np.mod(np.asarray(a, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi


def inplane_offset(true: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Signed in-plane angle φ (rad, ``[−π, π)``) of orientations ``other`` ``[M, 3, 3]``
    relative to ``true``: with ``Q`` the shortest rotation taking ``other``'s direction onto
    ``true``'s, ``trueᵀ Q other = Rz(φ)``. For equal directions ``φ = γ_other − γ_true``."""
    d1, d2 = true[..., 2], other[..., 2]
    x1, x2 = true[..., 0], other[..., 0]
    axis = np.cross(d2, d1)  # |axis| = sin of the angle between directions
    cos = np.sum(d1 * d2, axis=-1, keepdims=True)
    # Rodrigues without normalising: Q v = cos v + axis × v + axis (axis·v) / (1 + cos)
    safe = np.maximum(1.0 + cos, 1e-12)
    carried = cos * x2 + np.cross(axis, x2) + axis * np.sum(axis * x2, -1, keepdims=True) / safe
    # opposite directions: any half-turn about an axis normal to d2, here x2 (keeps x2)
    carried = np.where(1.0 + cos < 1e-9, x2, carried)
    sin_phi = np.sum(np.cross(x1, carried) * d1, axis=-1)
    return wrap_angle(np.arctan2(sin_phi, np.sum(x1 * carried, axis=-1)))


def image_centres(dx: np.ndarray, dy: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Where the model's origin sits in the image, ``Rot(−γ) d`` (Å), ``[..., 2]``."""
    c, s = np.cos(rotation), np.sin(rotation)
    return np.stack([c * dx + s * dy, -s * dx + c * dy], axis=-1)


@dataclass(frozen=True)
class ErrorStats:
    """Summary of one pose component's errors (same units as the errors)."""

    name: str
    unit: str
    median: float
    p90: float
    step: float
    floor_median: float
    floor_p90: float
    within_step: float  # share of images with error ≤ one grid step

    @property
    def half_step(self) -> float:
        return self.step / 2


@dataclass(frozen=True)
class PoseErrors:
    """Per-image errors of recovered poses: viewing direction and in-plane rotation in
    degrees, displacement in Å; the grid steps they are measured against; and the
    quantisation floor (the error of the nearest grid pose, per image). With a symmetry of
    ``n_symmetry`` rotations, ``modulo_symmetry`` holds the same up to it."""

    direction_deg: np.ndarray
    rotation_deg: np.ndarray
    shift_angstrom: np.ndarray
    direction_step_deg: float
    rotation_step_deg: float
    shift_step_angstrom: float
    direction_floor_deg: np.ndarray | None = None
    rotation_floor_deg: np.ndarray | None = None
    shift_floor_angstrom: np.ndarray | None = None

    modulo_symmetry: PoseErrors | None = None
    n_symmetry: int = 1

    _EPS = 1e-6

    @property
    def within_one_step(self) -> np.ndarray:
        """Whether each pose is within one grid step in direction, rotation and shift."""
        eps = self._EPS
        return (
            (self.direction_deg <= self.direction_step_deg + eps)
            & (self.rotation_deg <= self.rotation_step_deg + eps)
            & (self.shift_angstrom <= self.shift_step_angstrom + eps)
        )

    def components(self) -> list[tuple[str, str, np.ndarray, float, np.ndarray | None]]:
        """``(name, unit, errors, step, floor)`` of direction, rotation, shift."""
        return [
            (
                "viewing direction",
                "°",
                self.direction_deg,
                self.direction_step_deg,
                self.direction_floor_deg,
            ),
            (
                "in-plane rotation",
                "°",
                self.rotation_deg,
                self.rotation_step_deg,
                self.rotation_floor_deg,
            ),
            (
                "shift",
                "Å",
                self.shift_angstrom,
                self.shift_step_angstrom,
                self.shift_floor_angstrom,
            ),
        ]

    def stats(self) -> list[ErrorStats]:
        """Median and 90th percentile of each component, its step, floor and share ≤ 1 step."""
        out = []
        for name, unit, err, step, floor in self.components():
            fl = np.zeros_like(err) if floor is None else floor
            out.append(
                ErrorStats(
                    name,
                    unit,
                    float(np.median(err)),
                    float(np.percentile(err, 90)),
                    float(step),
                    float(np.median(fl)),
                    float(np.percentile(fl, 90)),
                    float(np.mean(err <= step + self._EPS)),
                )
            )
        return out


def direction_step_deg(angles: ViewingAngles) -> float:
    """Median angle between a viewing direction and its nearest neighbour, degrees."""
    d = angles.directions()
    cos = np.clip(d @ d.T, -1, 1)
    np.fill_diagonal(cos, -1)
    return float(np.degrees(np.median(np.arccos(cos.max(axis=1)))))


def _nearest_directions(d: np.ndarray, grid: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the grid direction nearest each of ``d`` ``[M, 3]``."""
    return np.concatenate(
        [np.argmax(d[i : i + chunk] @ grid.T, axis=1) for i in range(0, d.shape[0], chunk)]
    ).astype(np.int64)


def _floors(
    angles: ViewingAngles,
    n_inplanes: int,
    displacements: np.ndarray,
    true_r: np.ndarray,
    true_c: np.ndarray,
    offset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Errors (direction °, rotation °, shift Å) of the nearest grid pose to each truth: the
    nearest direction, then the nearest grid rotation in the carried frame, then the nearest
    grid displacement at that rotation (centred on ``offset`` ``[M, 2]`` Å, image frame, when
    given: the centres ``offset + Rot(−γ) g``)."""
    grid_dirs = angles.directions()
    s = _nearest_directions(true_r[:, :, 2], grid_dirs)
    step_rad = 2 * np.pi / n_inplanes
    base = orientation_matrices(angles.azimus[s], angles.polars[s], angles.gammas[s])
    phi0 = inplane_offset(true_r, base)  # offset at rotation 0; rotation γ adds γ
    w = np.mod(np.rint(-phi0 / step_rad), n_inplanes)
    rot_floor = np.abs(wrap_angle(phi0 + w * step_rad))
    disp = np.asarray(displacements, dtype=np.float64)
    grid_c = image_centres(disp[0][None, :], disp[1][None, :], (w * step_rad)[:, None])
    if offset is not None:
        grid_c = grid_c + np.asarray(offset, dtype=np.float64)[:, None, :]
    shift_floor = np.min(np.linalg.norm(grid_c - true_c[:, None, :], axis=-1), axis=1)
    return great_circle_deg(true_r[:, :, 2], grid_dirs[s]), np.degrees(rot_floor), shift_floor


def pose_errors(
    angles: ViewingAngles,
    n_inplanes: int,
    displacements: np.ndarray,
    truth: Truth,
    template: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    rotation: np.ndarray,
    symmetry: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> PoseErrors:
    """Errors of recovered poses (``template``, ``dx``, ``dy`` Å, ``rotation`` rad) against
    ``truth`` (grid or continuous poses); ``angles`` are the template grid's viewing angles,
    ``displacements`` the searched ``[2, D]`` grid (Å), ``n_inplanes`` the rotation count.
    ``symmetry`` (default: the truth's) adds the errors up to it. ``offset`` ``[M, 2]`` (Å,
    image frame, as :func:`image_centres`): the prior origin each image's search was centred
    on, ``displacements`` then being the residual grid around it (``dx``, ``dy`` stay the
    total displacements); it moves the shift floor's grid. See the module docstring for the
    definitions of the errors and of the floor."""
    t = np.asarray(template, dtype=np.int64)
    rot = np.asarray(rotation, dtype=np.float64)
    true_r = truth.orientations(angles)
    found = orientation_matrices(
        angles.azimus[t], angles.polars[t], angles.gammas[t].astype(np.float64) + rot
    )
    true_c = image_centres(truth.displacement_x, truth.displacement_y, truth.rotation)
    shift = np.linalg.norm(image_centres(dx, dy, rot) - true_c, axis=-1)
    xs = np.unique(np.asarray(displacements, dtype=np.float64)[0])
    steps = (
        direction_step_deg(angles),
        360.0 / n_inplanes,
        float(np.min(np.diff(xs))) if xs.size > 1 else 0.0,
    )

    def errors(true_r: np.ndarray, floors, **extra) -> PoseErrors:
        direction = great_circle_deg(true_r[:, :, 2], found[:, :, 2])
        turn = np.degrees(np.abs(inplane_offset(true_r, found)))
        return PoseErrors(direction, turn, shift, *steps, *floors, **extra)

    group = truth.symmetry if symmetry is None else np.asarray(symmetry, dtype=np.float64)
    modulo = None
    if group is not None and len(group) > 1:
        mates = np.einsum("gij,mjk->gmik", group, true_r)  # [G, M, 3, 3] equivalent truths
        # the equivalent truth nearest the recovered orientation (largest trace of Rᵀ R')
        near = np.argmax(np.einsum("gmji,mji->gm", mates, found), axis=0)
        per_mate = [_floors(angles, n_inplanes, displacements, r, true_c, offset) for r in mates]
        # the floor of the equivalent truth nearest the grid (by direction, then rotation)
        score = np.stack([f[0] + 1e-3 * f[1] for f in per_mate])  # [G, M]
        best = np.argmin(score, axis=0)
        m = np.arange(true_r.shape[0])
        floors = tuple(np.stack([f[k] for f in per_mate])[best, m] for k in range(3))
        modulo = errors(mates[near, m], floors, n_symmetry=len(group))
    return errors(
        true_r,
        _floors(angles, n_inplanes, displacements, true_r, true_c, offset),
        modulo_symmetry=modulo,
        n_symmetry=1 if group is None else len(group),
    )


def chain_symmetry(path: str | os.PathLike, max_rms: float = 1.0) -> np.ndarray:
    """The rotations ``[G, 3, 3]`` (model frame, about the centre of the model's CA atoms,
    which :func:`~cryolike_dask.io.models.read_atoms` puts at the origin) that map the first
    chain of the first model onto each chain within ``max_rms`` Å: the point group of a
    symmetric assembly (24 for apoferritin's 432 symmetry). Identity first. Fitted by the
    Kabsch method on the CA atoms of the residues the two chains share."""
    import gemmi

    model = gemmi.read_structure(str(path))[0]
    chains = []
    for chain in model:
        cas = {}
        for residue in chain:
            ca = residue.find_atom("CA", "*")
            if ca is not None:
                cas[residue.seqid.num] = (ca.pos.x, ca.pos.y, ca.pos.z)
        if cas:
            chains.append(cas)
    if not chains:
        raise ValueError(f"{path}: no CA atoms")
    centre = np.mean([p for c in chains for p in c.values()], axis=0)
    first, ops = chains[0], []
    for other in chains:
        keys = sorted(set(first) & set(other))
        if len(keys) < 3:
            continue
        a = np.array([first[k] for k in keys]) - centre
        b = np.array([other[k] for k in keys]) - centre
        u, _, vt = np.linalg.svd(b.T @ a)
        r = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt  # b ≈ r a
        if np.sqrt(np.mean(np.sum((a @ r.T - b) ** 2, axis=1))) <= max_rms:
            ops.append(r)
    return np.stack(ops)
