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
