"""``cryolike-dask run CONFIG.yaml``: one validated file for the whole pipeline.

``make-params`` → ``make-templates`` → ``convert-particles`` → ``likelihood`` → ``stitch``
(→ plots). Relative paths are relative to the config file. Every step is resumable: a step
whose completion record (``OUT/<step>/.complete.json``) matches its inputs and settings is
skipped, the likelihood resumes block by block, and a changed setting that would make
earlier results stale is refused with a message naming it. See
``deploy/examples/run_config.yaml`` for an annotated example.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from cryolike_dask._reweight import ReweightOptions
from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.pipeline.spec import LikelihoodOptions

logger = logging.getLogger(__name__)


class ConfigError(CryoLikeDaskError):
    """The configuration file is invalid or inconsistent with earlier results."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParametersConfig(_Model):
    """Image parameters: an existing ``parameters.npz`` (``file``) or the values to make one."""

    file: Path | None = None
    n_pixels: int | None = Field(None, gt=0)
    pixel_size: float | None = Field(None, gt=0, description="Å")
    precision: Literal["single", "double"] = "single"
    resolution_factor: float = Field(1.0, gt=0)
    viewing_distance: float | None = Field(None, gt=0)
    n_inplanes: int | None = Field(None, ge=2)
    atom_radii: float | None = Field(None, gt=0)
    atom_selection: str = "name CA"
    use_protein_residue_model: bool = True
    atom_shape: Literal["gaussian", "hard-sphere"] = "gaussian"

    @model_validator(mode="after")
    def _one_source(self) -> ParametersConfig:
        if self.file is None and (self.n_pixels is None or self.pixel_size is None):
            raise ValueError("give either 'file' or both 'n_pixels' and 'pixel_size'")
        return self


class TemplatesConfig(_Model):
    """Structures: maps/models to project (``inputs``) or an existing template folder/store."""

    inputs: list[Path] = Field(default_factory=list)
    folder: Path | None = None
    atom_shape: Literal["gaussian", "hard-sphere"] | None = None
    voxel_size: float | None = Field(None, gt=0)
    templates_per_block: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> TemplatesConfig:
        if bool(self.inputs) == (self.folder is not None):
            raise ValueError("give either 'inputs' (maps/models) or 'folder' (existing templates)")
        return self


class ParticlesConfig(_Model):
    """Particles, in exactly one input form (as ``convert-particles``), or an existing folder."""

    mrcs: list[Path] = Field(default_factory=list)
    star: list[Path] = Field(default_factory=list)
    cs: Path | None = None
    mrc_folder: Path | None = None
    cryosparc_job: Path | None = None
    folder: Path | None = None
    pixel_size: float | None = Field(None, gt=0)
    batch_size: int = Field(1024, gt=0)
    downsample: int = Field(1, ge=1)
    astigmatism_convention: Literal["relion", "cryolike"] = "relion"
    pose_source: Literal["auto", "refined", "prior", "none"] = "auto"
    sort_by_pose: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> ParticlesConfig:
        forms = [
            bool(self.mrcs),
            self.cs is not None,
            self.cryosparc_job is not None,
            bool(self.star) and not self.mrcs,
            self.folder is not None,
        ]
        if sum(forms) != 1:
            raise ValueError(
                "give exactly one input form: mrcs + star; star + mrc_folder; cs + mrc_folder; "
                "cryosparc_job; or folder (already converted)"
            )
        if (self.cs is not None or (self.star and not self.mrcs)) and self.mrc_folder is None:
            raise ValueError("an indexed 'star' or 'cs' needs 'mrc_folder'")
        return self


class LikelihoodConfig(LikelihoodOptions):
    """The likelihood run: the shared options of ``cryolike-dask likelihood`` (integrated
    likelihood on by default; the step always resumes, as ``--skip-exist``)."""

    integrated_likelihood: bool = True


class ReweightConfig(ReweightOptions):
    """The reweight step (the options of ``cryolike-dask reweight``, see docs/reweight.md):
    population weights of the structures from the likelihood matrix."""


class ClusterConfig(_Model):
    """Where to run: a LocalCluster (default) or a running scheduler."""

    scheduler_address: str | None = None
    scheduler_file: Path | None = None
    n_workers: int | None = Field(None, gt=0)
    threads_per_worker: int | None = Field(None, gt=0)
    memory_limit: str | None = None
    scheduler: Literal["sync", "threads"] | None = None


class RunConfig(_Model):
    """The whole pipeline."""

    output: Path
    parameters: ParametersConfig
    templates: TemplatesConfig
    particles: ParticlesConfig
    likelihood: LikelihoodConfig = Field(default_factory=LikelihoodConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    stitch: bool = True
    plots: bool = True
    reweight: ReweightConfig | None = None
    _source: Path | None = PrivateAttr(None)  # the YAML file, named in errors


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else (base / value)
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            object.__setattr__(value, name, _resolve(getattr(value, name), base))
    return value


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a YAML config; relative paths become relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (output, parameters, ...)")
    data = {k: v for k, v in data.items() if v is not None}  # an empty section: its defaults
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{p}: {problems}") from None
    cfg = _resolve(cfg, p.parent.resolve())
    cfg._source = p
    return cfg


# ------------------------------------------------------------------------------ checks
#: The command-line options that messages of the steps name, as the config's keys.
OPTION_KEYS = {
    "--mrcs": "particles.mrcs",
    "--star": "particles.star",
    "--cs": "particles.cs",
    "--mrc-folder": "particles.mrc_folder",
    "--cryosparc-job": "particles.cryosparc_job",
    "--pixel-size": "particles.pixel_size",
    "--batch-size": "particles.batch_size",
    "--downsample": "particles.downsample",
    "--pose-source": "particles.pose_source",
    "--sort-by-pose": "particles.sort_by_pose",
    "--voxel-size": "templates.voxel_size",
    "--n-stacks": "likelihood.n_stacks",
    "--i-template": "likelihood.structures",
}

_CHECKED_ERRORS = (CryoLikeDaskError, FileNotFoundError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class CheckedConfig:
    """What :func:`check_config` read: the parameters, the particle set to convert (``None``
    for a converted ``particles.folder``) and the structures' names."""

    params: ImageParameters
    particles: Any
    structures: tuple[str, ...]


def _where(cfg: RunConfig) -> str:
    return f"{cfg._source}: " if cfg._source is not None else ""


def _config_words(message: str) -> str:
    return re.sub(r"--[a-z][a-z-]*", lambda m: OPTION_KEYS.get(m.group(0), m.group(0)), message)


@contextlib.contextmanager
def _as_key(cfg: RunConfig, key: str | dict[str, list]) -> Iterator[None]:
    """Report an input error as the config's: ``CONFIG: KEY: message``. With a mapping of
    keys to the paths they give, the key is the one whose path the message names first."""
    try:
        yield
    except ConfigError:
        raise
    except _CHECKED_ERRORS as exc:
        message = str(exc)
        if isinstance(exc, OSError) and not isinstance(exc, CryoLikeDaskError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or exc}"
        if isinstance(key, dict):
            found = [
                (message.find(str(path)), name)
                for name, paths in key.items()
                for path in paths
                if str(path) in message
            ]
            key = min(found)[1] if found else next(iter(key)).split(".")[0]
        raise ConfigError(f"{_where(cfg)}{key}: {_config_words(message)}") from exc


def check_config(cfg: RunConfig) -> CheckedConfig:
    """Check every step's inputs and options before the first step starts (and before a
    cluster does): parameters, maps and models, particle files and metadata, the structure
    indices, the stack count and the displacement search. Reads headers and metadata only;
    writes nothing.

    Raises
    ------
    ConfigError
        ``CONFIG: KEY: message``, naming the config key (``particles.star``, ...) and the file.
    """
    from cryolike_dask.pipeline import convert_particles as cp
    from cryolike_dask.pipeline.make_templates import check_inputs
    from cryolike_dask.pipeline.spec import check_writable

    where = _where(cfg)
    with _as_key(cfg, "output"):
        check_writable(cfg.output)
    pc = cfg.parameters
    if pc.file is not None:
        with _as_key(cfg, "parameters.file"):
            params = ImageParameters.load(pc.file)
    else:
        with _as_key(cfg, "parameters"):
            params = ImageParameters.from_values(
                pc.n_pixels,
                pc.pixel_size,
                pc.precision,
                pc.resolution_factor,
                pc.viewing_distance,
                pc.n_inplanes,
                pc.atom_radii,
                pc.atom_selection,
                pc.use_protein_residue_model,
                pc.atom_shape,
            )
        made = cfg.output / "parameters.npz"
        if made.exists():
            with _as_key(cfg, "parameters"):
                earlier = ImageParameters.load(made)
            if earlier != params:
                raise ConfigError(
                    f"{made}: made with other parameters than the config's; results in "
                    f"{cfg.output} would be stale. Use a new output folder or delete it."
                )
    with warnings.catch_warnings():  # the steps warn when they run
        warnings.simplefilter("ignore", UserWarning)
        tc = cfg.templates
        if tc.folder is not None:
            from cryolike_dask.io.sources import open_templates

            with _as_key(cfg, "templates.folder"):
                names = tuple(open_templates(tc.folder, params).names)
        else:
            with _as_key(cfg, "templates.inputs"):
                names = tuple(t.name for t in check_inputs(tc.inputs, params, tc.voxel_size))
        pa = cfg.particles
        if pa.folder is not None:
            from cryolike_dask.io.sources import open_particles

            particles = None
            with _as_key(cfg, "particles.folder"):
                n_stacks = len(open_particles(pa.folder, params, None).stacks)
        else:
            paths = {
                "particles.mrcs": pa.mrcs,
                "particles.star": pa.star,
                "particles.cs": [pa.cs] if pa.cs else [],
                "particles.cryosparc_job": [pa.cryosparc_job] if pa.cryosparc_job else [],
                "particles.mrc_folder": [pa.mrc_folder] if pa.mrc_folder else [],
            }
            with _as_key(cfg, paths):
                particles = cp.gather(
                    mrcs=pa.mrcs,
                    star=pa.star,
                    cs=pa.cs,
                    mrc_folder=pa.mrc_folder,
                    cryosparc_job=pa.cryosparc_job,
                    pixel_size=pa.pixel_size,
                    batch_size=pa.batch_size,
                    pose_source=pa.pose_source,
                    sort_by_pose=pa.sort_by_pose,
                )
                cp.check_against_parameters(particles, params, pa.downsample)
            n_stacks = len(particles.stacks)
    lc = cfg.likelihood
    if lc.structures != "all":
        for k in lc.structures:
            if not 0 <= k < len(names):
                raise ConfigError(
                    f"{where}likelihood.structures: structure {k} is out of range: the "
                    f"templates have {len(names)} structure(s) ({', '.join(names)}), "
                    f"numbered from 0"
                )
    if lc.n_stacks is not None and lc.n_stacks > n_stacks:
        made_of = (
            f"{pa.folder} holds {n_stacks}"
            if pa.folder is not None
            else f"the conversion makes {n_stacks} ({particles.n_particles} particles, "
            f"particles.batch_size {pa.batch_size})"
        )
        raise ConfigError(
            f"{where}likelihood.n_stacks: {lc.n_stacks} stacks requested but {made_of}"
        )
    search = ("max_displacement_pixels", "n_displacements_x", "n_displacements_y")
    with (
        _as_key(cfg, {f"likelihood.{name}": [name] for name in search}),
        warnings.catch_warnings(),  # the likelihood step warns (no search along x, ...)
    ):
        warnings.simplefilter("ignore")
        lc.check_search(params)
    return CheckedConfig(params, particles, names)


def _record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _files_id(paths: list[Path]) -> list:
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _step_done(folder: Path, key: dict) -> bool:
    rec = _record(folder / ".complete.json")
    return rec is not None and rec == json.loads(json.dumps(key, default=str))


def _mark(folder: Path, key: dict) -> None:
    (folder / ".complete.json").write_text(json.dumps(key, default=str, indent=1))


def run_config(cfg: RunConfig, *, progress: bool = True, client: Any = None) -> dict[str, Path]:
    """Run every step of ``cfg``, skipping completed ones, on one Dask client (``client``, the
    active one, the config's cluster or one new LocalCluster for all steps); returns the main
    outputs."""
    from cryolike_dask.pipeline.cluster import ClusterOptions, get_client

    c = cfg.cluster
    cluster = ClusterOptions(
        c.scheduler_address,
        str(c.scheduler_file) if c.scheduler_file else None,
        c.n_workers,
        c.threads_per_worker,
        c.memory_limit,
        c.scheduler,
    )
    checked = check_config(cfg)  # every step's inputs, before a cluster starts
    device = cfg.likelihood.device
    if device == "auto":
        from cryolike_dask.pipeline.cluster import resolve_device

        device = resolve_device("auto")
    with get_client(cluster, device, client) as session:
        return _run_steps(cfg, checked, cluster, session, progress)


def _run_steps(
    cfg: RunConfig, checked: CheckedConfig, cluster: Any, client: Any, progress: bool
) -> dict[str, Path]:
    from cryolike_dask.io.stitch import stitch
    from cryolike_dask.pipeline import convert_particles as cp
    from cryolike_dask.pipeline.driver import OutputFolderInUseError, run_likelihood
    from cryolike_dask.pipeline.make_templates import make_templates
    from cryolike_dask.plots import plot_output_folder

    log = logger.info
    out = cfg.output
    out.mkdir(parents=True, exist_ok=True)
    if client is not None and getattr(client, "dashboard_link", None):
        log(f"Dask dashboard: {client.dashboard_link}")
    outputs: dict[str, Path] = {}
    # 1. parameters
    pc = cfg.parameters
    params = checked.params  # read, made and compared with an earlier one by check_config
    if pc.file is not None:
        params_path = pc.file
    else:
        params_path = out / "parameters.npz"
        if params_path.exists():
            log(f"parameters: {params_path} (unchanged)")
        else:
            params.save(params_path)
            log(f"parameters: {params_path}")
    outputs["parameters"] = params_path

    # 2. templates
    tc = cfg.templates
    if tc.folder is not None:
        templates_path = tc.folder
        log(f"templates: {templates_path} (given)")
    else:
        folder = out / "templates"
        key = {
            "inputs": _files_id(tc.inputs),
            "parameters": str(params),
            "atom_shape": tc.atom_shape,
            "voxel_size": tc.voxel_size,
        }
        templates_path = folder / "templates.zarr"
        if folder.exists() and _step_done(folder, key):
            log(f"templates: {templates_path} (complete, skipped)")
        else:
            make_templates(
                tc.inputs,
                params,
                folder,
                templates_per_block=tc.templates_per_block,
                atom_shape=tc.atom_shape,
                voxel_size=tc.voxel_size,
                overwrite=True,
                cluster=cluster,
                client=client,
                progress=progress,
            )
            _mark(folder, key)
            log(f"templates: {templates_path}")
    outputs["templates"] = templates_path

    # 3. particles
    pa = cfg.particles
    if pa.folder is not None:
        particles_path = pa.folder
        log(f"particles: {particles_path} (given)")
    else:
        folder = out / "particles"
        sources = [*pa.mrcs, *pa.star] + [p for p in (pa.cs,) if p is not None]
        key = {
            "inputs": _files_id(sources),
            "parameters": str(params),
            "options": pa.model_dump(mode="json"),
        }
        particles_path = folder / "particles.zarr"
        if folder.exists() and _step_done(folder, key):
            log(f"particles: {particles_path} (complete, skipped)")
        else:
            cp.convert_particles(
                checked.particles,
                params,
                folder,
                downsample=pa.downsample,
                convention=pa.astigmatism_convention,
                overwrite=True,
                cluster=cluster,
                client=client,
                progress=progress,
            )
            _mark(folder, key)
            log(f"particles: {particles_path}")
    outputs["particles"] = particles_path

    # 4. likelihood (resumes by itself)
    options = cfg.likelihood.model_copy(update={"skip_exist": not cfg.likelihood.overwrite})
    run = options.build(templates_path, particles_path, params, out / "likelihood")
    try:
        report = run_likelihood(run, cluster, client=client, progress=progress)
    except OutputFolderInUseError as exc:
        raise ConfigError(
            f"{out / 'likelihood'}: holds results of other settings ({exc}); use a new "
            "output folder or delete it"
        ) from None
    log(
        f"likelihood: {report.blocks_computed} blocks computed, {report.blocks_skipped} "
        f"already done, {report.stacks_exported} stacks written"
    )
    outputs["likelihood"] = out / "likelihood"

    # 5. matrices and plots
    if cfg.stitch:
        written = stitch(
            out / "likelihood",
            integrated=cfg.likelihood.integrated_likelihood,
            optimal=cfg.likelihood.optimal_pose_likelihood,
        )
        outputs["matrices"] = next(iter(written.values())).parent
        log(f"matrices: {outputs['matrices']}")
    if cfg.reweight is not None:  # 6. populations (needs the matrices)
        from cryolike_dask._reweight import reweight_folder

        folder = out / "reweight"
        key = {"likelihood": _record(out / "likelihood" / "results.zarr" / "zarr.json")}
        key["options"] = cfg.reweight.model_dump(mode="json")
        if folder.exists() and _step_done(folder, key):
            log(f"reweight: {folder} (complete, skipped)")
        else:
            result = reweight_folder(
                out / "likelihood", cfg.reweight, output=folder, overwrite=True
            )
            _mark(folder, key)
            weights = ", ".join(
                f"{n} {w:.3f}" for n, w in zip(result.components, result.map_weights, strict=True)
            )
            log(f"reweight: {folder} ({weights})")
        outputs["reweight"] = folder / "weights.csv"
    if cfg.plots:
        plots = plot_output_folder(out / "likelihood", out / "plots")
        outputs["plots"] = out / "plots"
        log(f"plots: {', '.join(p.name for p in plots)}")
    return outputs
