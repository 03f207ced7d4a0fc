"""Round trip: maps → templates → synthetic particles (known poses, CTF, noise) as MRC + STAR
→ convert-particles → likelihood recovers the poses and prefers the true structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.io.models import read_atoms
from cryolike_dask.io.mrc import write_images, write_volume
from cryolike_dask.io.sources import ZarrImages, ZarrTemplates
from cryolike_dask.io.zarr_stores import ResultsStore
from cryolike_dask.params import ImageParameters, LensParameters
from cryolike_dask.pipeline import LikelihoodRun, execute
from cryolike_dask.pipeline import convert_particles as cp
from cryolike_dask.pipeline.cluster import ClusterOptions
from cryolike_dask.pipeline.make_templates import make_templates
from cryolike_dask.pipeline.spec import OutputRequest
from cryolike_dask.preprocess.synthesis import synthesize_particles

SYNC = ClusterOptions(scheduler="sync")
N, PIXEL, W = 32, 4.0, 64


def _density(atoms: np.ndarray) -> np.ndarray:
    grid = np.zeros((N, N, N))
    idx = np.round(atoms / PIXEL).astype(int) + N // 2
    np.add.at(grid, (idx[:, 0], idx[:, 1], idx[:, 2]), 1.0)
    return gaussian_filter(grid, 3.0 / PIXEL).astype(np.float32)


def _star(path: Path, lens: LensParameters) -> Path:
    rows = [
        "data_",
        "",
        "loop_",
        "_rlnDefocusU #1",
        "_rlnDefocusV #2",
        "_rlnDefocusAngle #3",
        "_rlnVoltage #4",
        "_rlnSphericalAberration #5",
        "_rlnAmplitudeContrast #6",
    ]
    rows += [
        f"{u:.3f} {v:.3f} {np.rad2deg(a):.6f} 300 2.7 0.1"
        for u, v, a in zip(lens.defocus_u, lens.defocus_v, lens.defocus_angle, strict=True)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_round_trip_recovers_poses_and_structure(data_dir, tmp_path) -> None:
    rng = np.random.default_rng(1)
    params = ImageParameters.from_values(N, PIXEL, n_inplanes=W, viewing_distance=8 / (4 * np.pi))
    atoms = read_atoms(data_dir / "real" / "8zpm.cif", params).coordinates.astype(float)
    write_volume(tmp_path / "true.mrc", _density(atoms), PIXEL)
    write_volume(
        tmp_path / "perturbed.mrc", _density(atoms + rng.normal(scale=3.0, size=atoms.shape)), PIXEL
    )
    make_templates(
        [tmp_path / "true.mrc", tmp_path / "perturbed.mrc"],
        params,
        tmp_path / "templates",
        cluster=SYNC,
        progress=False,
    )
    true_templates = torch.load(tmp_path / "templates" / "templates_fourier_true.pt").numpy()

    m = 40
    disp = DisplacementGrid.from_search(1, 3, 3, PIXEL)
    t_idx = rng.integers(0, true_templates.shape[0], m)
    d_idx = rng.integers(0, disp.n_displacements, m)
    w_idx = rng.integers(0, W, m)
    lens = LensParameters(
        rng.uniform(8000, 16000, m),
        rng.uniform(8000, 16000, m),
        rng.uniform(-np.pi / 2, np.pi / 2, m),
        np.zeros(m),
        2.7,
        300.0,
        0.1,
        astigmatism_convention="relion",
    )
    synthetic = synthesize_particles(
        true_templates,
        params,
        t_idx,
        disp.x[d_idx],
        disp.y[d_idx],
        2 * np.pi * w_idx / W,
        lens,
        snr=0.3,
        rng=rng,
    )
    write_images(tmp_path / "particles.mrcs", synthetic.images, PIXEL)
    particles = cp.gather_paired(
        [tmp_path / "particles.mrcs"], [_star(tmp_path / "particles.star", lens)], batch_size=16
    )
    store = cp.convert_particles(
        particles, params, tmp_path / "particles", cluster=SYNC, progress=False
    )

    run = LikelihoodRun(
        ZarrTemplates.open(tmp_path / "templates" / "templates.zarr"),
        ZarrImages.open(store),
        tmp_path / "out",
        (0, 1),
        disp,
        OutputRequest(integrated=True),
    )
    execute(run, scheduler="sync", progress=False)
    r = ResultsStore.open(tmp_path / "out" / "results.zarr", mode="r").group
    template = r["optimal_template"][0]
    pose_ok = (
        (template == t_idx)
        & (r["optimal_displacement_x"][0] == disp.x[d_idx])
        & (r["optimal_displacement_y"][0] == disp.y[d_idx])
        & np.isclose(r["optimal_inplane_rotation"][0], 2 * np.pi * w_idx / W)
    )
    assert pose_ok.mean() >= 0.8, pose_ok.mean()  # measured: 1.0 at SNR 0.3
    ll = r["log_likelihood_integrated_fourier"][:]
    assert (ll[0] > ll[1]).mean() >= 0.9  # measured: every image prefers the true structure
