"""Fixtures for pipeline tests: the CryoLike reference case as run inputs, a LocalCluster."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.io.sources import CryoLikeParticles, CryoLikeTemplates
from cryolike_dask.params import ImageParameters


@pytest.fixture(scope="session")
def ref_inputs(reference_dir):
    params = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    return dict(
        params=params,
        templates=CryoLikeTemplates.open(reference_dir / "templates", params),
        images=CryoLikeParticles.open(reference_dir / "particles", 2, params),
        displacements=DisplacementGrid.from_search(1.5, 3, 3, 1.5),
        outputs=dict(np.load(reference_dir / "numpy" / "outputs.npz")),
        extras=dict(np.load(reference_dir / "numpy" / "extras.npz")),
    )


@pytest.fixture(scope="module")
def local_client():
    """A real LocalCluster with 2 single-threaded worker processes."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        memory_limit="2GB",
    )
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()
