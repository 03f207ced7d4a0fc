"""Export results to CryoLike's ``.pt`` layout, with a verifiable completion record per stack.

A stack's files are written atomically (temporary name, then rename); once all are written,
``OUT/.cryolike_dask/templateN/stack_SSSSSS.json`` records each file's SHA-256, shape and
dtype. ``--skip-exist`` trusts a stack only if that record exists and every file matches it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.io.cryolike import OutputLayout
from cryolike_dask.io.outputs import Quantity
from cryolike_dask.io.torch_files import (
    TorchFileError,
    file_sha256,
    save_pickled_array,
    save_tensor,
    tensor_header,
)
from cryolike_dask.io.zarr_stores import ResultsStore, StackInfo

RECORD_DIR = ".cryolike_dask"


def record_path(layout: OutputLayout, structure: int, i_stack: int) -> Path:
    return layout.root / RECORD_DIR / f"template{structure}" / f"stack_{i_stack:06d}.json"


def write_displacements(layout: OutputLayout, displacements: np.ndarray) -> Path:
    """``OUT/displacements_set.pt``: a pickled float32 ``[2, D]`` NumPy array (as CryoLike)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    return save_pickled_array(np.asarray(displacements, np.float32), layout.displacements)


def export_stack(
    results: ResultsStore,
    layout: OutputLayout,
    structure: int,
    i_stack: int,
    stack: StackInfo,
    quantities: Iterable[Quantity],
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write one stack's ``.pt`` files from the results store, then its completion record."""
    a, b = stack.start, stack.stop
    layout.make_tree(structure)
    quantities = tuple(quantities)
    paths = layout.stack_files(structure, i_stack, quantities)
    for q in quantities:
        path = paths[q.name]
        if q.scope == "full":
            _save_full(results, results.array(q, structure), a, b, path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensor(results.read(q, structure, a, b), path)
    record = {
        "stack": stack.__dict__,
        "fingerprint": fingerprint or results.fingerprint,
        "files": {str(p.relative_to(layout.root)): _describe(p) for p in paths.values()},
    }
    rp = record_path(layout, structure, i_stack)
    rp.parent.mkdir(parents=True, exist_ok=True)
    tmp = rp.with_name(f".{rp.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, rp)
    return paths


def _save_full(results: ResultsStore, arr: Any, a: int, b: int, path: Path) -> None:
    """Save ``[a, b)`` of the full tensor through a memory-mapped scratch file (bounded RSS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.scratch-{os.getpid()}")
    try:
        mm = np.lib.format.open_memmap(
            scratch, mode="w+", dtype=arr.dtype, shape=(b - a, *arr.shape[1:])
        )
        step = results.image_block
        for s in range(a, b, step):
            e = min(b, s + step)
            mm[s - a : e - a] = arr[s:e]
        mm.flush()
        save_tensor(mm, path)
        del mm
    finally:
        if scratch.exists():
            scratch.unlink()


def _describe(path: Path) -> dict[str, Any]:
    shape, dtype = tensor_header(path)
    return {"sha256": file_sha256(path), "shape": list(shape), "dtype": dtype.name}


def verify_stack(
    layout: OutputLayout,
    structure: int,
    i_stack: int,
    quantities: Iterable[Quantity],
    fingerprint: dict[str, Any] | None = None,
) -> tuple[bool, str]:
    """Whether every output file of a stack is complete: ``(ok, reason if not)``.

    Complete means: the completion record exists (and was made by a run with the same
    fingerprint, if given), and each expected file exists with the recorded size, SHA-256,
    shape and dtype.
    """
    rp = record_path(layout, structure, i_stack)
    if not rp.is_file():
        return False, f"no completion record {rp}"
    try:
        record = json.loads(rp.read_text())
        files = record["files"]
    except (ValueError, KeyError) as exc:
        return False, f"{rp}: unreadable completion record ({exc})"
    if fingerprint is not None and record.get("fingerprint") != json.loads(
        json.dumps(fingerprint, default=str)
    ):
        return False, f"{rp}: written by a run with other inputs or settings"
    for path in layout.stack_files(structure, i_stack, quantities).values():
        rel = str(path.relative_to(layout.root))
        if rel not in files:
            return False, f"{path}: not in the completion record"
        if not path.is_file():
            return False, f"{path}: missing"
        try:
            shape, dtype = tensor_header(path)
        except TorchFileError as exc:
            return False, str(exc)
        want = files[rel]
        if list(shape) != want["shape"] or dtype.name != want["dtype"]:
            return (
                False,
                f"{path}: shape/dtype {shape} {dtype} != recorded {want['shape']} {want['dtype']}",
            )
        if file_sha256(path) != want["sha256"]:
            return False, f"{path}: content differs from the completion record (checksum)"
    return True, ""
