"""The GPU path on two emulated GPUs (the strict CuPy stand-in): one worker per GPU, decisions
on the workers, the driver never touching a device, results equal to the CPU's."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import cryolike_dask as cd
from cryolike_dask.pipeline import cluster as cl
from tests.standin import STANDIN_PATH, standin_environ

ARGS = dict(max_displacement_pixels=1.5, n_displacements_x=3, n_displacements_y=3)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert cl.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,0")  # CUDA stops at an invalid entry
    assert cl.visible_gpus() == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cl.visible_gpus() == []


def test_gpu_requested_where_there_is_none(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(cd.ClusterError, match="no CUDA GPU on this machine"):
        cl.resolve_device("gpu")
    assert cl.resolve_device("auto") == "cpu"


@pytest.fixture(scope="module")
def two_gpus():
    """A local GPU cluster (no dask-cuda here: one Nanny per GPU) on 2 emulated GPUs."""
    env = standin_environ(n_gpus=2, memory_bytes=4 * 2**30)
    keys = ("PYTHONPATH", "CRYOLIKE_STANDIN_GPUS", "CRYOLIKE_STANDIN_GPU_MEMORY")
    saved = {k: os.environ.get(k) for k in (*keys, "CUDA_VISIBLE_DEVICES")}
    os.environ.update({k: env[k] for k in keys})
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"  # the node's GPUs, as SLURM would set them
    sys.path.insert(0, STANDIN_PATH)  # spawned workers take the parent's sys.path
    from distributed import Client

    cluster = cl.gpu_cluster(cl.ClusterOptions(dashboard=False, memory_limit="3GB"))
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()
    sys.path.remove(STANDIN_PATH)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stats():
    import cupy

    return cupy._standin.stats()


def test_one_worker_per_gpu_each_on_its_own_device(two_gpus) -> None:
    workers = cl.describe_workers(two_gpus)
    assert len(workers) == 2 and all(w.gpu and w.nthreads == 2 for w in workers)
    # one GPU resource each: one kernel at a time, the second thread loads and stores
    assert all(w.resources == {"GPU": 1} and w.kernel_slots == 1 for w in workers)
    assert cl.kernel_resources(workers, "gpu") == {"GPU": 1}
    assert cl.kernel_resources(workers, "cpu") is None
    assert sorted(w.device for w in workers) == ["0", "1"]  # each sees another GPU first
    physical = sorted(s["physical_device"] for s in two_gpus.run(_stats).values())
    assert physical == [0, 1]
    assert cl.resolve_device("auto", two_gpus, workers) == "gpu"


def test_pipeline_on_gpus_equals_cpu(two_gpus, reference_dir, tmp_path) -> None:
    assert "cupy" not in sys.modules  # the driver has never imported CuPy
    cpu = cd.write_likelihood(
        reference_dir / "particles",
        reference_dir / "templates",
        tmp_path / "cpu",
        n_stacks=2,
        integrated_likelihood=True,
        optimal_pose_likelihood=True,
        device="cpu",
        cluster=cd.ClusterOptions(scheduler="sync"),
        progress=False,
        **ARGS,
    )
    two_gpus.run(lambda: _stats() and __import__("cupy")._standin.reset())
    gpu = cd.write_likelihood(
        reference_dir / "particles",
        reference_dir / "templates",
        tmp_path / "gpu",
        n_stacks=2,
        integrated_likelihood=True,
        optimal_pose_likelihood=True,
        device="gpu",
        images_per_block=6,
        client=two_gpus,
        progress=False,
        **ARGS,
    )
    assert gpu.blocks_computed == 4 and cpu.blocks_computed > 0
    assert "cupy" not in sys.modules  # the driver planned and ran it without a device
    import xarray as xr

    a = xr.open_zarr(tmp_path / "cpu" / "results.zarr").compute()
    b = xr.open_zarr(tmp_path / "gpu" / "results.zarr").compute()
    np.testing.assert_allclose(b.cross_correlation, a.cross_correlation, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(b.optimal_template, a.optimal_template)
    np.testing.assert_array_equal(b.optimal_inplane_rotation, a.optimal_inplane_rotation)
    np.testing.assert_allclose(
        b.log_likelihood_integrated_fourier, a.log_likelihood_integrated_fourier, atol=1e-3
    )
    np.testing.assert_allclose(
        b.log_likelihood_optimal_fourier, a.log_likelihood_optimal_fourier, rtol=1e-5
    )
    stats = two_gpus.run(_stats)
    assert all(s["device_calls"] > 0 for s in stats.values())  # both GPUs worked
    peak = max(s["peak_bytes"] for s in stats.values())
    assert 0 < peak <= gpu.plan.task_bytes, (peak, gpu.plan.task_bytes)


def test_kernel_resources_only_when_every_gpu_worker_has_one() -> None:
    """A task asking for a resource no worker has would never run: our own clusters have it,
    a user's plain cluster does not (then kernels share a worker's GPU by its threads)."""
    with_gpu = cl.WorkerInfo("a", 2, 0, True, 2**30, 2**30, "0", {"GPU": 1})
    plain = cl.WorkerInfo("b", 2, 0, True, 2**30, 2**30, "1")
    cpu_only = cl.WorkerInfo("c", 4, 0, False)
    assert cl.kernel_resources([with_gpu, cpu_only], "gpu") == {"GPU": 1}
    assert cl.kernel_resources([with_gpu, plain], "gpu") is None
    assert (with_gpu.kernel_slots, plain.kernel_slots, cpu_only.kernel_slots) == (1, 2, 4)
    # the GPU's memory goes to one kernel with the resource, to each thread's without
    host = cl.machine_memory() // 2  # no memory limit: the machine's, per thread
    assert cl.worker_memory(object(), "gpu", [with_gpu]) == int(min(host, 2**30) * 0.8)
    assert cl.worker_memory(object(), "gpu", [plain]) == int(min(host, 2**29) * 0.8)
