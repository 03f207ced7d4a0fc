"""Very large likelihood runs start only when confirmed.

Before any input is read or output written, the driver estimates the run: its pose
evaluations, the hours they take on the cluster's workers, the bytes of its outputs and the
memory of one kernel task. A run over :data:`MAX_HOURS` hours or :data:`MAX_OUTPUT_BYTES` of
outputs is refused with that estimate unless confirmed (``--yes``, ``likelihood.yes: true``
in a run config, ``yes=True`` in Python): a mistyped displacement grid or structure list
should not take a shared cluster for weeks.

The hours are those of the kernel's contraction (``8 M S D N (W/2 + 1)`` real flops): on CPU
workers at :data:`CPU_EFFICIENCY` of this machine's measured complex GEMM rate times the
workers' threads, on GPU workers at :data:`GPU_POSE_RATE` pose evaluations per second per GPU
worker (docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cryolike_dask.pipeline.spec import LikelihoodRun, RunConfigurationError

#: Estimated wall-clock hours on the cluster's workers above which a run needs confirming.
MAX_HOURS = 24.0
#: Bytes of outputs (``results.zarr`` and the ``.pt`` copies) above which it needs confirming.
MAX_OUTPUT_BYTES = 2**40
#: The kernel's share of the complex GEMM rate on a CPU (docs/performance.md).
CPU_EFFICIENCY = 0.4
#: Pose evaluations per second of one GPU worker (an H100/H200, docs/performance.md).
GPU_POSE_RATE = 3e10

logger = logging.getLogger(__name__)


class LargeRunError(RunConfigurationError):
    """A very large run that was not confirmed (``--yes``)."""


def estimate_hours(run: LikelihoodRun, workers: Sequence[Any] | None) -> tuple[float, str]:
    """Estimated wall-clock hours of the run's kernels on ``workers`` (as
    :func:`~cryolike_dask.pipeline.cluster.describe_workers` gives them; ``None``: one local
    thread), and where that holds (``"on 4 CPU thread(s)"``)."""
    from cryolike_dask.kernels import backend
    from cryolike_dask.kernels.cross_correlation import kernel_flops

    if run.device == "gpu":
        gpus = [w for w in workers or () if getattr(w, "gpu", False)]
        n = max(1, len(gpus))
        return run.pose_evaluations() / (GPU_POSE_RATE * n) / 3600, f"on {n} GPU worker(s)"
    grid = run.parameters.polar_grid
    n_t = sum(run.templates.n_templates(k) for k in run.structures)
    flops = kernel_flops(
        run.images.n_images, n_t, run.displacements.n_displacements, grid.n_shells, grid.n_inplanes
    )
    threads = max(1, sum(w.nthreads for w in workers) if workers else 1)
    seconds = flops / (CPU_EFFICIENCY * backend.gemm_rate() * threads)
    return seconds / 3600, f"on {threads} CPU thread(s) at this machine's GEMM rate"


def check_confirmed(run: LikelihoodRun, plan: Any, workers: Sequence[Any] | None) -> None:
    """Refuse a run over :data:`MAX_HOURS` or :data:`MAX_OUTPUT_BYTES` unless ``run.yes``;
    the message gives the estimate (pose evaluations, hours, output GiB, memory per task)."""
    from cryolike_dask.pipeline.driver import output_bytes

    hours, where = estimate_hours(run, workers)
    out = output_bytes(run)
    over = []
    if hours > MAX_HOURS:
        over.append(f"{MAX_HOURS:g} h")
    if out >= MAX_OUTPUT_BYTES:
        over.append(f"{MAX_OUTPUT_BYTES / 2**30:g} GiB of outputs")
    if not over:
        return
    estimate = (
        f"~{run.pose_evaluations():.3g} pose evaluations, ~{hours:.3g} h {where}, "
        f"~{out / 2**30:.3g} GiB of outputs, ~{plan.task_bytes / 2**30:.2f} GiB per kernel task"
    )
    if run.yes:
        logger.info("a very large run, confirmed: %s", estimate)
        return
    raise LargeRunError(
        f"a very large run: {estimate} (over {' and '.join(over)}); pass --yes "
        "(likelihood.yes: true in a run config, yes=True in Python) if you mean it, or fewer "
        "displacements, templates or images"
    )


__all__ = [
    "CPU_EFFICIENCY",
    "GPU_POSE_RATE",
    "MAX_HOURS",
    "MAX_OUTPUT_BYTES",
    "LargeRunError",
    "check_confirmed",
    "estimate_hours",
]
