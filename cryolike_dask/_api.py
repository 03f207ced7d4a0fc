"""The Python API's entry points for the likelihood: open inputs, build the lazy dataset or
run the resumable driver. Exposed flat as ``cryolike_dask.open_images`` etc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.io import cryolike as cl
from cryolike_dask.io import sources
from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.io.zarr_stores import ImageStore, StoreError, TemplateStore
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.pipeline.spec import LikelihoodOptions

PathLike = str | os.PathLike


def _parameters(params: ImageParameters | PathLike | None) -> ImageParameters | None:
    if params is None or isinstance(params, ImageParameters):
        return params
    return ImageParameters.load(params)


def open_images(
    path: PathLike,
    params: ImageParameters | PathLike | None = None,
    *,
    n_stacks: int | None = None,
    astigmatism_convention: str | None = None,
) -> ImageSource:
    """Open particle images: a CryoLike particle folder (``fft/*.pt, *.npz``) or a Zarr image
    store (``convert-particles``, ``import-cryolike``).

    Parameters
    ----------
    path : path
        The folder or store.
    params : ImageParameters or path, optional
        The run's image parameters (``parameters.npz``); default: the store's, or those of the
        folder's first stack. Every stack is checked against them.
    n_stacks : int, optional
        Use stacks ``0 … n_stacks-1`` only (default all).
    astigmatism_convention : {"cryolike", "relion"}, optional
        How CryoLike stacks' defocus angles are read (default ``cryolike``).

    Returns
    -------
    ImageSource
        ``n_images`` complex images ``[M, N, W]`` with per-image CTF parameters, read lazily.
    """
    p = Path(path)
    given = _parameters(params)
    if given is None:
        if (p / "zarr.json").is_file():
            given = ImageStore.open(p).parameters
        elif (p / "fft").is_dir():
            given = ImageParameters.load(cl.stack_paths(p, 0)[1], strict=False)
    return sources.open_particles(p, given, n_stacks, astigmatism_convention)


def open_templates(
    path: PathLike, params: ImageParameters | PathLike | None = None
) -> TemplateSource:
    """Open structures' templates: a CryoLike template folder (``template_file_list.npy``) or a
    Zarr template store (``make-templates``, ``import-cryolike``).

    Parameters
    ----------
    path : path
        The folder or store.
    params : ImageParameters or path, optional
        The image parameters; default: the store's, or the folder's ``parameters.npz``.

    Returns
    -------
    TemplateSource
        One or more structures (``names``), each ``S`` complex templates ``[S, N, W]``.
    """
    p = Path(path)
    given = _parameters(params)
    if given is None:
        if (p / "zarr.json").is_file():
            try:
                given = TemplateStore.open(p).parameters
            except StoreError:
                given = None
        elif (p / "parameters.npz").is_file():
            given = ImageParameters.load(p / "parameters.npz")
        elif (p / cl.TEMPLATE_LIST).is_file():
            raise CryoLikeDaskError(
                f"{p}: a CryoLike template folder without parameters.npz; pass params="
            )
    return sources.open_templates(p, given)


def _structures(templates: TemplateSource, structures: Any) -> Any:
    if structures is None:
        return "all"
    items = [structures] if isinstance(structures, (int, str)) else list(structures)
    out = []
    for s in items:
        if isinstance(s, str):
            if s not in templates.names:
                raise CryoLikeDaskError(
                    f"no structure named {s!r}; the templates hold {', '.join(templates.names)}"
                )
            out.append(templates.names.index(s))
        else:
            out.append(int(s))
    return out


def _options_and_sources(images, templates, params, structures, options: dict):
    tsrc = templates if isinstance(templates, TemplateSource) else open_templates(templates, params)
    given = _parameters(params) or tsrc.parameters
    isrc = (
        images
        if isinstance(images, ImageSource)
        else open_images(
            images,
            given,
            n_stacks=options.get("n_stacks"),
            astigmatism_convention=options.get("astigmatism_convention"),
        )
    )
    opts = LikelihoodOptions(structures=_structures(tsrc, structures), **options)
    return opts, tsrc, isrc, given


def likelihood(
    images: PathLike | ImageSource,
    templates: PathLike | TemplateSource,
    *,
    params: ImageParameters | PathLike | None = None,
    structures: int | str | list[int | str] | None = None,
    max_displacement_pixels: float = 8.0,
    n_displacements_x: int = -1,
    n_displacements_y: int = -1,
    integrated_likelihood: bool = False,
    optimal_pose_likelihood: bool = False,
    per_template: bool = False,
    full_cross_correlation: bool = False,
    precision: str | None = None,
    device: str = "auto",
    client: Any = None,
    tolerance: float | None = None,
    **search: Any,
):
    """Cross-correlations, optimal poses and likelihoods of images against structures, lazily.

    Parameters
    ----------
    images, templates : path or source
        As :func:`open_images` / :func:`open_templates` take them, or their results.
    params : ImageParameters or path, optional
        Image parameters (default: the templates').
    structures : int, str or list of them, optional
        Structures to compare with, by index or name (default all).
    max_displacement_pixels, n_displacements_x, n_displacements_y
        The displacement grid (CryoLike's ``configure_displacement``; -1 = no search).
    integrated_likelihood, optimal_pose_likelihood, per_template, full_cross_correlation : bool
        Optional outputs (the optimal pose is always computed).
    precision : {"single", "double"}, optional
        Default: the parameters' precision.
    device : {"auto", "cpu", "gpu"}
        Where the kernels run (``auto``: the GPU when the workers have one).
    tolerance : float, optional
        Bounded-error mode: every normalised cross-correlation within ``tolerance`` of the
        exact one (compressed template spectra; pairs the run-time bound cannot certify are
        recomputed exactly). Default: exact.
    client : distributed.Client, optional
        Used to plan blocks for its workers and choose the device (default: the active
        client, else this machine).
    **search
        A search around each image's prior pose (images converted with their poses):
        ``pose_prior`` (``"window"``, ``"gaussian"`` or ``"fixed"``), ``window_degrees``,
        ``window_shift_pixels``, ``sigma_degrees``, ``sigma_shift_angstrom``,
        ``use_prior_origin``, ``pose_frame`` (``"auto"``/``"map"``/``"model"``), as the CLI's
        ``likelihood`` flags (docs/pipeline.md, "Searches around prior poses"). The
        dataset then also holds ``optimal_pose_on_window_edge`` and ``evaluated_poses``.

    Returns
    -------
    xarray.Dataset
        Dask-backed, nothing computed yet: ``.compute()`` or ``.to_zarr()`` runs it on the
        current Dask client. Variables ``cross_correlation`` (float32/64), ``optimal_template``
        (int64), ``optimal_displacement_x``/``_y`` (Å), ``optimal_inplane_rotation`` (rad),
        ``log_likelihood_integrated_fourier``, ``log_likelihood_optimal_fourier`` with dims
        ``("structure", "image")``; ``per_template_*`` ``("structure", "image", "template")``;
        ``cross_correlation_pose_msdw`` ``("structure", "image", "template", "displacement",
        "rotation")``. Structure names, image identifiers, displacements and rotations are
        coordinates.
    """
    from cryolike_dask.pipeline.cluster import active_client
    from cryolike_dask.pipeline.dataset import likelihood_dataset

    opts, tsrc, isrc, given = _options_and_sources(
        images,
        templates,
        params,
        structures,
        dict(
            max_displacement_pixels=max_displacement_pixels,
            n_displacements_x=n_displacements_x,
            n_displacements_y=n_displacements_y,
            integrated_likelihood=integrated_likelihood,
            optimal_pose_likelihood=optimal_pose_likelihood,
            per_template=per_template,
            full_cross_correlation=full_cross_correlation,
            precision=precision,
            device=device,
            tolerance=tolerance,
            **search,
        ),
    )
    run = opts.build(tsrc, isrc, given, None)
    return likelihood_dataset(run, client if client is not None else active_client())


def write_likelihood(
    images: PathLike | ImageSource,
    templates: PathLike | TemplateSource,
    output: PathLike,
    *,
    params: ImageParameters | PathLike | None = None,
    structures: int | str | list[int | str] | None = None,
    client: Any = None,
    cluster: Any = None,
    progress: bool = True,
    **options: Any,
):
    """Run the likelihood into ``output``, resumably: ``results.zarr`` and CryoLike's files.

    The same run as :func:`likelihood` (same keyword options, plus ``skip_exist``,
    ``overwrite``, ``export_pt``, ``templates_per_block``, ``images_per_block``,
    ``max_tasks_per_graph``), executed in batches with done marks so that an interrupted run
    resumes with ``skip_exist=True``. A folder holding another run's results is refused
    unless ``overwrite=True``. Runs on ``client``, else the active client, else ``cluster``
    (:class:`~cryolike_dask.pipeline.ClusterOptions`), else a new LocalCluster.

    Returns
    -------
    RunReport
        Blocks computed and skipped, stacks written, timings.
    """
    from cryolike_dask.pipeline.driver import run_likelihood as _run

    opts, tsrc, isrc, given = _options_and_sources(images, templates, params, structures, options)
    run = opts.build(tsrc, isrc, given, output)
    return _run(run, cluster, client=client, progress=progress)
