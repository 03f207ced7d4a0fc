"""Run an optimal-pose likelihood on a synthetic Zarr store and print the peak RSS (MiB).

Usage: python -m tests.pipeline.memory_probe IMAGES_ZARR TEMPLATES_ZARR OUTPUT
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.io.sources import ZarrImages, ZarrTemplates
from cryolike_dask.pipeline import LikelihoodRun, execute
from cryolike_dask.pipeline.spec import OutputRequest


def main() -> None:
    images, templates, out = (Path(a) for a in sys.argv[1:4])
    t = ZarrTemplates.open(templates)
    run = LikelihoodRun(
        templates=t,
        images=ZarrImages.open(images, t.parameters),
        output=out,
        displacements=DisplacementGrid.from_search(1, 3, 3, 1.0),
        request=OutputRequest(integrated=True),
        images_per_block=500,
        templates_per_block=32,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = execute(run, scheduler="sync", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"baseline_mib": before, "peak_mib": peak, "blocks": report.blocks_computed}))


if __name__ == "__main__":
    main()
