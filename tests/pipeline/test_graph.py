"""The batch graph: block sizes do not change results; building it is lazy and bounded."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.io.zarr_stores import StackInfo
from cryolike_dask.kernels import BlockOutputs
from cryolike_dask.params import ImageParameters
from cryolike_dask.pipeline import tasks
from cryolike_dask.pipeline.graph import build_batch_graph
from cryolike_dask.pipeline.plan import MAX_TASKS_PER_GRAPH, plan_blocks
from cryolike_dask.pipeline.spec import OutputRequest

ALL = OutputRequest(integrated=True, optimal_likelihood=True, per_template=True, full=True)


def _settings(ref, **outputs):
    d = ref["displacements"]
    return tasks.KernelSettings(
        ref["params"],
        tuple(zip(d.x.tolist(), d.y.tolist(), strict=True)),
        "single",
        "cpu",
        BlockOutputs(**outputs),
    )


def _ranges(n, b):
    return [(a, min(n, a + b)) for a in range(0, n, b)]


def _compute(ref, ib, tb, split_every=8, scheduler="sync"):
    settings = _settings(ref, full=True, integrated_likelihood=True)
    g = build_batch_graph(
        settings,
        ref["templates"],
        0,
        ref["images"],
        _ranges(24, ib),
        _ranges(96, tb),
        ALL,
        split_every=split_every,
    )
    return g, dask.compute(g.outputs, scheduler=scheduler)[0]


def _assert_same(a, b):
    assert a.keys() == b.keys() == {q.name for q in ALL.quantities}
    for key in a:
        if key == "log_likelihood_optimal_fourier":
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
        elif "log_likelihood" in key:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-3)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a["optimal_template"], b["optimal_template"])


def test_one_block_equals_many_small_blocks(ref_inputs) -> None:
    g1, whole = _compute(ref_inputs, 24, 96)
    g2, small = _compute(ref_inputs, 7, 5, split_every=3)
    assert (g1.n_kernel_tasks, g2.n_kernel_tasks) == (1, 4 * 20)
    _assert_same(whole, small)
    # the single-block result is CryoLike's (tested in detail in tests/kernels)
    np.testing.assert_array_equal(
        whole["optimal_template"], ref_inputs["outputs"]["t0_optimal_template"]
    )


def test_split_every_does_not_matter(ref_inputs) -> None:
    _, a = _compute(ref_inputs, 5, 7, split_every=2)
    _, b = _compute(ref_inputs, 5, 7, split_every=16)
    _assert_same(a, b)


def test_many_blocks_on_local_cluster(ref_inputs, local_client) -> None:
    _, whole = _compute(ref_inputs, 24, 96)
    settings = _settings(ref_inputs, full=True, integrated_likelihood=True)
    g = build_batch_graph(
        settings,
        ref_inputs["templates"],
        0,
        ref_inputs["images"],
        _ranges(24, 7),
        _ranges(96, 5),
        ALL,
        split_every=3,
    )
    result = dask.compute(g.outputs, scheduler=local_client.get)[0]
    _assert_same(whole, result)
    # the work ran in two worker processes
    assert len(local_client.scheduler_info()["workers"]) == 2


class _Placeholder(ImageSource, TemplateSource):
    """Sources of the right sizes that fail if anything is read."""

    def read(self, *args):
        raise AssertionError("building a graph must not read data")

    def fingerprint(self, *args):
        return {"placeholder": True}

    def n_templates(self, structure):
        return 10_000


def test_planning_a_huge_run_is_lazy_and_bounded() -> None:
    params = ImageParameters.from_values(128, 1.0, n_inplanes=256)
    grid = params.polar_grid
    n_images, n_templates = 10**6, 10**4
    disp = DisplacementGrid.from_search(2, 5, 5, 1.0)
    plan = plan_blocks(
        n_images, n_templates, grid.n_shells, grid.n_inplanes, 25, memory_bytes=8 * 2**30
    )
    batches = plan.batches()
    assert sorted(b for batch in batches for b in batch) == list(range(plan.n_image_blocks))
    assert max(len(b) for b in batches) * plan.n_template_blocks <= MAX_TASKS_PER_GRAPH
    placeholder = _Placeholder.__new__(_Placeholder)
    object.__setattr__(placeholder, "parameters", params)
    object.__setattr__(placeholder, "stacks", (StackInfo("s", 0, n_images),))
    object.__setattr__(placeholder, "names", ("big",))
    settings = tasks.KernelSettings(
        params, tuple(zip(disp.x.tolist(), disp.y.tolist(), strict=True))
    )
    image_ranges = plan.image_ranges()

    def no_compute(*args, **kwargs):
        raise AssertionError("building the graph must not compute anything")

    with dask.config.set(scheduler=no_compute):
        g = build_batch_graph(
            settings,
            placeholder,
            0,
            placeholder,
            [image_ranges[b] for b in batches[0]],
            plan.template_ranges(),
            OutputRequest(optimal_likelihood=True),
        )
    layers = g.outputs["cross_correlation"].dask.layers
    kernel_tasks = sum(len(layer) for name, layer in layers.items() if name.startswith("cc-kernel"))
    assert kernel_tasks == g.n_kernel_tasks <= MAX_TASKS_PER_GRAPH
    assert g.outputs["cross_correlation"].shape == (
        sum(b - a for a, b in (image_ranges[i] for i in batches[0])),
    )


def test_reading_errors_surface_from_tasks(ref_inputs) -> None:
    settings = _settings(ref_inputs)
    bad = _Placeholder.__new__(_Placeholder)
    object.__setattr__(bad, "parameters", ref_inputs["params"])
    object.__setattr__(bad, "stacks", (StackInfo("s", 0, 24),))
    g = build_batch_graph(
        settings, ref_inputs["templates"], 0, bad, [(0, 24)], [(0, 96)], OutputRequest()
    )
    with pytest.raises(AssertionError, match="must not read"):
        g.outputs["cross_correlation"].compute(scheduler="sync")


def test_tasks_per_image_block_are_few() -> None:
    """Load, one kernel per template block, one reduction and one store task per image block
    (plus one marker per unit of several blocks): the scheduler's cost per kernel task stays
    small however many blocks a batch has."""
    from cryolike_dask.pipeline.graph import store_units

    params = ImageParameters.from_values(32, 1.5, n_inplanes=16)
    placeholder = _Placeholder.__new__(_Placeholder)
    object.__setattr__(placeholder, "parameters", params)
    object.__setattr__(placeholder, "stacks", (StackInfo("s", 0, 100),))
    object.__setattr__(placeholder, "names", ("one",))
    settings = tasks.KernelSettings(params, ((0.0, 0.0),))
    request = OutputRequest()
    image_ranges, template_ranges = _ranges(100, 10), _ranges(40, 10)  # 10 × 4 blocks
    targets = {q.name: f"array:{q.name}" for q in request.quantities}
    for split_every, reduction_tasks in ((8, 1), (2, 3)):  # a tree of 2 + 1 past split_every
        g = build_batch_graph(
            settings, placeholder, 0, placeholder, image_ranges, template_ranges, request,
            split_every=split_every,
        )  # fmt: skip
        assert g.n_tasks == 10 * (1 + 4 + reduction_tasks)
        one_block_units = store_units(g, request, targets, [[i] for i in range(10)])
        assert len(one_block_units[0].dask) == g.n_tasks + 10  # one store task per block
        paired = store_units(g, request, targets, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])
        assert len(paired[0].dask) == g.n_tasks + 10 + 5  # and one marker per unit


def test_store_tasks_write_the_lazy_outputs(ref_inputs, tmp_path) -> None:
    """What the store tasks write into Zarr equals the lazy outputs of the same graph."""
    import zarr

    from cryolike_dask.pipeline.graph import store_units

    settings = _settings(ref_inputs, full=True, integrated_likelihood=True)
    image_ranges, template_ranges = _ranges(24, 7), _ranges(96, 40)
    g = build_batch_graph(
        settings, ref_inputs["templates"], 0, ref_inputs["images"], image_ranges,
        template_ranges, ALL, split_every=2,
    )  # fmt: skip
    root = zarr.open_group(tmp_path / "out.zarr", mode="w")
    targets = {}
    for q in ALL.quantities:
        dtype = np.int64 if q.kind == "int" else np.float32
        if q.scope == "image":
            shape, chunks = (2, 24), (1, 7)
        elif q.scope == "template":
            shape, chunks = (24, 96), (7, 40)
        else:
            shape = (24, 96, len(settings.displacements), settings.parameters.n_inplanes)
            chunks = (7, 40, *shape[2:])
        targets[q.name] = root.create_array(q.name, shape=shape, chunks=chunks, dtype=dtype)
    units = store_units(g, ALL, targets, [[0, 1], [2], [3]])
    dask.compute(*units, scheduler="sync")
    lazy = dask.compute(g.outputs, scheduler="sync")[0]
    for q in ALL.quantities:
        written = targets[q.name][0] if q.scope == "image" else targets[q.name][:]
        np.testing.assert_array_equal(written, lazy[q.name].astype(written.dtype), q.name)
        if q.scope == "image":  # structure 0's row only
            assert not np.any(targets[q.name][1]), q.name


def test_kernels_take_the_gpu_resource_one_at_a_time(ref_inputs, monkeypatch, tmp_path) -> None:
    """On a worker with two threads and one ``GPU`` resource, the driver's kernel tasks
    never overlap (Dask keeps the annotation of our materialised layers when it computes the
    store units) while loads use the other thread. The lazy outputs go through dask.array's
    optimisation, which drops annotations (dask/dask#7036): the lazy dataset is therefore
    planned without the resource (see ``test_lazy_dataset_is_planned_per_thread``)."""
    import itertools
    import threading
    import time

    import zarr
    from distributed import Client, LocalCluster

    from cryolike_dask.pipeline.executor import Batch, Executor
    from cryolike_dask.pipeline.graph import store_units

    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    real_kernel, real_load = tasks.correlate_task, tasks.load_image_block

    def timed(kind, fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            time.sleep(0.05)
            out = fn(*args)
            with lock:
                spans.append((kind, t0, time.perf_counter()))
            return out

        return wrapper

    monkeypatch.setattr(tasks, "correlate_task", timed("kernel", real_kernel))
    monkeypatch.setattr(tasks, "load_image_block", timed("load", real_load))
    settings = _settings(ref_inputs)
    request = OutputRequest()
    g = build_batch_graph(
        settings, ref_inputs["templates"], 0, ref_inputs["images"], _ranges(24, 4),
        _ranges(96, 32), request, kernel_resources={"GPU": 1},
    )  # fmt: skip
    root = zarr.open_group(tmp_path / "out.zarr", mode="w")
    targets = {
        q.name: root.create_array(
            q.name, shape=(1, 24), chunks=(1, 4), dtype=np.int64 if q.kind == "int" else "f4"
        )
        for q in request.quantities
    }
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 1},
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        units = store_units(g, request, targets, [[i] for i in range(6)])
        Executor(client, progress=False).run_batches([Batch([(u, 1) for u in units])])
    kernels = sorted((a, b) for kind, a, b in spans if kind == "kernel")
    assert len(kernels) == 18  # 6 image blocks × 3 template blocks
    assert all(a2 >= b1 for (_, b1), (a2, _) in itertools.pairwise(kernels))
    loads = [(a, b) for kind, a, b in spans if kind == "load"]
    # a load ran while a kernel did: the second thread was used
    assert any(a < kb and ka < b for a, b in loads for ka, kb in kernels)
    lazy = dask.compute(g.outputs["optimal_template"], scheduler="sync")[0]
    np.testing.assert_array_equal(targets["optimal_template"][0], lazy)


def test_lazy_dataset_is_planned_per_thread() -> None:
    """The lazy dataset cannot keep kernels to one per GPU (array optimisation drops the
    resource annotation), so it plans each kernel with a thread's share of the GPU."""
    from cryolike_dask.pipeline import cluster as cl
    from cryolike_dask.pipeline import dataset

    with_resource = cl.WorkerInfo("a", 2, 0, True, 2**30, 2**30, "0", {"GPU": 1})
    (planned,) = dataset._without_kernel_resources([with_resource])
    assert planned.kernel_slots == 2 and with_resource.kernel_slots == 1
    assert cl.worker_memory(object(), "gpu", [planned]) < cl.worker_memory(
        object(), "gpu", [with_resource]
    )
