"""Command line: ``cryolike-dask COMMAND --help`` (also ``python -m cryolike_dask``)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from cryolike_dask import __version__
from cryolike_dask.errors import DISK_FULL, CryoLikeDaskError, DiskFullError

#: More viewing directions than this need ``make-params --yes`` (the default grid has 2370).
MAX_DIRECTIONS = 100_000

#: Errors that mean "bad input, option or environment": one line, exit status 2, no
#: traceback. Anything else is a bug and shows as one.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CryoLikeDaskError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _memory(text: str) -> str:
    """An argparse type: a memory size with units (e.g. 4GB, 512MiB)."""
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected a size with units such as 4GB or 512MiB, not {text!r}"
        ) from None
    if value < 64 * 2**20:
        raise argparse.ArgumentTypeError(
            f"{text!r} is {value} bytes, too little for a worker; give units, e.g. 4GB"
        )
    return text


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--n-workers",
        type=_positive_int,
        metavar="W",
        help="LocalCluster worker processes (default: 1 on CPUs, one per GPU)",
    )
    g.add_argument(
        "--threads-per-worker",
        type=_positive_int,
        metavar="T",
        help="threads per worker (default: one per core on CPUs, 1 on GPUs)",
    )
    g.add_argument(
        "--memory-limit",
        type=_memory,
        metavar="SIZE",
        help="LocalCluster memory per worker, e.g. 4GB (default: machine / workers)",
    )
    g.add_argument(
        "--scheduler-address",
        metavar="A",
        help="connect to a running Dask scheduler (tcp://host:8786) instead",
    )
    g.add_argument("--scheduler-file", metavar="F", help="connect through a scheduler file")
    g.add_argument(
        "--scheduler",
        choices=["sync", "threads"],
        help="run without a distributed cluster (debugging)",
    )
    g.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cluster(args: argparse.Namespace):
    from cryolike_dask.pipeline.cluster import ClusterOptions

    return ClusterOptions(
        scheduler_address=args.scheduler_address,
        scheduler_file=args.scheduler_file,
        n_workers=args.n_workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        scheduler=args.scheduler,
        dashboard=not args.no_dashboard,
    )


# ------------------------------------------------------------------------------ likelihood
def _likelihood_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "likelihood",
        help="cross-correlations, optimal poses and likelihoods of images against structures",
        description=(
            "Compare every image with every template of one or more structures over all "
            "in-plane rotations and a grid of displacements. Writes CryoLike's output files "
            "(OUTPUT/templateN/...) and OUTPUT/results.zarr."
        ),
    )
    p.add_argument(
        "--templates",
        required=True,
        type=Path,
        metavar="DIR",
        help="CryoLike template folder (template_file_list.npy) or Zarr template store",
    )
    p.add_argument(
        "--particles",
        required=True,
        type=Path,
        metavar="DIR",
        help="CryoLike particle folder (fft/...) or Zarr image store",
    )
    p.add_argument(
        "--params",
        required=True,
        type=Path,
        metavar="FILE",
        help="image parameters (CryoLike's parameters.npz)",
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--i-template",
        type=int,
        default=0,
        metavar="N",
        help="index of the template file (structure) in the list (default 0)",
    )
    which.add_argument(
        "--all-templates", action="store_true", help="every structure of the template list"
    )
    p.add_argument(
        "--n-stacks",
        type=_positive_int,
        metavar="K",
        help="process particle stacks 0..K-1 (default: all)",
    )
    d = p.add_argument_group("displacement search (CryoLike's configure_displacement)")
    d.add_argument(
        "--max-displacement-pixels",
        type=float,
        default=8.0,
        metavar="F",
        help="search ±F pixels (default 8)",
    )
    d.add_argument(
        "--n-displacements-x",
        type=int,
        default=-1,
        metavar="NX",
        help="displacements along x, e.g. 5 (default -1: no search along x)",
    )
    d.add_argument(
        "--n-displacements-y",
        type=int,
        default=-1,
        metavar="NY",
        help="displacements along y, e.g. 5 (default -1: no search along y)",
    )
    lp = p.add_argument_group(
        "search around prior poses (particles converted with their RELION/cryoSPARC poses)"
    )
    lp.add_argument(
        "--pose-prior",
        choices=["window", "gaussian", "fixed"],
        help="window: poses within --window-degrees of each image's prior direction and "
        "in-plane angle; gaussian: RELION-style Gaussians (--sigma-degrees) cut at 3 sigma; "
        "fixed: the grid pose nearest the prior only (default: the global search)",
    )
    lp.add_argument("--window-degrees", type=float, metavar="A", help="window half-width, degrees")
    lp.add_argument(
        "--window-shift-pixels",
        type=float,
        metavar="R",
        help="search residual displacements within R pixels only (default: the whole grid)",
    )
    lp.add_argument(
        "--sigma-degrees", type=float, metavar="A", help="Gaussian prior's sigma, degrees"
    )
    lp.add_argument(
        "--sigma-shift-angstrom",
        type=float,
        metavar="B",
        help="Gaussian prior on the residual displacement, sigma in Å (default: uniform)",
    )
    lp.add_argument(
        "--use-prior-origin",
        action="store_true",
        help="centre each image on its prior origin (a phase ramp) before the search; "
        "reported displacements are then prior + residual",
    )
    lp.add_argument(
        "--pose-frame",
        choices=["auto", "map", "model"],
        default="auto",
        help="the structures' frame: templates made from MRC maps or from atomic models, in "
        "the frame of the map or model that the poses refer to (default auto: what "
        "make-templates read; map for CryoLike template files)",
    )
    lp.add_argument(
        "--check-frame",
        type=int,
        default=0,
        metavar="K",
        help="also search K evenly spaced images over every direction and rotation, and warn "
        "when their global optimum lies outside the window (default 0: off)",
    )
    o = p.add_argument_group("outputs (the optimal pose is always written)")
    o.add_argument(
        "--integrated-likelihood",
        action="store_true",
        help="integrated log-likelihood per image (marginalised over poses)",
    )
    o.add_argument(
        "--optimal-pose-likelihood",
        action="store_true",
        help="log-likelihood at the optimal pose per image",
    )
    o.add_argument(
        "--per-template",
        action="store_true",
        help="[M_stack, S] best cross-correlation and pose per image and template",
    )
    o.add_argument(
        "--full-cross-correlation",
        action="store_true",
        help="the full [M, S, D, W] cross-correlation tensor (large)",
    )
    o.add_argument(
        "--no-pt", action="store_true", help="write only results.zarr, not CryoLike's .pt files"
    )
    r = p.add_argument_group("execution")
    r.add_argument(
        "--skip-exist",
        action="store_true",
        help="resume the same run: skip stacks whose outputs are complete (checked) and "
        "blocks already done",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of another run in OUTPUT (all removed first); without it "
        "such a folder is refused",
    )
    r.add_argument(
        "--templates-per-block",
        type=_positive_int,
        metavar="T",
        help="templates per Dask task (default: planned from worker memory)",
    )
    r.add_argument(
        "--images-per-block",
        type=_positive_int,
        metavar="I",
        help="images per Dask task (default: planned from worker memory)",
    )
    r.add_argument(
        "--max-tasks-per-graph",
        type=_positive_int,
        default=10_000,
        metavar="K",
        help="kernel tasks per submitted Dask graph; larger runs go in batches (default 10000)",
    )
    r.add_argument(
        "--tolerance",
        type=float,
        metavar="EPS",
        help="bounded-error mode: every normalised cross-correlation within EPS of the exact "
        "one (compressed template spectra, pairs the run-time bound cannot certify "
        "recomputed exactly; e.g. 1e-4); default: exact",
    )
    r.add_argument(
        "--precision",
        choices=["single", "double"],
        help="working precision (default: the parameters' precision)",
    )
    r.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="run the kernels on the GPU (CuPy) or the CPU (NumPy) (default auto)",
    )
    r.add_argument(
        "--astigmatism-convention",
        choices=["cryolike", "relion"],
        help="override how CTF astigmatism angles of CryoLike stacks are read",
    )
    r.add_argument(
        "--yes",
        action="store_true",
        help="start a very large run (estimated over a day on the workers, or 1 TiB of "
        "outputs), which is otherwise refused with its estimate",
    )
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_likelihood)


def likelihood_options(args: argparse.Namespace):
    """The shared :class:`~cryolike_dask.pipeline.spec.LikelihoodOptions` of the flags."""
    from cryolike_dask.pipeline.spec import LikelihoodOptions

    return LikelihoodOptions.parse(
        structures="all" if args.all_templates else [args.i_template],
        n_stacks=args.n_stacks,
        max_displacement_pixels=args.max_displacement_pixels,
        n_displacements_x=args.n_displacements_x,
        n_displacements_y=args.n_displacements_y,
        integrated_likelihood=args.integrated_likelihood,
        optimal_pose_likelihood=args.optimal_pose_likelihood,
        per_template=args.per_template,
        full_cross_correlation=args.full_cross_correlation,
        templates_per_block=args.templates_per_block,
        images_per_block=args.images_per_block,
        max_tasks_per_graph=args.max_tasks_per_graph,
        precision=args.precision,
        device=args.device,
        astigmatism_convention=args.astigmatism_convention,
        skip_exist=args.skip_exist,
        overwrite=args.overwrite,
        export_pt=not args.no_pt,
        yes=args.yes,
        pose_prior=args.pose_prior,
        window_degrees=args.window_degrees,
        window_shift_pixels=args.window_shift_pixels,
        sigma_degrees=args.sigma_degrees,
        sigma_shift_angstrom=args.sigma_shift_angstrom,
        use_prior_origin=args.use_prior_origin,
        pose_frame=args.pose_frame,
        check_frame=args.check_frame,
        tolerance=args.tolerance,
    )


def _cmd_likelihood(args: argparse.Namespace) -> int:
    from cryolike_dask.params.image import ImageParameters
    from cryolike_dask.pipeline.driver import run_likelihood

    options = likelihood_options(args)
    params = ImageParameters.load(args.params)
    run = options.build(args.templates, args.particles, params, args.output)
    names = ", ".join(run.templates.names[k] for k in run.structures)
    print(f"cryolike-dask {__version__}: {run.images.n_images} images × {names}")
    report = run_likelihood(run, _cluster(args), progress=not args.no_progress)
    print(
        f"done in {report.seconds:.1f} s: {report.blocks_computed} blocks computed, "
        f"{report.blocks_skipped} already done; {report.stacks_exported} stacks written, "
        f"{report.stacks_skipped} complete already; "
        f"{report.poses_per_second:.3g} pose evaluations/s"
    )
    print(f"outputs: {args.output}/template*/ and {args.output}/results.zarr")
    return 0


# ------------------------------------------------------------------------------ import
def _import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-cryolike",
        help="copy CryoLike template and particle folders into Zarr stores",
        description="Writes OUTPUT/templates.zarr and OUTPUT/particles.zarr (either may be "
        "skipped). The stores can replace the folders in 'likelihood'.",
    )
    p.add_argument(
        "--params",
        required=True,
        type=Path,
        metavar="FILE",
        help="image parameters (parameters.npz)",
    )
    p.add_argument("--templates", type=Path, metavar="DIR", help="CryoLike template folder")
    p.add_argument("--particles", type=Path, metavar="DIR", help="CryoLike particle folder")
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--n-stacks", type=_positive_int, metavar="K", help="import stacks 0..K-1 (default all)"
    )
    p.add_argument(
        "--images-per-chunk",
        type=int,
        default=1024,
        metavar="N",
        help="Zarr chunk size along images (default 1024)",
    )
    p.add_argument(
        "--astigmatism-convention",
        choices=["cryolike", "relion"],
        help="CTF convention to record (default cryolike)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing stores")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> int:
    from cryolike_dask.io.imports import import_cryolike_particles, import_cryolike_templates
    from cryolike_dask.params.image import ImageParameters

    if args.templates is None and args.particles is None:
        raise CryoLikeDaskError("nothing to import: give --templates and/or --particles")
    params = ImageParameters.load(args.params)
    if args.templates is not None:
        path = import_cryolike_templates(
            args.templates, params, args.output / "templates.zarr", overwrite=args.overwrite
        )
        print(f"templates: {path}")
    if args.particles is not None:
        path = import_cryolike_particles(
            args.particles,
            params,
            args.output / "particles.zarr",
            n_stacks=args.n_stacks,
            astigmatism_convention=args.astigmatism_convention,
            overwrite=args.overwrite,
            chunk_images=args.images_per_chunk,
        )
        print(f"particles: {path}")
    return 0


# ------------------------------------------------------------------------------ make-params
def _params_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-params",
        help="write the image parameters (CryoLike's parameters.npz)",
        description="Writes the parameters that fix the polar grid, viewing directions and "
        "atom model (CryoLike's ImageDescriptor.from_individual_values). Sizes are those of "
        "the images the likelihood compares, i.e. after downsampling. Prints the number of "
        "viewing directions and their angular step: the work grows with that number.",
    )
    p.add_argument(
        "--n-pixels",
        type=int,
        required=True,
        metavar="N",
        help="image size in pixels, after any downsampling (convert-particles --downsample K "
        "turns 256-px particles into 256/K)",
    )
    p.add_argument(
        "--pixel-size",
        type=float,
        required=True,
        metavar="A",
        help="pixel size in Å after downsampling (the micrograph pixel × K)",
    )
    p.add_argument("--output", type=Path, required=True, metavar="FILE", help="the .npz to write")
    p.add_argument("--precision", choices=["single", "double"], default="single")
    p.add_argument(
        "--resolution-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="polar grid radius as a fraction of Nyquist (default 1)",
    )
    p.add_argument(
        "--viewing-distance",
        type=float,
        metavar="VD",
        help="spacing of viewing directions on the unit sphere (default 1/(4π F): 2370 "
        "directions, ~4° apart; 8/(4π) gives 96, ~21° apart)",
    )
    p.add_argument(
        "--n-inplanes", type=int, metavar="W", help="in-plane angles (default 2 × n_pixels)"
    )
    p.add_argument(
        "--atom-radii", type=float, metavar="R", help="atom radius in Å (with --no-residue-model)"
    )
    p.add_argument(
        "--atom-selection",
        default="name CA",
        metavar="SEL",
        help="atoms used with --no-residue-model (default 'name CA')",
    )
    p.add_argument(
        "--no-residue-model",
        action="store_true",
        help="do not use CryoLike's per-residue radii on CA atoms",
    )
    p.add_argument("--atom-shape", choices=["gaussian", "hard-sphere"], default="gaussian")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument(
        "--yes",
        action="store_true",
        help=f"accept more than {MAX_DIRECTIONS:,} viewing directions",
    )
    p.set_defaults(func=_cmd_params)


def _cmd_params(args: argparse.Namespace) -> int:
    from cryolike_dask.params.image import ImageParameters

    params = ImageParameters.from_values(
        args.n_pixels,
        args.pixel_size,
        precision=args.precision,
        resolution_factor=args.resolution_factor,
        viewing_distance=args.viewing_distance,
        n_inplanes=args.n_inplanes,
        atom_radii=args.atom_radii,
        atom_selection=args.atom_selection,
        use_protein_residue_model=not args.no_residue_model,
        atom_shape=args.atom_shape,
    )
    # CryoLike's sphere grid holds about 4π / vd² directions; refuse a mistyped distance
    estimate = 4 * math.pi / params.viewing_distance**2
    if estimate > MAX_DIRECTIONS and not args.yes:
        raise CryoLikeDaskError(
            f"--viewing-distance {params.viewing_distance:g} gives ~{estimate:.3g} viewing "
            f"directions (templates per structure; the default gives 2370); pass --yes if "
            "you mean it"
        )
    path = params.save(args.output, overwrite=args.overwrite)
    grid = params.polar_grid
    angles = params.viewing_angles
    print(
        f"{path}: {params.n_pixels[0]} px of {params.pixel_size[0]:g} Å, {grid.n_shells} "
        f"shells × {grid.n_inplanes} in-plane angles ({360 / grid.n_inplanes:.2g}° apart), "
        f"{angles.n_angles} viewing directions (~{angles.step_degrees():.1f}° apart)"
    )
    return 0


# ------------------------------------------------------------------------------ make-templates
def _templates_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-templates",
        help="project density maps and atomic models into template stacks",
        description="One template per viewing direction of the parameters, for each input "
        "(.mrc/.map/.mrcs maps, .pdb/.cif models). Writes OUTPUT/templates.zarr and CryoLike's "
        "OUTPUT/templates_fourier_NAME.pt + template_file_list.npy.",
    )
    p.add_argument(
        "--params",
        type=Path,
        required=True,
        metavar="FILE",
        help="image parameters (parameters.npz)",
    )
    p.add_argument("--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="maps and models")
    p.add_argument(
        "--atom-shape",
        choices=["gaussian", "hard-sphere"],
        help="override the parameters' atom shape",
    )
    p.add_argument(
        "--voxel-size",
        type=float,
        metavar="A",
        help="map voxel size in Å, overriding the MRC header",
    )
    p.add_argument(
        "--templates-per-block",
        type=_positive_int,
        metavar="T",
        help="viewing directions per Dask task (default: from a 256 MiB budget)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_templates)


def _cmd_templates(args: argparse.Namespace) -> int:
    from cryolike_dask.params.image import ImageParameters
    from cryolike_dask.pipeline.make_templates import make_templates

    params = ImageParameters.load(args.params)
    paths = make_templates(
        args.inputs,
        params,
        args.output,
        templates_per_block=args.templates_per_block,
        atom_shape=args.atom_shape,
        voxel_size=args.voxel_size,
        overwrite=args.overwrite,
        cluster=_cluster(args),
        progress=not args.no_progress,
    )
    for path in paths:
        print(f"templates: {path}")
    return 0


# ------------------------------------------------------------------------------ convert-particles
def _convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-particles",
        help="particle stacks + STAR/cryoSPARC metadata → polar Fourier stacks",
        description="Centre, max-normalise, NUFFT to the polar grid and unit-normalise particle "
        "images, with their CTF parameters. Input forms: --mrcs ... --star ... (paired); "
        "--star FILE --mrc-folder DIR (indexed RELION); --cs FILE --mrc-folder DIR; "
        "--cryosparc-job DIR. Writes OUTPUT/particles.zarr and CryoLike's "
        "OUTPUT/fft/particles_fourier_stack_NNNNNN.pt + .npz, in the metadata's row order.",
    )
    p.add_argument(
        "--params",
        type=Path,
        required=True,
        metavar="FILE",
        help="image parameters (parameters.npz)",
    )
    p.add_argument("--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--mrcs", nargs="+", type=Path, metavar="FILE", help="image stacks (paired)")
    p.add_argument(
        "--star",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="STAR file(s): paired with --mrcs, or one indexed STAR with --mrc-folder",
    )
    p.add_argument("--cs", type=Path, metavar="FILE", help="cryoSPARC .cs file")
    p.add_argument(
        "--mrc-folder",
        type=Path,
        metavar="DIR",
        help="where the images named in the STAR/.cs file are",
    )
    p.add_argument("--cryosparc-job", type=Path, metavar="DIR", help="cryoSPARC job folder")
    p.add_argument(
        "--pixel-size",
        type=float,
        metavar="A",
        help="pixel size in Å (default: from the metadata, else the MRC header)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="images per output stack (default 1024)",
    )
    p.add_argument(
        "--downsample",
        type=int,
        default=1,
        metavar="K",
        help="average-pool the images by an even factor K first",
    )
    p.add_argument(
        "--astigmatism-convention",
        choices=["relion", "cryolike"],
        default="relion",
        help="how the CTF reads the defocus angle (default relion, exact for "
        "RELION/cryoSPARC metadata; cryolike reproduces CryoLike)",
    )
    p.add_argument(
        "--pose-source",
        choices=["auto", "refined", "prior", "none"],
        default="auto",
        help="which prior poses to read and store in particles.zarr (prior_pose/): refined "
        "(rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst or rlnOriginX/Y; cryoSPARC alignments3D/pose "
        "and shift), prior (rlnAngle*Prior, rlnOrigin*Prior; 999 = unset), auto (refined if "
        "present, else prior, else none; the default) or none",
    )
    p.add_argument(
        "--sort-by-pose",
        action="store_true",
        help="order the particles of each input segment (each paired file, or the whole "
        "indexed set) by prior viewing direction: 10° bands of tilt, then rot, particles "
        "without angles last; each image keeps its id and source row",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from cryolike_dask.params.image import ImageParameters
    from cryolike_dask.pipeline import convert_particles as cp

    params = ImageParameters.load(args.params)
    particles = cp.gather(
        mrcs=args.mrcs,
        star=args.star,
        cs=args.cs,
        mrc_folder=args.mrc_folder,
        cryosparc_job=args.cryosparc_job,
        pixel_size=args.pixel_size,
        batch_size=args.batch_size,
        pose_source=args.pose_source,
        sort_by_pose=args.sort_by_pose,
    )
    store = cp.convert_particles(
        particles,
        params,
        args.output,
        downsample=args.downsample,
        convention=args.astigmatism_convention,
        overwrite=args.overwrite,
        cluster=_cluster(args),
        progress=not args.no_progress,
    )
    print(f"particles: {store} and {args.output / 'fft'}/ ({len(particles.stacks)} stacks)")
    return 0


# ------------------------------------------------------------------------------ demo
def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on a built-in example (a few minutes)",
        description="Templates of two apoferritin structures shipped with the package, "
        "synthetic particles from one of them (known poses, CTF, noise) written as MRC + STAR, "
        "conversion, likelihood on a local Dask cluster, a summary and PNG plots.",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("demo_output"),
        metavar="DIR",
        help="output folder (default demo_output)",
    )
    p.add_argument("--n-images", type=int, default=300, metavar="M", help="particles (300)")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    _add_cluster_options(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from cryolike_dask.demo import run_demo

    summary = run_demo(
        args.output,
        n_images=args.n_images,
        snr=args.snr,
        seed=args.seed,
        cluster=_cluster(args),
        progress=not args.no_progress,
    )
    if summary.dashboard_link:
        print(f"(the dashboard was at {summary.dashboard_link} while the cluster ran)")
    return 0


# ------------------------------------------------------------------------------ stitch, plot
def _stitch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stitch",
        help="images × structures matrices from per-stack outputs",
        description="Concatenates OUTPUT/templateN/*_stack_*.pt (ours or CryoLike's) into "
        "[n_structures, n_images] matrices, written as .pt, .npy and matrices.zarr in "
        "OUTPUT/likelihood_matrix/.",
    )
    p.add_argument("output", type=Path, metavar="OUTPUT", help="a likelihood output folder")
    p.add_argument("--no-integrated", action="store_true", help="skip the integrated LL matrix")
    p.add_argument("--no-optimal", action="store_true", help="skip the optimal-pose LL matrix")
    p.add_argument("--no-cross-correlation", action="store_true", help="skip the cc matrix")
    p.set_defaults(func=_cmd_stitch)


def _cmd_stitch(args: argparse.Namespace) -> int:
    from cryolike_dask.io.stitch import stitch

    written = stitch(
        args.output,
        integrated=not args.no_integrated,
        optimal=not args.no_optimal,
        cross_correlation=not args.no_cross_correlation,
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="PNG plots of a likelihood output folder",
        description="Cross-correlation per structure, log-likelihood differences and, with "
        "--truth (synthetic data), pose errors; from OUTPUT/results.zarr.",
    )
    p.add_argument("output", type=Path, metavar="OUTPUT", help="a likelihood output folder")
    p.add_argument("--plots", type=Path, metavar="DIR", help="where to write (OUTPUT/plots)")
    p.add_argument("--truth", type=Path, metavar="FILE", help="truth.npz of synthetic particles")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    from cryolike_dask.plots import plot_output_folder

    for path in plot_output_folder(args.output, args.plots, args.truth):
        print(f"plot: {path}")
    return 0


# ------------------------------------------------------------------------------ run
def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the whole pipeline from one YAML config (resumable)",
        description="make-params → make-templates → convert-particles → likelihood → stitch → "
        "plots, from one validated YAML file (see deploy/examples/run_config.yaml). Completed "
        "steps are skipped on a rerun; the likelihood resumes where it stopped.",
    )
    p.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the pipeline config")
    p.add_argument(
        "--scheduler-file",
        type=Path,
        metavar="F",
        help="use this running cluster (overrides the config's cluster section)",
    )
    p.add_argument(
        "--scheduler-address",
        metavar="A",
        help="use this running scheduler (overrides the config's cluster section)",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="start a very large likelihood step (as likelihood.yes: true in the config)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from cryolike_dask.config import ClusterConfig, load_config, run_config

    cfg = load_config(args.config)
    args.output = cfg.output  # where a full disk or an internal error is reported
    if args.yes:
        cfg.likelihood = cfg.likelihood.model_copy(update={"yes": True})
    if args.scheduler_file or args.scheduler_address:
        cfg.cluster = ClusterConfig(
            scheduler_file=args.scheduler_file, scheduler_address=args.scheduler_address
        )
    outputs = run_config(cfg, progress=not args.no_progress)
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


# ------------------------------------------------------------------------------ main
class _Parser(argparse.ArgumentParser):
    """Bad options are one line (and exit status 2), not the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``cryolike-dask`` argument parser with all its commands."""
    parser = _Parser(
        prog="cryolike-dask",
        description="Cryo-EM image-to-structure likelihoods (CryoLike's math) on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _demo_parser(sub)
    _run_parser(sub)
    _params_parser(sub)
    _templates_parser(sub)
    _convert_parser(sub)
    _likelihood_parser(sub)
    _import_parser(sub)
    _stitch_parser(sub)
    _plot_parser(sub)
    from cryolike_dask.reweight_cli import add_reweight_parser

    add_reweight_parser(sub)
    debug = "on an internal error, show its traceback here instead of writing it to a log file"
    parser.add_argument("--debug", action="store_true", help=debug)
    for command in sub.choices.values():  # also after the command: likelihood ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return parser


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record comes (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """The library logs through ``logging`` (quiet by default); the CLI shows its INFO lines."""
    logger = logging.getLogger("cryolike_dask")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
    logger.setLevel(logging.INFO)


def _one_line(exc: BaseException) -> str:
    if _disk_full(exc):
        full = exc if isinstance(exc, DiskFullError) else DiskFullError(exc.filename, exc.errno)
        return f"{full}; free space or choose another output folder, then rerun"
    if isinstance(exc, OSError) and not isinstance(exc, CryoLikeDaskError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL)


#: Set to 1 to see an internal error's traceback on stderr (as ``--debug``).
DEBUG_ENV = "CRYOLIKE_DASK_DEBUG"
#: Error logs go to ``OUTPUT/LOG_FOLDER/`` when the command's output folder exists (beside,
#: not inside, the ``.cryolike_dask`` folder of a run's records), else to the temp folder.
LOG_FOLDER = ".cryolike_dask.logs"
#: Libraries whose versions an error log lists.
LOGGED_LIBRARIES = ("numpy", "scipy", "dask", "distributed", "zarr", "torch", "cupy", "pydantic")


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _error_log(args: argparse.Namespace, argv: Sequence[str], exc: BaseException) -> Path:
    """Write ``exc``'s traceback, with the version, command line, Python, platform and
    library versions, to a new log file; return its path."""
    import platform
    import tempfile
    import time
    import traceback
    from importlib import metadata

    versions = []
    for name in LOGGED_LIBRARIES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    text = "\n".join(
        [
            f"cryolike-dask {__version__}: internal error in '{args.command}'",
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
            f"command: {' '.join(['cryolike-dask', *argv])}",
            f"working folder: {os.getcwd()}",
            f"python: {sys.version.split()[0]} ({sys.executable})",
            f"platform: {platform.platform()}",
            f"libraries: {', '.join(versions)}",
            "",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        ]
    )
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    output = getattr(args, "output", None)
    candidates = [Path(tempfile.gettempdir()) / f"cryolike-dask-{name}"]
    if output is not None and Path(output).is_dir():
        candidates.insert(0, Path(output) / LOG_FOLDER / name)
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            if path == candidates[-1]:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _internal_error(args: argparse.Namespace, argv: Sequence[str], exc: Exception) -> int:
    """A bug: its details to a log file, one line naming that file on stderr; exit status 1."""
    summary = (str(exc).strip().splitlines() or [""])[0]
    what = f"{type(exc).__name__}: {summary}" if summary else type(exc).__name__
    try:
        where = f"details in {_error_log(args, argv, exc)}"
    except OSError as log_error:  # nowhere to write: the traceback here
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
        where = f"no log file ({log_error}), traceback above"
    print(
        f"cryolike-dask {args.command}: internal error: {what} ({where}; please report it)",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status: 2 for bad input, with a one-line message; 1 for
    an internal error (a bug: its traceback goes to a log file that a one-line message names,
    or to stderr with ``--debug`` or ``CRYOLIKE_DASK_DEBUG=1``); 130 after Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.simplefilter("default", UserWarning)

    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"cryolike-dask {args.command}: warning: {message}\n"

    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line
    _configure_logging()
    from cryolike_dask.pipeline.cluster import catch_interrupts

    if threading.current_thread() is threading.main_thread():
        catch_interrupts()
    try:
        return int(args.func(args) or 0)
    except (*USER_ERRORS, OSError) as exc:
        if not isinstance(exc, USER_ERRORS) and not _disk_full(exc):
            # an OS error that names no input or output: reported as the bug it may be
            if _debug(args):
                raise
            return _internal_error(args, argv, exc)
        if _disk_full(exc) and not exc.filename and getattr(args, "output", None) is not None:
            exc = DiskFullError(str(args.output), exc.errno)  # where it was writing
        print(f"cryolike-dask {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        import signal

        from cryolike_dask.pipeline.cluster import _quiet_shutdown

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _quiet_shutdown()
        hint = " (rerun with --skip-exist to resume)" if args.command == "likelihood" else ""
        print(f"cryolike-dask {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug
        if _debug(args):
            raise
        return _internal_error(args, argv, exc)
    finally:
        warnings.formatwarning = formatwarning


def run() -> None:
    """Console entry point: :func:`main`, then exit with its status.

    After Ctrl-C the process ends at once once the cluster is closed (``os._exit``), so that
    no late interrupt in interpreter shutdown turns the one-line message into a traceback.
    """
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
