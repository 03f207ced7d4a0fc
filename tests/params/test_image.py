"""Image parameters: CryoLike's parameters.npz read and written (spec §14.1)."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.params import ImageParameters, ParameterFileError
from cryolike_dask.precision import Precision


def test_load_reference(reference_dir) -> None:
    p = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    assert p.n_pixels == (32, 32) and p.pixel_size == (1.5, 1.5)
    assert p.radius_max == 8.0 and p.dist_radii == 0.25 and p.n_inplanes == 64
    assert p.precision is Precision.SINGLE
    assert p.viewing_distance == pytest.approx(8 / (4 * np.pi), rel=1e-15)
    assert p.atom_radii is None and p.atom_selection == "name CA"
    assert p.use_protein_residue_model is True and p.atom_shape == "gaussian"
    assert p.polar_grid.n_shells == 33 and p.viewing_angles.n_angles == 96
    assert p.box_size == (48.0, 48.0)


def test_from_values_defaults() -> None:
    p = ImageParameters.from_values(128, 1.2, resolution_factor=0.5)
    assert p.radius_max == 0.5 * 128 / 4
    assert p.dist_radii == 0.25 and p.n_inplanes == 256
    assert p.viewing_distance == pytest.approx(1 / (4 * np.pi) / 0.5)
    q = ImageParameters.from_values(32, 1.5, n_inplanes=64, viewing_distance=8 / (4 * np.pi))
    assert q.viewing_angles.n_angles == 96


def test_round_trip_matches_cryolike_file(tmp_path, reference_dir) -> None:
    ref_path = reference_dir / "templates" / "parameters.npz"
    p = ImageParameters.load(ref_path)
    out = p.save(tmp_path / "parameters.npz")
    with np.load(ref_path, allow_pickle=True) as a, np.load(out, allow_pickle=True) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert a[key].dtype == b[key].dtype, key
            assert a[key].shape == b[key].shape, key
            assert a[key].tolist() == b[key].tolist(), key
    assert ImageParameters.load(out) == p


def test_refuses_to_overwrite(tmp_path) -> None:
    p = ImageParameters.from_values(32, 1.5)
    path = p.save(tmp_path / "parameters.npz")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        ImageParameters.from_values(64, 1.0).save(path)
    assert path.read_bytes() == before
    ImageParameters.from_values(64, 1.0).save(path, overwrite=True)
    assert ImageParameters.load(path).n_pixels == (64, 64)


def test_missing_field_names_file_and_field(tmp_path) -> None:
    fields = ImageParameters.from_values(32, 1.5).to_dict()
    del fields["n_inplanes"]
    np.savez(
        tmp_path / "bad.npz",
        **{k: np.asarray(v, dtype=object) if v is None else v for k, v in fields.items()},
    )
    with pytest.raises(ParameterFileError, match=r"bad\.npz.*'n_inplanes'"):
        ImageParameters.load(tmp_path / "bad.npz")
    with pytest.raises(ParameterFileError, match="not found"):
        ImageParameters.load(tmp_path / "nope.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    with pytest.raises(ParameterFileError, match=r"corrupt\.npz.*not a readable"):
        ImageParameters.load(tmp_path / "corrupt.npz")


def test_bad_values() -> None:
    with pytest.raises(ValueError, match="pixel_size"):
        ImageParameters.from_values(32, 0.0)
    with pytest.raises(ValueError, match="precision"):
        ImageParameters.from_values(32, 1.0, precision="half")
    with pytest.raises(ValueError, match="atom_shape"):
        ImageParameters.from_values(32, 1.0, atom_shape="cube")


def test_compatibility() -> None:
    a = ImageParameters.from_values(32, 1.5)
    assert a.is_compatible_with(a.with_precision("double"))
    b = ImageParameters.from_values(32, 1.6)
    assert not a.is_compatible_with(b)
    assert any("pixel_size" in d for d in a.incompatibilities(b))
