"""Particle conversion (spec §3.3) against CryoLike's stacks, and the inverse transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolike_dask.io.mrc import read_images
from cryolike_dask.params import ImageParameters
from cryolike_dask.preprocess.nufft import images_to_polar, polar_to_images
from cryolike_dask.preprocess.particles import center_and_scale, downsample, images_to_fourier


def test_conversion_matches_cryolike(reference_dir) -> None:
    params = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    images = read_images(reference_dir / "raw" / "particles.mrcs")
    fourier, phys = images_to_fourier(images, params.polar_grid, "single")
    stacks = [
        torch.load(
            reference_dir / "particles" / sub / f"particles_{kind}_stack_00000{i}.pt"
        ).numpy()
        for sub, kind in (("fft", "fourier"),)
        for i in (0, 1)
    ]
    expected = np.concatenate(stacks)
    assert fourier.dtype == np.complex64
    assert np.abs(fourier - expected).max() / np.abs(expected).max() < 1e-5  # measured 1.6e-7
    phys_ref = np.concatenate(
        [
            torch.load(
                reference_dir / "particles" / "phys" / f"particles_phys_stack_00000{i}.pt"
            ).numpy()
            for i in (0, 1)
        ]
    )
    np.testing.assert_allclose(phys, phys_ref, atol=1e-6)


def test_inverse_transform_returns_the_image(rng) -> None:
    """polar → image → polar is the identity on band-limited content (smooth test image)."""
    n = 48
    params = ImageParameters.from_values(n, 1.0, n_inplanes=4 * n, resolution_factor=1.0)
    grid = params.polar_grid
    axis = np.arange(n) - n // 2
    x, y = np.meshgrid(axis, axis, indexing="ij")
    image = np.exp(-((x - 3) ** 2 + (y + 2) ** 2) / (2 * 4.0**2))
    forward = images_to_polar(image[None], grid, "double")
    back = polar_to_images(forward, grid, n)[0]
    np.testing.assert_allclose(back, image, atol=2e-6)


def test_centre_scale_and_downsample() -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    c = center_and_scale(x)
    np.testing.assert_allclose(c.mean(axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(np.abs(c).max(axis=(1, 2)), 1)
    d = downsample(x, 2)
    assert d.shape == (2, 2, 2) and d[0, 0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))
    with pytest.raises(ValueError, match="even"):
        downsample(x, 3)
    with pytest.raises(ValueError, match="image 1 is constant"):
        center_and_scale(np.stack([x[0], np.ones((4, 4), np.float32)]))
