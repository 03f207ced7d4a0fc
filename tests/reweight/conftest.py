"""Small likelihood output folders for the reweight tests, made with the package's own
writers (``ResultsStore``, per-stack ``.pt`` files, ``stitch``) instead of a slow run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate

from cryolike_dask.io.outputs import quantity
from cryolike_dask.io.stitch import stitch
from cryolike_dask.io.torch_files import save_tensor
from cryolike_dask.io.zarr_stores import ImageIds, ResultsStore, StackInfo

PARAMETERS = {
    "n_pixels": [32, 32],
    "pixel_size": [5.0, 5.0],
    "radius_max": 8.0,
    "dist_radii": 0.25,
    "n_inplanes": 8,
    "precision": "single",
}


def mixture_loglik(
    rng: np.random.Generator, n: int, weights: list[float], separation: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(ll [n, K], z)``: images from a mixture, structure ``z_i`` favoured by
    ``separation`` nats plus unit noise."""
    z = rng.choice(len(weights), size=n, p=np.asarray(weights))
    ll = rng.normal(-1000.0, 1.0, size=(n, len(weights)))
    ll[np.arange(n), z] += separation
    return ll, z


def write_star(path: Path, n: int) -> Path:
    """A RELION 3.1 STAR file (optics + particles) of ``n`` particles."""
    rows = [f"{i + 1:06d}@particles.mrcs 1 {10000 + i:.1f} {10100 + i:.1f} 10.0" for i in range(n)]
    path.write_text(
        "\n".join(
            [
                "data_optics",
                "",
                "loop_",
                "_rlnOpticsGroup #1",
                "_rlnVoltage #2",
                "_rlnSphericalAberration #3",
                "_rlnImagePixelSize #4",
                "1 300.0 2.7 5.0",
                "",
                "data_particles",
                "",
                "loop_",
                "_rlnImageName #1",
                "_rlnOpticsGroup #2",
                "_rlnDefocusU #3",
                "_rlnDefocusV #4",
                "_rlnDefocusAngle #5",
                *rows,
                "",
            ]
        )
    )
    return path


def make_likelihood_folder(
    root: Path,
    ll: np.ndarray,
    names: list[str],
    *,
    n_templates: list[int] | None = None,
    parameters: dict | None = None,
    star: bool = True,
    matrices: bool = True,
    image_file: Path | None = None,
) -> Path:
    """A likelihood output folder holding ``ll [n_images, n_structures]`` as the integrated
    log-likelihood: ``results.zarr`` (image ids, stacks), ``template<N>/`` stack files, the
    stitched ``likelihood_matrix/`` and (``star``) the particles' STAR file and stack
    ``.npz`` that name it."""
    root.mkdir(parents=True, exist_ok=True)
    n, k = ll.shape
    fft = root / "particles" / "fft"
    fft.mkdir(parents=True, exist_ok=True)
    pt = fft / "particles_fourier_stack_000000.pt"
    if star:
        star_path = write_star(root / "particles.star", n)
        np.savez(
            pt.with_suffix(".npz"),
            source_metadata=np.array([str(star_path)] * n),
            source_rows=np.arange(n, dtype=np.int64),
        )
    mrcs = image_file or root / "particles.mrcs"
    ids = ImageIds(
        np.array([f"{i + 1:06d}@{mrcs}" for i in range(n)]),
        np.zeros(n, np.int64),
        np.arange(n, dtype=np.int64),
        np.arange(n, dtype=np.int64),
    )
    fingerprint = {
        "parameters": parameters or PARAMETERS,
        "displacements": [[0.0], [0.0]],
        "precision": "single",
        "images": {"kind": "zarr-images", "path": str(root / "particles.zarr"), "stacks": []},
        "templates": [{"kind": "test", "structure": j} for j in range(k)],
    }
    store = ResultsStore.create(
        root / "results.zarr",
        structures=list(names),
        n_templates=n_templates or [4] * k,
        n_images=n,
        image_block=n,
        template_block=4,
        displacements=np.zeros((2, 1)),
        rotations=np.linspace(0, 2 * np.pi, 8, endpoint=False),
        real_dtype=np.dtype(np.float64),
        fingerprint=fingerprint,
        stacks=[StackInfo("particles_fourier_stack_000000", 0, n, str(pt))],
        image_ids=ids,
    )
    q = quantity("log_likelihood_integrated_fourier")
    store.require([q], range(k))
    store.array(q)[:] = ll.T
    if matrices:
        for j in range(k):
            save_tensor(
                ll[:, j].copy(), root / f"template{j}" / q.folder / f"{q.stem}_stack_000000.pt"
            )
        stitch(root, optimal=False, cross_correlation=False)
    return root


@pytest.fixture
def likelihood_folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """``(folder, ll [60, 2], z)``: a 70/30 mixture of two structures ``apo`` and ``holo``."""
    ll, z = mixture_loglik(np.random.default_rng(0), 60, [0.7, 0.3])
    return make_likelihood_folder(tmp_path / "run", ll, ["apo", "holo"]), ll, z


def posterior_quadrature(
    ll: np.ndarray, alpha: float, counts: np.ndarray | None = None
) -> tuple[float, float]:
    """Posterior mean and sd of w_1 for two components by quadrature of the exact posterior
    (the prior in w: the scaled Dirichlet of the reweighting factors)."""
    lik = np.exp(ll - ll.max())
    n = np.array([0.5, 0.5]) if counts is None else counts / counts.sum()

    def log_post(w: float) -> float:
        v = np.array([w, 1.0 - w])
        return float(
            np.sum(np.log(lik @ v))
            + np.sum((alpha - 1.0) * np.log(v))
            - 2 * alpha * np.log(np.sum(v / n))
        )

    grid = np.linspace(1e-6, 1 - 1e-6, 2001)
    peak = max(log_post(w) for w in grid)

    def moment(j: int) -> float:
        value, _ = integrate.quad(
            lambda w: w**j * math.exp(log_post(w) - peak), 0, 1, limit=400, epsabs=0, epsrel=1e-10
        )
        return value

    z = moment(0)
    mean = moment(1) / z
    return mean, math.sqrt(moment(2) / z - mean**2)
