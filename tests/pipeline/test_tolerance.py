"""The bounded-error mode through the pipeline: every best cross-correlation within the
tolerance of the exact run's, the fingerprints apart, the option from the CLI's options."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.io.zarr_stores import ResultsStore
from cryolike_dask.pipeline import LikelihoodRun, execute
from cryolike_dask.pipeline.spec import (
    LikelihoodOptions,
    OutputRequest,
    RunConfigurationError,
    fingerprint,
)


def _run(ref, out, tolerance):
    run = LikelihoodRun(
        ref["templates"],
        ref["images"],
        out,
        (0,),
        ref["displacements"],
        OutputRequest(integrated=True, per_template=True),
        tolerance=tolerance,
    )
    execute(run, scheduler="sync", progress=False)
    g = ResultsStore.open(out / "results.zarr", mode="r").group
    return run, {
        k: np.asarray(g[k][0]) for k in g.array_keys() if g[k].ndim == 2 and k != "done"
    } | {"per_template": np.asarray(g["structure_0/per_template/cross_correlation"])}


@pytest.mark.parametrize("tolerance", [1e-3, 1e-5])
def test_results_within_the_tolerance_of_the_exact_run(ref_inputs, tmp_path, tolerance) -> None:
    exact_run, exact = _run(ref_inputs, tmp_path / "exact", None)
    run, approx = _run(ref_inputs, tmp_path / "approx", tolerance)
    # the guarantee is per pose, so per template (best over poses) and per image too, plus
    # float32 rounding of values ~0.1-1
    err = np.abs(approx["per_template"] - exact["per_template"])
    assert err.max() <= tolerance + 1e-6, err.max()
    assert (
        np.abs(approx["cross_correlation"] - exact["cross_correlation"]).max() <= tolerance + 1e-6
    )
    same = approx["optimal_template"] == exact["optimal_template"]
    assert same.mean() >= 0.9, same.mean()
    assert fingerprint(run) != fingerprint(exact_run)
    assert fingerprint(run)["tolerance"] == tolerance
    assert "tolerance" not in fingerprint(exact_run)  # exact runs' fingerprints unchanged


def test_tolerance_option_is_checked(ref_inputs) -> None:
    opts = LikelihoodOptions.parse(tolerance=1e-4)
    run = opts.build(ref_inputs["templates"], ref_inputs["images"], ref_inputs["params"], None)
    assert run.tolerance == 1e-4
    with pytest.raises(RunConfigurationError, match="tolerance"):
        LikelihoodOptions.parse(tolerance=0)
    with pytest.raises(RunConfigurationError, match="tolerance"):
        LikelihoodOptions.parse(tolerance=2.0)
