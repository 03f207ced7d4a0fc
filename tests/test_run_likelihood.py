"""A CryoLike script works after changing its import line (the reference README's calls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolike_dask.run_likelihood import (
    configure_displacement,
    configure_likelihood_files,
    run_likelihood_full_cross_correlation,
    run_likelihood_optimal_pose,
)
from tests.conftest import read_pt_tensor


def test_cryolike_script(reference_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(reference_dir)  # CryoLike's run used this folder as working directory
    out = tmp_path / "likelihood"
    file_config = configure_likelihood_files(
        folder_templates="templates/",
        folder_particles="particles/",
        folder_output=str(out),
        n_stacks=2,
        i_template=0,
    )
    displacer = configure_displacement(
        max_displacement_pixels=1.5, n_displacements_x=3, n_displacements_y=3
    )
    run_likelihood_optimal_pose(
        file_config,
        "templates/parameters.npz",
        displacer,
        template_index=0,
        n_stacks=2,
        skip_exist=False,
        n_templates_per_batch=32,
        n_images_per_batch=12,
        estimate_batch_size=False,
        return_likelihood_optimal_pose_fourier=True,
        return_likelihood_integrated_pose_fourier=True,
        scheduler="sync",
        progress=False,
    )
    run_likelihood_full_cross_correlation(
        file_config,
        "templates/parameters.npz",
        displacer,
        template_index=0,
        n_stacks=1,
        n_templates_per_batch=32,
        n_images_per_batch=12,
        scheduler="sync",
        progress=False,
    )
    ref = reference_dir / "likelihood" / "template0"
    for name in (
        "optimal_pose/optimal_template",
        "optimal_pose/optimal_inplane_rotation",
        "cross_correlation/cross_correlation",
        "log_likelihood/log_likelihood_optimal_fourier",
    ):
        for i in (0, 1):
            a = torch.load(ref / f"{name}_stack_00000{i}.pt").numpy()
            b = torch.load(out / "template0" / f"{name}_stack_00000{i}.pt").numpy()
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    full = torch.load(
        out / "template0/cross_correlation/cross_correlation_pose_msdw_stack_000000.pt"
    )
    assert isinstance(full, torch.Tensor)  # a plain tensor, loadable with weights_only=True
    expected = read_pt_tensor(
        ref / "cross_correlation/cross_correlation_pose_msdw_stack_000000.pt",
        "<f4",
        (12, 96, 9, 64),
    )
    np.testing.assert_allclose(full.numpy(), expected, rtol=0, atol=2e-6)
    assert not (
        out / "template0/cross_correlation/cross_correlation_pose_msdw_stack_000001.pt"
    ).exists()


def test_configuration_errors(reference_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="3 particle stacks requested"):
        configure_likelihood_files(
            str(reference_dir / "templates"),
            str(reference_dir / "particles"),
            str(tmp_path),
            n_stacks=3,
        )
    with pytest.raises(NotImplementedError, match="physical"):
        configure_likelihood_files(
            str(reference_dir / "templates"),
            str(reference_dir / "particles"),
            return_likelihood_optimal_pose_physical=True,
        )
    with pytest.warns(UserWarning, match="no translational search"):
        assert configure_displacement().grid(1.0).n_displacements == 1
