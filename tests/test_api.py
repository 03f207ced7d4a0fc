"""The flat Python API on the user's own Dask client: lazy xarray results, CryoLike's numbers."""

from __future__ import annotations

import logging
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import cryolike_dask as cd
from cryolike_dask.io.outputs import OUTPUTS


@pytest.fixture(scope="module")
def user_client():
    """The user's own cluster: a real LocalCluster with 2 worker processes."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def _task_prefixes(client) -> dict[str, float]:
    """Seconds of compute per task-key prefix, as the scheduler recorded them (durations
    accumulate; task counts fall back to 0 once results are released)."""

    def read(dask_scheduler):
        return {
            name: float(tp.all_durations.get("compute", 0.0))
            for name, tp in dask_scheduler.task_prefixes.items()
        }

    return client.run_on_scheduler(read)


def test_likelihood_is_lazy_and_runs_on_the_users_client(
    user_client, reference_dir, caplog, monkeypatch
) -> None:
    import distributed

    started = []
    real = distributed.LocalCluster.__init__

    def spy(self, *args, **kwargs):  # any second cluster would be seen here
        started.append(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(distributed.LocalCluster, "__init__", spy)
    before = _task_prefixes(user_client)
    images = cd.open_images(reference_dir / "particles", n_stacks=2)
    templates = cd.open_templates(reference_dir / "templates")
    ds = cd.likelihood(
        images,
        templates,
        max_displacement_pixels=1.5,
        n_displacements_x=3,
        n_displacements_y=3,
        integrated_likelihood=True,
    )
    assert isinstance(ds, xr.Dataset)
    for name in ("cross_correlation", "optimal_template", "log_likelihood_integrated_fourier"):
        assert isinstance(ds[name].data, da.Array), name  # nothing computed yet
        assert ds[name].dims == ("structure", "image")
    assert list(ds["structure"].values) == ["1uao"]
    assert ds.sizes == {"structure": 1, "image": 24}
    assert _task_prefixes(user_client) == before

    result = ds.compute()  # dask's default scheduler: the user's client
    after = _task_prefixes(user_client)
    # the graph's tasks ran on the user's scheduler (keys keep our layer names)
    ours = [n for n in after if n.startswith("best-pose") and after[n] > before.get(n, 0.0)]
    assert ours, sorted(after)
    assert sum(after.values()) > sum(before.values())
    assert not started, "a second cluster was started"
    ref = np.load(reference_dir / "numpy" / "outputs.npz")
    np.testing.assert_allclose(
        result["cross_correlation"][0], ref["t0_cross_correlation"], rtol=0, atol=1e-5
    )
    for ours, theirs in (
        ("optimal_template", "t0_optimal_template"),
        ("optimal_displacement_x", "t0_optimal_displacement_x"),
        ("optimal_displacement_y", "t0_optimal_displacement_y"),
        ("optimal_inplane_rotation", "t0_optimal_inplane_rotation"),
    ):
        np.testing.assert_array_equal(result[ours][0].values, ref[theirs], err_msg=ours)
    assert np.isfinite(result["log_likelihood_integrated_fourier"]).all()
    names = result["image_name"].values
    assert names[0] == "particles_fourier_stack_000000:0" and names[23].endswith(":11")
    assert list(result["stack"].values) == [0] * 12 + [1] * 12


def test_write_likelihood_uses_the_active_client(
    user_client, reference_dir, tmp_path, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="cryolike_dask"):
        report = cd.write_likelihood(
            reference_dir / "particles",
            reference_dir / "templates",
            tmp_path / "out",
            n_stacks=2,
            max_displacement_pixels=1.5,
            n_displacements_x=3,
            n_displacements_y=3,
            progress=False,
        )
    assert "using the active Dask client" in caplog.text
    assert "starting a LocalCluster" not in caplog.text
    assert report.blocks_computed > 0 and report.stacks_exported == 2
    ref = np.load(reference_dir / "numpy" / "outputs.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated, xarray-ready: no warning at all
        ds = xr.open_zarr(tmp_path / "out" / "results.zarr")
    assert list(ds["structure"].values) == ["1uao"]
    assert {"image_name", "stack", "stack_row", "source_row"} <= set(ds.coords)
    assert "done" not in ds.variables  # bookkeeping lives outside the data variables
    np.testing.assert_array_equal(ds["optimal_template"][0].values, ref["t0_optimal_template"])


def test_full_and_per_template_variables(reference_dir) -> None:
    ds = cd.likelihood(
        reference_dir / "particles",
        reference_dir / "templates",
        structures="1uao",
        max_displacement_pixels=1.5,
        n_displacements_x=3,
        n_displacements_y=3,
        per_template=True,
        full_cross_correlation=True,
    )
    full = ds["cross_correlation_pose_msdw"]
    assert full.dims == ("structure", "image", "template", "displacement", "rotation")
    assert full.shape == (1, 24, 96, 9, 64)
    assert ds["displacement_x"].shape == (9,) and ds["rotation"].shape == (64,)
    small = ds.isel(image=slice(0, 5)).compute(scheduler="sync")
    per = small["per_template_cross_correlation"].values
    np.testing.assert_allclose(
        per, small["cross_correlation_pose_msdw"].max(("displacement", "rotation"))
    )
    np.testing.assert_allclose(small["cross_correlation"], per.max(axis=2), rtol=0, atol=0)


def test_unknown_structure_name_is_a_clear_error(reference_dir) -> None:
    with pytest.raises(cd.CryoLikeDaskError, match=r"no structure named 'x'.*1uao"):
        cd.likelihood(reference_dir / "particles", reference_dir / "templates", structures="x")


def test_flat_api_covers_the_workflow() -> None:
    for name in (
        "open_images",
        "open_templates",
        "likelihood",
        "write_likelihood",
        "make_templates",
        "convert_particles",
        "gather",
        "stitch",
        "plot_output_folder",
        "CryoLikeDaskError",
    ):
        assert name in cd.__all__ and hasattr(cd, name), name
    # every user-facing error derives from the one base class
    for name in cd.__all__:
        obj = getattr(cd, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and name.endswith("Error"):
            assert issubclass(obj, cd.CryoLikeDaskError), name


def test_every_output_quantity_has_one_row_and_unique_files() -> None:
    names = [q.name for q in OUTPUTS]
    assert len(names) == len(set(names))
    files = [q.file_key for q in OUTPUTS]
    assert len(files) == len(set(files))
    request = cd.OutputRequest(
        integrated=True, optimal_likelihood=True, per_template=True, full=True, pose_prior=True
    )
    assert {q.name for q in request.quantities} == set(names)


def test_run_config_uses_one_cluster_for_all_steps(
    user_client, reference_dir, tmp_path, caplog, monkeypatch
) -> None:
    import distributed
    import yaml

    started = []
    monkeypatch.setattr(
        distributed.LocalCluster, "__init__", lambda self, *a, **k: started.append(k)
    )
    config = {
        "output": "out",
        "parameters": {"file": str(reference_dir / "templates" / "parameters.npz")},
        "templates": {"inputs": [str(reference_dir / "inputs_pdb" / "1uao.pdb")]},
        "particles": {
            "mrcs": [str(reference_dir / "raw" / "particles.mrcs")],
            "star": [str(reference_dir / "raw" / "particles.star")],
            "batch_size": 12,
        },
        "likelihood": {"n_displacements_x": 3, "n_displacements_y": 3},
        "plots": False,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="cryolike_dask"):
        outputs = cd.run_config(cd.load_config(path), progress=False)
    assert not started  # templates, particles and the likelihood all ran on the user's client
    assert caplog.text.count("using the active Dask client") == 1
    assert (outputs["likelihood"] / "results.zarr").is_dir()
