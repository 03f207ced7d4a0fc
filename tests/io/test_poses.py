"""Prior poses from RELION STAR and cryoSPARC .cs files: values, the 999 rule, conventions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryolike_dask.io.particle_metadata import MetadataError, read_cs, read_star
from cryolike_dask.io.poses import (
    PriorPoses,
    cryosparc_to_relion,
    relion_to_cryosparc,
    sort_key,
)

CTF = {
    "rlnDefocusU": 12000.0,
    "rlnDefocusV": 11000.0,
    "rlnDefocusAngle": 30.0,
    "rlnVoltage": 300.0,
    "rlnSphericalAberration": 2.7,
    "rlnAmplitudeContrast": 0.1,
}


def relion_euler_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` (src/euler.cpp), written out: the matrix ``A``."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def rodrigues(v: np.ndarray) -> np.ndarray:
    """The active rotation of rotation vector ``v``: I + sin θ K + (1 − cos θ) K²."""
    theta = np.linalg.norm(v)
    if theta == 0:
        return np.eye(3)
    x, y, z = v / theta
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def _particles(n: int, **columns) -> pd.DataFrame:
    data = {k: np.full(n, v) for k, v in CTF.items()}
    data.update({k: np.asarray(v) for k, v in columns.items()})
    return pd.DataFrame(data)


def _cs(path, n: int, **fields):
    """A .cs file (a NumPy structured array saved with np.save) with CTF fields and ``fields``."""
    base = {
        "ctf/df1_A": np.full(n, 12000.0, np.float32),
        "ctf/df2_A": np.full(n, 11000.0, np.float32),
        "ctf/df_angle_rad": np.full(n, 0.5, np.float32),
        "ctf/cs_mm": np.full(n, 2.7, np.float32),
        "ctf/accel_kv": np.full(n, 300.0, np.float32),
        "ctf/amp_contrast": np.full(n, 0.1, np.float32),
        "blob/path": np.array([b"stack.mrc"] * n),
        "blob/idx": np.arange(n, dtype=np.uint32),
    }
    base.update(fields)
    dtype = [(k, v.dtype, v.shape[1:]) for k, v in base.items()]
    arr = np.empty(n, dtype=dtype)
    for k, v in base.items():
        arr[k] = v
    with open(path, "wb") as f:
        np.save(f, arr)
    return path


def test_scipy_zyz_is_relions_euler_matrix_transposed() -> None:
    """The convention the module states: A (RELION) = R(rot, tilt, psi)ᵀ; the direction R·ẑ."""
    rng = np.random.default_rng(0)
    for rot, tilt, psi in rng.uniform([-180, 0, -180], [180, 180, 180], size=(20, 3)):
        r = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix()
        np.testing.assert_allclose(relion_euler_matrix(rot, tilt, psi), r.T, atol=1e-12)
        poses = PriorPoses([rot], [tilt], [psi], [0.0], [0.0], [True], [True], "star-refined")
        np.testing.assert_allclose(poses.directions()[0], r @ [0, 0, 1], atol=1e-12)
        # RELION's projection direction: the third row of A
        np.testing.assert_allclose(poses.directions()[0], relion_euler_matrix(rot, tilt, psi)[2])


def test_star31_refined_angstrom_origins(tmp_path) -> None:
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [1.5],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    parts = pd.DataFrame(
        {
            "rlnImageName": ["000001@s.mrcs", "000002@s.mrcs", "000003@s.mrcs"],
            "rlnDefocusU": [1e4] * 3,
            "rlnDefocusV": [1e4] * 3,
            "rlnDefocusAngle": [0.0] * 3,
            "rlnOpticsGroup": [1, 1, 1],
            "rlnAngleRot": [10.0, -120.5, 45.0],
            "rlnAngleTilt": [20.0, 95.25, 170.0],
            "rlnAnglePsi": [30.0, 5.0, -60.0],
            "rlnOriginXAngst": [1.5, -3.0, 0.75],
            "rlnOriginYAngst": [-4.5, 2.25, 0.0],
        }
    )
    path = tmp_path / "p31.star"
    starfile.write({"optics": optics, "particles": parts}, path)
    p = read_star(path).poses
    assert p is not None and p.source == "star-refined" and p.n == 3
    np.testing.assert_array_equal(p.rot, [10.0, -120.5, 45.0])
    np.testing.assert_array_equal(p.tilt, [20.0, 95.25, 170.0])
    np.testing.assert_array_equal(p.psi, [30.0, 5.0, -60.0])
    np.testing.assert_array_equal(p.origin_x, [1.5, -3.0, 0.75])  # Å as written
    np.testing.assert_array_equal(p.origin_y, [-4.5, 2.25, 0.0])
    assert p.has_angles.all() and p.has_origin.all()
    assert p.columns == {
        "rot": "rlnAngleRot",
        "tilt": "rlnAngleTilt",
        "psi": "rlnAnglePsi",
        "origin_x": "rlnOriginXAngst",
        "origin_y": "rlnOriginYAngst",
    }
    assert read_star(path, pose_source="none").poses is None
    with pytest.raises(MetadataError, match=r"p31\.star: prior poses.*rlnAngleRotPrior"):
        read_star(path, pose_source="prior")
    with pytest.raises(MetadataError, match="pose_source"):
        read_star(path, pose_source="best")
    # subset keeps the poses with the rows
    sub = read_star(path).subset(np.array([2, 0]))
    np.testing.assert_array_equal(sub.poses.rot, [45.0, 10.0])
    np.testing.assert_array_equal(sub.rows, [2, 0])


def test_star_pixel_origins(tmp_path) -> None:
    """Old-style rlnOriginX/Y are pixels: × the file's pixel size (here 5 µm / 25000 = 2 Å)."""
    df = _particles(
        2,
        rlnDetectorPixelSize=[5.0, 5.0],
        rlnMagnification=[25000.0, 25000.0],
        rlnAngleRot=[0.0, 90.0],
        rlnAngleTilt=[90.0, 45.0],
        rlnAnglePsi=[0.0, 180.0],
        rlnOriginX=[1.5, -2.0],
        rlnOriginY=[0.25, 3.0],
    )
    path = tmp_path / "old.star"
    starfile.write(df, path)
    rec = read_star(path)
    assert rec.pixel_size == pytest.approx(2.0)
    np.testing.assert_allclose(rec.poses.origin_x, [3.0, -4.0])
    np.testing.assert_allclose(rec.poses.origin_y, [0.5, 6.0])
    assert rec.poses.columns["origin_x"] == "rlnOriginX"
    # no pixel size in the file: the given one, else a clear refusal
    bare = tmp_path / "bare.star"
    starfile.write(df.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"]), bare)
    np.testing.assert_allclose(read_star(bare, pixel_size=1.25).poses.origin_x, [1.875, -2.5])
    with pytest.raises(MetadataError, match=r"bare\.star: origins rlnOriginX/rlnOriginY.*pixel"):
        read_star(bare)
    # no origin columns: angles only
    noorig = tmp_path / "noorig.star"
    starfile.write(df.drop(columns=["rlnOriginX", "rlnOriginY"]), noorig)
    p = read_star(noorig).poses
    assert p.has_angles.all() and not p.has_origin.any() and np.isnan(p.origin_x).all()
    # refined asked for without psi: names the column
    nopsi = tmp_path / "nopsi.star"
    starfile.write(df.drop(columns=["rlnAnglePsi"]), nopsi)
    with pytest.raises(MetadataError, match=r"nopsi\.star: refined poses.*rlnAnglePsi"):
        read_star(nopsi, pose_source="refined")
    assert read_star(nopsi).poses is None  # auto: no refined set, no priors


def test_star_priors_and_the_999_rule(tmp_path) -> None:
    df = _particles(
        5,
        rlnImagePixelSize=[1.0] * 5,
        rlnAngleRotPrior=[10.0, 999.0, 30.0, 40.0, 50.0],
        rlnAngleTiltPrior=[80.0, 90.0, -999.0, 100.0, 110.0],
        rlnAnglePsiPrior=[5.0, 6.0, 7.0, np.nan, 999.0],
        rlnOriginXPriorAngst=[1.0, 2.0, 3.0, 999.0, -999.0],
        rlnOriginYPriorAngst=[-1.0, -2.0, np.nan, 4.0, 5.0],
    )
    path = tmp_path / "prior.star"
    starfile.write(df, path)
    p = read_star(path).poses  # auto: no refined angles, so the priors
    assert p.source == "star-prior"
    np.testing.assert_array_equal(p.has_angles, [True, False, False, True, True])
    np.testing.assert_array_equal(p.has_psi, [True, False, False, False, False])
    np.testing.assert_array_equal(p.has_origin, [True, True, False, False, False])
    np.testing.assert_array_equal(p.rot[[0, 3, 4]], [10.0, 40.0, 50.0])
    np.testing.assert_array_equal(p.tilt[[0, 3, 4]], [80.0, 100.0, 110.0])
    assert np.isnan(p.rot[[1, 2]]).all() and np.isnan(p.tilt[[1, 2]]).all()
    assert p.psi[0] == 5.0 and np.isnan(p.psi[1:]).all()  # rows 1, 2: no direction either
    np.testing.assert_array_equal(p.origin_x[:2], [1.0, 2.0])
    assert np.isnan(p.origin_x[2:]).all() and np.isnan(p.origin_y[2:]).all()
    assert (
        p.columns["rot"] == "rlnAngleRotPrior" and p.columns["origin_y"] == "rlnOriginYPriorAngst"
    )
    # both sets present: auto takes the refined angles, prior asks for the priors
    both = tmp_path / "both.star"
    starfile.write(
        df.assign(rlnAngleRot=1.0, rlnAngleTilt=2.0, rlnAnglePsi=3.0, rlnOriginX=0.5, rlnOriginY=1),
        both,
    )
    auto = read_star(both).poses
    assert auto.source == "star-refined" and (auto.rot == 1.0).all()
    np.testing.assert_array_equal(auto.origin_x, np.full(5, 0.5))  # pixels × 1 Å
    assert read_star(both, pose_source="prior").poses.source == "star-prior"
    # prior psi column absent: directions kept, psi unknown
    nopsi = tmp_path / "nopsi.star"
    starfile.write(df.drop(columns=["rlnAnglePsiPrior"]), nopsi)
    q = read_star(nopsi, pose_source="prior").poses
    np.testing.assert_array_equal(q.has_angles, p.has_angles)
    assert np.isnan(q.psi).all() and "psi" not in q.columns
    # pixel priors
    pix = tmp_path / "pix.star"
    starfile.write(
        df.drop(columns=["rlnOriginXPriorAngst", "rlnOriginYPriorAngst"]).assign(
            rlnImagePixelSize=2.0, rlnOriginXPrior=1.5, rlnOriginYPrior=-0.5
        ),
        pix,
    )
    np.testing.assert_array_equal(read_star(pix).poses.origin_x, np.full(5, 3.0))
    np.testing.assert_array_equal(read_star(pix).poses.origin_y, np.full(5, -1.0))


def test_cs_poses_and_pixel_sizes(tmp_path) -> None:
    """alignments3D/pose → RELION angles, checked against Rodrigues' formula and RELION's A;
    shifts × alignments3D/psize_A, not the (downsampled) blob's pixel size."""
    rng = np.random.default_rng(1)
    pose = rng.normal(size=(6, 3)).astype(np.float32)
    shift = rng.uniform(-5, 5, size=(6, 2)).astype(np.float32)
    path = _cs(
        tmp_path / "a.cs",
        6,
        **{
            "alignments3D/pose": pose,
            "alignments3D/shift": shift,
            "alignments3D/psize_A": np.full(6, 1.1, np.float32),
            "blob/psize_A": np.full(6, 2.2, np.float32),
        },
    )
    p = read_cs(path).poses
    assert p.source == "cryosparc" and p.has_angles.all() and p.has_origin.all()
    assert (
        p.columns["rot"] == "alignments3D/pose"
        and p.columns["pixel_size"] == "alignments3D/psize_A"
    )
    for k in range(6):
        r = Rotation.from_euler("ZYZ", [p.rot[k], p.tilt[k], p.psi[k]], degrees=True).as_matrix()
        np.testing.assert_allclose(r, rodrigues(pose[k].astype(np.float64)), atol=1e-10)
        # pyem: A = expmap(pose) = Rodriguesᵀ
        np.testing.assert_allclose(
            relion_euler_matrix(p.rot[k], p.tilt[k], p.psi[k]),
            rodrigues(pose[k].astype(np.float64)).T,
            atol=1e-10,
        )
    np.testing.assert_allclose(p.origin_x, shift[:, 0].astype(np.float64) * np.float32(1.1))
    np.testing.assert_allclose(p.origin_y, shift[:, 1].astype(np.float64) * np.float32(1.1))
    # without alignments3D/psize_A: blob/psize_A
    b = _cs(
        tmp_path / "b.cs",
        6,
        **{
            "alignments3D/pose": pose,
            "alignments3D/shift": shift,
            "blob/psize_A": np.full(6, 2.0, np.float32),
        },
    )
    q = read_cs(b).poses
    np.testing.assert_allclose(q.origin_x, shift[:, 0] * 2.0)
    assert q.columns["pixel_size"] == "blob/psize_A"
    with pytest.raises(MetadataError, match=r"b\.cs: a cryoSPARC \.cs file has no prior poses"):
        read_cs(b, pose_source="prior")
    assert read_cs(b, pose_source="none").poses is None
    # no pose fields: auto gives none, refined names the field
    c = _cs(tmp_path / "c.cs", 2)
    assert read_cs(c).poses is None
    with pytest.raises(MetadataError, match=r"c\.cs: refined poses.*alignments3D/pose"):
        read_cs(c, pose_source="refined")
    # pose without shift: angles, no origins; a NaN pose: that particle has no angles
    bad = pose[:2].copy()
    bad[1] = np.nan
    d = _cs(tmp_path / "d.cs", 2, **{"alignments3D/pose": bad})
    r = read_cs(d).poses
    np.testing.assert_array_equal(r.has_angles, [True, False])
    assert not r.has_origin.any() and np.isnan(r.rot[1])


def test_star_cs_star_round_trip(tmp_path) -> None:
    """Random RELION poses → .cs (relion_to_cryosparc) → read_cs → STAR → read_star: the
    rotation matrices agree to 1e-10 (angles may differ by ZYZ ambiguities) and so do the
    origins."""
    rng = np.random.default_rng(2)
    n = 50
    rot = rng.uniform(-180, 180, n)
    tilt = rng.uniform(0, 180, n)
    psi = rng.uniform(-180, 180, n)
    ox, oy = rng.uniform(-10, 10, (2, n))
    tilt[:2] = [0.0, 180.0]  # the gimbal-lock poles
    star = tmp_path / "in.star"
    starfile.write(
        _particles(
            n,
            rlnImagePixelSize=np.full(n, 1.3),
            rlnAngleRot=rot,
            rlnAngleTilt=tilt,
            rlnAnglePsi=psi,
            rlnOriginXAngst=ox,
            rlnOriginYAngst=oy,
        ),
        star,
        float_format="%.15g",
    )
    a = read_star(star).poses
    pose, shift = relion_to_cryosparc(a.rot, a.tilt, a.psi, a.origin_x, a.origin_y, 1.3)
    assert pose.shape == (n, 3) and shift.shape == (n, 2)
    cs = _cs(
        tmp_path / "mid.cs",
        n,
        **{
            "alignments3D/pose": pose,
            "alignments3D/shift": shift,
            "alignments3D/psize_A": np.full(n, 1.3),
        },
    )
    b = read_cs(cs).poses
    back = tmp_path / "out.star"
    starfile.write(
        _particles(
            n,
            rlnImagePixelSize=np.full(n, 1.3),
            rlnAngleRot=b.rot,
            rlnAngleTilt=b.tilt,
            rlnAnglePsi=b.psi,
            rlnOriginXAngst=b.origin_x,
            rlnOriginYAngst=b.origin_y,
        ),
        back,
        float_format="%.17g",
    )
    c = read_star(back).poses
    for poses in (b, c):
        for k in range(n):
            want = Rotation.from_euler("ZYZ", [rot[k], tilt[k], psi[k]], degrees=True).as_matrix()
            got = Rotation.from_euler(
                "ZYZ", [poses.rot[k], poses.tilt[k], poses.psi[k]], degrees=True
            ).as_matrix()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
            np.testing.assert_allclose(
                Rotation.from_rotvec(pose[k]).as_matrix(), want, rtol=0, atol=1e-10
            )
        np.testing.assert_allclose(poses.origin_x, ox, rtol=0, atol=1e-10)
        np.testing.assert_allclose(poses.origin_y, oy, rtol=0, atol=1e-10)
    # the functions are inverse of each other directly too
    r2, t2, p2, x2, y2 = cryosparc_to_relion(pose, shift, 1.3)
    m1 = Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], 1), degrees=True).as_matrix()
    m2 = Rotation.from_euler("ZYZ", np.stack([r2, t2, p2], 1), degrees=True).as_matrix()
    np.testing.assert_allclose(m2, m1, atol=1e-10)
    np.testing.assert_allclose(x2, ox, atol=1e-10)
    np.testing.assert_allclose(y2, oy, atol=1e-10)


def test_subset_concat_and_sort_key() -> None:
    a = PriorPoses(
        [0.0, 350.0, 20.0, np.nan],
        [5.0, 15.0, 12.0, np.nan],
        [1.0, 2.0, 3.0, np.nan],
        [0.0] * 4,
        [0.0] * 4,
        [True, True, True, False],
        [True] * 4,
        "star-refined",
        {"rot": "rlnAngleRot"},
    )
    # band 0 (tilt 5) first; band 1: rot 20 before 350; no angles last
    np.testing.assert_array_equal(sort_key(a), [0, 2, 1, 3])
    # negative tilt: the direction's polar angle 30°, azimuth rot + 180°
    b = PriorPoses([10.0], [-30.0], [0.0], [0.0], [0.0], [True], [False], "star-refined", {})
    both = PriorPoses.concat([a, b])
    assert both.n == 5 and both.columns == {"rot": "rlnAngleRot"}
    np.testing.assert_array_equal(both.subset(np.array([4, 0])).tilt, [-30.0, 5.0])
    np.testing.assert_array_equal(sort_key(both), [0, 2, 1, 4, 3])
    with pytest.raises(ValueError, match="different kinds"):
        PriorPoses.concat([a, a.__class__(*([[0.0]] * 5), [True], [True], "cryosparc", {})])
