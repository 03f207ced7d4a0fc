"""``python -m cryolike_dask``: the ``cryolike-dask`` command line."""

from cryolike_dask.cli import run

if __name__ == "__main__":
    run()
