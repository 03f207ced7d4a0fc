"""A run as a lazy ``xarray.Dataset``: the likelihood graph of every selected structure, one
dask-backed variable per requested output quantity, computed wherever the user computes it
(``.compute()``, ``.to_zarr()``, ``.persist()`` on the current Dask client).

It is the same graph the resumable driver executes batch by batch
(:func:`~cryolike_dask.pipeline.graph.build_batch_graph`), over all image blocks at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import dask.array as da
import numpy as np

from cryolike_dask.io.zarr_stores import params_to_json
from cryolike_dask.pipeline.cluster import WorkerInfo, describe_workers, resolve_device
from cryolike_dask.pipeline.driver import _cache_and_pool, kernel_settings, plan_run
from cryolike_dask.pipeline.graph import build_batch_graph
from cryolike_dask.pipeline.spec import LikelihoodRun, RunConfigurationError, validate

logger = logging.getLogger(__name__)


def _without_kernel_resources(workers: list[WorkerInfo] | None) -> list[WorkerInfo] | None:
    """The workers as the lazy dataset must plan for them: dask.array's graph optimisation
    drops resource annotations (dask/dask#7036), so a worker may run as many kernels at once
    as it has threads, each with its share of the GPU."""
    if workers is None:
        return None
    return [dataclasses.replace(w, resources={}) for w in workers]


def likelihood_dataset(run: LikelihoodRun, client: Any = None, memory_bytes: int | None = None):
    """The lazy dataset of ``run`` (``run.output`` is ignored).

    Blocks are planned for the workers of ``client`` (or this machine). Variables are named
    after the rows of :data:`~cryolike_dask.io.outputs.OUTPUTS` the request selects, with
    dims ``("structure", "image")`` for per-image quantities, ``("structure", "image",
    "template")`` per template and ``("structure", "image", "template", "displacement",
    "rotation")`` for the full tensor. Coordinates: ``structure`` (names), ``image``
    (0..M-1) with ``image_name``, ``stack``, ``stack_row``, ``source_row``; ``template``;
    ``displacement`` with ``displacement_x``/``displacement_y`` (Å); ``rotation`` (rad).
    """
    import xarray as xr

    validate(dataclasses.replace(run, output=None))
    workers = describe_workers(client) if client is not None else None
    device = resolve_device(run.device, client, workers)
    workers = _without_kernel_resources(workers)
    run = dataclasses.replace(run, device=device, output=None)
    plan, budget = plan_run(run, client, memory_bytes, workers)
    settings = kernel_settings(run, *_cache_and_pool(run, plan, budget))
    n_t = {k: run.templates.n_templates(k) for k in run.structures}
    per_structure = [q for q in run.request.quantities if q.scope != "image"]
    if per_structure and len(set(n_t.values())) > 1:
        raise RunConfigurationError(
            f"{', '.join(q.name for q in per_structure)}: the selected structures have "
            f"different template counts ({n_t}); select structures with the same count"
        )
    image_ranges = plan.image_ranges()
    graphs = []
    for k in run.structures:
        t_ranges = [
            (a, min(n_t[k], a + plan.template_block)) for a in range(0, n_t[k], plan.template_block)
        ]
        graphs.append(
            build_batch_graph(
                settings,
                run.templates,
                k,
                run.images,
                image_ranges,
                t_ranges,
                run.request,
                split_every=plan.split_every,
            )
        )
    tasks = sum(g.n_kernel_tasks for g in graphs)
    if tasks > run.max_tasks:
        logger.warning(
            "%d kernel tasks in one graph; for runs this large the resumable driver "
            "(cryolike_dask.run_likelihood or the likelihood command) submits batches",
            tasks,
        )
    grid = run.parameters.polar_grid
    ids = run.images.image_ids()
    coords: dict[str, Any] = {
        "structure": ("structure", np.array([run.templates.names[k] for k in run.structures])),
        "image": ("image", np.arange(run.images.n_images)),
        "image_name": ("image", ids.image_name),
        "stack": ("image", ids.stack),
        "stack_row": ("image", ids.stack_row),
        "source_row": ("image", ids.source_row),
    }
    data = {}
    for q in run.request.quantities:
        arr = da.stack([g.outputs[q.name] for g in graphs], axis=0)
        dims = ("structure", *q.dims) if q.scope != "image" else q.dims
        attrs = {"long_name": q.description}
        if q.units:
            attrs["units"] = q.units
        data[q.name] = xr.Variable(dims, arr, attrs=attrs)
    if per_structure:
        coords["template"] = ("template", np.arange(next(iter(n_t.values()))))
    if run.request.full:
        disp = run.displacements.as_array()
        coords["displacement"] = ("displacement", np.arange(disp.shape[1]))
        coords["displacement_x"] = ("displacement", disp[0], {"units": "Å"})
        coords["displacement_y"] = ("displacement", disp[1], {"units": "Å"})
        coords["rotation"] = ("rotation", grid.theta, {"units": "rad"})
    attrs = {
        "precision": run.precision,
        "device": run.device,
        "image_parameters": json.dumps(params_to_json(run.parameters)),
        "displacements_angstrom": json.dumps(run.displacements.as_array().tolist()),
        "kernel_tasks": tasks,
        "image_block": plan.image_block,
        "template_block": plan.template_block,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)
