"""Drop-in replacement for ``cryolike.run_likelihood``.

A CryoLike script works after changing its import line::

    from cryolike_dask.run_likelihood import (
        configure_likelihood_files, configure_displacement, run_likelihood_optimal_pose,
    )

    file_config = configure_likelihood_files(folder_templates="templates/",
        folder_particles="particles/", folder_output="likelihood/", n_stacks=2, i_template=0)
    displacer = configure_displacement(max_displacement_pixels=1.5, n_displacements_x=3,
                                       n_displacements_y=3)
    run_likelihood_optimal_pose(file_config, "templates/parameters.npz", displacer,
        template_index=0, n_stacks=2, return_likelihood_optimal_pose_fourier=True,
        return_likelihood_integrated_pose_fourier=True)

The outputs are CryoLike's files (same paths, names, dtypes), except that the integrated
log-likelihood is really computed (CryoLike's wrapper writes a constant) with normalised
viewing weights. Extra keyword arguments choose the cluster (``n_workers``,
``scheduler_address``, ``scheduler_file``, ``scheduler="sync"``), the device and progress
display. ``n_templates_per_batch`` / ``n_images_per_batch`` set the Dask block sizes; left
``None`` (or with ``estimate_batch_size=True``) they are planned from the worker memory.

Where it runs: the session's active Dask client if there is one (or ``client=``, or
``scheduler_address=`` / ``scheduler_file=``); otherwise a LocalCluster whose workers are
threads of this process, so that a top-level script with no ``if __name__ == "__main__":``
guard runs as CryoLike scripts do (``processes=True`` asks for worker processes instead).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

from threadpoolctl import threadpool_limits

from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.io.cryolike import check_stacks_exist
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.pipeline.cluster import ClusterOptions, active_client
from cryolike_dask.pipeline.driver import RunReport
from cryolike_dask.pipeline.driver import run_likelihood as _run
from cryolike_dask.pipeline.spec import LikelihoodOptions, OutputRequest

__all__ = [
    "DisplacementConfig",
    "LikelihoodFiles",
    "configure_displacement",
    "configure_likelihood_files",
    "run_likelihood_full_cross_correlation",
    "run_likelihood_optimal_pose",
]


@dataclass(frozen=True)
class LikelihoodFiles:
    """Input and output folders of a run (CryoLike's ``LikelihoodFileManager``)."""

    folder_templates: Path
    folder_particles: Path
    folder_output: Path
    n_stacks: int
    i_template: int


@dataclass(frozen=True)
class DisplacementConfig:
    """The displacement search (CryoLike's ``configure_displacement`` callback)."""

    max_displacement_pixels: float = 8.0
    n_displacements_x: int = -1
    n_displacements_y: int = -1

    def grid(self, pixel_size: float) -> DisplacementGrid:
        """The displacement grid for images of ``pixel_size`` Å."""
        return DisplacementGrid.from_search(
            self.max_displacement_pixels,
            self.n_displacements_x,
            self.n_displacements_y,
            pixel_size,
        )

    def __call__(self, pixel_size: float) -> DisplacementGrid:
        return self.grid(pixel_size)


def configure_likelihood_files(
    folder_templates: str,
    folder_particles: str,
    folder_output: str = "",
    n_stacks: int = 1,
    i_template: int = 0,
    return_likelihood_optimal_pose_physical: bool = False,
) -> LikelihoodFiles:
    """Name the input and output folders; check that the particle stacks exist.

    Parameters are CryoLike's: ``folder_templates`` holds ``template_file_list.npy`` (or is a
    Zarr template store), ``folder_particles`` holds ``fft/particles_fourier_stack_*.pt/.npz``
    (or is a Zarr image store), outputs go to ``folder_output/template{i_template}/``.
    """
    if return_likelihood_optimal_pose_physical:
        raise NotImplementedError(
            "the physical-space likelihood is not implemented (nor is it in CryoLike)"
        )
    particles = Path(folder_particles)
    if (particles / "fft").is_dir() or not (particles / "zarr.json").is_file():
        check_stacks_exist(particles, n_stacks)
    return LikelihoodFiles(
        Path(folder_templates),
        particles,
        Path(folder_output or "."),
        int(n_stacks),
        int(i_template),
    )


def configure_displacement(
    max_displacement_pixels: float = 8.0,
    n_displacements_x: int = -1,
    n_displacements_y: int = -1,
) -> DisplacementConfig:
    """The displacement grid to search (spec §8.2): counts of -1 mean no search on that axis."""
    return DisplacementConfig(max_displacement_pixels, n_displacements_x, n_displacements_y)


def _run_wrapper(
    file_config: LikelihoodFiles,
    params_input: str | ImageParameters,
    displacer: DisplacementConfig,
    template_index: int,
    n_stacks: int,
    skip_exist: bool,
    n_templates_per_batch: int | None,
    n_images_per_batch: int | None,
    estimate_batch_size: bool,
    request: OutputRequest,
    options: dict,
) -> RunReport:
    params = (
        params_input
        if isinstance(params_input, ImageParameters)
        else ImageParameters.load(params_input)
    )
    if template_index != file_config.i_template:
        warnings.warn(
            f"template_index={template_index} differs from configure_likelihood_files' "
            f"i_template={file_config.i_template}; results go to template{template_index}/ "
            "(CryoLike would write them under template{i_template}/)",
            UserWarning,
            stacklevel=3,
        )
    if n_stacks > file_config.n_stacks:
        check_stacks_exist(file_config.folder_particles, n_stacks)
    auto = estimate_batch_size or options.pop("discover_batch_size", False)
    if not isinstance(displacer, DisplacementConfig):  # a grid given directly
        grid = displacer
        displacer = DisplacementConfig()
    else:
        grid = None
    run_options = LikelihoodOptions.parse(
        structures=[int(template_index)],
        n_stacks=n_stacks,
        max_displacement_pixels=displacer.max_displacement_pixels,
        n_displacements_x=displacer.n_displacements_x,
        n_displacements_y=displacer.n_displacements_y,
        optimal_pose=request.optimal_pose,
        integrated_likelihood=request.integrated,
        optimal_pose_likelihood=request.optimal_likelihood,
        full_cross_correlation=request.full,
        templates_per_block=None if auto else n_templates_per_batch,
        images_per_block=None if auto else n_images_per_batch,
        precision=options.pop("precision", None),
        device=options.pop("device", "auto"),
        skip_exist=skip_exist,
        overwrite=options.pop("overwrite", False),
        yes=options.pop("yes", False),  # confirm a very large run
    )
    run = run_options.build(
        file_config.folder_templates,
        file_config.folder_particles,
        params,
        file_config.folder_output,
    )
    if grid is not None:
        run = dataclasses.replace(run, displacements=grid)
    progress = options.pop("progress", True)
    client = options.pop("client", None)
    # A CryoLike script is often a plain top-level script: without a client or a cluster
    # address, run the workers in this process (no spawned interpreters re-importing it).
    options.setdefault("processes", False)
    cluster = ClusterOptions(**options)
    if client is None and active_client() is None and not cluster.processes:
        with threadpool_limits(1):  # one BLAS thread per worker thread, as a nanny would set
            return _run(run, cluster, progress=progress)
    return _run(run, cluster, client=client, progress=progress)


def run_likelihood_optimal_pose(
    file_config: LikelihoodFiles,
    params_input: str | ImageParameters,
    displacer: DisplacementConfig,
    template_index: int = 0,
    n_stacks: int = 1,
    skip_exist: bool = False,
    n_templates_per_batch: int | None = None,
    n_images_per_batch: int | None = None,
    estimate_batch_size: bool = False,
    return_likelihood_optimal_pose_fourier: bool = False,
    return_likelihood_integrated_pose_fourier: bool = False,
    **cluster_options,
) -> RunReport:
    """Optimal pose of every image (and optionally its likelihoods), one file set per stack.

    Writes ``template{N}/optimal_pose/*``, ``template{N}/cross_correlation/cross_correlation_*``
    and, if asked, ``template{N}/log_likelihood/log_likelihood_{optimal,integrated}_fourier_*``
    for stacks ``0 … n_stacks-1``, plus ``displacements_set.pt`` and ``results.zarr``.

    Extra keyword arguments: ``n_workers``, ``threads_per_worker``, ``memory_limit``,
    ``scheduler_address``, ``scheduler_file``, ``scheduler`` (``"sync"``/``"threads"``),
    ``dashboard``, ``device`` (``"auto"``, ``"cpu"``, ``"gpu"``), ``precision``, ``progress``
    and ``discover_batch_size`` (CryoLike's newer name for ``estimate_batch_size``).
    Returns a :class:`~cryolike_dask.pipeline.RunReport`.
    """
    request = OutputRequest(
        optimal_pose=True,
        integrated=return_likelihood_integrated_pose_fourier,
        optimal_likelihood=return_likelihood_optimal_pose_fourier,
    )
    return _run_wrapper(
        file_config,
        params_input,
        displacer,
        template_index,
        n_stacks,
        skip_exist,
        n_templates_per_batch,
        n_images_per_batch,
        estimate_batch_size,
        request,
        dict(cluster_options),
    )


def run_likelihood_full_cross_correlation(
    file_config: LikelihoodFiles,
    params_input: str | ImageParameters,
    displacer: DisplacementConfig,
    template_index: int = 0,
    n_stacks: int = 1,
    skip_exist: bool = False,
    n_templates_per_batch: int | None = None,
    n_images_per_batch: int | None = None,
    estimate_batch_size: bool = False,
    **cluster_options,
) -> RunReport:
    """The full ``[image, template, displacement, rotation]`` cross-correlation per stack.

    Writes ``template{N}/cross_correlation/cross_correlation_pose_msdw_stack_SSSSSS.pt`` as a
    plain float tensor (CryoLike pickles a NamedTuple holding it), computed block by block
    into ``results.zarr`` and never held whole in memory. Keyword options as in
    :func:`run_likelihood_optimal_pose`.
    """
    request = OutputRequest(optimal_pose=False, full=True)
    return _run_wrapper(
        file_config,
        params_input,
        displacer,
        template_index,
        n_stacks,
        skip_exist,
        n_templates_per_batch,
        n_images_per_batch,
        estimate_batch_size,
        request,
        dict(cluster_options),
    )
