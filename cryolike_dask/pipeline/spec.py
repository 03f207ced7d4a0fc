"""The run spec: what a likelihood run computes, on which data, normalised once.

Rechunker's split is the model: this module describes a run (:class:`LikelihoodRun`, built by
the CLI, the YAML config, the CryoLike drop-in and the Python API from one shared options
model, :class:`LikelihoodOptions`), :mod:`~cryolike_dask.pipeline.plan` plans it and
:mod:`~cryolike_dask.pipeline.driver` / :mod:`~cryolike_dask.pipeline.dataset` execute it.
What can be computed is the table :data:`cryolike_dask.io.outputs.OUTPUTS`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.grids.displacement import DisplacementGrid
from cryolike_dask.io import outputs
from cryolike_dask.io.cryolike import OutputLayout
from cryolike_dask.io.outputs import Quantity
from cryolike_dask.io.sources import ImageSource, TemplateSource
from cryolike_dask.io.zarr_stores import params_to_json
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.pipeline.plan import MAX_TASKS_PER_GRAPH
from cryolike_dask.pipeline.pose_search import PosePriorSpec
from cryolike_dask.precision import Precision

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "gpu"]
PrecisionName = Literal["single", "double"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")


class RunConfigurationError(CryoLikeDaskError):
    """The run's inputs or options are inconsistent (reported before any work starts)."""


class InputDataError(CryoLikeDaskError):
    """Images or templates hold values the likelihood cannot use (NaN, Inf, zero norm)."""


def resolve_precision(precision: str | None, params: ImageParameters) -> str:
    """``"single"`` or ``"double"``: ``precision`` if given, else the parameters' precision."""
    if precision is None:
        return params.precision.resolve().value
    return Precision.parse(precision).resolve().value


def check_device(device: str) -> str:
    """``device`` if it is one of :data:`DEVICES`, else :class:`RunConfigurationError`."""
    if device not in DEVICES:
        raise RunConfigurationError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    return device


# ------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class OutputRequest:
    """Which outputs a run computes (each flag selects rows of :data:`~.outputs.OUTPUTS`).

    Attributes
    ----------
    optimal_pose : bool
        Best cross-correlation, template, displacements and rotation per image.
    integrated : bool
        Integrated log-likelihood per image.
    optimal_likelihood : bool
        Log-likelihood at the optimal pose per image.
    per_template : bool
        ``[M, S]`` best over (d, w) per image and template (+ integrated if requested).
    full : bool
        The full ``[M, S, D, W]`` cross-correlation tensor.
    pose_prior : bool
        The search is limited around prior poses: window-edge flags and evaluated poses.
    """

    optimal_pose: bool = True
    integrated: bool = False
    optimal_likelihood: bool = False
    per_template: bool = False
    full: bool = False
    pose_prior: bool = False

    @property
    def flags(self) -> dict[str, bool]:
        return {name: bool(getattr(self, name)) for name in outputs.FLAG_BITS}

    @property
    def quantities(self) -> tuple[Quantity, ...]:
        """The output quantities this request writes, in table order."""
        return outputs.selected(self.flags)

    def of_scope(self, scope: str) -> tuple[Quantity, ...]:
        return tuple(q for q in self.quantities if q.scope == scope)

    def of_source(self, source: str) -> tuple[Quantity, ...]:
        return tuple(q for q in self.quantities if q.source == source)

    @property
    def bits(self) -> int:
        """The results store's ``done`` bits these outputs need."""
        bits = 0
        for name, on in self.flags.items():
            bits |= outputs.FLAG_BITS[name] if on else 0
        return bits

    @property
    def needs_reduction(self) -> bool:
        """Whether the tree reduction over template blocks is needed."""
        return self.optimal_pose or self.integrated or self.optimal_likelihood

    def files(self, layout: OutputLayout, structure: int, i_stack: int) -> dict[str, Path]:
        """CryoLike's files of one stack, keyed by quantity name."""
        return layout.stack_files(structure, i_stack, self.quantities)


# ------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class LikelihoodRun:
    """One likelihood run: which data, which outputs, how split.

    Attributes
    ----------
    templates : TemplateSource
        Structures (template stacks).
    images : ImageSource
        Images with their CTF parameters.
    output : Path or None
        Output folder (CryoLike layout plus ``results.zarr``); ``None`` for a lazy dataset.
    structures : tuple of int
        Indices of the structures (template files) to run.
    displacements : DisplacementGrid
    request : OutputRequest
    precision : str
        ``"single"`` or ``"double"``.
    device : str
        ``"auto"``, ``"cpu"`` or ``"gpu"``; ``auto`` is resolved on the workers.
    templates_per_block, images_per_block : int, optional
        Block sizes (default: planned from the worker memory).
    skip_exist : bool
        Resume: skip blocks already done and stacks whose outputs are complete (verified).
    overwrite : bool
        Replace the outputs of an earlier run with other inputs or settings (all removed
        first); without it such a folder is refused.
    export_pt : bool
        Write CryoLike's ``.pt`` files (``results.zarr`` is always written).
    split_every : int
        Fan-in of the reduction tree over template blocks.
    max_tasks : int
        Kernel tasks per submitted graph.
    work_bytes : int
        Kernel temporaries budget per task.
    validate_data : bool
        Check every image and template (finite, non-zero) before the likelihood starts.
    yes : bool
        Confirm a very large run (estimated over a day on the workers, or a TiB of outputs;
        see :mod:`~cryolike_dask.pipeline._size_guard`); without it such a run is refused
        with its estimate.
    pose_prior : PosePriorSpec or None
        Search around each image's prior pose (``displacements`` is then the searched
        residual grid); ``None``: the global search.
    check_frame : int
        With ``pose_prior``: also search this many evenly spaced images over every direction
        and rotation, and warn when their global optimum lies outside the window.
    tolerance : float or None
        Bounded-error mode: allowed error of every normalised cross-correlation (compressed
        template spectra, :mod:`~cryolike_dask.kernels.compression`); ``None``: exact.
    """

    templates: TemplateSource
    images: ImageSource
    output: Path | None = None
    structures: tuple[int, ...] = (0,)
    displacements: DisplacementGrid = field(
        default_factory=lambda: DisplacementGrid(np.zeros(1), np.zeros(1))
    )
    request: OutputRequest = field(default_factory=OutputRequest)
    precision: str = "single"
    device: str = "cpu"
    templates_per_block: int | None = None
    images_per_block: int | None = None
    skip_exist: bool = False
    overwrite: bool = False
    export_pt: bool = True
    split_every: int = 8
    max_tasks: int = MAX_TASKS_PER_GRAPH
    work_bytes: int = 256 * 2**20
    validate_data: bool = True
    yes: bool = False
    pose_prior: PosePriorSpec | None = None
    check_frame: int = 0
    tolerance: float | None = None

    @property
    def parameters(self) -> ImageParameters:
        return self.templates.parameters

    @property
    def n_templates(self) -> list[int]:
        """Templates of every structure of the template source (not only the selected)."""
        return [self.templates.n_templates(k) for k in range(self.templates.n_structures)]

    def pose_evaluations(self, structures: tuple[int, ...] | None = None) -> float:
        """(image, template, displacement, rotation) evaluations of the selected structures."""
        ks = self.structures if structures is None else structures
        per = self.displacements.n_displacements * self.parameters.n_inplanes
        return float(self.images.n_images) * sum(self.templates.n_templates(k) for k in ks) * per


def fingerprint(run: LikelihoodRun) -> dict[str, Any]:
    """What determines the numbers of a run (not how it is split or where it runs)."""
    fp = {
        "parameters": params_to_json(run.templates.parameters),
        "displacements": run.displacements.as_array().tolist(),
        "precision": Precision.parse(run.precision).resolve().value,
        "images": run.images.fingerprint(),
        "templates": [run.templates.fingerprint(k) for k in range(run.templates.n_structures)],
    }
    if run.pose_prior is not None:  # absent for global searches: their fingerprints unchanged
        fp["pose_prior"] = run.pose_prior.as_json()
    if run.tolerance is not None:  # bounded-error results never mix with exact ones
        fp["tolerance"] = float(run.tolerance)
    return json.loads(json.dumps(fp, default=str))


def same_run(stored: dict[str, Any], fp: dict[str, Any]) -> bool:
    """Whether a run of fingerprint ``fp`` computes the same numbers as the run that made
    ``stored``: every part equal, its images equal to those of ``stored`` or their first
    stacks."""
    from cryolike_dask.io.sources import same_images

    rest = [k for k in set(stored) | set(fp) if k != "images"]
    return all(stored.get(k) == fp.get(k) for k in rest) and same_images(
        stored.get("images", {}), fp["images"]
    )


def differences(stored: dict[str, Any], fp: dict[str, Any]) -> list[str]:
    """The parts of two fingerprints that make them different runs."""
    from cryolike_dask.io.sources import same_images

    out = sorted(k for k in set(stored) | set(fp) if k != "images" and stored.get(k) != fp.get(k))
    if not same_images(stored.get("images", {}), fp["images"]):
        out.append("images")
    return out


def validate(run: LikelihoodRun, *, headers: bool = True) -> None:
    """Check the run before any work starts; raise :class:`RunConfigurationError`.

    ``headers``: also read every input file's header (shapes, dtypes, counts); the executors
    do that once, just before a cluster starts.
    """
    if not run.structures:
        raise RunConfigurationError("no structure (template file) selected")
    for k in run.structures:
        if not 0 <= k < run.templates.n_structures:
            raise RunConfigurationError(
                f"i_template {k} is out of range: the template list has "
                f"{run.templates.n_structures} file(s) ({', '.join(run.templates.names)})"
            )
    diffs = run.templates.parameters.incompatibilities(run.images.parameters)
    if diffs:
        raise RunConfigurationError("templates and images use different grids: " + "; ".join(diffs))
    if run.images.n_images < 1:
        raise RunConfigurationError("no images to process")
    if headers:
        run.templates.check_headers(run.structures)
        run.images.check_headers()
    check_device(run.device)
    Precision.parse(run.precision)
    if run.skip_exist and run.overwrite:
        raise RunConfigurationError(
            "--skip-exist (resume) and --overwrite (replace) exclude each other"
        )
    if not run.request.quantities:
        raise RunConfigurationError("no output requested")
    if run.output is not None:
        check_writable(Path(run.output))


def check_writable(output: Path) -> None:
    """An output folder that exists as a folder, or can be created; else an error."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise RunConfigurationError(f"{output}: exists and is not a folder")
    probe = (
        output if output.exists() else next((p for p in output.parents if p.exists()), Path("."))
    )
    if not probe.is_dir():
        raise RunConfigurationError(f"{output}: cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK):
        raise RunConfigurationError(f"{output}: cannot write here ({probe} is not writable)")


# ------------------------------------------------------------------------------ shared options
class LikelihoodOptions(BaseModel):
    """The options of a likelihood run, shared by the CLI, the YAML config and the drop-in.

    Each front end fills this model (the CLI from its flags, the config from its
    ``likelihood`` section, the drop-in from CryoLike's keyword arguments) and calls
    :meth:`build`; no front end describes a run by itself.
    """

    model_config = ConfigDict(extra="forbid")

    structures: Literal["all"] | list[int] = "all"
    n_stacks: int | None = Field(None, gt=0)
    max_displacement_pixels: float = Field(8.0, ge=0)
    n_displacements_x: int = -1
    n_displacements_y: int = -1
    optimal_pose: bool = True
    integrated_likelihood: bool = False
    optimal_pose_likelihood: bool = False
    per_template: bool = False
    full_cross_correlation: bool = False
    templates_per_block: int | None = Field(None, gt=0)
    images_per_block: int | None = Field(None, gt=0)
    max_tasks_per_graph: int = Field(MAX_TASKS_PER_GRAPH, gt=0)
    precision: PrecisionName | None = None
    device: Device = "auto"
    astigmatism_convention: Literal["cryolike", "relion"] | None = None
    skip_exist: bool = False
    overwrite: bool = False
    export_pt: bool = True
    #: Confirm a very large run (``--yes``): one estimated over a day or a TiB of outputs.
    yes: bool = False
    #: Search around each image's prior pose (``particles.zarr`` from ``convert-particles``
    #: with poses): ``window``, ``gaussian`` or ``fixed``; ``None``: the global search.
    pose_prior: Literal["window", "gaussian", "fixed"] | None = None
    window_degrees: float | None = Field(None, gt=0, le=180)
    window_shift_pixels: float | None = Field(None, ge=0)
    sigma_degrees: float | None = Field(None, gt=0)
    sigma_shift_angstrom: float | None = Field(None, gt=0)
    use_prior_origin: bool = False
    #: The structures' frame: ``auto`` reads what each structure's templates were made from
    #: (``make-templates`` records the map or model file).
    pose_frame: Literal["auto", "map", "model"] = "auto"
    #: With ``pose_prior``: compare with a global search on this many images (0: off).
    check_frame: int = Field(0, ge=0)
    #: Bounded-error mode: allowed error of the normalised cross-correlation (None: exact).
    tolerance: float | None = Field(None, gt=0, lt=1)

    @classmethod
    def parse(cls, **values: Any) -> LikelihoodOptions:
        """Validate ``values``; a bad one is a :class:`RunConfigurationError` naming it."""
        from pydantic import ValidationError

        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise RunConfigurationError(problems) from None

    def request(self) -> OutputRequest:
        return OutputRequest(
            optimal_pose=self.optimal_pose,
            integrated=self.integrated_likelihood,
            optimal_likelihood=self.optimal_pose_likelihood,
            per_template=self.per_template,
            full=self.full_cross_correlation,
            pose_prior=self.pose_prior is not None,
        )

    def displacements(self, pixel_size: float) -> DisplacementGrid:
        return DisplacementGrid.from_search(
            self.max_displacement_pixels,
            self.n_displacements_x,
            self.n_displacements_y,
            pixel_size,
        )

    def pose_prior_spec(
        self, pixel_size: float, frame: Literal["map", "model"] | None = None
    ) -> PosePriorSpec | None:
        """The run's :class:`PosePriorSpec` (``None`` for the global search); options that
        do not go together are refused naming them. ``frame``: the structures' frame where
        ``pose_frame`` is ``auto`` (default ``map``)."""
        local = {
            "window_degrees": self.window_degrees,
            "window_shift_pixels": self.window_shift_pixels,
            "sigma_degrees": self.sigma_degrees,
            "sigma_shift_angstrom": self.sigma_shift_angstrom,
        }
        mode = self.pose_prior
        wanted = {
            None: set(),
            "window": {"window_degrees", "window_shift_pixels"},
            "gaussian": {"sigma_degrees", "sigma_shift_angstrom"},
            "fixed": set(),
        }[mode]
        stray = [k for k, v in local.items() if v is not None and k not in wanted]
        if stray:
            raise RunConfigurationError(
                f"{', '.join(stray)} belong(s) to another search: pose_prior is {mode!r}"
            )
        if mode is None:
            if self.use_prior_origin:
                raise RunConfigurationError("use_prior_origin needs a pose_prior")
            return None
        if mode == "window" and self.window_degrees is None:
            raise RunConfigurationError("pose_prior window needs window_degrees")
        if mode == "gaussian" and self.sigma_degrees is None:
            raise RunConfigurationError("pose_prior gaussian needs sigma_degrees")
        radius = self.window_shift_pixels
        return PosePriorSpec(
            mode=mode,
            half_width=math.radians(self.window_degrees or 180.0),
            shift_radius=None if radius is None else radius * pixel_size,
            sigma=math.radians(self.sigma_degrees or 180.0),
            shift_sigma=self.sigma_shift_angstrom,
            use_origin=self.use_prior_origin,
            frame=(frame or "map") if self.pose_frame == "auto" else self.pose_frame,
        )

    def check_search(self, params: ImageParameters) -> DisplacementGrid:
        """The displacement grid, refused when the search reaches beyond the image box."""
        half = min(params.n_pixels) / 2
        searching = self.n_displacements_x > 1 or self.n_displacements_y > 1
        if searching and self.max_displacement_pixels > half:
            raise RunConfigurationError(
                f"max_displacement_pixels = {self.max_displacement_pixels:g} reaches beyond the "
                f"image: half the box is {half:g} pixels (images of {params.n_pixels[0]} px)"
            )
        return self.displacements(params.pixel_size[0])

    def build(
        self,
        templates: str | os.PathLike | TemplateSource,
        particles: str | os.PathLike | ImageSource,
        params: ImageParameters,
        output: str | os.PathLike | None,
    ) -> LikelihoodRun:
        """Open the inputs (paths or sources) and describe the run; :func:`validate` its
        options (the files' headers are checked when it runs)."""
        from cryolike_dask.io.sources import open_particles, open_templates

        if not isinstance(templates, TemplateSource):
            templates = open_templates(templates, params)
        if not isinstance(particles, ImageSource):
            particles = open_particles(
                particles, params, self.n_stacks, self.astigmatism_convention
            )
        structures = (
            tuple(range(templates.n_structures))
            if self.structures == "all"
            else tuple(int(k) for k in self.structures)
        )
        self.check_search(params)
        frame = None
        if self.pose_prior is not None and self.pose_frame == "auto":
            frame = structure_frame(templates, structures)
        prior = self.pose_prior_spec(params.pixel_size[0], frame)
        grid = self.displacements(params.pixel_size[0])
        if prior is not None:
            grid = prior.restrict(grid)
            if particles.prior_poses(0, particles.n_images) is None:
                raise RunConfigurationError(
                    f"pose_prior {prior.mode!r}: the images hold no prior poses (convert the "
                    "particles from a STAR or .cs file with angles: convert-particles "
                    "--pose-source)"
                )
        run = LikelihoodRun(
            templates=templates,
            images=particles,
            output=None if output is None else Path(output),
            structures=structures,
            displacements=grid,
            request=self.request(),
            precision=resolve_precision(self.precision, params),
            device=self.device,
            templates_per_block=self.templates_per_block,
            images_per_block=self.images_per_block,
            skip_exist=self.skip_exist,
            overwrite=self.overwrite,
            export_pt=self.export_pt,
            max_tasks=self.max_tasks_per_graph,
            yes=self.yes,
            pose_prior=prior,
            check_frame=self.check_frame if prior is not None else 0,
            tolerance=self.tolerance,
        )
        validate(run, headers=False)  # the file headers are read once, when it runs
        return run


def structure_frame(
    templates: TemplateSource, structures: tuple[int, ...]
) -> Literal["map", "model"]:
    """The frame of the structures' prior poses (``pose_frame`` ``auto``): ``map`` for
    templates projected from MRC maps, ``model`` for atomic models, by the files
    ``make-templates`` read; ``map`` (logged) when the templates do not say (CryoLike
    template files). Structures of both kinds in one run are refused: give ``pose_frame``."""
    kinds = {templates.structure_kind(k) for k in structures}
    known = kinds - {None}
    if len(known) > 1:
        names = ", ".join(
            f"{templates.names[k]} ({templates.structure_kind(k)})" for k in structures
        )
        raise RunConfigurationError(
            f"pose_frame auto: the structures come from maps and from atomic models ({names}); "
            "search them in separate runs or give pose_frame (--pose-frame map|model)"
        )
    if not known:
        logger.info(
            "pose frame: map (the templates do not say whether they were made from a map or "
            "an atomic model; give --pose-frame model for a model)"
        )
        return "map"
    frame = known.pop()
    logger.info("pose frame: %s (the templates were made from %ss)", frame, frame)
    return frame  # type: ignore[return-value]


__all__ = [
    "DEVICES",
    "InputDataError",
    "LikelihoodOptions",
    "LikelihoodRun",
    "OutputRequest",
    "RunConfigurationError",
    "check_device",
    "check_writable",
    "fingerprint",
    "resolve_precision",
    "structure_frame",
    "validate",
]
