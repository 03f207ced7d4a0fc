"""Synthetic particles: templates at known poses, with CTF and noise, as real-space images.

Used by the round-trip tests and the demo. The forward model is the likelihood's own
(``model_at_pose``: shift, then in-plane rotation, then CTF), taken to real space with the
type-1 NUFFT of spec §3.2, plus white Gaussian noise at a given SNR per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryolike_dask.kernels.ctf import ctf_from_lens
from cryolike_dask.kernels.likelihood import model_at_pose
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.preprocess.nufft import polar_to_images


@dataclass(frozen=True)
class SyntheticParticles:
    """Images ``[m, nx, ny]`` float32 and the truth they were made from."""

    images: np.ndarray
    template_index: np.ndarray
    displacement_x: np.ndarray
    displacement_y: np.ndarray
    rotation: np.ndarray
    lens: LensParameters
    noise_sigma: np.ndarray


def synthesize_particles(
    templates: np.ndarray,
    params: ImageParameters,
    template_index: np.ndarray,
    displacement_x: np.ndarray,
    displacement_y: np.ndarray,
    rotation: np.ndarray,
    lens: LensParameters,
    snr: float | None,
    rng: np.random.Generator,
) -> SyntheticParticles:
    """Particles from ``templates[template_index]`` shifted by ``(dx, dy)`` Å, rotated by
    ``rotation`` rad (rounded to the grid's step), with each image's CTF (its lens
    parameters and convention), plus noise of variance ``mean(clean²) / snr`` (none if
    ``snr`` is None).
    """
    grid = params.polar_grid
    ctf = ctf_from_lens(lens, grid.radii, grid.theta, params.box_size[0])
    idx = np.asarray(template_index)
    model = model_at_pose(
        np.asarray(templates)[idx].astype(np.complex128),
        ctf,
        displacement_x,
        displacement_y,
        rotation,
        grid,
        params.box_size,
    )
    clean = polar_to_images(model, grid, params.n_pixels)
    if snr is None:
        sigma = np.zeros(idx.size)
        noisy = clean
    else:
        sigma = np.sqrt(np.mean(clean**2, axis=(1, 2)) / snr)
        noisy = clean + rng.normal(size=clean.shape) * sigma[:, None, None]
    return SyntheticParticles(
        noisy.astype(np.float32),
        idx,
        np.asarray(displacement_x),
        np.asarray(displacement_y),
        np.asarray(rotation),
        lens,
        sigma,
    )
