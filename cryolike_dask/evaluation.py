"""Compare recovered poses with known ones (synthetic data, the demo)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolike_dask.grids.sphere import ViewingAngles


@dataclass(frozen=True)
class Truth:
    """Known poses of synthetic particles (``truth.npz``): arrays ``[M]``.

    ``structure`` is the index (in the template list) of the structure they came from.
    """

    structure: int
    template_index: np.ndarray
    displacement_x: np.ndarray
    displacement_y: np.ndarray
    rotation: np.ndarray

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        np.savez(
            p,
            structure=self.structure,
            template_index=self.template_index,
            displacement_x=self.displacement_x,
            displacement_y=self.displacement_y,
            rotation=self.rotation,
        )
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Truth:
        with np.load(path) as d:
            return cls(
                int(d["structure"]),
                d["template_index"],
                d["displacement_x"],
                d["displacement_y"],
                d["rotation"],
            )


@dataclass(frozen=True)
class PoseErrors:
    """Per-image errors of recovered poses: viewing direction and in-plane rotation in
    degrees, displacement in Å; and the grid steps they are measured against."""

    direction_deg: np.ndarray
    rotation_deg: np.ndarray
    shift_angstrom: np.ndarray
    direction_step_deg: float
    rotation_step_deg: float
    shift_step_angstrom: float

    @property
    def within_one_step(self) -> np.ndarray:
        """Whether each pose is within one grid step in direction, rotation and shift."""
        eps = 1e-6
        return (
            (self.direction_deg <= self.direction_step_deg + eps)
            & (self.rotation_deg <= self.rotation_step_deg + eps)
            & (self.shift_angstrom <= self.shift_step_angstrom + eps)
        )


def direction_step_deg(angles: ViewingAngles) -> float:
    """Median angle between a viewing direction and its nearest neighbour, degrees."""
    d = angles.directions()
    cos = np.clip(d @ d.T, -1, 1)
    np.fill_diagonal(cos, -1)
    return float(np.degrees(np.median(np.arccos(cos.max(axis=1)))))


def pose_errors(
    angles: ViewingAngles,
    n_inplanes: int,
    displacements: np.ndarray,
    truth: Truth,
    template: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    rotation: np.ndarray,
) -> PoseErrors:
    """Errors of recovered poses (``template``, ``dx``, ``dy`` Å, ``rotation`` rad) against
    ``truth``; ``displacements`` is the searched ``[2, D]`` grid (Å)."""
    d = angles.directions()
    cos = np.clip(np.sum(d[template] * d[truth.template_index], axis=1), -1, 1)
    direction = np.degrees(np.arccos(cos))
    turn = np.abs(np.angle(np.exp(1j * (rotation - truth.rotation))))
    shift = np.hypot(dx - truth.displacement_x, dy - truth.displacement_y)
    xs = np.unique(np.asarray(displacements)[0])
    step = float(np.min(np.diff(xs))) if xs.size > 1 else 0.0
    return PoseErrors(
        direction, np.degrees(turn), shift, direction_step_deg(angles), 360.0 / n_inplanes, step
    )
