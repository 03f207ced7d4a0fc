"""Reading every source form of ``reweight`` and writing its outputs (io/reweight_files.py,
the front end ``cd.reweight``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import cryolike_dask as cd
from cryolike_dask.io import reweight_files as files
from cryolike_dask.io.reweight_files import ReweightError
from cryolike_dask.io.torch_files import save_tensor
from tests.reweight.conftest import make_likelihood_folder, mixture_loglik

pytestmark = pytest.mark.filterwarnings("ignore::cryolike_dask._reweight.ReweightWarning")

QUICK = {"samples": 60, "warmup": 20, "chains": 2, "folds": 0, "plots": False, "laplace": False}


# ------------------------------------------------------------------------------ sources
def test_reads_every_form_of_a_likelihood_folder(likelihood_folder, tmp_path: Path) -> None:
    folder, ll, _ = likelihood_folder
    want = ll.astype(np.float64)
    for source in (
        folder,
        folder / "results.zarr",
        folder / "likelihood_matrix",
        folder / "likelihood_matrix" / "matrices.zarr",
    ):
        data = files.read_source(source)
        np.testing.assert_array_equal(data.loglik, want)
        assert data.structures == ["apo", "holo"]
        assert data.images.image_name[0] == f"000001@{folder / 'particles.mrcs'}"
        assert data.images.star_file is not None and data.images.source_row[5] == 5
        assert data.fingerprint is not None and data.fingerprint["parameters"]["n_inplanes"] == 8
        assert len(data.checksums["matrix_sha256"]) == 64
    # stitch's .npy/.pt next to its matrices.zarr are [structure, image]: no layout needed
    for suffix in (".npy", ".pt"):
        f = folder / "likelihood_matrix" / f"integrated_fourier_log_likelihood_matrix{suffix}"
        data = files.read_source(f)
        np.testing.assert_array_equal(data.loglik, want)
        assert data.structures == ["apo", "holo"]
        with pytest.raises(ReweightError, match="contradicts"):
            files.read_source(f, layout="images-by-structures")
    # a demo/run folder holding likelihood/
    demo = tmp_path / "demo"
    demo.mkdir()
    (folder).rename(demo / "likelihood")
    assert files.read_source(demo).loglik.shape == (60, 2)
    with pytest.raises(ReweightError, match="no optimal_fourier_log_likelihood_matrix"):
        files.read_source(demo, matrix="optimal")


def test_plain_matrix_files_need_their_layout(tmp_path: Path) -> None:
    ll = np.arange(12, dtype=np.float64).reshape(4, 3) - 20.0  # 4 images × 3 structures
    paths = {
        ".npy": tmp_path / "m.npy",
        ".txt": tmp_path / "m.txt",
        ".csv": tmp_path / "m.csv",
        ".pt": tmp_path / "m.pt",
    }
    np.save(paths[".npy"], ll)
    np.savetxt(paths[".txt"], ll)
    np.savetxt(paths[".csv"], ll, delimiter=",")
    save_tensor(ll, paths[".pt"])
    for suffix, p in paths.items():
        with pytest.raises(ReweightError, match="--layout images-by-structures") as info:
            files.read_source(p)
        assert str(p) in str(info.value) and "4×3" in str(info.value), suffix
        data = files.read_source(p, layout="images-by-structures")
        np.testing.assert_array_equal(data.loglik, ll)
        assert data.structures == ["structure_0", "structure_1", "structure_2"]
        np.testing.assert_array_equal(
            files.read_source(p, layout="structures-by-images").loglik, ll.T
        )
        neg = files.read_source(p, layout="images-by-structures", kind="negloglik")
        np.testing.assert_array_equal(neg.loglik, -ll)
        assert p.name in json.dumps(data.checksums)
    # a CSV whose header says which axis is which
    named = tmp_path / "named.csv"
    named.write_text("image,apo,holo\nimg_a,-1.5,-2.0\nimg_b,-3.0,-0.5\nimg_c,-1.0,-1.0\n")
    data = files.read_source(named)
    assert data.structures == ["apo", "holo"]
    assert list(data.images.image_name) == ["img_a", "img_b", "img_c"]
    np.testing.assert_array_equal(data.loglik[1], [-3.0, -0.5])
    with pytest.raises(ReweightError, match="contradicts"):
        files.read_source(named, layout="structures-by-images")
    transposed = tmp_path / "transposed.csv"
    transposed.write_text("structure,i0,i1,i2\napo,-1,-2,-3\nholo,-4,-5,-6\n")
    data = files.read_source(transposed)
    assert data.structures == ["apo", "holo"] and data.loglik.shape == (3, 2)
    # structure selection and renaming
    data = files.read_source(paths[".npy"], layout="images-by-structures", structures=[2, 0])
    np.testing.assert_array_equal(data.loglik, ll[:, [2, 0]])
    data = files.read_source(
        paths[".npy"], layout="images-by-structures", structure_names=["a", "b", "c"],
        structures=["c"],
    )  # fmt: skip
    assert data.structures == ["c"]
    # what is refused
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for source, match in (
        (bad, "unknown matrix file type"),
        (tmp_path / "missing.npy", "no such file"),
        (tmp_path, "not a likelihood output folder"),
    ):
        with pytest.raises(ReweightError, match=match):
            files.read_source(source, layout="images-by-structures")
    np.save(tmp_path / "vector.npy", np.zeros(5))
    with pytest.raises(ReweightError, match="1-D array"):
        files.read_source(tmp_path / "vector.npy", layout="images-by-structures")
    with pytest.raises(ReweightError, match="needs a layout"):
        files.read_source(ll)
    with pytest.raises(ReweightError, match="names repeat"):
        files.read_source(ll, layout="images-by-structures", structure_names=["a", "a", "b"])


def test_non_finite_values_are_refused_with_image_and_structure(likelihood_folder) -> None:
    folder, ll, _ = likelihood_folder
    bad = ll.copy()
    bad[7, 1] = np.nan
    bad[9, 0] = np.inf
    with pytest.raises(ReweightError) as info:
        files.read_source(bad, layout="images-by-structures", structure_names=["apo", "holo"])
    msg = str(info.value)
    assert "image 7" in msg and "structure 1 (holo)" in msg and "2 non-finite" in msg
    # an image not computed in a results store is named with its identifier
    from cryolike_dask.io.outputs import quantity
    from cryolike_dask.io.zarr_stores import ResultsStore

    store = ResultsStore.open(folder / "results.zarr", mode="r+")
    store.array(quantity("log_likelihood_integrated_fourier"))[0, 3] = np.nan
    with pytest.raises(ReweightError, match=r"image 3 \(000004@.*\) and structure 0 \(apo\)"):
        files.read_source(folder / "results.zarr")
    with pytest.raises(ReweightError, match="not computed"):
        files.read_source(folder / "results.zarr")


def test_structures_on_different_grids_are_refused(tmp_path: Path) -> None:
    ll, _ = mixture_loglik(np.random.default_rng(1), 20, [0.5, 0.3, 0.2])
    folder = make_likelihood_folder(
        tmp_path / "a", ll, ["a", "b", "c"], n_templates=[4, 4, 8], star=False, matrices=False
    )
    with pytest.raises(ReweightError, match=r"different grids.*c: 8"):
        files.read_source(folder)
    assert files.read_source(folder, structures=["a", "b"]).structures == ["a", "b"]
    # several folders are joined along structures, when they are comparable
    same = {"star": False, "matrices": False, "image_file": tmp_path / "particles.mrcs"}
    one = make_likelihood_folder(tmp_path / "one", ll[:, :1], ["a"], **same)
    two = make_likelihood_folder(tmp_path / "two", ll[:, 1:2], ["b"], **same)
    data = files.read_source([one, two])
    assert data.structures == ["a", "b"]
    np.testing.assert_array_equal(data.loglik, ll[:, :2])
    other = dict(make_likelihood_folder.__globals__["PARAMETERS"], pixel_size=[4.0, 4.0])
    three = make_likelihood_folder(tmp_path / "three", ll[:, 2:], ["c"], parameters=other, **same)
    with pytest.raises(ReweightError, match=r"different image parameters: pixel_size"):
        files.read_source([one, three])
    four = make_likelihood_folder(tmp_path / "four", ll[:, 2:], ["c"], n_templates=[8], **same)
    with pytest.raises(ReweightError, match="different grids"):
        files.read_source([one, four])
    short = make_likelihood_folder(tmp_path / "short", ll[:10, 2:], ["c"], **same)
    with pytest.raises(ReweightError, match="10 and 20 images"):
        files.read_source([one, short])
    # per-stack outputs without a store or matrices: stitch first
    (tmp_path / "raw" / "template0").mkdir(parents=True)
    with pytest.raises(ReweightError, match="cryolike-dask stitch"):
        files.read_source(tmp_path / "raw")


def test_read_vector_forms(tmp_path: Path) -> None:
    (tmp_path / "counts.txt").write_text("10\n30\n")
    (tmp_path / "named.csv").write_text("structure,count\nholo,30\napo,10\n")
    np.save(tmp_path / "counts.npy", np.array([10.0, 30.0]))
    for spec in (tmp_path / "counts.txt", tmp_path / "named.csv", tmp_path / "counts.npy"):
        values, digest = files.read_vector(spec, 2, "prior counts", ["apo", "holo"])
        np.testing.assert_array_equal(values, [10.0, 30.0])
        assert len(digest) == 64
    assert files.read_vector([1, 2], 2, "x")[1] is None
    with pytest.raises(ReweightError, match="3 values; expected 2"):
        files.read_vector([1, 2, 3], 2, "prior counts")
    with pytest.raises(ReweightError, match="no prior counts for holo"):
        (tmp_path / "partial.csv").write_text("apo,10\nother,3\n")
        files.read_vector(tmp_path / "partial.csv", 2, "prior counts", ["apo", "holo"])


# ------------------------------------------------------------------------------ front end
def test_reweight_writes_every_output(likelihood_folder, tmp_path: Path) -> None:
    folder, ll, _ = likelihood_folder
    out = tmp_path / "rw"
    with pytest.warns(cd.ReweightWarning, match="effective sample size"):
        r = cd.reweight(
            folder,
            out,
            samples=100,
            warmup=50,
            bootstrap=5,
            truth={"apo": 0.7, "holo": 0.3},
            ess_threshold=1e6,
        )
    assert r.components == ["apo", "holo"] and r.point_estimate == "map"
    assert abs(r.map_weights.sum() - 1) < 1e-12 and r.gap < 1e-8
    header = (out / "weights.csv").read_text().splitlines()[0]
    assert header == (
        "structure,map_weight,posterior_mean,posterior_sd,q2.5,q50,q97.5,expected_count,"
        "assigned_count"
    )
    rows = [line.split(",") for line in (out / "weights.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["apo", "holo"]
    assert sum(int(row[-1]) for row in rows) == 60
    methods = {line.split(",")[1] for line in (out / "intervals.csv").read_text().splitlines()[1:]}
    assert methods == {"gibbs", "laplace", "bootstrap"}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("settings", "em", "gibbs", "perplexity", "cross_validation", "input", "truth"):
        assert summary[key] is not None, key
    assert summary["em"]["frank_wolfe_gap"] < 1e-8 and summary["em"]["converged"]
    assert summary["input"]["checksums"]["matrix_sha256"] == files.matrix_sha256(ll)
    assert set(summary["gibbs"]["rhat"]) == {"apo", "holo"}
    assert 1.0 <= summary["perplexity"]["map"] <= 2.0
    assert summary["truth"]["apo"]["inside_95"] in (True, False)
    with np.load(out / "posterior_samples.npz") as s:
        assert s["weights"].shape == (4, 100, 2) and s["counts"].sum(axis=2).max() == 60
        assert list(s["components"]) == ["apo", "holo"]
    ds = xr.open_zarr(out / "responsibilities.zarr")
    assert ds["responsibility"].dims == ("image", "structure")
    assert list(ds["structure"].values) == ["apo", "holo"]
    assert str(ds["image_name"].values[0]).startswith("000001@")
    np.testing.assert_allclose(ds["responsibility"].values, r.responsibilities)
    # cryoER's files: mean and sd per structure
    prob = np.loadtxt(out / "reweighted_prob.txt")
    assert prob.shape == (2, 2) and abs(prob[:, 0].sum() - 1) < 1e-5
    np.testing.assert_allclose(np.loadtxt(out / "reweighting_factor.txt"), prob, atol=1e-6)
    # STAR subsets partition the particles, optics kept
    import starfile

    parts = [
        starfile.read(out / "star" / f"particles_{n}.star", always_dict=True)
        for n in ("apo", "holo")
    ]
    assert sum(len(p["particles"]) for p in parts) == 60
    assert all("optics" in p for p in parts)
    apo_rows = set(parts[0]["particles"]["rlnImageName"])
    assert apo_rows == {
        f"{i + 1:06d}@particles.mrcs" for i in np.flatnonzero(r.responsibilities.argmax(1) == 0)
    }
    assert len(list((out / "plots").glob("*.png"))) == 6
    # the outputs are not replaced without overwrite; other files are kept
    (out / "notes.txt").write_text("mine")
    with pytest.raises(cd.OutputExistsError, match=r"weights\.csv"):
        cd.reweight(folder, out, **QUICK)
    cd.reweight(folder, out, overwrite=True, **QUICK)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "plots").exists()


def test_two_thirds_through_the_front_end(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    a, b = float(np.log(3.0)), float(np.log(11 / 5))
    csv.write_text(f"image,a,b\n0,{a!r},0\n1,{a!r},0\n2,0,{b!r}\n3,0,{b!r}\n")
    r = cd.reweight(csv, tmp_path / "out", tolerance=1e-14, **QUICK)
    np.testing.assert_allclose(r.map_weights, [2 / 3, 1 / 3], atol=1e-12)
    assert r.point_estimate == "map"
    # α < 1: the point estimate is the maximum likelihood
    r = cd.reweight(csv, tmp_path / "out2", alpha=0.5, **QUICK)
    assert r.point_estimate == "ml"
    np.testing.assert_allclose(r.map_weights, [2 / 3, 1 / 3], atol=1e-8)


def test_none_column_and_prior_counts(likelihood_folder, tmp_path: Path) -> None:
    folder, ll, _ = likelihood_folder
    # junk particles: a third component explains 20 extra images far better than either
    rng = np.random.default_rng(5)
    junk = rng.normal(-1000.0, 1.0, size=(20, 2)) - 6.0
    full = np.vstack([ll, junk])
    noise = np.r_[ll.max(axis=1) - 8.0, junk.max(axis=1) + 6.0]
    np.save(tmp_path / "noise.npy", noise)
    m = tmp_path / "m.npy"
    np.save(m, full)
    r = cd.reweight(
        m, tmp_path / "o1", layout="images-by-structures", none_column=str(tmp_path / "noise.npy"),
        structure_names=["apo", "holo"], **QUICK,
    )  # fmt: skip
    assert r.components == ["apo", "holo", "none_of_these"]
    assert abs(r.map_weights[2] - 0.25) < 0.02
    # the same with the noise model as a column of the matrix, named
    np.save(m, np.column_stack([full, noise]))
    r2 = cd.reweight(
        m, tmp_path / "o2", layout="images-by-structures", none_column=2,
        structure_names=["apo", "holo", "noise"], **QUICK,
    )  # fmt: skip
    np.testing.assert_allclose(r2.map_weights, r.map_weights, atol=1e-10)
    # cryoER's prior counts: same ML weights, different reweighting factors
    (tmp_path / "counts.txt").write_text("1\n3\n")
    r3 = cd.reweight(folder, tmp_path / "o3", prior_counts=tmp_path / "counts.txt", **QUICK)
    r4 = cd.reweight(folder, tmp_path / "o4", **QUICK)
    np.testing.assert_allclose(r3.map_weights, r4.map_weights, atol=1e-8)
    factor = np.loadtxt(tmp_path / "o3" / "reweighting_factor.txt")[:, 0]
    prob = np.loadtxt(tmp_path / "o3" / "reweighted_prob.txt")[:, 0]
    want = (prob / [0.25, 0.75]) / (prob / [0.25, 0.75]).sum()
    np.testing.assert_allclose(factor, want, atol=0.02)
    with pytest.raises(ReweightError, match="neither a structure"):
        cd.reweight(folder, tmp_path / "o5", none_column="nothing", **QUICK)
    with pytest.raises(ReweightError, match="positive counts"):
        cd.reweight(folder, tmp_path / "o6", prior_counts=[1.0, 0.0], **QUICK)
    with pytest.raises(ReweightError, match="alpha"):
        cd.reweight(folder, tmp_path / "o7", alpha=-1.0)
    with pytest.raises(ReweightError, match="truth names"):
        cd.reweight(folder, tmp_path / "o8", truth={"x": 1.0}, **QUICK)


def test_star_subsets_of_a_given_star_file(tmp_path: Path) -> None:
    import starfile

    from tests.reweight.conftest import write_star

    ll, _ = mixture_loglik(np.random.default_rng(3), 30, [0.5, 0.5], separation=8.0)
    np.save(tmp_path / "m.npy", ll)
    star = write_star(tmp_path / "particles.star", 30)
    r = cd.reweight(
        tmp_path / "m.npy", tmp_path / "out", layout="images-by-structures", star=star,
        star_min_responsibility=0.9, **QUICK,
    )  # fmt: skip
    kept = r.responsibilities.max(axis=1) >= 0.9
    for k in range(2):
        table = starfile.read(tmp_path / "out" / "star" / f"particles_structure_{k}.star")
        table = table["particles"] if isinstance(table, dict) else table
        want = np.flatnonzero(kept & (r.responsibilities.argmax(axis=1) == k))
        assert list(table["rlnImageName"]) == [f"{i + 1:06d}@particles.mrcs" for i in want]
    with pytest.raises(ReweightError, match="file not found"):
        cd.reweight(tmp_path / "m.npy", tmp_path / "o2", layout="images-by-structures",
                    star=tmp_path / "nope.star", **QUICK)  # fmt: skip
    assert not (tmp_path / "o2").exists()


def test_reweight_folder_for_a_config_section(likelihood_folder) -> None:
    folder, _, _ = likelihood_folder
    r = cd.reweight_folder(folder, {"samples": 40, "warmup": 10, "plots": False, "folds": 0})
    assert r.output == folder / "reweight" and (folder / "reweight" / "weights.csv").is_file()
    with pytest.raises(ReweightError, match="unknown_option"):
        cd.reweight_folder(folder, {"unknown_option": 1}, overwrite=True)
