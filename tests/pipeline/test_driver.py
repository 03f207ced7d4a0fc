"""The driver: results in Zarr and CryoLike files, resume, --skip-exist checks, structures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cryolike_dask.grids import DisplacementGrid
from cryolike_dask.io.exports import record_path
from cryolike_dask.io.outputs import BY_NAME
from cryolike_dask.io.sources import CryoLikeTemplates
from cryolike_dask.io.zarr_stores import ResultsStore
from cryolike_dask.pipeline import LikelihoodRun, RunConfigurationError, execute
from cryolike_dask.pipeline.spec import OutputRequest

ALL = OutputRequest(
    optimal_pose=True, integrated=True, optimal_likelihood=True, per_template=True, full=True
)


def _run(ref, out: Path, **kw) -> LikelihoodRun:
    args = dict(
        templates=ref["templates"],
        images=ref["images"],
        output=out,
        structures=(0,),
        displacements=ref["displacements"],
        request=ALL,
        images_per_block=5,
        templates_per_block=30,
    )
    args.update(kw)
    return LikelihoodRun(**args)


def _pt_files(out: Path) -> dict[str, np.ndarray]:
    files = {}
    for p in sorted(out.rglob("*.pt")):
        obj = torch.load(p, weights_only=False)
        files[str(p.relative_to(out))] = np.asarray(obj)
    return files


def _quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def uninterrupted(ref_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    report = execute(_run(ref_inputs, out), scheduler="sync", progress=False)
    return out, report, _pt_files(out)


def test_writes_results_store_and_cryolike_files(uninterrupted, ref_inputs) -> None:
    out, report, files = uninterrupted
    assert report.blocks_computed == 5 and report.stacks_exported == 2
    store = ResultsStore.open(out / "results.zarr", mode="r")
    assert store.done().tolist() == [[ALL.bits] * 5]
    cc = store.group["cross_correlation"]
    assert cc.metadata.dimension_names == ("structure", "image") and cc.shape == (1, 24)
    np.testing.assert_allclose(cc[0], ref_inputs["outputs"]["t0_cross_correlation"], atol=1e-6)
    full = store.array(BY_NAME["cross_correlation_pose_msdw"], 0)
    assert full.shape == (24, 96, 9, 64) and full.chunks == (5, 30, 9, 64)
    np.testing.assert_array_equal(
        files["template0/cross_correlation/cross_correlation_pose_msdw_stack_000001.pt"], full[12:]
    )
    per = files["template0/per_template/cross_correlation_stack_000000.pt"]
    assert per.shape == (12, 96)
    np.testing.assert_allclose(per, full[:12].max(axis=(2, 3)), rtol=0, atol=0)


def test_resume_after_interruption(uninterrupted, ref_inputs, tmp_path) -> None:
    _, _, expected = uninterrupted
    run = _run(ref_inputs, tmp_path, max_tasks=8)  # 4 template blocks: 2 image blocks per graph
    first = execute(run, scheduler="sync", progress=False, stop_after_batches=1)
    assert first.blocks_computed == 2
    done = ResultsStore.open(tmp_path / "results.zarr", mode="r").done()[0]
    assert list(done) == [ALL.bits, ALL.bits, 0, 0, 0]
    # stack 0 (images 0..11) needs blocks 0..2: not written yet
    assert not (tmp_path / "template0/optimal_pose/optimal_template_stack_000000.pt").exists()
    second = execute(
        LikelihoodRun(**{**run.__dict__, "skip_exist": True}),
        scheduler="sync",
        progress=False,
    )
    assert (second.blocks_computed, second.blocks_skipped) == (3, 2)
    got = _pt_files(tmp_path)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_skip_exist_checks_content(uninterrupted, ref_inputs, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[0], out)
    run = _run(ref_inputs, out, skip_exist=True)
    again = execute(run, scheduler="sync", progress=False)
    assert (again.blocks_computed, again.stacks_exported, again.stacks_skipped) == (0, 0, 2)
    victim = out / "template0/log_likelihood/log_likelihood_optimal_fourier_stack_000001.pt"
    data = bytearray(victim.read_bytes())
    data[-30] ^= 0xFF  # corrupt one byte: the file still exists with the same size
    victim.write_bytes(bytes(data))
    repaired = execute(run, scheduler="sync", progress=False)
    assert (repaired.blocks_computed, repaired.stacks_exported, repaired.stacks_skipped) == (
        0,
        1,
        1,
    )
    key = str(victim.relative_to(out))
    np.testing.assert_array_equal(_pt_files(out)[key], uninterrupted[2][key])
    assert record_path(run_layout(out), 0, 1).is_file()


def run_layout(out):
    from cryolike_dask.io.cryolike import OutputLayout

    return OutputLayout(out)


def test_another_run_is_refused_and_overwrite_replaces_it(
    uninterrupted, ref_inputs, tmp_path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = DisplacementGrid.from_search(1.0, 3, 3, 1.5)
    for skip in (True, False):
        with pytest.raises(RunConfigurationError, match=r"another run \(other displacements\)"):
            execute(
                _run(ref_inputs, out, displacements=other, skip_exist=skip),
                scheduler="sync",
                progress=False,
            )
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # refused before anything was written
    report = execute(
        _run(ref_inputs, out, displacements=other, overwrite=True, request=OutputRequest()),
        scheduler="sync",
        progress=False,
    )
    assert report.blocks_computed == 5 and len(report.removed) >= 4
    # nothing of the old run is left: no per-template, full or likelihood files
    left = {str(p.relative_to(out)) for p in out.rglob("*.pt")}
    assert left == {"displacements_set.pt"} | {
        f"template0/{sub}_stack_00000{i}.pt"
        for i in (0, 1)
        for sub in (
            "cross_correlation/cross_correlation",
            "optimal_pose/optimal_template",
            "optimal_pose/optimal_displacement_x",
            "optimal_pose/optimal_displacement_y",
            "optimal_pose/optimal_inplane_rotation",
        )
    }
    disp = torch.load(out / "displacements_set.pt", weights_only=False)
    np.testing.assert_allclose(disp, other.as_array())


def test_several_structures_and_bad_index(ref_inputs, tmp_path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    original = ref_inputs["templates"].files[0]
    t = torch.load(original)
    shutil.copy(original, folder / "templates_fourier_a.pt")
    # a different structure: the same model, low-pass filtered (a conjugate copy would not
    # do: it is each projection turned by 180°, which the rotation search already covers)
    radii = torch.from_numpy(np.array(ref_inputs["params"].polar_grid.radii))
    blurred = t * torch.exp(-0.05 * radii**2)[None, :, None].to(t.dtype)
    torch.save(blurred, folder / "templates_fourier_blurred.pt")
    np.save(
        folder / "template_file_list.npy",
        np.array([str(folder / "templates_fourier_a.pt"), "templates_fourier_blurred.pt"]),
    )
    templates = CryoLikeTemplates.open(folder, ref_inputs["params"])
    assert templates.names == ("a", "blurred")
    out = tmp_path / "out"
    request = OutputRequest(integrated=True)
    report = execute(
        _run(ref_inputs, out, templates=templates, structures=(0, 1), request=request),
        scheduler="sync",
        progress=False,
    )
    assert report.blocks_computed == 10
    store = ResultsStore.open(out / "results.zarr", mode="r")
    assert store.structures == ["a", "blurred"]
    ll = store.group["log_likelihood_integrated_fourier"][:]
    assert np.isfinite(ll).all() and np.abs(ll[0] - ll[1]).max() > 1.0
    for k in (0, 1):
        assert (out / f"template{k}/optimal_pose/optimal_template_stack_000001.pt").is_file()
    with pytest.raises(RunConfigurationError, match="i_template 2 is out of range"):
        execute(
            _run(ref_inputs, out, templates=templates, structures=(2,)),
            scheduler="sync",
            progress=False,
        )


def test_connects_to_a_running_scheduler(uninterrupted, ref_inputs, local_client, tmp_path) -> None:
    from cryolike_dask.pipeline import ClusterOptions, run_likelihood

    options = ClusterOptions(scheduler_address=local_client.scheduler.address)
    report = run_likelihood(_run(ref_inputs, tmp_path), options, progress=False)
    assert report.blocks_computed == 5
    got, expected = _pt_files(tmp_path), uninterrupted[2]
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-3, err_msg=key)
