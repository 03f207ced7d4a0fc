"""A GPU cluster of SLURM jobs from a login node or a JupyterHub session (dask-jobqueue).

    python deploy/slurm/adaptive.py run_config.yaml [JOBS]

Needs deploy/dask/jobqueue.yaml copied to ~/.config/dask/ (profile "slurm-gpu": one job per
GPU, one worker each with two threads and one GPU resource). The scheduler runs in this
process and needs no GPU.

``adapt()`` keeps JOBS GPU jobs (default 8) for as long as the run lasts: every worker
retires gracefully at its ``--lifetime``, before the job's walltime, and a new job is
submitted in its place. The driver sends GPU work to the workers it finds when it starts,
so the run starts once they have joined (or after ``WAIT_S`` with those that have).
"""

from __future__ import annotations

import sys

from dask_jobqueue import SLURMCluster
from distributed import Client

from cryolike_dask.config import load_config, run_config

JOBS = 8  # EDIT: how many GPUs
WAIT_S = 900.0  # how long to wait for the last jobs once the first one runs


def main(config_path: str, jobs: int = JOBS) -> None:
    cfg = load_config(config_path)  # a bad config fails here, before any job is submitted
    with SLURMCluster(config_name="slurm-gpu") as cluster, Client(cluster) as client:
        print(cluster.job_script())
        cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
        print("dashboard:", client.dashboard_link)
        client.wait_for_workers(1)  # as long as the queue takes
        try:
            client.wait_for_workers(jobs, timeout=WAIT_S)
        except TimeoutError:
            print(f"starting with {len(client.nthreads())} of {jobs} GPU workers")
        cfg.cluster.scheduler_address = cluster.scheduler_address
        run_config(cfg)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
