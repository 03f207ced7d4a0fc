"""Tests of the prior-pose search math against independent references."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from cryolike_dask.evaluation import inplane_offset
from cryolike_dask.grids.polar import PolarGrid
from cryolike_dask.grids.sphere import ViewingAngles
from cryolike_dask.kernels import pose_prior as pp
from cryolike_dask.preprocess.templates import templates_from_atoms

RNG = np.random.default_rng(7)


def _poses(n):
    return RNG.uniform(-180, 180, n), RNG.uniform(0, 180, n), RNG.uniform(-180, 180, n)


def test_matrices_match_scipy() -> None:
    rot, tilt, psi = _poses(20)
    ref = Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], 1), degrees=True).as_matrix()
    assert np.allclose(pp.relion_matrices(rot, tilt, psi), ref, atol=1e-12)
    a, b = RNG.uniform(0, 2 * np.pi, 9), RNG.uniform(0, np.pi, 9)
    ref = Rotation.from_euler("ZYZ", np.stack([a, b, 0 * a], 1)).as_matrix()
    assert np.allclose(pp.template_rotations(a, b), ref, atol=1e-12)


def test_frame_matrices() -> None:
    r = RNG.normal(size=(30, 3))
    m = pp.relion_matrices(*_poses(12))
    xy = np.einsum("nji,aj->nai", m, r)[..., :2]  # RELION (x, y)
    for structure, coords in (("model", r), ("map", r[:, ::-1])):
        q = pp.template_frame(m, structure)
        assert np.allclose(np.linalg.det(q), 1.0)
        ours = np.einsum("nji,aj->nai", q, coords)[..., :2]  # (row, col)
        assert np.allclose(ours[..., 0], xy[..., 1]) and np.allclose(ours[..., 1], xy[..., 0])


def test_frame_through_templates() -> None:
    grid, box = PolarGrid(6.0, 0.5, 24), 60.0
    atoms = RNG.normal(scale=8.0, size=(5, 3))
    radii = np.full(5, 2.0)
    m = pp.relion_matrices(*_poses(4))
    xy = np.einsum("nji,aj->nai", m, atoms)[..., :2]
    rho = 2 * radii / box
    log_a = -1.5 * np.log(2 * np.pi) - 3 * np.log(rho) - np.log(5)
    kx, ky = grid.x_points, grid.y_points
    offset = np.sinc(2 * kx) * np.sinc(2 * ky) * np.exp(log_a).sum()
    for structure, coords in (("model", atoms), ("map", atoms[:, ::-1])):
        q = pp.template_frame(m, structure)
        e = Rotation.from_matrix(q).as_euler("ZYZ")
        angles = ViewingAngles.uniform_weights(e[:, 0], e[:, 1], e[:, 2])
        t = templates_from_atoms(coords, radii, angles, grid, box, precision="double")
        for n in range(4):
            row, col = xy[n, :, 1], xy[n, :, 0]
            ph = -2 * np.pi * (2 / box) * (kx[..., None] * row + ky[..., None] * col)
            rad = np.exp(-2 * np.pi**2 * rho**2 * grid.radii[:, None, None] ** 2 + log_a)
            ref = np.sum(rad * np.exp(1j * ph), -1) - offset
            corr = np.real(np.vdot(ref, t[n])) / np.linalg.norm(ref) / np.linalg.norm(t[n])
            assert corr > 0.999


def test_relative_pose_brute_force() -> None:
    q = Rotation.random(6, random_state=1).as_matrix()
    a, b = RNG.uniform(0, 2 * np.pi, 10), RNG.uniform(0, np.pi, 10)
    r = pp.template_rotations(a, b)
    direction, phase = pp.relative_pose(q, r)
    theta = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    for i in range(6):
        for s in range(10):
            dz = np.arccos(np.clip(q[i, :, 2] @ r[s, :, 2], -1, 1))
            assert abs(direction[i, s] - dz) < 1e-7
            for g in theta:
                pose = r[s] @ Rotation.from_euler("z", g).as_matrix()
                psi = inplane_offset(q[i][None], pose[None])[0]
                diff = pp.wrap_angle(phase[i, s] + g - psi)
                assert abs(pp.wrap_angle(diff + np.pi) - np.pi) < 1e-9 or abs(diff) < 1e-9
                # sign: pose = C^T Q Rz(psi); the relative rotation angle is |psi| at dz = 0
    # prior equal to a grid pose (s, w0): direction 0, phase -gamma_w0
    q0 = r[3] @ Rotation.from_euler("z", theta[5]).as_matrix()
    d0, p0 = pp.relative_pose(q0[None], r)
    assert abs(d0[0, 3]) < 1e-7 and abs(pp.wrap_angle(p0[0, 3] + theta[5])) < 1e-9
    rel = Rotation.from_matrix(q0.T @ r[3] @ Rotation.from_euler("z", theta[6]).as_matrix())
    assert np.isclose(rel.as_rotvec()[2], pp.wrap_angle(p0[0, 3] + theta[6]))


def _case(m=3, s=7, w=6, d=5):
    direction = RNG.uniform(0, np.pi, (m, s))
    phase = RNG.uniform(-np.pi, np.pi, (m, s))
    theta = np.linspace(0, 2 * np.pi, w, endpoint=False)
    disp = RNG.normal(scale=2.0, size=(2, d))
    return direction, phase, theta, disp


def test_window_full_is_exactly_zero() -> None:
    direction, phase, theta, disp = _case()
    f = pp.window_prior(direction, phase, theta, disp, np.pi)
    assert np.all(f.log_template == 0) and np.all(f.log_rotation == 0)
    assert np.all(f.displacement_kept) and np.all(f.n_poses == 7 * 6 * 5)
    lw = np.log(RNG.uniform(0.1, 1.0, 7))
    lw -= np.log(np.exp(lw).sum())
    assert np.all(pp.log_normaliser(f, lw) == 0.0)
    g = pp.gaussian_prior(direction, phase, theta, disp, 1e9, 1e9)
    assert np.allclose(pp.log_normaliser(g, lw), 0.0, atol=1e-12)


def test_normaliser_and_counts_brute_force() -> None:
    direction, phase, theta, disp = _case()
    lw = np.log(RNG.uniform(0.1, 1.0, 7))
    lw -= np.log(np.exp(lw).sum())
    for f in (
        pp.window_prior(direction, phase, theta, disp, 1.2, 2.5),
        pp.gaussian_prior(direction, phase, theta, disp, 0.6, 1.5),
    ):
        dk = f.n_kept
        for i in range(3):
            z, count = 0.0, 0
            for s in range(7):
                for w in range(6):
                    for c in f.log_displacement:
                        v = f.log_template[i, s] + f.log_rotation[i, s, w] + c
                        z += np.exp(lw[s] + v)
                        count += int(np.isfinite(v))
            kappa = np.log(z) - np.log(dk) - np.log(6)
            assert np.isclose(pp.log_normaliser(f, lw)[i], kappa, atol=1e-12)
            assert f.n_poses[i] == count
        bp = pp.block_pairs(f, [(0, 3), (3, 7)], [(0, 1), (1, 3)])
        assert bp[0, 0] == f.pairs[0, :3].any() and bp[1, 1] == f.pairs[1:, 3:].any()


def test_on_edge_and_misc() -> None:
    e = pp.on_edge(np.array([0.1, 0.95, 0.1]), np.array([0.0, 0.0, 0.9]), 1.0, 0.2, 0.2)
    assert e.tolist() == [False, True, True]
    assert not pp.on_edge(3.0, 3.0, np.pi, 0.2, 0.2)
    p = pp.image_offset([1.0], [2.0])
    assert np.allclose(p, [[-2.0, -1.0]])
    d = pp.template_displacement(p, [0.7])
    c, s = np.cos(0.7), np.sin(0.7)
    assert np.allclose(np.array([[c, s], [-s, c]]) @ d[0], p[0])  # Rot(-γ) d = p
    assert pp.wrap_angle(-np.pi) == np.pi


def test_allowed_directions_against_scipy_angles() -> None:
    """The direction-only test: templates within the limit of each prior's projection
    direction (angles between the rotations' third columns, from SciPy), plus the nearest."""
    rng = np.random.default_rng(4)
    q = Rotation.random(30, random_state=rng).as_matrix()
    r = Rotation.random(200, random_state=rng).as_matrix()
    limit = np.radians(25.0)
    got = pp.allowed_directions(q, r, limit)
    cos = np.einsum("mi,si->ms", q[:, :, 2], r[:, :, 2])
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    want = angle <= 25.0
    want[np.arange(30), np.argmin(angle, axis=1)] = True
    np.testing.assert_array_equal(got, want)
    # a limit below every angle keeps only the nearest template; slack widens the test
    only = pp.allowed_directions(q, r, -np.inf)
    assert np.all(only.sum(axis=1) == 1)
    assert np.all(pp.allowed_directions(q, r, limit, 0.1) >= got)
    # the kernel's own direction angle (relative_pose) gives the same window
    direction, _ = pp.relative_pose(q, r)
    np.testing.assert_allclose(np.degrees(direction), angle, atol=1e-6)
