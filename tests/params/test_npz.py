"""CryoLike .npz reading: None values, atomic writes, refusal of arbitrary pickles."""

from __future__ import annotations

import numpy as np
import pytest

from cryolike_dask.params.npz import ParameterFileError, read_npz, write_npz


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_arbitrary_pickles(tmp_path, capsys) -> None:
    np.savez(tmp_path / "evil.npz", a=np.array([_Evil()], dtype=object))
    with pytest.raises(ParameterFileError, match=r"evil\.npz.*refusing to unpickle"):
        read_npz(tmp_path / "evil.npz")
    assert "must never run" not in capsys.readouterr().out


def test_none_and_scalars_round_trip(tmp_path) -> None:
    path = write_npz(tmp_path / "f.npz", {"a": None, "b": np.float64(2.5), "c": np.arange(3)})
    out = read_npz(path)
    assert out["a"] is None and out["b"] == 2.5 and isinstance(out["b"], float)
    np.testing.assert_array_equal(out["c"], [0, 1, 2])
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_write_requires_npz_suffix(tmp_path) -> None:
    with pytest.raises(ParameterFileError, match=r"\.npz"):
        write_npz(tmp_path / "f.txt", {"a": 1})
