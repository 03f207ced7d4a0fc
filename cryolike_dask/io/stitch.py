"""``stitch``: per-stack outputs → images × structures matrices (CryoLike's post-processing).

Reads the per-stack ``.pt`` files of ``OUT/templateN/`` (ours or CryoLike's own), concatenates
them in stack order for every template folder, and writes ``[n_structures, n_images]``
matrices, template-major as CryoLike's ``stitch_log_likelihood_matrices``, as ``.pt``, ``.npy``
and one Zarr group. CryoLike swaps its ``optimal``/``physical`` flags (spec §17.3); here each
matrix has its own flag.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import zarr

from cryolike_dask.io.cryolike import INTEGRATED_FILE, OPTIMAL_LL_FILE
from cryolike_dask.io.torch_files import load_tensor, save_tensor

MATRICES = {
    # name: (folder, file stem) of the per-stack inputs
    "integrated_fourier_log_likelihood_matrix": INTEGRATED_FILE,
    "optimal_fourier_log_likelihood_matrix": OPTIMAL_LL_FILE,
    "cross_correlation_matrix": ("cross_correlation", "cross_correlation"),
}


class StitchError(ValueError):
    """Per-stack outputs are missing or inconsistent across template folders."""


def template_folders(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(N, OUT/templateN)`` for every template folder, by N."""
    out = []
    for p in Path(root).iterdir():
        m = re.fullmatch(r"template(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _stacks(folder: Path, sub: str, stem: str) -> list[Path]:
    files = sorted((folder / sub).glob(f"{stem}_stack_*.pt"))
    numbers = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    if numbers != list(range(len(numbers))):
        raise StitchError(f"{folder / sub}: stack files are not numbered 0..{len(numbers) - 1}")
    return files


def stitch(
    root: str | os.PathLike,
    *,
    integrated: bool = True,
    optimal: bool = True,
    cross_correlation: bool = True,
    output: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Build the requested matrices from ``root``; returns ``{name: .pt path}``.

    Matrices are written to ``output`` (default ``root/likelihood_matrix``) as ``NAME.pt``
    (torch tensor), ``NAME.npy`` and ``matrices.zarr/NAME`` (``("structure", "image")``).
    Every template folder must hold the same stacks with the same image counts.
    """
    root = Path(root)
    folders = template_folders(root)
    if not folders:
        raise StitchError(f"{root}: no template<N> folders")
    wanted = {
        "integrated_fourier_log_likelihood_matrix": integrated,
        "optimal_fourier_log_likelihood_matrix": optimal,
        "cross_correlation_matrix": cross_correlation,
    }
    out = Path(output) if output is not None else root / "likelihood_matrix"
    out.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(out / "matrices.zarr", mode="w")
    group.attrs["structures"] = [f"template{n}" for n, _ in folders]
    written = {}
    for name, (sub, stem) in MATRICES.items():
        if not wanted[name]:
            continue
        rows, counts = [], None
        for n, folder in folders:
            files = _stacks(folder, sub, stem)
            if not files:
                raise StitchError(f"{folder / sub}: no {stem}_stack_*.pt files (needed for {name})")
            parts = [load_tensor(f).ravel() for f in files]
            these = [p.size for p in parts]
            if counts is not None and these != counts:
                raise StitchError(
                    f"template{n}: stacks hold {these} images, template{folders[0][0]}: {counts}"
                )
            counts = these
            rows.append(np.concatenate(parts))
        matrix = np.stack(rows)
        save_tensor(matrix, out / f"{name}.pt")
        np.save(out / f"{name}.npy", matrix)
        arr = group.create_array(
            name, shape=matrix.shape, dtype=matrix.dtype, dimension_names=("structure", "image")
        )
        arr[:] = matrix
        written[name] = out / f"{name}.pt"
    return written
