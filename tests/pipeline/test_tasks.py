"""Task helpers: the translation kernel is made once per worker, in the layout the template
preparation uses, with the same prepared templates as a fresh kernel."""

from __future__ import annotations

import numpy as np

from cryolike_dask.kernels import BlockOutputs, prepare_templates, translation_kernel
from cryolike_dask.pipeline import tasks


def _settings(ref):
    d = ref["displacements"]
    return tasks.KernelSettings(
        ref["params"],
        tuple(zip(d.x.tolist(), d.y.tolist(), strict=True)),
        "single",
        "cpu",
        BlockOutputs(),
    )


def test_translation_kernel_is_cached_angle_major(ref_inputs) -> None:
    tasks.clear_caches()
    settings = _settings(ref_inputs)
    grid = settings.parameters.polar_grid
    d = settings.displacement_array
    fresh = translation_kernel(
        grid.x_points, grid.y_points, d[0], d[1], settings.parameters.box_size
    )
    cached = tasks._translation(settings)
    assert cached is tasks._translation(settings)  # made once
    assert cached.shape == fresh.shape and cached.dtype == np.complex64
    assert cached.transpose(2, 1, 0).flags.c_contiguous  # no copy in prepare_templates
    np.testing.assert_array_equal(cached, fresh.astype(np.complex64))
    block = ref_inputs["templates"].read(0, 0, 8)
    a = prepare_templates(block, cached, grid, "single")
    b = prepare_templates(block, fresh, grid, "single")
    for name in ("spectrum", "power_spectrum", "mask_weighted"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    tasks.clear_caches()
