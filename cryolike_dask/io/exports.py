"""Export results to CryoLike's ``.pt`` layout, with a verifiable completion record per stack.

A stack's files are written atomically (temporary name, then rename); once all are written,
``OUT/.cryolike_dask/templateN/stack_SSSSSS.json`` records each file's SHA-256, shape and
dtype. ``--skip-exist`` trusts a stack only if that record exists and every file matches it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryolike_dask.io.cryolike import OutputLayout
from cryolike_dask.io.torch_files import (
    TorchFileError,
    file_sha256,
    save_pickled_array,
    save_tensor,
    tensor_header,
)
from cryolike_dask.io.zarr_stores import (
    DONE_FULL,
    DONE_INTEGRATED,
    DONE_OPTIMAL_LIKELIHOOD,
    DONE_OPTIMAL_POSE,
    DONE_PER_TEMPLATE,
    ResultsStore,
    StackInfo,
)

RECORD_DIR = ".cryolike_dask"


@dataclass(frozen=True)
class OutputRequest:
    """Which outputs a run writes.

    Attributes
    ----------
    optimal_pose : bool
        Best cross-correlation, template, displacements and rotation per image.
    integrated : bool
        Integrated log-likelihood per image.
    optimal_likelihood : bool
        Log-likelihood at the optimal pose per image.
    per_template : bool
        ``[M_stack, S]`` best over (d, w) per image and template (+ integrated if requested).
    full : bool
        The full ``[M_stack, S, D, W]`` cross-correlation tensor.
    """

    optimal_pose: bool = True
    integrated: bool = False
    optimal_likelihood: bool = False
    per_template: bool = False
    full: bool = False

    @property
    def bits(self) -> int:
        """The results store's ``done`` bits these outputs need."""
        bits = DONE_OPTIMAL_POSE
        bits |= DONE_INTEGRATED if self.integrated else 0
        bits |= DONE_OPTIMAL_LIKELIHOOD if self.optimal_likelihood else 0
        bits |= DONE_PER_TEMPLATE if self.per_template else 0
        bits |= DONE_FULL if self.full else 0
        return bits

    def files(self, layout: OutputLayout, structure: int, i_stack: int) -> dict[str, Path]:
        return layout.stack_files(
            structure,
            i_stack,
            optimal_pose=self.optimal_pose,
            integrated=self.integrated,
            optimal_likelihood=self.optimal_likelihood,
            full=self.full,
            per_template=self.per_template,
        )


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
    request: OutputRequest,
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write one stack's ``.pt`` files from the results store, then its completion record."""
    a, b = stack.start, stack.stop
    layout.make_tree(structure)
    paths = request.files(layout, structure, i_stack)
    g = results.group
    for key, path in paths.items():
        if key.startswith("per_template/"):
            name = key.split("/", 1)[1]
            save_tensor(np.asarray(results.per_template_array(structure, name)[a:b]), path)
        elif key == "cross_correlation_pose_msdw":
            _save_full(results, structure, a, b, path)
        else:
            save_tensor(np.asarray(g[key][structure, a:b]), path)
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


def _save_full(results: ResultsStore, structure: int, a: int, b: int, path: Path) -> None:
    """Save ``[a, b)`` of the full tensor through a memory-mapped scratch file (bounded RSS)."""
    arr = results.full_array(structure)
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
    request: OutputRequest,
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
    for path in request.files(layout, structure, i_stack).values():
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
