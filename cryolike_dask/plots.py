"""Plots of a likelihood run (PNG, matplotlib): cross-correlations, likelihood differences,
pose errors. ``cryolike-dask plot OUT`` draws them from any output folder.

The pose errors pair each result with its truth by the result's ``source_row`` (its row in
the input particle stack / metadata file), so results in any order (``--sort-by-pose``) meet
their own truth; a run centred on each image's prior origin (``--use-prior-origin``) has its
shift floor measured on the residual grid around that origin.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryolike_dask.evaluation import PoseErrors

if TYPE_CHECKING:
    from cryolike_dask.evaluation import Truth
    from cryolike_dask.io.zarr_stores import ResultsStore

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cross_correlation(cc: np.ndarray, names: list[str], path: Path) -> Path:
    """Histogram of the best cross-correlation per image, one colour per structure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(np.nanmin(cc), np.nanmax(cc), 40)
    for k, name in enumerate(names):
        ax.hist(cc[k], bins=bins, alpha=0.6, label=name)
    ax.set_xlabel("best normalised cross-correlation")
    ax.set_ylabel("images")
    ax.set_title("Cross-correlation per structure")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_log_likelihood_differences(
    ll: np.ndarray, names: list[str], path: Path, reference: int = 0
) -> Path:
    """Histogram of ``LL[k] − LL[reference]`` per image for every other structure ``k``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, name in enumerate(names):
        if k == reference:
            continue
        diff = ll[reference] - ll[k]
        ax.hist(diff, bins=40, alpha=0.6, label=f"{names[reference]} − {name}")
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("integrated log-likelihood difference (nats)")
    ax.set_ylabel("images")
    ax.set_title("Which structure each image prefers (> 0: the first)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pose_errors(errors: PoseErrors, path: Path) -> Path:
    """Histograms of viewing-direction, in-plane rotation and shift errors, with the grid
    step and the quantisation floor (the error of the nearest grid pose) for comparison; a
    second row up to the structure's symmetry when the errors have one."""
    plt = _pyplot()
    sets = [(errors, "against the truth")]
    if errors.modulo_symmetry is not None:
        sets.append((errors.modulo_symmetry, f"up to {errors.n_symmetry}-fold symmetry"))
    fig, axes = plt.subplots(len(sets), 3, figsize=(12, 3.6 * len(sets)), squeeze=False)
    for row, (e, what) in zip(axes, sets, strict=True):
        for ax, (name, unit, values, step, floor) in zip(row, e.components(), strict=True):
            top = max(float(np.max(values, initial=0.0)), step, 1e-9)
            bins = np.linspace(0.0, top * 1.02, 31)
            ax.hist(values, bins=bins, label="recovered pose")
            if floor is not None and np.any(floor > 0):
                ax.hist(
                    floor, bins=bins, histtype="step", color="k", lw=1.2, label="nearest grid pose"
                )
            ax.axvline(step, color="r", ls="--", lw=1, label="one grid step")
            ax.axvline(step / 2, color="r", ls=":", lw=1, label="half a step")
            ax.set_xlabel(f"{name} error ({unit})")
            ax.legend(fontsize="small")
        row[0].set_ylabel(f"images, {what}")
    title = f"Pose recovery: {errors.within_one_step.mean():.0%} within one grid step"
    if errors.modulo_symmetry is not None:
        title += f" ({errors.modulo_symmetry.within_one_step.mean():.0%} up to symmetry)"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _truth_positions(truth: Truth, source_rows: np.ndarray | None, n_results: int) -> np.ndarray:
    """The result position of each entry of ``truth``, int64 ``[n]``.

    Entry ``i`` is the image at row ``truth.images[i]`` of the input stack (row ``i`` when
    ``images`` is None); its result is the one whose ``source_row`` is that row, wherever the
    run put it. Results that record no source rows (``source_rows`` None or all −1: images
    from CryoLike stacks) are taken to be in input order, position ``i`` holding row ``i``
    (logged). Rows that no result holds, or several, are an error.
    """
    n = int(np.asarray(truth.rotation).shape[0])
    rows = np.arange(n, dtype=np.int64) if truth.images is None else np.asarray(truth.images)
    rows = rows.astype(np.int64)
    if rows.shape != (n,):
        raise ValueError(f"truth: {rows.shape} image rows for {n} poses")
    known = None if source_rows is None else np.asarray(source_rows, dtype=np.int64)
    if known is None or not np.any(known >= 0):
        logger.warning(
            "the results record no source rows: the truth is paired with them by position "
            "(right only if the images kept their input order)"
        )
        if np.any((rows < 0) | (rows >= n_results)):
            raise ValueError(f"truth: image rows outside the {n_results} results")
        return rows
    if known.shape != (n_results,):
        raise ValueError(f"{known.shape} source rows for {n_results} results")
    valid = np.flatnonzero(known >= 0)
    order = valid[np.argsort(known[valid], kind="stable")]
    ranked = known[order]
    if np.any(ranked[1:] == ranked[:-1]):
        raise ValueError(
            "the results hold some source rows more than once (images from several metadata "
            "files): the truth cannot be paired with them"
        )
    at = np.minimum(np.searchsorted(ranked, rows), ranked.size - 1)
    missing = ranked[at] != rows
    if np.any(missing):
        raise ValueError(
            f"truth: {int(missing.sum())} of its {n} image rows are in no result "
            f"(first: {rows[missing][:5].tolist()})"
        )
    return order[at].astype(np.int64)


def _search_offsets(store: ResultsStore) -> tuple[bool, np.ndarray | None]:
    """Whether the run centred each image's search on its prior origin, and then the image
    offsets it was centred on, float64 ``[M, 2]`` Å in result order (image frame, as
    :func:`~cryolike_dask.evaluation.image_centres`; zero for images without an origin), as
    the search took them from the image store's prior poses. ``(True, None)`` when they
    cannot be read back (logged)."""
    from cryolike_dask.io.zarr_stores import ImageStore, StoreError
    from cryolike_dask.kernels.pose_prior import image_offset

    prior = store.fingerprint.get("pose_prior") or {}
    if not prior.get("use_origin"):
        return False, None
    images = store.fingerprint.get("images") or {}
    why = None
    poses = None
    if images.get("kind") != "zarr-images" or not images.get("path"):
        why = f"the images are not an image store ({images.get('kind')})"
    else:
        try:
            source = ImageStore.open(images["path"])
        except (StoreError, OSError) as exc:
            why = str(exc)
        else:
            header = dict(source.group.attrs).get("cryolike_dask", {})
            if images.get("store_id") and header.get("store_id") not in (
                None,
                images["store_id"],
            ):
                why = f"{images['path']} was made again since the run"
            elif source.n_images < store.n_images:
                why = f"{images['path']} holds {source.n_images} images, not {store.n_images}"
            else:
                poses = source.prior_poses(0, store.n_images)
                if poses is None:
                    why = f"{images['path']} holds no prior poses"
    if poses is None:
        logger.warning(
            "the search was centred on the prior origins, which cannot be read back (%s): "
            "the pose errors are drawn without the shift floor",
            why,
        )
        return True, None
    has = np.asarray(poses.has_origin, dtype=bool)
    ox = np.where(has, poses.origin_x, 0.0)
    oy = np.where(has, poses.origin_y, 0.0)
    return True, image_offset(ox, oy)


def _without_shift_floor(errors: PoseErrors) -> PoseErrors:
    sym = errors.modulo_symmetry
    return replace(
        errors,
        shift_floor_angstrom=None,
        modulo_symmetry=None if sym is None else _without_shift_floor(sym),
    )


def _folder_pose_errors(store: ResultsStore, truth: Truth) -> PoseErrors:
    """The pose errors of a results store's images against ``truth``: each truth entry
    against the result of its source row (:func:`_truth_positions`), with the shift floor on
    the grid the run searched (around each image's prior origin where it was centred on it,
    :func:`_search_offsets`). In the order of ``truth``."""
    from cryolike_dask.evaluation import pose_errors
    from cryolike_dask.io.zarr_stores import params_from_json

    g = store.group
    params = params_from_json(store.fingerprint["parameters"], str(store.path))
    rows = np.asarray(g["source_row"][:]) if "source_row" in g else None
    at = _truth_positions(truth, rows, store.n_images)
    k = truth.structure
    centred, offset = _search_offsets(store)
    errors = pose_errors(
        params.viewing_angles,
        store.n_inplanes,
        store.displacements,
        truth,
        *(
            np.asarray(g[name][k])[at]
            for name in (
                "optimal_template",
                "optimal_displacement_x",
                "optimal_displacement_y",
                "optimal_inplane_rotation",
            )
        ),
        offset=None if offset is None else offset[at],
    )
    return _without_shift_floor(errors) if centred and offset is None else errors


def plot_output_folder(
    output: str | os.PathLike,
    plots: str | os.PathLike | None = None,
    truth: str | os.PathLike | None = None,
) -> list[Path]:
    """Draw the plots of a likelihood output folder (its ``results.zarr``).

    With ``truth`` (a ``truth.npz`` of synthetic particles, in the input order: entry ``i``
    is row ``images[i]``, else ``i``, of the particle stack), also the pose errors; each
    result is paired with its truth by its source row.
    """
    from cryolike_dask.evaluation import Truth
    from cryolike_dask.io.zarr_stores import ResultsStore

    out = Path(output)
    store = ResultsStore.open(out / "results.zarr", mode="r")
    g = store.group
    names = store.structures
    target = Path(plots) if plots is not None else out / "plots"
    target.mkdir(parents=True, exist_ok=True)
    cc = np.asarray(g["cross_correlation"][:])
    done = ~np.all(np.isnan(cc), axis=1)
    made = [
        plot_cross_correlation(
            cc[done],
            [n for n, d in zip(names, done, strict=True) if d],
            target / "cross_correlation_per_structure.png",
        )
    ]
    ll = np.asarray(g["log_likelihood_integrated_fourier"][:])
    if np.sum(done & ~np.all(np.isnan(ll), axis=1)) >= 2:
        keep = done & ~np.all(np.isnan(ll), axis=1)
        made.append(
            plot_log_likelihood_differences(
                ll[keep],
                [n for n, k in zip(names, keep, strict=True) if k],
                target / "log_likelihood_differences.png",
            )
        )
    if truth is not None:
        errors = _folder_pose_errors(store, Truth.load(truth))
        made.append(plot_pose_errors(errors, target / "pose_errors.png"))
    return made
