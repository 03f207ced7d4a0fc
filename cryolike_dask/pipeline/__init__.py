"""Orchestration: the run spec, block planning, the Dask graph, the executor and driver.

No math here: the graph maps :mod:`cryolike_dask.kernels` over template-block × image-block
pairs and reduces the partials with the kernels' monoid.
"""

from cryolike_dask.pipeline.cluster import ClusterOptions, get_client
from cryolike_dask.pipeline.driver import RunReport, execute, run_likelihood
from cryolike_dask.pipeline.graph import BatchGraph, build_batch_graph
from cryolike_dask.pipeline.plan import BlockPlan, plan_blocks
from cryolike_dask.pipeline.spec import (
    InputDataError,
    LikelihoodOptions,
    LikelihoodRun,
    OutputRequest,
    RunConfigurationError,
)

__all__ = [
    "BatchGraph",
    "BlockPlan",
    "ClusterOptions",
    "InputDataError",
    "LikelihoodOptions",
    "LikelihoodRun",
    "OutputRequest",
    "RunConfigurationError",
    "RunReport",
    "build_batch_graph",
    "execute",
    "get_client",
    "plan_blocks",
    "run_likelihood",
]
