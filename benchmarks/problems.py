"""Benchmark problems: random data with the symmetry of real images, at two sizes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolike_dask.grids import DisplacementGrid, PolarGrid


@dataclass(frozen=True)
class Problem:
    """Sizes of one benchmark problem (N shells, W angles, D displacements, S, M)."""

    name: str
    n_pixels: int
    n_templates: int
    n_images: int
    n_displacements_side: int  # D = side² (odd: no extra zero)

    @property
    def grid(self) -> PolarGrid:
        return PolarGrid.from_image_size(self.n_pixels)

    @property
    def displacements(self) -> DisplacementGrid:
        k = self.n_displacements_side
        return DisplacementGrid.from_search(2.0, k, k, 1.0)

    @property
    def box(self) -> float:
        return float(self.n_pixels)  # 1 Å pixels

    @property
    def pose_evaluations(self) -> float:
        return (
            float(self.n_images)
            * self.n_templates
            * self.displacements.n_displacements
            * (self.grid.n_inplanes)
        )

    def describe(self) -> str:
        g = self.grid
        return (
            f"{self.n_pixels} px: N={g.n_shells}, W={g.n_inplanes}, "
            f"D={self.displacements.n_displacements}, S={self.n_templates}, "
            f"M={self.n_images}"
        )


PROBLEMS = {
    "small": Problem("small", 64, 96, 256, 3),
    "realistic": Problem("realistic", 128, 256, 1024, 5),
}


def best_time(f, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``f`` (seconds) and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def hermitian(rng: np.random.Generator, count: int, n: int, w: int) -> np.ndarray:
    half = w // 2
    f = np.empty((count, n, w), np.complex64)
    f[..., :half] = rng.standard_normal((count, n, half), dtype=np.float32) + 1j * (
        rng.standard_normal((count, n, half), dtype=np.float32)
    )
    f[..., half:] = np.conj(f[..., :half])
    return f


def data(problem: Problem, cache: Path) -> dict[str, np.ndarray]:
    """Templates, images, CTFs and the translation kernel (memory-mapped from ``cache``)."""
    from cryolike_dask.kernels import ctf_polar, translation_kernel

    cache.mkdir(parents=True, exist_ok=True)
    names = ("templates", "images", "ctf", "kernel")
    paths = {k: cache / f"{problem.name}_{k}.npy" for k in names}
    if not all(p.exists() for p in paths.values()):
        rng = np.random.default_rng(0)
        g = problem.grid
        m = problem.n_images
        arrays = {
            "templates": hermitian(rng, problem.n_templates, g.n_shells, g.n_inplanes),
            "images": hermitian(rng, m, g.n_shells, g.n_inplanes),
            "ctf": ctf_polar(
                rng.uniform(8e3, 2e4, m),
                rng.uniform(8e3, 2e4, m),
                rng.uniform(0, 3, m),
                np.zeros(m),
                voltage_kv=300,
                spherical_aberration_mm=2.7,
                amplitude_contrast=0.1,
                radii=g.radii,
                theta=g.theta,
                box_size=problem.box,
            ).astype(np.float32),
            "kernel": translation_kernel(
                g.x_points,
                g.y_points,
                problem.displacements.x,
                problem.displacements.y,
                problem.box,
                np.complex64,
            ),
        }
        for k, v in arrays.items():
            np.save(paths[k], v)
    return {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
