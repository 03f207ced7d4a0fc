"""MRC, STAR, cryoSPARC and atomic-model readers on real files, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.io.models import ModelFileError, read_atoms
from cryolike_dask.io.mrc import MrcFileError, mrc_info, read_images, read_volume
from cryolike_dask.io.particle_metadata import MetadataError, read_cs, read_star
from cryolike_dask.params import ImageParameters


def test_mrc_real_files(data_dir) -> None:
    vol, voxel = read_volume(data_dir / "real" / "emd_1832.map")
    assert vol.shape == (64, 64, 64) and voxel == pytest.approx((5.7, 5.7, 5.7))
    info = mrc_info(data_dir / "real" / "relion31.mrcs")  # strict readers refuse this header
    assert info.permissive and info.shape == (5, 256, 256)
    some = read_images(data_dir / "real" / "relion31.mrcs", np.array([3, 0]))
    allimg = read_images(data_dir / "real" / "relion31.mrcs")
    np.testing.assert_array_equal(some, allimg[[3, 0]])
    assert mrc_info(data_dir / "real" / "empiar_10076_7.mrc").voxel_size == (0.0, 0.0, 0.0)


def test_mrc_errors(tmp_path, data_dir) -> None:
    (tmp_path / "junk.mrc").write_bytes(b"\0" * 100)
    with pytest.raises(MrcFileError, match=r"junk\.mrc"):
        mrc_info(tmp_path / "junk.mrc")
    with pytest.raises(MrcFileError, match="not found"):
        mrc_info(tmp_path / "none.mrc")
    with pytest.raises(MrcFileError, match=r"image index 6 \(1-based\).*holds 5"):
        read_images(data_dir / "real" / "relion31.mrcs", np.array([5]))
    with pytest.raises(MrcFileError, match="expected a 3-D density map"):
        read_volume(data_dir / "real" / "relion31.mrcs")


def test_star_and_cs_describe_the_same_particles(data_dir) -> None:
    star = read_star(data_dir / "real" / "empiar_10076_7.star")
    cs = read_cs(data_dir / "real" / "empiar_10076_7.cs")
    assert star.n_particles == cs.n_particles == 7
    assert star.image_files == cs.image_files
    np.testing.assert_array_equal(star.image_indices, cs.image_indices)
    # the .cs stores float32: agreement to its precision
    for field in ("defocus_u", "defocus_v", "defocus_angle", "phase_shift"):
        np.testing.assert_allclose(
            getattr(star.lens, field), getattr(cs.lens, field), rtol=1e-6, atol=1e-8, err_msg=field
        )
    assert star.lens.amplitude_contrast == pytest.approx(cs.lens.amplitude_contrast, rel=1e-6)
    # 5 µm detector pixels at 38168× = 1.31 Å; the .cs says 1.31 too
    assert star.pixel_size == pytest.approx(1.31, abs=1e-4)
    assert cs.pixel_size == pytest.approx(star.pixel_size, rel=1e-6)
    assert star.lens.astigmatism_convention == "relion"
    np.testing.assert_allclose(star.lens.defocus_angle, np.deg2rad(5.28))  # degrees → rad


def test_relion31_optics_and_particles(data_dir) -> None:
    rec = read_star(data_dir / "real" / "relion31.star")
    assert rec.n_particles == 5 and rec.pixel_size == 2.806
    assert rec.lens.spherical_aberration == 0.01 and rec.lens.amplitude_contrast == 0.1
    assert rec.image_files == ["relion31.mrcs"] * 5
    np.testing.assert_array_equal(rec.image_indices, np.arange(5))


def test_particle_data_star_parses(data_dir) -> None:
    rec = read_star(data_dir / "star" / "particle_data.star")
    assert rec.n_particles == 483 and rec.image_files is None
    assert rec.pixel_size == pytest.approx(14.0 * 1e4 / 104089.0)
    assert rec.lens.voltage == 300.0 and rec.lens.defocus_u[0] == pytest.approx(21213.220703)


def _write_star(path, header, rows):
    lines = ["data_", "", "loop_"] + [f"_rln{h} #{i + 1}" for i, h in enumerate(header)]
    path.write_text("\n".join(lines + [" ".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_star_errors(tmp_path) -> None:
    hdr = ["DefocusU", "DefocusAngle", "Voltage", "SphericalAberration"]
    p = _write_star(tmp_path / "a.star", hdr, [[1e4, 10, 300, 2.7]])
    with pytest.raises(MetadataError, match=r"a\.star: missing column rlnDefocusV"):
        read_star(p)
    hdr = ["DefocusU", "DefocusV", "DefocusAngle", "Voltage", "SphericalAberration", "ImageName"]
    p = _write_star(tmp_path / "b.star", hdr, [[1e4, 1e4, 10, 300, 2.7, "stack.mrcs"]])
    with pytest.raises(MetadataError, match=r"b\.star: rlnImageName in row 0.*NNNNNN@file"):
        read_star(p)
    p = _write_star(
        tmp_path / "c.star", hdr[:5], [[1e4, 1e4, 10, 300, 2.7], [1e4, 1e4, 10, 200, 2.7]]
    )
    with pytest.raises(MetadataError, match=r"rlnVoltage takes several values"):
        read_star(p)
    p = _write_star(tmp_path / "d.star", hdr[:5], [[1e4, "nan", 10, 300, 2.7]])
    with pytest.raises(MetadataError, match=r"rlnDefocusV has a non-finite value in row 0"):
        read_star(p)
    (tmp_path / "e.star").write_text("this is not a star file\n")
    with pytest.raises(MetadataError, match=r"e\.star"):
        read_star(tmp_path / "e.star")


def test_cs_errors(tmp_path, data_dir) -> None:
    data = np.load(data_dir / "real" / "empiar_10076_7.cs")
    names = [n for n in data.dtype.names if n != "ctf/df2_A"]
    slim = np.empty(data.shape, dtype=[(n, data.dtype[n]) for n in names])
    for n in names:
        slim[n] = data[n]
    with open(tmp_path / "x.cs", "wb") as f:
        np.save(f, slim)
    with pytest.raises(MetadataError, match=r"x\.cs: missing field\(s\) ctf/df2_A"):
        read_cs(tmp_path / "x.cs")


def test_models(data_dir) -> None:
    params = ImageParameters.from_values(32, 1.5)
    atoms = read_atoms(data_dir / "models" / "1uao.pdb", params)
    assert atoms.n_atoms == 10  # the 10 CA atoms of model 1 of the NMR ensemble
    np.testing.assert_allclose(atoms.radii, [2.25, 3.25, 2.8, 2.8, 2.95, 2.8, 2.25, 2.8, 3.4, 2.25])
    np.testing.assert_allclose(atoms.coordinates.mean(axis=0), 0.0, atol=1e-5)
    cif = read_atoms(data_dir / "real" / "8zpm.cif", params)
    assert cif.n_atoms > 300 and cif.coordinates.dtype == np.float32
    heavy = ImageParameters.from_values(
        32, 1.5, use_protein_residue_model=False, atom_radii=1.0, atom_selection="heavy"
    )
    assert read_atoms(data_dir / "real" / "8zpm.cif", heavy).n_atoms == 3222


def test_model_errors(tmp_path, data_dir) -> None:
    params = ImageParameters.from_values(32, 1.5)
    (tmp_path / "m.xyz").write_text("x")
    with pytest.raises(ModelFileError, match="unknown model extension"):
        read_atoms(tmp_path / "m.xyz", params)
    (tmp_path / "water.pdb").write_text(
        "HETATM    1  O   HOH A   1       0.000   0.000   0.000  1.00  0.00           O\nEND\n"
    )
    with pytest.raises(ModelFileError, match=r"water\.pdb: no amino-acid residues"):
        read_atoms(tmp_path / "water.pdb", params)
    odd = ImageParameters.from_values(
        32, 1.5, use_protein_residue_model=False, atom_radii=1.0, atom_selection="resid 1 to 5"
    )
    with pytest.raises(ModelFileError, match="not supported"):
        read_atoms(data_dir / "models" / "1uao.pdb", odd)
