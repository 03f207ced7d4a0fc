"""make-templates: CryoLike's 1uao templates, real maps and models, checks, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryolike_dask.io.mrc import write_volume
from cryolike_dask.io.zarr_stores import TemplateStore
from cryolike_dask.params import ImageParameters
from cryolike_dask.pipeline.cluster import ClusterOptions
from cryolike_dask.pipeline.make_templates import TemplateInputError, check_inputs, make_templates

SYNC = ClusterOptions(scheduler="sync")
ROOT = Path(__file__).resolve().parents[2]


def _quiet(*a) -> None:
    pass


def test_1uao_matches_cryolike(reference_dir, tmp_path) -> None:
    params = ImageParameters.load(reference_dir / "templates" / "parameters.npz")
    paths = make_templates(
        [reference_dir / "inputs_pdb" / "1uao.pdb"],
        params,
        tmp_path,
        templates_per_block=7,
        cluster=SYNC,
        progress=False,
    )
    assert [p.name for p in paths] == ["templates_fourier_1uao.pt"]
    ours = torch.load(paths[0]).numpy()
    expected = torch.load(reference_dir / "templates" / "templates_fourier_1uao.pt").numpy()
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-5
    listing = np.load(tmp_path / "template_file_list.npy")
    assert [Path(p).name for p in listing] == ["templates_fourier_1uao.pt"]
    store = TemplateStore.open(tmp_path / "templates.zarr")
    np.testing.assert_array_equal(store.templates(0)[:], ours)
    np.testing.assert_array_equal(store.viewing_angles(0).weights, params.viewing_angles.weights)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_templates(
            [reference_dir / "inputs_pdb" / "1uao.pdb"],
            params,
            tmp_path,
            cluster=SYNC,
            progress=False,
        )


def test_real_map_and_mmcif(data_dir, tmp_path) -> None:
    params = ImageParameters.from_values(32, 11.4, n_inplanes=32, viewing_distance=4 / (4 * np.pi))
    paths = make_templates(
        [data_dir / "real" / "emd_1832.map", data_dir / "real" / "8zpm.cif"],
        params,
        tmp_path,
        cluster=SYNC,
        progress=False,
    )
    grid = params.polar_grid
    for p in paths:
        t = torch.load(p).numpy()
        assert t.shape == (params.viewing_angles.n_angles, *grid.shape)
        norms = np.sum(np.abs(t) ** 2 * grid.integration_weights, axis=(1, 2))
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
        # real densities: Hermitian templates, as the likelihood kernel requires
        half = grid.n_inplanes // 2
        assert np.abs(t[..., half:] - np.conj(t[..., :half])).max() < 1e-5


def test_input_checks(tmp_path, data_dir) -> None:
    params = ImageParameters.from_values(32, 11.4)
    with pytest.raises(TemplateInputError, match="unknown extension"):
        (tmp_path / "x.txt").write_text("")
        check_inputs([tmp_path / "x.txt"], params)
    with pytest.raises(TemplateInputError, match="not found"):
        check_inputs([tmp_path / "nope.mrc"], params)
    with pytest.raises(TemplateInputError, match="image stack"):
        check_inputs([data_dir / "real" / "relion31.mrcs"], params)
    coarse = ImageParameters.from_values(64, 2.0)  # 5.7 Å voxels cannot reach 1/4 Å⁻¹
    with pytest.raises(TemplateInputError, match="too coarse"):
        check_inputs([data_dir / "real" / "emd_1832.map"], coarse)
    unknown = tmp_path / "novoxel.mrc"
    write_volume(unknown, np.ones((20, 20, 20), np.float32), 0.0)
    with pytest.raises(TemplateInputError, match=r"no voxel size.*--voxel-size"):
        check_inputs([unknown], params)
    with pytest.warns(UserWarning, match="placed by its voxel size"):  # 20 × 5 Å ≠ 364.8 Å
        given = check_inputs([unknown], params, voxel_size=5.0)
    assert given[0].scale == pytest.approx((5 / 364.8,) * 3)
    with pytest.warns(UserWarning, match="differs from the image box"):
        check_inputs([data_dir / "real" / "emd_1832.map"], ImageParameters.from_values(32, 12.0))


def _peak(params_path: Path, out: Path, model: Path) -> float:
    code = (
        "import json, resource, sys\n"
        "from cryolike_dask.params import ImageParameters\n"
        "from cryolike_dask.pipeline.cluster import ClusterOptions\n"
        "from cryolike_dask.pipeline.make_templates import make_templates\n"
        f"p = ImageParameters.load({str(params_path)!r})\n"
        f"make_templates([{str(model)!r}], p, {str(out)!r}, templates_per_block=64,"
        " cluster=ClusterOptions(scheduler='sync'), progress=False)\n"
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_is_bounded_for_thousands_of_templates(tmp_path, data_dir) -> None:
    """2370 vs 239 viewing directions: a direct [S, N, W, A] evaluation (as CryoLike's batch)
    would need 2370·33·64·10·16 B ≈ 800 MB more; the peak grows by about the output's size."""
    peaks = {}
    for vd, count in ((4 / (4 * np.pi), 239), (1 / (4 * np.pi), 2370)):
        params = ImageParameters.from_values(32, 1.5, n_inplanes=64, viewing_distance=vd)
        path = params.save(tmp_path / f"p{count}.npz")
        peaks[count] = _peak(path, tmp_path / f"t{count}", data_dir / "models" / "1uao.pdb")
    output_growth = (2370 - 239) * 33 * 64 * 8 / 2**20  # MiB of complex64 templates
    assert peaks[2370] - peaks[239] < 4 * output_growth + 64, peaks
