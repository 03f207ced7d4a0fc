"""Pose errors against the truth, checked against independent references (scipy, plain vectors).

Conventions (spec §5.1, §9): orientation ``Rz(α) Ry(β) Rz(γ)``, projection direction
``(cos α sin β, sin α sin β, cos β)``, image-frame centre ``Rot(−γ) d``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryolike_dask.evaluation import (
    PoseErrors,
    Truth,
    chain_symmetry,
    great_circle_deg,
    image_centres,
    inplane_offset,
    orientation_matrices,
    pose_errors,
    wrap_angle,
)
from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.grids.sphere import ViewingAngles


def test_orientation_matches_scipy_intrinsic_zyz() -> None:
    rng = np.random.default_rng(0)
    a, b, g = rng.uniform(0, 2 * np.pi, 20), rng.uniform(0, np.pi, 20), rng.uniform(0, 7, 20)
    ref = Rotation.from_euler("ZYZ", np.stack([a, b, g], 1)).as_matrix()
    np.testing.assert_allclose(orientation_matrices(a, b, g), ref, atol=1e-14)
    # the third column is the viewing direction of ViewingAngles
    d = ViewingAngles.uniform_weights(a, b).directions()
    np.testing.assert_allclose(orientation_matrices(a, b, 0)[:, :, 2], d, atol=1e-6)


def test_great_circle_hand_made_and_scipy() -> None:
    x, y, z = np.eye(3)
    cases = np.array(
        [
            great_circle_deg(x, x),
            great_circle_deg(x, y),
            great_circle_deg(x, -x),
            great_circle_deg(x, (x + y) / np.sqrt(2)),
            great_circle_deg(z, np.array([np.sin(1e-7), 0, np.cos(1e-7)])),
        ]
    )
    np.testing.assert_allclose(cases, [0, 90, 180, 45, np.degrees(1e-7)], rtol=1e-9, atol=1e-12)
    rng = np.random.default_rng(1)
    r1, r2 = Rotation.random(50, random_state=rng), Rotation.random(50, random_state=rng)
    u, v = r1.apply([0, 0, 1]), r2.apply([0, 0, 1])
    # the rotation taking u to v has magnitude = the angle between them
    ref = np.array(
        [
            np.degrees(Rotation.align_vectors([b], [a])[0].magnitude())
            for a, b in zip(u, v, strict=True)
        ]
    )
    np.testing.assert_allclose(great_circle_deg(u, v), ref, atol=1e-9)


def test_wrap_and_circular_rotation_difference() -> None:
    np.testing.assert_allclose(
        wrap_angle([0.0, np.pi / 2, 3 * np.pi / 2, 2 * np.pi - 0.1, -2 * np.pi + 0.1, 5 * np.pi]),
        [0.0, np.pi / 2, -np.pi / 2, -0.1, 0.1, -np.pi],
        atol=1e-12,
    )
    # same direction: the in-plane error is the circular difference of γ, wrapped
    base = orientation_matrices(np.full(4, 0.7), np.full(4, 1.1), [np.radians(359), 0.0, 1.0, 6.0])
    other = orientation_matrices(
        np.full(4, 0.7), np.full(4, 1.1), [np.radians(1), 2 * np.pi, 2.5, 0.5]
    )
    np.testing.assert_allclose(
        np.degrees(inplane_offset(base, other)),
        [2.0, 0.0, np.degrees(1.5), np.degrees(0.5 - 6.0 + 2 * np.pi)],
        atol=1e-9,
    )


def test_inplane_offset_against_scipy() -> None:
    """φ with ``trueᵀ Q other = Rz(φ)``, ``Q`` = scipy's shortest rotation between directions."""
    rng = np.random.default_rng(2)
    true = Rotation.random(40, random_state=rng)
    # nearby orientations (small direction errors), as recovered poses are
    other = Rotation.from_rotvec(rng.normal(scale=0.2, size=(40, 3))) * true
    phi = inplane_offset(true.as_matrix(), other.as_matrix())
    for k in range(40):
        d1, d2 = true[k].apply([0, 0, 1]), other[k].apply([0, 0, 1])
        q = Rotation.align_vectors([d1], [d2])[0]
        rel = true[k].inv() * q * other[k]
        rv = rel.as_rotvec()
        np.testing.assert_allclose(rv[:2], 0, atol=1e-9)  # a rotation about z
        assert phi[k] == pytest.approx(rv[2], abs=1e-9)


def test_pole_trade_off_is_no_error() -> None:
    """At β = 0, (α, γ) and (α + δ, γ − δ) are one orientation: no direction or in-plane error."""
    true = orientation_matrices(0.3, 0.0, 1.0)
    other = orientation_matrices(0.3 + 0.8, 0.0, 1.0 - 0.8)
    assert great_circle_deg(true[:, :, 2], other[:, :, 2])[0] == pytest.approx(0, abs=1e-9)
    assert inplane_offset(true, other)[0] == pytest.approx(0, abs=1e-12)


def test_image_centres_rotate_by_minus_gamma() -> None:
    # d = (1, 0) Å rotated by −90° (from +x towards −y) is (0, −1)
    np.testing.assert_allclose(image_centres(1.0, 0.0, np.pi / 2), [0.0, -1.0], atol=1e-15)


def _grid():
    # three directions on the equator and the pole; 8 rotations; 3 × 3 shifts of 2 Å
    angles = ViewingAngles.uniform_weights([0.0, np.pi / 2, 0.0], [np.pi / 2, np.pi / 2, 0.0])
    return angles, 8, DisplacementGrid.from_search(1, 3, 3, 2.0)


def test_pose_errors_hand_made_continuous_truth() -> None:
    angles, w, disp = _grid()
    step = 2 * np.pi / w
    delta = np.radians(10.0)
    truth = Truth.continuous(
        0,
        azimuth=[delta, 0.0, 0.0],
        polar=[np.pi / 2, np.pi / 2, np.pi / 2],
        rotation=[2 * step, 1.5 * step, 0.0],
        displacement_x=[0.0, 0.0, 1.0],
        displacement_y=[0.0, 0.0, 1.0],
    )
    e = pose_errors(
        angles,
        w,
        disp.as_array(),
        truth,
        template=np.array([0, 0, 0]),
        dx=np.array([0.0, 0.0, 2.0]),
        dy=np.array([0.0, 0.0, 2.0]),
        rotation=np.array([2 * step, 1.0 * step, 0.0]),
    )
    # 1: along the equator by 10°, frames carried exactly: no in-plane error
    # 2: same direction, rotation halfway between two grid rotations
    # 3: shift to the (2, 2) corner from (1, 1)
    np.testing.assert_allclose(e.direction_deg, [10.0, 0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(e.rotation_deg, [0.0, 22.5, 0.0], atol=1e-5)
    np.testing.assert_allclose(e.shift_angstrom, [0.0, 0.0, np.sqrt(2)], atol=1e-6)
    # floors: the nearest grid pose
    np.testing.assert_allclose(e.direction_floor_deg, [10.0, 0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(e.rotation_floor_deg, [0.0, 22.5, 0.0], atol=1e-5)
    np.testing.assert_allclose(e.shift_floor_angstrom, [0.0, 0.0, np.sqrt(2)], atol=1e-6)
    assert e.rotation_step_deg == 45.0 and e.shift_step_angstrom == pytest.approx(2.0)
    assert e.direction_step_deg == pytest.approx(90.0, abs=1e-4)
    assert e.within_one_step.tolist() == [True, True, True]
    st = {s.name: s for s in e.stats()}
    assert st["in-plane rotation"].median == pytest.approx(0.0, abs=1e-5)
    assert st["in-plane rotation"].p90 == pytest.approx(0.8 * 22.5, abs=1e-4)  # linear interp.
    assert st["shift"].half_step == pytest.approx(1.0)


def test_pose_errors_grid_truth_exact_match_is_zero() -> None:
    angles, w, disp = _grid()
    idx = np.array([0, 1, 2, 1])
    d = np.array([0, 4, 8, 3])
    rot = 2 * np.pi * np.array([0, 3, 7, 5]) / w
    truth = Truth(1, idx, disp.x[d].astype(float), disp.y[d].astype(float), rot)
    e = pose_errors(angles, w, disp.as_array(), truth, idx, disp.x[d], disp.y[d], rot)
    for a in (e.direction_deg, e.rotation_deg, e.shift_angstrom):
        np.testing.assert_allclose(a, 0, atol=1e-4)
    for a in (e.direction_floor_deg, e.rotation_floor_deg, e.shift_floor_angstrom):
        np.testing.assert_allclose(a, 0, atol=1e-4)
    # the wrong rotation by one step, 360° − 45° away going the other way: 45°
    wrong = np.mod(rot - 2 * np.pi / w, 2 * np.pi)
    e2 = pose_errors(angles, w, disp.as_array(), truth, idx, disp.x[d], disp.y[d], wrong)
    np.testing.assert_allclose(e2.rotation_deg, 45.0, atol=1e-4)


def test_shift_error_is_in_the_image_frame() -> None:
    angles, w, disp = _grid()
    truth = Truth.continuous(0, [0.0], [np.pi / 2], [np.pi / 2], [2.0], [0.0])
    # rotation 0 with d = (0, −2) puts the centre where the truth has it: no shift error
    e = pose_errors(angles, w, disp.as_array(), truth, [0], [0.0], [-2.0], [0.0])
    assert e.shift_angstrom[0] == pytest.approx(0.0, abs=1e-12)
    assert e.rotation_deg[0] == pytest.approx(90.0)


def test_truth_round_trip(tmp_path) -> None:
    t = Truth.continuous(2, [0.1, 0.2], [1.0, 2.0], [3.0, 4.0], [0.5, -0.5], [1.5, 0.0])
    back = Truth.load(t.save(tmp_path / "truth.npz"))
    assert back.structure == 2 and back.template_index is None and not back.on_grid
    for name in ("azimuth", "polar", "rotation", "displacement_x", "displacement_y"):
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
    g = Truth(0, np.array([3, 1]), np.zeros(2), np.ones(2), np.zeros(2))
    back = Truth.load(g.save(tmp_path / "grid.npz"))
    assert back.on_grid and back.template_index.tolist() == [3, 1] and back.azimuth is None
    with pytest.raises(ValueError, match="template_index"):
        Truth(0, None, np.zeros(1), np.zeros(1), np.zeros(1))


def test_stats_within_step_and_percentiles() -> None:
    e = PoseErrors(
        np.array([1.0, 2.0, 3.0, 30.0]),
        np.array([0.0, 1.0, 6.0, 1.0]),
        np.array([0.0, 0.5, 0.5, 0.5]),
        10.0,
        5.0,
        1.0,
    )
    st = {s.name: s for s in e.stats()}
    assert st["viewing direction"].within_step == 0.75
    assert st["in-plane rotation"].within_step == 0.75
    assert st["viewing direction"].median == 2.5
    assert st["viewing direction"].p90 == pytest.approx(3 + 0.7 * 27)
    assert st["shift"].floor_median == 0.0  # no floor given
    assert e.within_one_step.tolist() == [True, True, False, False]


def test_chain_symmetry_of_apoferritin_is_the_octahedral_group() -> None:
    from importlib import resources

    import gemmi
    from scipy.spatial import cKDTree

    path = resources.files("cryolike_dask") / "data" / "apoferritin_ca_apo_sym.pdb"
    g = chain_symmetry(path)
    assert g.shape == (24, 3, 3)
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-9)
    np.testing.assert_allclose(
        np.einsum("gji,gjk->gik", g, g), np.broadcast_to(np.eye(3), g.shape), atol=1e-9
    )
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-9)
    # the rotation angles of the octahedral group O: 1 × 0°, 6 × 90°, 8 × 120°, 9 × 180°
    angles = np.degrees(np.arccos(np.clip((np.trace(g, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    values, counts = np.unique(np.round(angles), return_counts=True)
    assert values.tolist() == [0, 90, 120, 180] and counts.tolist() == [1, 6, 8, 9]
    # closed under composition
    prod = np.einsum("aij,bjk->abik", g, g).reshape(-1, 1, 9)
    assert np.max(np.min(np.abs(prod - g.reshape(1, -1, 9)).max(axis=2), axis=1)) < 1e-3
    # each maps the model's atoms (about their centre) onto themselves
    st = gemmi.read_structure(str(path))
    x = np.array(
        [res["CA"][0].pos.tolist() for ch in st[0] for res in ch if res.find_atom("CA", "*")]
    )
    x -= x.mean(axis=0)
    tree = cKDTree(x)
    for r in g:
        assert np.max(tree.query(x @ r.T)[0]) < 0.5


def test_errors_up_to_symmetry() -> None:
    """A recovered pose that is the truth turned by a symmetry is wrong against the truth and
    exact up to the symmetry."""
    rng = np.random.default_rng(5)
    twofold = np.diag([1.0, -1.0, -1.0])  # 180° about the model's x axis
    true = Rotation.random(random_state=rng)
    a, b, c = true.as_euler("ZYZ")
    mate = Rotation.from_matrix(twofold @ true.as_matrix())
    ma, mb, mc = mate.as_euler("ZYZ")
    angles = ViewingAngles.uniform_weights([ma, 0.0, 1.0], [mb, 0.5, 2.0])
    truth = Truth.continuous(0, [a], [b], [c], [0.5], [0.0], np.stack([np.eye(3), twofold]))
    back_rot = np.mod(mc, 2 * np.pi)
    # the same image centre, Rot(−c) d, in the mate's frame: d' = Rot(mc) Rot(−c) d
    centre = image_centres(0.5, 0.0, c)
    dx, dy = (
        np.cos(mc) * centre[0] - np.sin(mc) * centre[1],
        np.sin(mc) * centre[0] + np.cos(mc) * centre[1],
    )
    e = pose_errors(angles, 360, DisplacementGrid.from_search(1, 3, 3, 1.0).as_array(), truth,
                    [0], [dx], [dy], [back_rot])  # fmt: skip
    assert e.n_symmetry == 2 and e.modulo_symmetry is not None
    sym = e.modulo_symmetry
    assert e.direction_deg[0] > 1 or e.rotation_deg[0] > 1  # wrong against the truth
    assert sym.direction_deg[0] < 1e-3 and sym.rotation_deg[0] < 1e-3  # float32 angles
    assert sym.shift_angstrom[0] == pytest.approx(0.0, abs=1e-12)
    assert sym.direction_floor_deg[0] <= e.direction_floor_deg[0] + 1e-9
    # without the symmetry, none
    plain = pose_errors(angles, 360, np.zeros((2, 1)), truth.with_symmetry(None), [0], [dx],
                        [dy], [back_rot])  # fmt: skip
    assert plain.modulo_symmetry is None and plain.n_symmetry == 1
