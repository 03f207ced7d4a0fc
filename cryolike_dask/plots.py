"""Plots of a likelihood run (PNG, matplotlib): cross-correlations, likelihood differences,
pose errors. ``cryolike-dask plot OUT`` draws them from any output folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryolike_dask.evaluation import PoseErrors


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


def plot_output_folder(
    output: str | os.PathLike,
    plots: str | os.PathLike | None = None,
    truth: str | os.PathLike | None = None,
) -> list[Path]:
    """Draw the plots of a likelihood output folder (its ``results.zarr``).

    With ``truth`` (a ``truth.npz`` of synthetic particles), also the pose errors.
    """
    from cryolike_dask.evaluation import Truth, pose_errors
    from cryolike_dask.io.zarr_stores import ResultsStore, params_from_json

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
        t = Truth.load(truth)
        params = params_from_json(store.fingerprint["parameters"], str(store.path))
        k = t.structure
        sel = slice(None) if t.images is None else np.asarray(t.images)  # a mixture's share
        errors = pose_errors(
            params.viewing_angles,
            store.n_inplanes,
            store.displacements,
            t,
            np.asarray(g["optimal_template"][k])[sel],
            np.asarray(g["optimal_displacement_x"][k])[sel],
            np.asarray(g["optimal_displacement_y"][k])[sel],
            np.asarray(g["optimal_inplane_rotation"][k])[sel],
        )
        made.append(plot_pose_errors(errors, target / "pose_errors.png"))
    return made
