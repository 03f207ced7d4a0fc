"""``python -m cryolike_dask`` runs the command line."""

import sys

from cryolike_dask.cli import main

if __name__ == "__main__":
    sys.exit(main())
