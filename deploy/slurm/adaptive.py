"""An adaptive cluster from a login node or a JupyterHub session (SLURM, GPU workers).

    python deploy/slurm/adaptive.py run_config.yaml

Jobs are submitted as work appears and released when idle (between 0 and 8 GPU jobs here).
Needs deploy/dask/jobqueue.yaml copied to ~/.config/dask/ (profile "slurm-gpu").
"""

import sys

from dask_jobqueue import SLURMCluster
from distributed import Client

from cryolike_dask.config import load_config, run_config


def main(config_path: str) -> None:
    cluster = SLURMCluster(config_name="slurm-gpu")
    print(cluster.job_script())
    cluster.adapt(minimum_jobs=0, maximum_jobs=8)  # EDIT: how many GPUs at most
    client = Client(cluster)
    print("dashboard:", client.dashboard_link)
    cfg = load_config(config_path)
    cfg.cluster.scheduler_address = cluster.scheduler_address
    run_config(cfg)
    client.close()
    cluster.close()


if __name__ == "__main__":
    main(sys.argv[1])
