"""The inputs and outputs of ``cryolike-dask reweight``.

Inputs (:func:`read_source`), always returned as a float64 ``[n_images, n_structures]``
log-likelihood matrix (nats; images-by-structures, whatever the source's orientation):

* a likelihood output folder (``OUT`` of ``cryolike-dask likelihood``: its ``results.zarr``,
  else ``likelihood_matrix/matrices.zarr``; a demo or ``run`` folder holding ``likelihood/``
  also works), a ``results.zarr``, or a ``matrices.zarr`` of ``cryolike-dask stitch``
  (``[structure, image]``, structure names as a coordinate); several folders are joined
  along structures when they hold the same images with the same parameters and grids;
* a ``.npy``, ``.pt``, ``.txt`` (whitespace) or ``.csv`` matrix, with an explicit layout
  (``images-by-structures`` or ``structures-by-images``) unless the file says it: stitch's
  own ``.npy``/``.pt`` next to its ``matrices.zarr`` are ``[structure, image]``, and a CSV
  header whose first cell is ``image``/``image_name`` (rows are images) or
  ``structure``/``structure_name`` (rows are structures) names the other axis.

Outputs: see :func:`check_output_folder` and the ``write_*`` functions; the layout of every
file is described in ``docs/reweight.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError, OutputExistsError

logger = logging.getLogger(__name__)

LAYOUTS = ("images-by-structures", "structures-by-images")
KINDS = ("loglik", "negloglik")
#: ``--matrix`` choice → the per-image quantity of ``results.zarr``
QUANTITIES = {
    "integrated": "log_likelihood_integrated_fourier",
    "optimal": "log_likelihood_optimal_fourier",
}
#: ``--matrix`` choice → stitch's matrix name (``.npy``/``.pt`` stem, ``matrices.zarr`` array)
MATRIX_NAMES = {
    "integrated": "integrated_fourier_log_likelihood_matrix",
    "optimal": "optimal_fourier_log_likelihood_matrix",
}
FILE_SUFFIXES = (".npy", ".pt", ".txt", ".csv")
_IMAGE_HEADERS = {"image", "image_name", "image_id", "images"}
_STRUCTURE_HEADERS = {"structure", "structure_name", "structures"}
_LABEL_HEADERS = _IMAGE_HEADERS | _STRUCTURE_HEADERS | {""}

#: What ``reweight`` writes into its output folder (files and folders).
OUTPUT_NAMES = (
    "weights.csv",
    "intervals.csv",
    "summary.json",
    "posterior_samples.npz",
    "responsibilities.zarr",
    "reweighting_factor.txt",
    "reweighted_prob.txt",
    "star",
    "plots",
)


class ReweightError(CryoLikeDaskError):
    """An input of ``reweight`` cannot be used (unreadable, ambiguous, non-finite, or
    structures that cannot be compared)."""


# ------------------------------------------------------------------------------ containers
@dataclass(frozen=True)
class ImageTable:
    """Identifiers of the images (rows of the matrix).

    Attributes
    ----------
    image_name : numpy.ndarray of str
        ``NNNNNN@FILE`` where the particle file is known, else ``STACK:ROW`` or ``image N``.
    stack, stack_row, source_row : numpy.ndarray of int64
        Stack in the run, row in the stack, row in the source STAR/.cs file (-1: unknown).
    star_file : numpy.ndarray of str or None
        The STAR file each particle came from ('' where not a STAR file), when known.
    """

    image_name: np.ndarray
    stack: np.ndarray
    stack_row: np.ndarray
    source_row: np.ndarray
    star_file: np.ndarray | None = None

    @classmethod
    def numbered(cls, n: int) -> ImageTable:
        idx = np.arange(n, dtype=np.int64)
        return cls(
            np.array([f"image {i}" for i in range(n)], dtype=str),
            np.zeros(n, np.int64),
            idx,
            np.full(n, -1, np.int64),
        )

    @property
    def n_images(self) -> int:
        return int(self.image_name.size)


@dataclass(frozen=True)
class LikelihoodInput:
    """A log-likelihood matrix with what identifies its rows and columns.

    Attributes
    ----------
    loglik : numpy.ndarray
        float64 ``[n_images, n_structures]``, log-likelihoods in nats.
    structures : list of str
        Column names, in input order.
    images : ImageTable
        Row identifiers.
    sources : list of Path
        What was read.
    description : str
        The quantity read (e.g. ``results.zarr:log_likelihood_integrated_fourier``).
    checksums : dict
        ``{"matrix_sha256": ..., "files": {path: sha256}, "stores": {path: store_id}}``.
    fingerprint : dict or None
        The run's image parameters, displacements and precision (likelihood folders).
    """

    loglik: np.ndarray
    structures: list[str]
    images: ImageTable
    sources: list[Path]
    description: str
    checksums: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None


# ------------------------------------------------------------------------------ helpers
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def matrix_sha256(loglik: np.ndarray) -> str:
    """Hex SHA-256 of a matrix as float64, C order (what the weights were computed from)."""
    return hashlib.sha256(np.ascontiguousarray(loglik, dtype=np.float64).tobytes()).hexdigest()


def _orient(a: np.ndarray, layout: str, path: str) -> np.ndarray:
    if a.ndim != 2:
        raise ReweightError(
            f"{path}: holds a {a.ndim}-D array of shape {a.shape}; expected a matrix"
        )
    if a.size == 0:
        raise ReweightError(f"{path}: the matrix is empty ({a.shape})")
    out = a if layout == "images-by-structures" else a.T
    if out.shape[1] > out.shape[0]:
        logger.warning(
            "%s: %d structures but only %d images with layout %s; check the layout",
            path,
            out.shape[1],
            out.shape[0],
            layout,
        )
    return out


def _to_float(a: Any, path: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ReweightError(f"{path}: holds {arr.dtype} values; expected real numbers")
    return arr.astype(np.float64)


def check_finite(
    loglik: np.ndarray, structures: Sequence[str], images: ImageTable, what: str
) -> None:
    """Refuse NaN and ±inf, naming the first offending image and structure."""
    bad = ~np.isfinite(loglik)
    if not bad.any():
        return
    i, k = (int(v[0]) for v in np.nonzero(bad))
    value = loglik[i, k]
    note = " (not computed)" if np.isnan(value) and "results.zarr" in what else ""
    raise ReweightError(
        f"{what}: {int(bad.sum())} non-finite value(s) (NaN/Inf); the first is {value}{note} "
        f"for image {i} ({images.image_name[i]}) and structure {k} ({structures[k]}); "
        "expected finite log-likelihoods"
    )


# ------------------------------------------------------------------------------ plain files
def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None, list[str] | None, str | None]:
    """``(values, header names, first-column names, layout)`` of a CSV matrix."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    if not rows:
        raise ReweightError(f"{path}: no rows")

    def numeric(cells: Sequence[str]) -> bool:
        try:
            [float(c) for c in cells]
        except ValueError:
            return False
        return True

    header = None
    first = ""
    if not numeric(rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
        first = header[0].lower()
    if not rows:
        raise ReweightError(f"{path}: a header and no data rows")
    labels = None
    if not numeric([r[0] for r in rows]) or (header and first in _LABEL_HEADERS):
        labels = [r[0].strip() for r in rows]
        rows = [r[1:] for r in rows]
        if header:
            header = header[1:]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ReweightError(f"{path}: rows have different numbers of values ({sorted(widths)})")
    try:
        values = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise ReweightError(f"{path}: a value is not a number ({exc})") from None
    if header is not None and len(header) != values.shape[1]:
        raise ReweightError(
            f"{path}: the header names {len(header)} columns, the rows hold {values.shape[1]}"
        )
    layout = None
    if header is not None and labels is not None:
        if first in _IMAGE_HEADERS:
            layout = "images-by-structures"
        elif first in _STRUCTURE_HEADERS:
            layout = "structures-by-images"
    return values, header, labels, layout


def _stitch_names(path: Path) -> list[str] | None:
    """Structure names of stitch's matrix file ``path`` (None if it is not one)."""
    if path.stem not in MATRIX_NAMES.values():
        return None
    zpath = path.parent / "matrices.zarr"
    if not zpath.is_dir():
        return None
    import zarr

    try:
        g = zarr.open_group(zpath, mode="r")
        return [str(s) for s in g.attrs.get("structures", [])] or None
    except Exception:
        return None


def read_matrix_file(
    path: str | os.PathLike, layout: str | None = None, kind: str = "loglik"
) -> tuple[np.ndarray, list[str] | None, list[str] | None]:
    """A ``.npy``/``.pt``/``.txt``/``.csv`` matrix as float64 images-by-structures
    log-likelihoods; returns ``(loglik, structure names or None, image names or None)``."""
    p = Path(path)
    if not p.is_file():
        raise ReweightError(f"{p}: file not found")
    if layout is not None and layout not in LAYOUTS:
        raise ReweightError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if kind not in KINDS:
        raise ReweightError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    suffix = p.suffix.lower()
    header = labels = None
    stated = None
    if suffix == ".npy":
        try:
            raw = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise ReweightError(f"{p}: not a readable .npy array ({exc})") from None
    elif suffix == ".pt":
        from cryolike_dask.io.torch_files import load_tensor

        raw = load_tensor(p, "log-likelihood matrix")
    elif suffix == ".txt":
        try:
            raw = np.loadtxt(p, dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise ReweightError(f"{p}: not a whitespace-separated numeric matrix ({exc})") from None
    elif suffix == ".csv":
        raw, header, labels, stated = _read_csv(p)
    else:
        raise ReweightError(
            f"{p}: unknown matrix file type {suffix!r}; expected {', '.join(FILE_SUFFIXES)}, a "
            "likelihood output folder or a matrices.zarr"
        )
    values = _to_float(raw, str(p))
    stitch = _stitch_names(p) if suffix in (".npy", ".pt") else None
    if stitch is not None or (suffix in (".npy", ".pt") and p.stem in MATRIX_NAMES.values()):
        if p.parent.joinpath("matrices.zarr").is_dir():
            stated = "structures-by-images"
    if layout is None:
        layout = stated
    elif stated is not None and stated != layout:
        raise ReweightError(
            f"{p}: the file is {stated} ({'its header' if suffix == '.csv' else 'stitch output'}),"
            f" which --layout {layout} contradicts"
        )
    if layout is None:
        shape = "×".join(str(s) for s in values.shape)
        raise ReweightError(
            f"{p}: a {shape} matrix with nothing saying which axis holds the images; give "
            "--layout images-by-structures (rows are images) or --layout structures-by-images "
            "(rows are structures)"
        )
    ll = _orient(values, layout, str(p))
    if kind == "negloglik":
        ll = -ll
    structures = image_names = None
    if layout == "images-by-structures":
        structures, image_names = header, labels
    else:
        structures, image_names = labels, header
    if stitch is not None and structures is None and len(stitch) == ll.shape[1]:
        structures = stitch
    return ll, structures, image_names


# ------------------------------------------------------------------------------ folders
def _results_store(path: Path):
    from cryolike_dask.io.zarr_stores import ResultsStore

    return ResultsStore.open(path, mode="r")


def _is_results_store(path: Path) -> bool:
    z = path / "zarr.json"
    if not z.is_file():
        return False
    try:
        meta = json.loads(z.read_text())
    except (OSError, ValueError):
        return False
    header = meta.get("attributes", {}).get("cryolike_dask", {})
    return isinstance(header, dict) and header.get("kind") == "results"


def _star_of_images(store, n: int) -> np.ndarray | None:
    """The source metadata file of every image of a results store, from its stacks' ``.npz``
    (None when any is unknown)."""
    from cryolike_dask.params.npz import read_npz

    files = np.full(n, "", dtype=object)
    stacks = store.group.attrs.get("stacks", [])
    if not stacks:
        return None
    for info in stacks:
        src = info.get("source") or ""
        if not src:
            return None
        npz = Path(src).with_suffix(".npz")
        if not npz.is_file():
            return None
        try:
            meta = read_npz(npz).get("source_metadata")
        except CryoLikeDaskError:
            return None
        a, b = int(info["start"]), int(info["stop"])
        if meta is None or np.size(meta) != b - a or b > n:
            return None
        files[a:b] = [str(m) for m in np.ravel(meta)]
    if not all(str(f).lower().endswith(".star") for f in files):
        return None
    return np.asarray(files.tolist(), dtype=str)


def _check_grids(store, path: Path, columns: list[int]) -> None:
    """Structures of one run must share the search grid (same templates count and, for a
    template store, the same viewing directions and weights)."""
    counts = [store.n_templates[k] for k in columns]
    if len(set(counts)) > 1:
        detail = ", ".join(f"{store.structures[k]}: {store.n_templates[k]}" for k in columns)
        raise ReweightError(
            f"{path}: the structures were searched on different grids of viewing directions "
            f"({detail} templates); their likelihoods would bias the weights. Expected the "
            "same search grid for every structure"
        )
    fps = store.fingerprint.get("templates", [])
    paths = {
        fp.get("path")
        for k, fp in enumerate(fps)
        if k in columns and fp.get("kind") == "zarr-templates"
    }
    if len(paths) != 1:
        return
    tpath = Path(next(iter(paths)))
    if not tpath.is_dir():
        return
    try:
        from cryolike_dask.io.zarr_stores import TemplateStore

        ts = TemplateStore.open(tpath)
        ref = None
        for k in columns:
            sub = int(fps[k].get("structure", k))
            va = ts.viewing_angles(sub)
            arrays = [np.asarray(getattr(va, f)) for f in ("azimus", "polars", "gammas", "weights")]
            if ref is None:
                ref = (k, arrays)
                continue
            if any(
                a.shape != b.shape or not np.allclose(a, b)
                for a, b in zip(arrays, ref[1], strict=True)
            ):
                raise ReweightError(
                    f"{path}: structures {store.structures[ref[0]]} and {store.structures[k]} "
                    f"use different viewing directions or weights in {tpath}; their "
                    "likelihoods would bias the weights. Expected the same search grid"
                )
    except ReweightError:
        raise
    except Exception as exc:  # the template store moved or changed: nothing to compare
        logger.info("%s: search grids not compared (%s)", tpath, exc)


def _read_results(path: Path, matrix: str) -> LikelihoodInput:
    store = _results_store(path)
    q = QUANTITIES[matrix]
    if q not in store.group:
        flag = "--integrated-likelihood" if matrix == "integrated" else "--optimal-pose-likelihood"
        raise ReweightError(
            f"{path}: no {q} (the run did not compute it); rerun the likelihood with {flag} or "
            "choose the other --matrix"
        )
    values = _to_float(store.group[q][:], str(path))  # [structure, image]
    g = store.group

    def coord(name: str, default: np.ndarray) -> np.ndarray:
        return np.asarray(g[name][:]) if name in g else default

    n = values.shape[1]
    base = ImageTable.numbered(n)
    images = ImageTable(
        np.asarray(np.asarray(coord("image_name", base.image_name)).tolist(), dtype=str),
        coord("stack", base.stack).astype(np.int64),
        coord("stack_row", base.stack_row).astype(np.int64),
        coord("source_row", base.source_row).astype(np.int64),
        _star_of_images(store, n),
    )
    fp = store.fingerprint
    header = dict(g.attrs).get("cryolike_dask", {})
    return LikelihoodInput(
        values.T.copy(),
        list(store.structures),
        images,
        [path],
        f"{path}:{q}",
        {"stores": {str(path): header.get("store_id", "")}},
        {
            "parameters": fp.get("parameters"),
            "displacements": fp.get("displacements"),
            "precision": fp.get("precision"),
            "images": fp.get("images"),
            "n_templates": list(store.n_templates),
            "_store": store,
        },
    )


def _read_matrices_zarr(path: Path, matrix: str) -> LikelihoodInput:
    import zarr

    try:
        g = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise ReweightError(f"{path}: not a readable Zarr group ({exc})") from None
    name = MATRIX_NAMES[matrix]
    if name not in g:
        have = ", ".join(sorted(k for k in g.array_keys() if k != "structure")) or "none"
        raise ReweightError(
            f"{path}: no {name} array (holds {have}); choose another --matrix or run "
            "cryolike-dask stitch"
        )
    values = _to_float(g[name][:], f"{path}/{name}")  # [structure, image]
    if values.ndim != 2:
        raise ReweightError(f"{path}/{name}: shape {values.shape}; expected [structure, image]")
    if "structure" in g:
        names = [str(s) for s in np.asarray(g["structure"][:]).tolist()]
    else:
        names = [str(s) for s in g.attrs.get("structures", [])]
    if len(names) != values.shape[0]:
        names = [f"structure_{k}" for k in range(values.shape[0])]
    out = LikelihoodInput(
        values.T.copy(), names, ImageTable.numbered(values.shape[1]), [path], f"{path}/{name}"
    )
    sibling = path.parent.parent / "results.zarr"
    if _is_results_store(sibling):
        try:
            res = (
                _read_results(sibling, matrix)
                if QUANTITIES[matrix] in _results_store(sibling).group
                else None
            )
        except CryoLikeDaskError:
            res = None
        if res is not None and res.images.n_images == out.images.n_images:
            out = replace(out, images=res.images, fingerprint=res.fingerprint)
    return out


def _likelihood_folder(path: Path) -> Path | None:
    """The store to read in a folder: its results.zarr, likelihood_matrix/matrices.zarr, a
    matrices.zarr, or the same inside ``likelihood/``."""
    for candidate in (path, path / "likelihood"):
        if _is_results_store(candidate / "results.zarr"):
            return candidate / "results.zarr"
        for z in (candidate / "likelihood_matrix" / "matrices.zarr", candidate / "matrices.zarr"):
            if z.is_dir():
                return z
    return None


def _read_one_path(p: Path, layout: str | None, kind: str, matrix: str) -> LikelihoodInput:
    if not p.exists():
        raise ReweightError(f"{p}: no such file or folder")
    if p.is_dir():
        if layout is not None:
            logger.info("%s: --layout is ignored for stores (they name their axes)", p)
        if _is_results_store(p):
            data = _read_results(p, matrix)
        elif p.suffix == ".zarr" or (p / "zarr.json").is_file():
            data = _read_matrices_zarr(p, matrix)
        else:
            store = _likelihood_folder(p)
            if store is None:
                from cryolike_dask.io.stitch import template_folders

                if template_folders(p):
                    raise ReweightError(
                        f"{p}: holds per-stack outputs (template<N>/) but no results.zarr or "
                        "likelihood_matrix/matrices.zarr; run `cryolike-dask stitch "
                        f"{p}` first"
                    )
                raise ReweightError(
                    f"{p}: not a likelihood output folder (no results.zarr, "
                    "likelihood_matrix/matrices.zarr or matrices.zarr)"
                )
            if (
                store.name == "results.zarr"
                and QUANTITIES[matrix] not in _results_store(store).group
            ):
                alt = store.parent / "likelihood_matrix" / "matrices.zarr"
                data = (
                    _read_matrices_zarr(alt, matrix)
                    if alt.is_dir()
                    else _read_results(store, matrix)
                )
            else:
                data = (
                    _read_results(store, matrix)
                    if store.name == "results.zarr"
                    else _read_matrices_zarr(store, matrix)
                )
        if kind == "negloglik":
            logger.warning(
                "%s: likelihood stores hold log-likelihoods; --kind negloglik negates them", p
            )
            data = replace(data, loglik=-data.loglik)
        return data
    ll, structures, image_names = read_matrix_file(p, layout, kind)
    images = ImageTable.numbered(ll.shape[0])
    if image_names is not None:
        images = replace(images, image_name=np.asarray(image_names, dtype=str))
    return LikelihoodInput(
        ll,
        structures or [f"structure_{k}" for k in range(ll.shape[1])],
        images,
        [p],
        str(p),
        {"files": {str(p): file_sha256(p)}},
    )


def _comparable(a: LikelihoodInput, b: LikelihoodInput) -> None:
    """Two sources joined along structures: same images, parameters and search grids."""
    where = f"{b.sources[0]} and {a.sources[0]}"
    if a.loglik.shape[0] != b.loglik.shape[0]:
        raise ReweightError(
            f"{where}: {b.loglik.shape[0]} and {a.loglik.shape[0]} images; expected the same "
            "images in every source"
        )
    if not np.array_equal(a.images.image_name, b.images.image_name):
        i = int(np.flatnonzero(a.images.image_name != b.images.image_name)[0])
        raise ReweightError(
            f"{where}: image {i} is {b.images.image_name[i]} in one and "
            f"{a.images.image_name[i]} in the other; expected the same images in the same order"
        )
    fa, fb = a.fingerprint or {}, b.fingerprint or {}
    for key, what in (
        ("parameters", "image parameters"),
        ("displacements", "displacement grids"),
        ("precision", "precisions"),
    ):
        if fa.get(key) is not None and fb.get(key) is not None and fa[key] != fb[key]:
            differ = ""
            if key == "parameters":
                differ = ": " + ", ".join(
                    f"{k} {fb[key].get(k)} vs {fa[key].get(k)}"
                    for k in sorted(set(fa[key]) | set(fb[key]))
                    if fa[key].get(k) != fb[key].get(k)
                )
            raise ReweightError(
                f"{where}: different {what}{differ}; likelihoods computed on different grids "
                "would bias the weights. Expected the same parameters for every structure"
            )


def pick_structure(names: Sequence[str], spec: str | int, what: str) -> int:
    """The index of a structure given by name or 0-based index (``what`` names it in the
    error)."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        k = int(spec)
        if not 0 <= k < len(names):
            raise ReweightError(f"{what} {k}: out of range (0..{len(names) - 1})")
        return k
    s = str(spec)
    if s in names:
        return names.index(s)
    if s.lstrip("-").isdigit():
        return pick_structure(names, int(s), what)
    raise ReweightError(f"{what} {s!r}: no such structure (have {', '.join(names)})")


def read_source(
    source: Any,
    *,
    layout: str | None = None,
    kind: str = "loglik",
    matrix: str = "integrated",
    structure_names: Sequence[str] | None = None,
    structures: Sequence[str | int] | None = None,
) -> LikelihoodInput:
    """Read one or more sources (see the module docstring) as one ``LikelihoodInput``.

    ``source`` may also be an array (``layout`` needed). ``structures`` keeps only those
    columns (names or indices), in the order given; ``structure_names`` renames the columns.
    Non-finite values are refused here (:func:`check_finite`).
    """
    if kind not in KINDS:
        raise ReweightError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    if matrix not in QUANTITIES:
        raise ReweightError(f"matrix {matrix!r}: expected one of {', '.join(QUANTITIES)}")
    if layout is not None and layout not in LAYOUTS:
        raise ReweightError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if isinstance(source, np.ndarray) or (
        hasattr(source, "__array__") and not isinstance(source, (str, os.PathLike))
    ):
        if layout is None:
            raise ReweightError(
                "an array source needs a layout: images-by-structures or structures-by-images"
            )
        ll = _orient(_to_float(source, "array"), layout, "array")
        if kind == "negloglik":
            ll = -ll
        data = LikelihoodInput(
            ll,
            [f"structure_{k}" for k in range(ll.shape[1])],
            ImageTable.numbered(ll.shape[0]),
            [],
            "array",
        )
    else:
        paths = (
            [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
        )
        if not paths:
            raise ReweightError("no source given")
        parts = [_read_one_path(p, layout, kind, matrix) for p in paths]
        for part in parts[1:]:
            _comparable(parts[0], part)
        data = parts[0]
        if len(parts) > 1:
            checks: dict[str, Any] = {}
            for part in parts:
                for key, value in part.checksums.items():
                    checks.setdefault(key, {}).update(value)
            data = replace(
                data,
                loglik=np.concatenate([p.loglik for p in parts], axis=1),
                structures=[s for p in parts for s in p.structures],
                sources=[s for p in parts for s in p.sources],
                description=" + ".join(p.description for p in parts),
                checksums=checks,
            )
    if structure_names is not None:
        names = [str(s) for s in structure_names]
        if len(names) != data.loglik.shape[1]:
            raise ReweightError(
                f"{len(names)} structure names for {data.loglik.shape[1]} structures in "
                f"{data.description}"
            )
        data = replace(data, structures=names)
    if len(set(data.structures)) != len(data.structures):
        dup = sorted({s for s in data.structures if data.structures.count(s) > 1})
        raise ReweightError(
            f"{data.description}: structure names repeat ({', '.join(dup)}); give distinct "
            "structure names"
        )
    columns = list(range(data.loglik.shape[1]))
    if structures is not None:
        columns = [pick_structure(data.structures, s, "structure") for s in structures]
        if len(set(columns)) != len(columns):
            raise ReweightError(f"structures {list(structures)}: a structure is named twice")
        data = replace(
            data, loglik=data.loglik[:, columns], structures=[data.structures[k] for k in columns]
        )
    if not isinstance(source, np.ndarray) and data.sources:
        _check_search_grids(parts, columns)
    check_finite(data.loglik, data.structures, data.images, data.description)
    checks = dict(data.checksums)
    checks["matrix_sha256"] = matrix_sha256(data.loglik)
    fp = {k: v for k, v in (data.fingerprint or {}).items() if k != "_store"}
    return replace(data, checksums=checks, fingerprint=fp or None)


def _check_search_grids(parts: list[LikelihoodInput], columns: list[int]) -> None:
    """The selected structures of every source share their search grid (templates count,
    and within a template store the viewing directions and weights)."""
    offset = 0
    counts: dict[str, int] = {}
    for part in parts:
        k = part.loglik.shape[1]
        local = [c - offset for c in columns if offset <= c < offset + k]
        fp = part.fingerprint or {}
        store = fp.get("_store")
        if store is not None and local:
            _check_grids(store, part.sources[0], local)
            for j in local:
                counts[f"{part.sources[0]}:{store.structures[j]}"] = store.n_templates[j]
        offset += k
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise ReweightError(
            f"the structures were searched on different grids of viewing directions ({detail} "
            "templates); their likelihoods would bias the weights. Expected the same search "
            "grid for every structure"
        )


def read_vector(
    spec: Any, n: int, what: str, names: Sequence[str] | None = None
) -> tuple[np.ndarray, str | None]:
    """A vector of ``n`` numbers: a sequence, or a ``.npy``/``.pt``/``.txt``/``.csv`` file
    (one value per line; a CSV with ``name,value`` rows is matched to ``names``). Returns
    the float64 values and the file's SHA-256 (None for values given inline)."""
    digest = None
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if not p.is_file():
            raise ReweightError(f"{p}: file not found (expected the {what})")
        digest = file_sha256(p)
        suffix = p.suffix.lower()
        try:
            if suffix == ".npy":
                values = np.load(p, allow_pickle=False)
            elif suffix == ".pt":
                from cryolike_dask.io.torch_files import load_tensor

                values = load_tensor(p, what)
            elif suffix == ".csv":
                with open(p, newline="") as f:
                    rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
                if rows and len(rows[0]) == 2 and names is not None:
                    try:
                        float(rows[0][1])
                    except ValueError:
                        rows = rows[1:]
                    try:
                        table = {r[0].strip(): float(r[1]) for r in rows}
                    except ValueError as exc:
                        raise ReweightError(f"{p}: a value is not a number ({exc})") from None
                    missing = [s for s in names if s not in table]
                    if missing and all(s.strip().lstrip("-").isdigit() for s in table):
                        values = np.array(list(table.values()))
                    elif missing:
                        raise ReweightError(
                            f"{p}: no {what} for {', '.join(missing)} (rows name "
                            f"{', '.join(table)})"
                        )
                    else:
                        values = np.array([table[s] for s in names])
                else:
                    values = np.array([float(c) for r in rows for c in r])
            else:
                values = np.loadtxt(p, dtype=np.float64, ndmin=1)
        except ReweightError:
            raise
        except (ValueError, OSError) as exc:
            raise ReweightError(f"{p}: not a readable list of numbers ({exc})") from None
        where = str(p)
    else:
        values = spec
        where = what
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != n:
        raise ReweightError(f"{where}: {v.size} values; expected {n} ({what})")
    if not np.all(np.isfinite(v)):
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise ReweightError(f"{where}: value {i} is {v[i]}; expected finite numbers ({what})")
    return v, digest


# ------------------------------------------------------------------------------ outputs
def check_output_folder(output: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that holds ``reweight`` outputs unless ``overwrite`` (nothing
    is changed; :func:`prepare_output_folder` clears it once the inputs are read)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ReweightError(f"{out}: exists and is not a folder (expected an output folder)")
    present = [out / n for n in OUTPUT_NAMES if (out / n).exists()]
    if present and not overwrite:
        raise OutputExistsError(
            f"{present[0]}: exists (reweight outputs in {out}); pass --overwrite to replace them"
        )
    return out


def prepare_output_folder(output: str | os.PathLike, overwrite: bool) -> Path:
    """:func:`check_output_folder`, then remove the previous ``reweight`` outputs (nothing
    else in the folder) and create it."""
    out = check_output_folder(output, overwrite)
    for name in OUTPUT_NAMES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """JSON with NumPy values converted and non-finite numbers as ``null``."""
    return _atomic_text(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A CSV table (floats with 10 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not math.isfinite(float(v)) else f"{float(v):.10g}"
        return str(v)

    lines = [",".join(header)] + [",".join(cell(v) for v in r) for r in rows]
    return _atomic_text(path, "\n".join(lines) + "\n")


def write_cryoer(
    folder: Path, factor_draws: np.ndarray, prob_draws: np.ndarray
) -> tuple[Path, Path]:
    """cryoER's ``reweighting_factor.txt`` and ``reweighted_prob.txt``: one row per structure,
    ``mean sd`` of the draws (``%.6f``), as cryoER's ``analyze_mcmc`` writes them."""
    paths = []
    for name, draws in (
        ("reweighting_factor.txt", factor_draws),
        ("reweighted_prob.txt", prob_draws),
    ):
        d = draws.reshape(-1, draws.shape[-1])
        table = np.vstack((d.mean(axis=0), d.std(axis=0))).T
        p = folder / name
        np.savetxt(p, table, fmt="%.6f")
        paths.append(p)
    return paths[0], paths[1]


def write_responsibilities(
    path: Path,
    responsibilities: np.ndarray,
    components: Sequence[str],
    images: ImageTable,
    attrs: dict[str, Any],
) -> Path:
    """``responsibilities.zarr``: ``responsibility [image, structure]`` float64 with the image
    identifiers and component names as coordinates, ``assigned [image]`` (index of the most
    responsible component) and ``max_responsibility [image]``; ``xr.open_zarr`` opens it."""
    import zarr

    from cryolike_dask.io.zarr_stores import consolidate

    g = zarr.open_group(path, mode="w")

    def put(name: str, values: np.ndarray, dims: tuple[str, ...], dtype: Any = None) -> Any:
        values = np.asarray(values)
        kind: Any = str if values.dtype.kind in "UO" else (dtype or values.dtype)
        chunks = (
            values.shape if values.ndim == 1 else (min(values.shape[0], 65536), values.shape[1])
        )
        arr = g.create_array(
            name, shape=values.shape, chunks=chunks, dtype=kind, dimension_names=dims
        )
        arr[...] = values
        return arr

    r = np.asarray(responsibilities, dtype=np.float64)
    n = r.shape[0]
    put("structure", np.asarray(list(components), dtype=str), ("structure",))
    put("image", np.arange(n, dtype=np.int64), ("image",))
    coords = ["image_name", "stack", "stack_row", "source_row"]
    for name in coords:
        put(name, getattr(images, name), ("image",))
    a = put("responsibility", r, ("image", "structure"))
    a.attrs["coordinates"] = " ".join(coords)
    a.attrs["description"] = "posterior probability that the image comes from each component"
    b = put("assigned", np.argmax(r, axis=1).astype(np.int64), ("image",))
    b.attrs["coordinates"] = " ".join(coords)
    b.attrs["description"] = "index of the most responsible component (see structure)"
    c = put("max_responsibility", r.max(axis=1), ("image",))
    c.attrs["coordinates"] = " ".join(coords)
    g.attrs.update(_jsonable(attrs))
    consolidate(path)
    return path


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")
    return s or "structure"


def write_star_subsets(
    folder: Path,
    images: ImageTable,
    assigned: np.ndarray,
    keep: np.ndarray,
    structures: Sequence[str],
) -> list[Path]:
    """Per-structure particle subsets: for each structure ``k``, the STAR rows of the images
    with ``assigned == k`` and ``keep``, every block (optics ...) kept as it is; one file
    per structure and source STAR file. Returns the files written."""
    import starfile

    if images.star_file is None:
        return []
    sources = sorted({s for s in images.star_file.tolist() if s})
    written: list[Path] = []
    folder.mkdir(parents=True, exist_ok=True)
    for src in sources:
        p = Path(src)
        if not p.is_file():
            logger.warning("%s: not found; no particle subsets written for it", p)
            continue
        try:
            blocks = starfile.read(p, always_dict=True)
        except Exception as exc:
            raise ReweightError(f"{p}: not a readable STAR file ({exc})") from None
        tables = {k: v for k, v in blocks.items() if hasattr(v, "iloc")}
        key = (
            "particles"
            if "particles" in tables
            else (next(iter(tables)) if len(tables) == 1 else None)
        )
        if key is None:
            raise ReweightError(
                f"{p}: {len(tables)} data blocks ({', '.join(tables)}); expected one, or a "
                "'particles' block"
            )
        table = tables[key]
        mine = images.star_file == src
        rows = images.source_row
        if np.any(rows[mine] < 0) or np.any(rows[mine] >= len(table)):
            raise ReweightError(
                f"{p}: the particles' rows in it are unknown or out of range ({len(table)} rows)"
            )
        stem = "" if len(sources) == 1 else f"__{_safe_name(p.stem)}"
        for k, name in enumerate(structures):
            sel = np.flatnonzero(mine & keep & (assigned == k))
            out = folder / f"particles_{_safe_name(name)}{stem}.star"
            subset = dict(blocks)
            subset[key] = table.iloc[np.sort(rows[sel])].reset_index(drop=True)
            starfile.write(subset, out, overwrite=True)
            written.append(out)
    return written


__all__ = [
    "FILE_SUFFIXES",
    "KINDS",
    "LAYOUTS",
    "MATRIX_NAMES",
    "OUTPUT_NAMES",
    "QUANTITIES",
    "ImageTable",
    "LikelihoodInput",
    "ReweightError",
    "check_finite",
    "check_output_folder",
    "file_sha256",
    "matrix_sha256",
    "pick_structure",
    "prepare_output_folder",
    "read_matrix_file",
    "read_source",
    "read_vector",
    "write_cryoer",
    "write_json",
    "write_responsibilities",
    "write_star_subsets",
    "write_table",
]
