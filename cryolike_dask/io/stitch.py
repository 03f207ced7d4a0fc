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
import shutil
from pathlib import Path

import numpy as np
import zarr

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.io import outputs
from cryolike_dask.io.torch_files import load_tensor, save_tensor

#: stitch's matrices, from the output table: ``{matrix name: quantity}``.
MATRICES = {q.matrix: q for q in outputs.matrices()}
#: which keyword of :func:`stitch` selects each matrix
_SELECTOR = {
    "log_likelihood_integrated_fourier": "integrated",
    "log_likelihood_optimal_fourier": "optimal",
    "cross_correlation": "cross_correlation",
}


class StitchError(CryoLikeDaskError):
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


def _results_store(root: Path):
    from cryolike_dask.io.zarr_stores import ResultsStore, StoreError

    path = root / "results.zarr"
    if not path.exists():
        return None
    try:
        return ResultsStore.open(path, mode="r")
    except StoreError as exc:
        raise StitchError(f"{path}: not a readable results store ({exc})") from None


def _check_against_store(store, n: int, q, files: list[Path], parts: list[np.ndarray]) -> None:
    """The per-stack files of structure ``n`` must hold what ``results.zarr`` holds."""
    stacks = store.group.attrs.get("stacks", [])
    if n >= len(store.structures):
        raise StitchError(
            f"{store.path.parent / f'template{n}'}: no such structure in {store.path} "
            f"({len(store.structures)} structures); the folder mixes outputs of several runs"
        )
    if len(stacks) != len(files):
        raise StitchError(
            f"{files[0].parent}: {len(files)} stack files of {q.stem} but {store.path} "
            f"holds {len(stacks)} stacks; the folder mixes outputs of several runs "
            "(rerun the likelihood with --overwrite, or --skip-exist to complete it)"
        )
    for f, part, info in zip(files, parts, stacks, strict=True):
        want = store.read(q, n, int(info["start"]), int(info["stop"]))
        if part.shape != want.shape or not np.allclose(part, want, rtol=0, atol=0, equal_nan=True):
            raise StitchError(
                f"{f}: differs from {store.path} (structure {n}, {q.name}); the folder mixes "
                "outputs of several runs (rerun the likelihood with --overwrite, or "
                "--skip-exist to complete it)"
            )


def stitch(
    root: str | os.PathLike,
    *,
    integrated: bool = True,
    optimal: bool = True,
    cross_correlation: bool = True,
    output: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Build the requested matrices from ``root``; returns ``{name: .pt path}``.

    Matrices are ``[n_structures, n_images]`` (template-major, as CryoLike's
    ``stitch_log_likelihood_matrices``), written to ``output`` (default
    ``root/likelihood_matrix``) as ``NAME.pt`` (torch tensor), ``NAME.npy`` and
    ``matrices.zarr/NAME`` (dims ``("structure", "image")``, structure names as a coordinate).
    Every template folder must hold the same stacks with the same image counts. When ``root``
    holds a ``results.zarr`` (our runs), every stack file must equal it: a folder mixing
    outputs of different runs is refused. Nothing is written unless every matrix can be built.
    """
    root = Path(root)
    folders = template_folders(root) if root.is_dir() else []
    if not folders:
        raise StitchError(f"{root}: no template<N> folders")
    store = _results_store(root)
    wanted = {"integrated": integrated, "optimal": optimal, "cross_correlation": cross_correlation}
    names = [f"template{n}" for n, _ in folders]
    if store is not None:
        names = [
            store.structures[n] if n < len(store.structures) else f"template{n}" for n, _ in folders
        ]
    built: dict[str, np.ndarray] = {}
    for name, q in MATRICES.items():
        if not wanted.get(_SELECTOR.get(q.name, ""), True):
            continue
        rows, counts = [], None
        for n, folder in folders:
            files = _stacks(folder, q.folder, q.stem)
            if not files:
                raise StitchError(
                    f"{folder / q.folder}: no {q.stem}_stack_*.pt files (needed for {name})"
                )
            parts = [load_tensor(f).ravel() for f in files]
            if store is not None:
                _check_against_store(store, n, q, files, parts)
            these = [p.size for p in parts]
            if counts is not None and these != counts:
                raise StitchError(
                    f"template{n}: stacks hold {these} images, template{folders[0][0]}: {counts}"
                )
            counts = these
            rows.append(np.concatenate(parts))
        built[name] = np.stack(rows)
    out = Path(output) if output is not None else root / "likelihood_matrix"
    out.mkdir(parents=True, exist_ok=True)
    # everything is written under temporary names, then renamed: a failure leaves the
    # earlier matrices as they were
    tmp = f".tmp-{os.getpid()}"
    zpath = out / f".matrices.zarr{tmp}"
    group = zarr.open_group(zpath, mode="w")
    group.attrs["structures"] = names
    coord = group.create_array(
        "structure", shape=(len(names),), dtype=str, dimension_names=("structure",)
    )
    coord[:] = np.array(names, dtype=str)
    staged = []
    for name, matrix in built.items():
        pt, npy = out / f".{name}.pt{tmp}", out / f".{name}.npy{tmp}"
        save_tensor(matrix, pt)
        with open(npy, "wb") as f:
            np.save(f, matrix)
        staged += [(pt, out / f"{name}.pt"), (npy, out / f"{name}.npy")]
        arr = group.create_array(
            name, shape=matrix.shape, dtype=matrix.dtype, dimension_names=("structure", "image")
        )
        arr[:] = matrix
    from cryolike_dask.io.zarr_stores import consolidate

    consolidate(zpath)
    if (out / "matrices.zarr").exists():
        shutil.rmtree(out / "matrices.zarr")
    os.replace(zpath, out / "matrices.zarr")
    written = {}
    for src, dst in staged:
        os.replace(src, dst)
        if dst.suffix == ".pt":
            written[dst.stem] = dst
    return written
