"""Searches limited around each image's prior pose (RELION/cryoSPARC poses in ``particles.zarr``).

The run spec carries a :class:`PosePriorSpec`; the image block's prior poses are turned
into the template frame once per block (:func:`block_prior`, with the per-image normaliser
of the prior and the poses evaluated), and each kernel task takes the prior's factors for its
templates (:func:`kernel_factors`). The math is :mod:`cryolike_dask.kernels.pose_prior`'s.

Modes:

* ``window``: poses whose viewing direction lies within ``half_width`` of the prior's and
  whose in-plane angle (carried onto the prior's direction) within ``half_width`` of the
  prior's, residual displacements within ``shift_radius`` (all when ``None``); the template
  nearest the prior's direction, and its rotation nearest the prior's, always take part (as
  if at the window's edge), so a window narrower than the grids still searches something;
* ``gaussian``: RELION-style Gaussian log weights (``sigma`` on the direction and the
  in-plane angle, ``shift_sigma`` on the displacement), cut at 3σ;
* ``fixed``: the grid pose nearest the prior only (nearest template direction, nearest
  rotation, the zero residual displacement: use it with ``use_origin``).

Images without prior angles are searched globally (a uniform prior); the prior is normalised
per image, so the integrated likelihood stays a marginal comparable across structures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.kernels import pose_prior as pp

PoseMode = Literal["window", "gaussian", "fixed"]
POSE_MODES: tuple[str, ...] = ("window", "gaussian", "fixed")
#: Gaussian priors are cut at this many standard deviations (as RELION's local searches).
SIGMA_CUT = 3.0


@dataclass(frozen=True)
class PosePriorSpec:
    """How a run uses the images' prior poses (angles rad, lengths Å).

    Attributes
    ----------
    mode : {"window", "gaussian", "fixed"}
    half_width : float
        Window half-width (``window``), rad.
    shift_radius : float or None
        Largest residual displacement searched (``window``), Å.
    sigma : float
        Standard deviation on the direction and the in-plane angle (``gaussian``), rad.
    shift_sigma : float or None
        Standard deviation on the residual displacement (``gaussian``), Å.
    use_origin : bool
        Centre each image on its prior origin (a phase ramp) before the search.
    frame : {"map", "model"}
        The structures' frame: templates made from MRC maps or from atomic models.
    """

    mode: PoseMode = "window"
    half_width: float = math.pi
    shift_radius: float | None = None
    sigma: float = math.pi
    shift_sigma: float | None = None
    use_origin: bool = False
    frame: Literal["map", "model"] = "map"

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def kept_displacements(self, grid: DisplacementGrid) -> np.ndarray:
        """bool ``[D]``: the displacements of ``grid`` this prior searches."""
        r = np.hypot(grid.x.astype(np.float64), grid.y.astype(np.float64))
        if self.mode == "fixed":
            return r == r.min()
        limit = self.shift_radius if self.mode == "window" else None
        if self.mode == "gaussian" and self.shift_sigma is not None:
            limit = SIGMA_CUT * self.shift_sigma
        if limit is None:
            return np.ones(r.shape, dtype=bool)
        return r <= limit * (1 + 1e-6) + 1e-9

    def restrict(self, grid: DisplacementGrid) -> DisplacementGrid:
        """The displacement grid this prior searches (a subset of ``grid``)."""
        keep = self.kept_displacements(grid)
        if keep.all():
            return grid
        return DisplacementGrid(grid.x[keep], grid.y[keep])


@dataclass(frozen=True)
class BlockPrior:
    """An image block's prior in the template frame (host arrays, one row per image).

    Attributes
    ----------
    rotations : float64 ``[m, 3, 3]``
        Prior pose in the template frame (identity where unknown).
    known : bool ``[m]``
        Whether the image has a prior direction (else it is searched globally).
    psi_known : bool ``[m]``
        Whether it has a prior in-plane angle too (else every rotation is searched).
    offset : float64 ``[m, 2]``
        Prior image-frame offset of the particle, Å (zero where unknown or not used).
    direction, phase : float64 ``[m, S]``
        Angle between the prior's and each template's direction; in-plane phase
        (:func:`~cryolike_dask.kernels.pose_prior.relative_pose`).
    log_normaliser : float64 ``[m]``
        ``κ``: subtracted from the integrated log-likelihood.
    n_poses : int64 ``[m]``
        Poses evaluated per image.
    """

    rotations: np.ndarray
    known: np.ndarray
    psi_known: np.ndarray
    offset: np.ndarray
    direction: np.ndarray
    phase: np.ndarray
    log_normaliser: np.ndarray
    n_poses: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, k).nbytes for k in self.__dataclass_fields__))


def _factors(
    spec: PosePriorSpec,
    direction: np.ndarray,
    phase: np.ndarray,
    known: np.ndarray,
    psi_known: np.ndarray,
    theta: np.ndarray,
    displacements: np.ndarray,
) -> pp.PriorFactors:
    """The prior's factors for templates ``[S]`` (rows without prior angles: all zero; rows
    without a prior in-plane angle: every rotation, unweighted)."""
    if spec.mode == "gaussian":
        f = pp.gaussian_prior(direction, phase, theta, displacements, spec.sigma, spec.shift_sigma)
    elif spec.mode == "window":
        f = pp.window_prior(
            direction, phase, theta, displacements, spec.half_width, spec.shift_radius
        )
    else:
        f = _fixed(direction, phase, theta, displacements)
    lt, lr = f.log_template, f.log_rotation
    # a window narrower than the rotation step still holds the nearest rotation (at its edge)
    empty = np.isfinite(lt) & ~np.isfinite(lr).any(axis=2)
    if empty.any():
        lr = lr.copy()
        m_i, s_i = np.nonzero(empty)
        diff = np.abs(pp.wrap_angle(phase[m_i, s_i][:, None] + theta[None, :]))
        edge = 0.0 if spec.mode != "gaussian" else -0.5 * SIGMA_CUT**2
        lr[m_i, s_i, np.argmin(diff, axis=1)] = edge
        f = pp.PriorFactors(lt, lr, f.log_displacement, f.displacement_kept)
    if psi_known.all():
        return f
    lt, lr = f.log_template.copy(), f.log_rotation.copy()
    lt[~known] = 0.0
    lr[~psi_known] = 0.0
    return pp.PriorFactors(lt, lr, f.log_displacement, f.displacement_kept)


def _fixed(direction, phase, theta, displacements) -> pp.PriorFactors:
    """Only the nearest grid pose: the template of finite ``direction`` (the nearest, see
    :func:`block_prior`), its nearest rotation, the zero displacement."""
    lt = np.where(np.isfinite(direction), 0.0, -np.inf)
    diff = pp.wrap_angle(phase[:, :, None] + theta[None, None, :])
    w_best = np.argmin(np.abs(diff), axis=2)  # [m, S]
    lr = np.full(diff.shape, -np.inf)
    np.put_along_axis(lr, w_best[:, :, None], 0.0, axis=2)
    n_d = displacements.shape[1]
    return pp.PriorFactors(lt, lr, np.zeros(n_d), np.ones(n_d, dtype=bool))


def block_prior(
    spec: PosePriorSpec,
    poses: Any,
    azimuth: np.ndarray,
    polar: np.ndarray,
    log_weights: np.ndarray,
    theta: np.ndarray,
    displacements: np.ndarray,
) -> BlockPrior:
    """The block's prior in the template frame, with its normaliser and pose counts.

    ``poses``: the block's :class:`~cryolike_dask.io.poses.PriorPoses` (RELION convention);
    ``azimuth``/``polar`` ``[S]`` rad and ``log_weights`` ``[S]`` (normalised viewing weights)
    of the structure's templates; ``theta`` ``[W]`` rad; ``displacements`` ``[2, D]`` Å (the
    searched grid).
    """
    known = np.asarray(poses.has_angles, dtype=bool)
    psi_known = known & np.isfinite(poses.psi)
    n = known.size
    rot = np.where(known, poses.rot, 0.0)
    tilt = np.where(known, poses.tilt, 0.0)
    psi = np.where(psi_known, poses.psi, 0.0)
    q = pp.template_frame(pp.relion_matrices(rot, tilt, psi), spec.frame)
    direction, phase = pp.relative_pose(q, pp.template_rotations(azimuth, polar))
    nearest = np.argmin(direction, axis=1)
    rows = np.arange(n)
    if spec.mode == "fixed":  # only the nearest template keeps a (finite) direction
        keep = np.zeros(direction.shape, dtype=bool)
        keep[rows, nearest] = True
        direction = np.where(keep, direction, np.inf)
    else:  # a window narrower than the template grid still holds the nearest template
        limit = (spec.half_width if spec.mode == "window" else SIGMA_CUT * spec.sigma) * (1 - 1e-9)
        far = direction[rows, nearest] > limit
        direction[rows[far], nearest[far]] = limit
    offset = np.zeros((n, 2))
    if spec.use_origin:
        has = np.asarray(poses.has_origin, dtype=bool)
        ox = np.where(has, poses.origin_x, 0.0)
        oy = np.where(has, poses.origin_y, 0.0)
        offset = pp.image_offset(ox, oy)
    f = _factors(spec, direction, phase, known, psi_known, theta, displacements)
    kappa = pp.log_normaliser(f, log_weights)
    return BlockPrior(q, known, psi_known, offset, direction, phase, kappa, f.n_poses)


#: Slack of :func:`block_pairs`' direction test (rad): a pair the kernel might compute is
#: never left out for a rounding difference; a pair kept in excess returns at once.
PAIR_SLACK = 1e-6


def block_pairs(
    spec: PosePriorSpec,
    poses: Any,
    azimuth: np.ndarray,
    polar: np.ndarray,
    template_ranges: Sequence[tuple[int, int]],
    image_ranges: Sequence[tuple[int, int]],
) -> np.ndarray:
    """bool ``[n_template_blocks, n_image_blocks]``: the (template block, image block) pairs
    that hold a template some image's prior lets it take (the graph builds only these).

    ``poses``: the :class:`~cryolike_dask.io.poses.PriorPoses` of the images that
    ``image_ranges`` index (``(start, stop)`` relative to ``poses``); ``azimuth``/``polar``
    ``[S]`` rad. A direction test only (``[m, 3] @ [3, S]``), no rotation or displacement
    factor: a template is allowed within the window (or the 3σ cut), the one nearest the
    prior always (as in :func:`block_prior`), every template for an image without a prior
    direction; with :data:`PAIR_SLACK` to spare.
    """
    known = np.asarray(poses.has_angles, dtype=bool)
    rot = np.where(known, poses.rot, 0.0)
    tilt = np.where(known, poses.tilt, 0.0)
    psi = np.where(known & np.isfinite(poses.psi), poses.psi, 0.0)
    q = pp.template_frame(pp.relion_matrices(rot, tilt, psi), spec.frame)
    if spec.mode == "fixed":
        limit = -math.inf
    else:
        limit = spec.half_width if spec.mode == "window" else SIGMA_CUT * spec.sigma
    allowed = pp.allowed_directions(q, pp.template_rotations(azimuth, polar), limit, PAIR_SLACK)
    allowed[~known] = True
    return pp.block_pairs(allowed, template_ranges, image_ranges)


def kernel_factors(
    spec: PosePriorSpec,
    prior: BlockPrior,
    t0: int,
    t1: int,
    theta: np.ndarray,
    displacements: np.ndarray,
) -> pp.PriorFactors:
    """The prior's factors for templates ``[t0, t1)`` of the block (the kernel's
    ``pose_prior``)."""
    return _factors(
        spec,
        prior.direction[:, t0:t1],
        prior.phase[:, t0:t1],
        prior.known,
        prior.psi_known,
        theta,
        displacements,
    )


def on_edge(
    spec: PosePriorSpec, prior: BlockPrior, template: np.ndarray, gamma: np.ndarray, n_w: int
) -> np.ndarray:
    """bool ``[m]``: the best pose lies on the window's edge (its direction within half the
    templates' typical spacing ``sqrt(4π/S)`` of the window, or of the 3σ cut, or its
    in-plane angle within one rotation step ``2π/W``): the optimum may lie outside the
    searched window."""
    if spec.mode == "fixed":
        return np.zeros(prior.known.shape, dtype=bool)
    limit = spec.half_width if spec.mode == "window" else SIGMA_CUT * spec.sigma
    rows = np.arange(prior.known.size)
    inplane = pp.wrap_angle(prior.phase[rows, template] + gamma)
    edge = pp.on_edge(
        prior.direction[rows, template],
        np.where(prior.psi_known, inplane, 0.0),  # no prior in-plane angle: no in-plane edge
        limit,
        math.sqrt(4 * math.pi / prior.direction.shape[1]),
        2 * math.pi / n_w,
    )
    return edge & prior.known


def outside_window(
    spec: PosePriorSpec, azimuth: np.ndarray, polar: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """bool: template ``a``'s direction lies outside the prior's window around template
    ``b``'s (by more than half the templates' typical spacing); ``azimuth``/``polar`` ``[S]``
    rad."""
    u = pp.template_rotations(azimuth, polar)[:, :, 2]
    angle = np.arccos(np.clip(np.sum(u[a] * u[b], axis=1), -1.0, 1.0))
    limit = spec.half_width if spec.mode == "window" else SIGMA_CUT * spec.sigma
    return angle > limit + 0.5 * math.sqrt(4 * math.pi / u.shape[0])


def total_displacement(
    prior: BlockPrior, dx: np.ndarray, dy: np.ndarray, gamma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Prior + residual displacement in the template frame, Å (``Rot(γ)·offset + d``)."""
    d = pp.template_displacement(prior.offset, gamma)
    return dx + d[:, 0], dy + d[:, 1]


__all__ = [
    "POSE_MODES",
    "SIGMA_CUT",
    "BlockPrior",
    "PosePriorSpec",
    "block_pairs",
    "block_prior",
    "kernel_factors",
    "on_edge",
    "outside_window",
    "total_displacement",
]
