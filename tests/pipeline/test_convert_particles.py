"""convert-particles: CryoLike's stacks, real RELION/cryoSPARC files, row order, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolike_dask.io.mrc import read_images, write_images
from cryolike_dask.io.zarr_stores import ImageStore
from cryolike_dask.params import ImageParameters, LensParameters
from cryolike_dask.pipeline import convert_particles as cp
from cryolike_dask.pipeline.cluster import ClusterOptions

SYNC = ClusterOptions(scheduler="sync")


def _convert(particles, params, out, **kw):
    return cp.convert_particles(particles, params, out, cluster=SYNC, progress=False, **kw)


def _stacks(folder, n):
    return np.concatenate(
        [
            torch.load(folder / "fft" / f"particles_fourier_stack_{i:06d}.pt").numpy()
            for i in range(n)
        ]
    )


def test_paired_matches_cryolike_without_a_pixel_size(reference_dir, tmp_path) -> None:
    """CryoLike needed --pixel-size here (bug §17.9); the MRC header gives it."""
    params = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    particles = cp.gather_paired(
        [reference_dir / "raw" / "particles.mrcs"],
        [reference_dir / "raw" / "particles.star"],
        batch_size=12,
    )
    assert particles.pixel_size == 1.5 and particles.stacks == [(0, 12), (12, 24)]
    store = _convert(particles, params, tmp_path)
    ours = _stacks(tmp_path, 2)
    expected = _stacks(reference_dir / "particles", 2)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-5
    for i in (0, 1):
        a = LensParameters.load(tmp_path / "fft" / f"particles_fourier_stack_00000{i}.npz")
        b = LensParameters.load(
            reference_dir / "particles" / "fft" / f"particles_fourier_stack_00000{i}.npz"
        )
        np.testing.assert_allclose(a.defocus_angle, b.defocus_angle, rtol=1e-12)  # radians
        np.testing.assert_allclose(a.defocus_u, b.defocus_u)
        assert a.astigmatism_convention == "relion"
        rows = np.load(tmp_path / "fft" / f"particles_fourier_stack_00000{i}.npz")["source_rows"]
        np.testing.assert_array_equal(rows, np.arange(12 * i, 12 * i + 12))
    zs = ImageStore.open(store)
    np.testing.assert_array_equal(zs.images[:], ours)
    assert zs.astigmatism_convention == "relion" and [s.n_images for s in zs.stacks] == [12, 12]


def test_star_and_cs_give_the_same_images(data_dir, tmp_path) -> None:
    real = data_dir / "real"
    params = ImageParameters.from_values(160, 2.62, n_inplanes=64, resolution_factor=0.5)
    a = cp.gather_indexed_star(real / "empiar_10076_7.star", real, batch_size=4)
    b = cp.gather_cs(real / "empiar_10076_7.cs", real, batch_size=4)
    _convert(a, params, tmp_path / "star", downsample=2)
    _convert(b, params, tmp_path / "cs", downsample=2)
    np.testing.assert_array_equal(_stacks(tmp_path / "star", 2), _stacks(tmp_path / "cs", 2))
    for i in (0, 1):
        x = LensParameters.load(tmp_path / "star" / "fft" / f"particles_fourier_stack_00000{i}.npz")
        y = LensParameters.load(tmp_path / "cs" / "fft" / f"particles_fourier_stack_00000{i}.npz")
        np.testing.assert_allclose(x.defocus_u, y.defocus_u, rtol=1e-6)
        np.testing.assert_allclose(x.defocus_angle, y.defocus_angle, rtol=1e-6)


def test_relion31_row_order_and_single_image_files(data_dir, tmp_path) -> None:
    """A permissive MRC, the STAR's pixel size over the header's 1.0, the STAR's row order
    across two files, and a file contributing one image (crashes CryoLike, §17.9)."""
    real = data_dir / "real"
    images = read_images(real / "relion31.mrcs")
    write_images(tmp_path / "one.mrcs", images[2:3], 2.806)
    star = (real / "relion31.star").read_text()
    lines = star.splitlines()
    body = [i for i, line in enumerate(lines) if "@relion31.mrcs" in line]
    rows = [lines[i] for i in body]
    # new order: particle 4, the single image of one.mrcs, 1, 0
    new = [rows[4], rows[2].replace("000001@relion31.mrcs", "1@one.mrcs"), rows[1], rows[0]]
    new[1] = new[1].replace(rows[2].split()[21], "1@one.mrcs")
    (tmp_path / "mixed.star").write_text("\n".join(lines[: body[0]] + new) + "\n")
    import shutil

    shutil.copy(real / "relion31.mrcs", tmp_path / "relion31.mrcs")
    params = ImageParameters.from_values(256, 2.806, n_inplanes=32, resolution_factor=0.25)
    particles = cp.gather_indexed_star(tmp_path / "mixed.star", tmp_path, batch_size=3)
    assert particles.pixel_size == 2.806
    _convert(particles, params, tmp_path / "out")
    got = _stacks(tmp_path / "out", 2)
    from cryolike_dask.preprocess.particles import images_to_fourier

    expected, _ = images_to_fourier(images[[4, 2, 1, 0]], params.polar_grid, "single")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    npz = np.load(tmp_path / "out" / "fft" / "particles_fourier_stack_000000.npz")
    np.testing.assert_array_equal(npz["source_rows"], [0, 1, 2])
    assert [f.split("/")[-1] for f in npz["files"]] == [
        "relion31.mrcs",
        "one.mrcs",
        "relion31.mrcs",
    ]


def test_cryosparc_job_folder(data_dir, tmp_path) -> None:
    real = data_dir / "real"
    images = read_images(real / "empiar_10076_7.mrc")
    job = tmp_path / "J7"
    (job / "restack").mkdir(parents=True)
    write_images(job / "restack" / "batch_000000_restacked.mrc", images[:4], 1.31)
    write_images(job / "restack" / "batch_000001_restacked.mrc", images[4:], 1.31)
    cs = np.load(real / "empiar_10076_7.cs")
    with open(job / "J7_passthrough_particles.cs", "wb") as f:
        np.save(f, cs)
    params = ImageParameters.from_values(320, 1.31, n_inplanes=32, resolution_factor=0.25)
    a = cp.gather_cryosparc_job(job, batch_size=7)
    b = cp.gather_cs(real / "empiar_10076_7.cs", real, batch_size=7)
    _convert(a, params, tmp_path / "job")
    _convert(b, params, tmp_path / "cs")
    np.testing.assert_array_equal(_stacks(tmp_path / "job", 1), _stacks(tmp_path / "cs", 1))


def test_errors_before_any_output(reference_dir, data_dir, tmp_path) -> None:
    params = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    raw = reference_dir / "raw"
    particles = cp.gather_paired([raw / "particles.mrcs"], [raw / "particles.star"])
    wrong_size = ImageParameters.from_values(64, 1.5)
    with pytest.raises(cp.ConversionError, match=r"images are 32×32 pixels.*n_pixels is 64×64"):
        _convert(particles, wrong_size, tmp_path / "a")
    wrong_pixel = ImageParameters.from_values(32, 2.0)
    with pytest.raises(cp.ConversionError, match=r"pixel size is 1.5 Å.*pixel_size is 2 Å"):
        _convert(particles, wrong_pixel, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(cp.ConversionError, match="same number of files"):
        cp.gather_paired([raw / "particles.mrcs"], [])
    short = tmp_path / "short.star"
    short.write_text("\n".join(raw.joinpath("particles.star").read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(
        cp.ConversionError, match=r"short\.star: 21 rows but .*particles\.mrcs holds 24"
    ):
        cp.gather_paired([raw / "particles.mrcs"], [short])
    with pytest.raises(cp.ConversionError, match=r"image file 'empiar_10076_7\.mrc' not found"):
        cp.gather_indexed_star(data_dir / "real" / "empiar_10076_7.star", tmp_path)
    with pytest.raises(cp.ConversionError, match="no pixel size"):
        import shutil

        shutil.copy(data_dir / "real" / "empiar_10076_7.mrc", tmp_path / "e.mrc")
        star = tmp_path / "e.star"
        text = (data_dir / "real" / "empiar_10076_7.star").read_text()
        text = text.replace("empiar_10076_7.mrc", "e.mrc").replace("_rlnMagnification #9\n", "")
        text = "\n".join(
            " ".join(line.split()[:8] + line.split()[9:]) if "@e.mrc" in line else line
            for line in text.splitlines()
        )
        star.write_text(text + "\n")
        cp.gather_indexed_star(star, tmp_path)
    _convert(particles, params, tmp_path / "c")
    with pytest.raises(FileExistsError, match="overwrite"):
        _convert(particles, params, tmp_path / "c")


# ------------------------------------------------------------------------------ prior poses
POSE_A = {"rot": [10.0, 200.0, 0.0, 100.0, 50.0], "tilt": [95.0, 12.0, 999.0, 15.0, 3.0]}
POSE_B = {"rot": [30.0, 300.0, 10.0, 5.0], "tilt": [50.0, 41.0, 170.0, 45.0]}


def _posed_pair(folder, poses_b: bool = True):
    """Two stacks (5 and 4 images, 16×16, 1.5 Å) with STAR files carrying refined poses
    (particle 2 of the first: tilt 999, no angles) and Å origins."""
    import pandas as pd
    import starfile

    rng = np.random.default_rng(7)
    out = []
    for name, pose, with_poses in (("a", POSE_A, True), ("b", POSE_B, poses_b)):
        n = len(pose["rot"])
        write_images(folder / f"{name}.mrcs", rng.normal(size=(n, 16, 16)).astype(np.float32), 1.5)
        cols = {
            "rlnDefocusU": np.full(n, 1.2e4),
            "rlnDefocusV": np.full(n, 1.1e4),
            "rlnDefocusAngle": np.linspace(0, 90, n),
            "rlnVoltage": np.full(n, 300.0),
            "rlnSphericalAberration": np.full(n, 2.7),
        }
        if with_poses:
            cols |= {
                "rlnAngleRot": pose["rot"],
                "rlnAngleTilt": pose["tilt"],
                "rlnAnglePsi": np.arange(n) * 7.0,
                "rlnOriginXAngst": np.arange(n) * 0.5,
                "rlnOriginYAngst": -np.arange(n) * 0.25,
            }
        starfile.write(pd.DataFrame(cols), folder / f"{name}.star")
        out.append((folder / f"{name}.mrcs", folder / f"{name}.star"))
    return [m for m, _ in out], [s for _, s in out]


def _expected_order(pose, offset):
    """Within one file: 10° tilt bands, then rot; no angles (999) last; written out here."""
    keys = [
        (t == 999.0, 0 if t == 999.0 else int(t // 10), 0 if t == 999.0 else r % 360, k)
        for k, (r, t) in enumerate(zip(pose["rot"], pose["tilt"], strict=True))
    ]
    return [offset + k[-1] for k in sorted(keys)]


def test_prior_poses_are_stored_in_image_order(tmp_path) -> None:
    from cryolike_dask.io.sources import ZarrImages

    mrcs, stars = _posed_pair(tmp_path)
    params = ImageParameters.from_values(16, 1.5, n_inplanes=16, resolution_factor=0.5)
    plain = cp.gather(mrcs=mrcs, star=stars, batch_size=3)
    assert plain.poses is not None and plain.poses.source == "star-refined"
    store_plain = ImageStore.open(_convert(plain, params, tmp_path / "plain"))
    p = store_plain.prior_poses()
    np.testing.assert_array_equal(p.rot, [10.0, 200.0, np.nan, 100.0, 50.0] + POSE_B["rot"])
    np.testing.assert_array_equal(p.has_angles, [True, True, False, True, True] + [True] * 4)
    assert np.isnan(p.tilt[2]) and np.isnan(p.psi[2]) and p.has_origin.all()
    np.testing.assert_array_equal(p.origin_x, np.r_[np.arange(5), np.arange(4)] * 0.5)
    assert store_plain.group["prior_pose"].attrs["columns"]["origin_x"] == "rlnOriginXAngst"
    assert "ZYZ" in store_plain.group["prior_pose"].attrs["convention"]
    assert store_plain.group["prior_pose/rot"].chunks == (3,)

    sorted_set = cp.gather(mrcs=mrcs, star=stars, batch_size=3, sort_by_pose=True)
    order = _expected_order(POSE_A, 0) + _expected_order(POSE_B, 5)
    assert order == [4, 3, 1, 0, 2, 8, 6, 5, 7]  # the segments stay apart: 0–4 then 5–8
    assert sorted_set.stacks == plain.stacks
    store = ImageStore.open(_convert(sorted_set, params, tmp_path / "sorted"))
    q = store.prior_poses()
    np.testing.assert_array_equal(q.rot, p.rot[order])
    np.testing.assert_array_equal(q.has_angles, p.has_angles[order])
    np.testing.assert_array_equal(q.origin_y, p.origin_y[order])
    # each image keeps its id and source row, and is the image it was
    ids, plain_ids = store.image_ids(), store_plain.image_ids()
    np.testing.assert_array_equal(ids.image_name, plain_ids.image_name[order])
    np.testing.assert_array_equal(ids.source_row, [4, 3, 1, 0, 2, 3, 1, 0, 2])
    assert ids.image_name[0].startswith("000005@") and ids.image_name[0].endswith("a.mrcs")
    assert ids.image_name[5].startswith("000004@") and ids.image_name[5].endswith("b.mrcs")
    np.testing.assert_array_equal(store.images[:], store_plain.images[:][order])
    np.testing.assert_array_equal(
        store.group["defocus_angle"][:], store_plain.group["defocus_angle"][:][order]
    )
    npz = np.load(tmp_path / "sorted" / "fft" / "particles_fourier_stack_000000.npz")
    np.testing.assert_array_equal(npz["source_rows"], [4, 3, 1])
    # sorting in convert_particles gives the same store; sorting twice changes nothing
    again = ImageStore.open(_convert(plain, params, tmp_path / "again", sort_by_pose=True))
    np.testing.assert_array_equal(again.image_ids().image_name, ids.image_name)
    np.testing.assert_array_equal(cp.sort_by_pose(sorted_set).rows, sorted_set.rows)
    # the image source reads the same poses by range
    src = ZarrImages.open(tmp_path / "sorted" / "particles.zarr")
    np.testing.assert_array_equal(src.prior_poses(2, 6).rot, q.rot[2:6])
    assert src.prior_poses().n == 9


def test_prior_pose_errors(tmp_path) -> None:
    mrcs, stars = _posed_pair(tmp_path, poses_b=False)
    with pytest.raises(cp.ConversionError, match=r"some metadata files carry poses.*b\.star: no"):
        cp.gather(mrcs=mrcs, star=stars)
    none = cp.gather(mrcs=mrcs, star=stars, pose_source="none")
    assert none.poses is None
    with pytest.raises(cp.ConversionError, match="--sort-by-pose needs prior poses"):
        cp.gather(mrcs=mrcs, star=stars, pose_source="none", sort_by_pose=True)
    with pytest.raises(cp.MetadataError, match=r"a\.star: prior poses.*rlnAngleRotPrior"):
        cp.gather(mrcs=mrcs, star=stars, pose_source="prior")
    params = ImageParameters.from_values(16, 1.5, n_inplanes=16, resolution_factor=0.5)
    store = ImageStore.open(_convert(none, params, tmp_path / "out"))
    assert store.prior_poses() is None and "prior_pose" not in store.group


def test_cs_poses_survive_conversion(data_dir, tmp_path) -> None:
    """A cryoSPARC .cs with alignments3D/pose and shift: angles and Å origins in the store."""
    from scipy.spatial.transform import Rotation

    real = data_dir / "real"
    cs = np.load(real / "empiar_10076_7.cs")
    rng = np.random.default_rng(3)
    pose = rng.normal(size=(7, 3))
    shift = rng.uniform(-3, 3, size=(7, 2))
    extra = [("alignments3D/pose", "<f8", (3,)), ("alignments3D/shift", "<f8", (2,))]
    dtype = [*cs.dtype.descr, *extra]
    posed = np.empty(cs.shape, dtype=dtype)
    for name in cs.dtype.names:
        posed[name] = cs[name]
    posed["alignments3D/pose"], posed["alignments3D/shift"] = pose, shift
    with open(tmp_path / "posed.cs", "wb") as f:
        np.save(f, posed)
    particles = cp.gather_cs(tmp_path / "posed.cs", real, batch_size=4)
    params = ImageParameters.from_values(160, 2.62, n_inplanes=16, resolution_factor=0.25)
    p = ImageStore.open(_convert(particles, params, tmp_path / "out", downsample=2)).prior_poses()
    assert p.source == "cryosparc" and p.has_angles.all()
    got = Rotation.from_euler("ZYZ", np.stack([p.rot, p.tilt, p.psi], 1), degrees=True)
    np.testing.assert_allclose(got.as_matrix(), Rotation.from_rotvec(pose).as_matrix(), atol=1e-10)
    # blob/psize_A is 1.31 Å: the shifts' pixels, not the downsampled output's
    np.testing.assert_allclose(p.origin_x, shift[:, 0] * float(cs["blob/psize_A"][0]), rtol=1e-12)
