"""One-shot GPU check: environment, GPU tests, NumPy/CuPy agreement, GEMM and post-GEMM
throughput, ``correlate_block`` speed and memory, and the pipeline CPU vs GPU.

    python -m benchmarks.gpu_check --out gpu_report.json [--budget-seconds 420] [--quick]
    python -m benchmarks.gpu_check --dry-run --out /tmp/gpu_report.json   # no GPU needed

Sized for one short run on a GPU machine (6–8 minutes with the defaults). The JSON
report is rewritten after every phase and every measurement inside one, so a run that is
killed keeps what it finished. Each phase has a time budget (scaled by
``--budget-seconds / 420``), is skipped when less time is left than it needs to start, runs
under an alarm at its budget, and records its own error text; the next phase runs anyway.

Modes: on a machine where CuPy sees a GPU, the realistic sizes (``--quick``: fewer images
and templates, one work budget). ``--dry-run``: every phase that can run without CuPy, on
NumPy at tiny sizes; CuPy-only measurements say ``"skipped: no CuPy"`` (or
``"skipped: --dry-run"``). ``--tiny``: the dry run's sizes with CuPy when it is there (a
smoke test of the script on a GPU). Only the package's dependencies and CuPy are needed
(``pynvml`` is used when present); when the pipeline's dependencies (dask, zarr ...) are
missing, the kernels are imported without them and the pipeline phase is skipped.

Sizes (full): 128-pixel grid, ``N = 129`` shells, ``W = 256`` angles; displacement grids of
``D = 25`` (5 × 5) and ``D = 257`` (16 × 16 plus the zero shift). Agreement: ``S = 16``
templates, ``M = 64`` images. ``correlate_block``: ``S = 239``, ``M = 1024``, work budgets
256 MiB (the default) and 2 GiB.

JSON report (stable keys; floats that are not finite are written as ``null``)
----------------------------------------------------------------------------
Top level: ``schema`` (``"cryolike_dask.gpu_check/1"``), ``mode`` (``"gpu"``, ``"quick"``,
``"tiny"``, ``"dry-run"`` or ``"no-gpu"``), ``backend`` (``"cupy"`` or ``"numpy"``),
``args``, ``sizes``, ``started``/``finished`` (ISO times; ``finished`` null until the end),
``budget_seconds``, ``elapsed_seconds``, ``phases`` (below), ``summary`` (the lines printed
at the end).

Phases, in order: ``environment``, ``pytest_gpu``, ``agreement``, ``gemm``,
``correlate_block``, ``pipeline``. Every ``phases[NAME]`` has ``status`` (``"ok"``,
``"partial"``: some measurement failed or was skipped for another reason than the want of
CuPy; ``"error"``, ``"timeout"``, ``"skipped"``, or ``"running"``: the run was killed in
it), ``reason``
(why skipped, else null), ``error`` (traceback tail, else null), ``seconds``,
``budget_seconds`` and ``result`` (a dict). A measurement inside a phase carries its own
``status`` (``"ok"``, ``"error"`` with ``error``, ``"skipped"`` with ``reason``).

``environment.result``: ``python``, ``executable``, ``platform``, ``cpu_count``,
``packages`` (name → version or null: numpy, scipy, cupy, dask, distributed, zarr, xarray,
torch, pynvml ...), ``cryolike_dask``
(``version``, ``import_mode``: ``"full"`` or ``"kernels-only"``, ``import_error``),
``git_commit``, ``env`` (CUDA_VISIBLE_DEVICES, CUPY_TF32 ...), ``cupy`` (``available``,
``error``, ``device_count``, ``runtime_version``, ``driver_version``, ``cufft_version``,
``devices``: list of {``index``, ``name``, ``total_memory_bytes``, ``free_memory_bytes``,
``compute_capability``, ``multiprocessors``, ``clock_khz``, ``memory_clock_khz``,
``memory_bus_bits``, ``l2_bytes``, ``fp32_peak_tflops_estimate``,
``hbm_peak_gb_s_estimate``}), ``nvidia_smi`` (``query``: CSV line(s), ``text``: the plain
output, or ``error``), ``nvml`` (per device name/memory/clocks, when pynvml imports).

``pytest_gpu.result``: ``command``, ``files`` (test files holding ``mark.gpu``),
``returncode``, ``counts`` ({passed, failed, skipped, errors, deselected ...}), ``tail``.

``agreement.result.cases``: one per ``D``: ``n_shells``, ``n_inplanes``,
``n_displacements``, ``n_templates``, ``n_images``, ``numpy_seconds``, ``cupy_seconds``
(first calls, not benchmarks), ``max_abs_diff_cross_correlation`` (whole ``[M, S, D, W]``
tensor), ``max_abs_diff_best_cross_correlation``, ``identical_best_pose_fraction``,
``identical_pose_ms_fraction``, ``max_tie_gap`` (for images whose best pose differs: NumPy's
score at its own pose minus its score at CuPy's pose; ≲ 1e-6 means a tie),
``max_abs_diff_log_likelihood_ms``, ``max_rel_diff_log_likelihood_ms``,
``max_abs_diff_log_likelihood_sum``, ``ok`` (all within ``tolerances``). Without CuPy a case
is ``skipped`` and carries ``self_check``: the same comparison of NumPy against itself.

``gemm.result``: ``backend``, ``copy`` ({``bytes``, ``seconds``, ``gb_s``}: device-to-device
copy, bytes read + written), ``cgemm`` (list: ``m``, ``n``, ``q``, ``cols``, ``shape``,
``seconds`` (median), ``tflops`` (8 flops per complex multiply-add), ``use``: which
``correlate_block`` step has this shape), ``peak_tflops``, ``steps`` (list, one per distinct
internal step of the ``correlate_block`` cases: ``m``, ``s``, ``d``, ``integrated``, and for
each pass ``gemm``, ``irfft`` (as the kernel calls it, on the transposed GEMM output),
``transpose_copy``, ``irfft_contiguous`` (a contiguous input: CuPy still copies it, C2R
overwrites its input), ``irfft_overwrite`` (GPU only: ``cupyx.scipy.fft.irfft`` with
``overwrite_x=True``, the transform alone), ``normalise_max``, ``integrated_likelihood``:
{``seconds``, ``min_seconds``, ``n``, ``gb_s`` (nominal bytes: each input read and output
written once), ``poses_per_s``; ``gemm`` also ``tflops``}; ``step_seconds``: the sum of the
passes the kernel runs; ``poses_per_s``: the step's pose evaluations over that sum).

``correlate_block.result.cases``: one per (``D``, integrated likelihood, work budget):
``n_displacements``, ``integrated``, ``work_bytes``, ``n_images``, ``n_templates``,
``step`` ([images, templates] per internal step), ``n_steps``, ``seconds_first`` (first
call: plans and handles), ``seconds`` (median of the timed calls), ``repeats``,
``pose_evaluations`` (``M·S·D·W``), ``poses_per_s``, ``contraction_tflops``
(``8·M·S·D·N·(W/2+1)`` over the time), ``fraction_of_gemm_peak``, ``predicted_seconds``
(``n_steps`` × the step's passes from ``gemm.steps``), ``pool_baseline_bytes`` (pool after
preparation, inputs and prepared blocks alive), ``pool_peak_bytes`` (pool high-water:
``total_bytes()`` after the first call, the pool emptied before), ``hook_peak_extra_bytes``
(peak of allocated bytes above the baseline, from a ``MemoryHook``; null without one),
``plan_task_bytes`` (``kernel_memory(..., device="gpu").task_bytes(M, S, work_bytes=…)``),
``plan_work_bytes`` (its temporaries share), ``plan_fixed_bytes`` (CUDA context, outside
the pool), ``peak_over_plan`` (``pool_peak_bytes / (plan_task_bytes − plan_fixed_bytes)``),
``temporaries_over_plan`` (``(pool_peak − baseline) / plan_work_bytes``), ``best_cc_max``.
``correlate_block.result.prepare``: per ``D``: ``prepare_templates_seconds``,
``prepare_images_seconds``, ``prepared_template_bytes``, ``pool_bytes`` (the pool after
both). ``correlate_block.result.gemm_peak_tflops``: the peak it is compared with.

``pipeline.result``: ``case`` (the reference case and options), ``cpu`` / ``gpu_cold`` /
``gpu_warm`` ({``seconds``, ``attrs``: the dataset's planning attributes}),
``cpu_vs_reference`` (``max_abs_diff_cross_correlation`` against CryoLike's numbers,
``identical_optimal_pose_fraction``), ``gpu_vs_cpu`` (``max_abs_diff_cross_correlation``,
``identical_optimal_pose_fraction``, ``max_abs_diff_log_likelihood_integrated``,
``max_rel_diff_log_likelihood_integrated``). The GPU runs are skipped without CuPy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import importlib
import importlib.metadata as _md
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "cryolike_dask.gpu_check/1"
MiB = 2**20
GiB = 2**30
REFERENCE = ROOT / "tests" / "data" / "cryolike_reference_small"

#: FP32 lanes per multiprocessor by compute capability (for the peak estimate only).
FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128}


class PhaseTimeout(Exception):
    """The phase ran past its budget (raised by the alarm)."""


# ------------------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode."""

    pixels: int  # image side: N = pixels + 1 shells, W = 2·pixels angles
    agree_templates: int
    agree_images: int
    displacement_sides: tuple[int, ...]  # D = side² (+1 when even: the zero shift)
    templates: int
    images: int
    work_bytes: tuple[int, ...]
    gemm_wide_images: tuple[int, ...]  # image counts of the extra wide GEMMs

    @property
    def grid(self) -> Any:
        from cryolike_dask.grids import PolarGrid

        return PolarGrid.from_image_size(self.pixels)


FULL = Sizes(128, 16, 64, (5, 16), 239, 1024, (256 * MiB, 2 * GiB), (128, 512))
QUICK = Sizes(128, 8, 32, (5, 16), 64, 256, (256 * MiB,), (128,))
TINY = Sizes(32, 4, 8, (3, 5), 12, 16, (1 * MiB, 256 * MiB), (16,))

#: Phase name → (budget seconds at --budget-seconds 420, least seconds to start it).
PHASES: dict[str, tuple[float, float]] = {
    "environment": (20, 5),
    "pytest_gpu": (90, 20),
    "agreement": (60, 15),
    "gemm": (40, 10),
    "correlate_block": (150, 30),
    "pipeline": (60, 20),
}
TOTAL_BUDGET = sum(b for b, _ in PHASES.values())

TOLERANCES = {
    "max_abs_diff_cross_correlation": 1e-5,
    "max_tie_gap": 1e-5,
    "max_rel_diff_log_likelihood_ms": 1e-5,
}


# ------------------------------------------------------------------------------ JSON
def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, bytes to str, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace").rstrip("\x00")
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, np.ndarray) and x.size <= 64:
        return _clean(x.tolist())
    return str(x)


def _error_text(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-3000:]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ imports
def import_package() -> dict:
    """Import cryolike_dask; without its pipeline's dependencies, import the kernels alone.

    The package's ``__init__`` imports the pipeline (dask, zarr, pydantic ...); the kernels
    need only NumPy and SciPy. When the full import fails, a bare parent package is put in
    ``sys.modules`` so that ``cryolike_dask.kernels`` and ``cryolike_dask.grids`` import.
    """
    info: dict[str, Any] = {"import_mode": "full", "import_error": None, "version": None}
    try:
        import cryolike_dask

        info["version"] = cryolike_dask.__version__
        return info
    except Exception as exc:
        info["import_error"] = f"{type(exc).__name__}: {exc}"
    for name in [m for m in sys.modules if m == "cryolike_dask" or m.startswith("cryolike_")]:
        del sys.modules[name]
    pkg = types.ModuleType("cryolike_dask")
    pkg.__path__ = [str(ROOT / "cryolike_dask")]
    sys.modules["cryolike_dask"] = pkg
    importlib.import_module("cryolike_dask.kernels")
    importlib.import_module("cryolike_dask.grids")
    info["import_mode"] = "kernels-only"
    return info


def import_cupy() -> tuple[Any, str | None]:
    """``(cupy, None)`` when CuPy imports and sees a GPU, else ``(None, why)``."""
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return None, "CuPy sees no CUDA device"
        return cupy, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ backend
class Backend:
    """NumPy or CuPy: synchronisation, timing, the memory pool and its high-water mark."""

    def __init__(self, xp: Any):
        self.xp = xp
        self.gpu = xp is not np
        from cryolike_dask.kernels.backend import fft_module

        self.fft = fft_module(xp)
        self.workers = None if self.gpu else (os.cpu_count() or 1)
        self.fft_kw = {} if self.gpu else {"workers": self.workers}

    @property
    def name(self) -> str:
        return "cupy" if self.gpu else "numpy"

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.Device().synchronize()

    def asarray(self, a: np.ndarray) -> Any:
        return self.xp.asarray(a) if self.gpu else a

    def host(self, a: Any) -> np.ndarray:
        from cryolike_dask.kernels import to_host

        return to_host(a)

    def timeit(
        self, fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, max_seconds: float = 5.0
    ) -> dict:
        """Median seconds of ``fn`` over up to ``repeats`` calls after ``warmup`` calls.

        On the GPU with CUDA events around each call (wall clock after a synchronisation
        where this CuPy has no ``get_elapsed_time``); on the CPU with ``perf_counter``.
        """
        for _ in range(warmup):
            fn()
        self.sync()
        events = self.gpu and hasattr(self.xp.cuda, "get_elapsed_time")
        times: list[float] = []
        t_end = time.perf_counter() + max_seconds
        for _ in range(max(1, repeats)):
            if events:
                start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(self.xp.cuda.get_elapsed_time(start, stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t0)
            if time.perf_counter() > t_end:
                break
        return {"seconds": float(np.median(times)), "min_seconds": min(times), "n": len(times)}

    def wall(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    # memory --------------------------------------------------------------------------
    def free_pool(self) -> None:
        gc.collect()
        if self.gpu:
            self.sync()
            self.xp.get_default_memory_pool().free_all_blocks()

    def pool_total(self) -> int | None:
        return int(self.xp.get_default_memory_pool().total_bytes()) if self.gpu else None

    @contextlib.contextmanager
    def peak_hook(self) -> Iterator[Any]:
        """A MemoryHook counting allocated bytes and their peak (``None`` where unavailable)."""
        base = getattr(self.xp.cuda, "MemoryHook", None) if self.gpu else None
        if base is None:
            yield None
            return

        class PeakHook(base):  # type: ignore[misc, valid-type]
            name = "gpu_check_peak"

            def __init__(self) -> None:
                super().__init__()
                self.used = 0
                self.peak = 0

            def malloc_postprocess(self, **kw: Any) -> None:
                self.used += int(kw.get("mem_size", 0))
                self.peak = max(self.peak, self.used)

            def free_postprocess(self, **kw: Any) -> None:
                self.used -= int(kw.get("mem_size", 0))

        hook = PeakHook()
        with hook:
            yield hook


# ------------------------------------------------------------------------------ the run
class Run:
    """The report, the clock and the phases' bookkeeping."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        self.budget = float(args.budget_seconds)
        self.scale = self.budget / TOTAL_BUDGET
        self.out = Path(args.out)
        self.report: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": None,
            "backend": None,
            "args": vars(args),
            "sizes": None,
            "started": _now(),
            "finished": None,
            "budget_seconds": self.budget,
            "elapsed_seconds": 0.0,
            "phases": {},
            "summary": [],
        }
        self.deadline = math.inf
        self.cupy: Any = None
        self.cupy_reason: str | None = None
        self.backend: Backend | None = None
        self.sizes = FULL
        self.package: dict = {}

    def left(self) -> float:
        """Seconds left in the whole run."""
        return self.budget - (time.perf_counter() - self.t0)

    def phase_left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.report["elapsed_seconds"] = round(time.perf_counter() - self.t0, 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(_clean(self.report), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.out)

    def no_cupy(self) -> str:
        if self.args.dry_run and self.cupy is not None:
            return "skipped: --dry-run"
        return "skipped: no CuPy" + (f" ({self.cupy_reason})" if self.cupy_reason else "")

    def phase(self, name: str, fn: Callable[[dict], str | None]) -> None:
        """Run ``fn(result)`` under its budget; ``fn`` may return a skip reason."""
        budget, least = PHASES[name]
        budget *= self.scale
        entry: dict[str, Any] = {
            "status": "running",
            "reason": None,
            "error": None,
            "seconds": None,
            "budget_seconds": round(budget, 1),
            "result": {},
        }
        self.report["phases"][name] = entry
        allotted = min(budget, self.left())
        if allotted < least * min(self.scale, 1.0):
            entry["status"] = "skipped"
            entry["reason"] = (
                f"skipped: {self.left():.0f} s left of the run's budget, the phase needs "
                f"at least {least * min(self.scale, 1.0):.0f} s"
            )
            self.save()
            print(f"[{name}] {entry['reason']}", flush=True)
            return
        print(f"[{name}] up to {allotted:.0f} s", flush=True)
        self.save()
        t0 = time.perf_counter()
        self.deadline = t0 + allotted
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(allotted, 1.0))
        try:
            reason = fn(entry["result"])
            if reason:
                entry["status"], entry["reason"] = "skipped", reason
            else:
                entry["status"] = "partial" if _has_failures(entry["result"]) else "ok"
        except PhaseTimeout:
            entry["status"] = "timeout"
            entry["error"] = f"stopped at the phase's budget of {allotted:.0f} s"
        except Exception as exc:
            entry["status"] = "error"
            entry["error"] = _error_text(exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            self.deadline = math.inf
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            with contextlib.suppress(Exception):
                if self.backend is not None:
                    self.backend.free_pool()
            self.save()
        print(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        if entry["error"]:
            print(entry["error"].strip().splitlines()[-1], flush=True)

    def measure(
        self, items: list, label: dict, fn: Callable[[], dict], need_s: float = 0.0
    ) -> dict:
        """Append ``fn()``'s dict (with ``label``) to ``items``, or its error, or a skip."""
        item = dict(label)
        left = self.phase_left()
        if left < need_s:
            item.update(
                status="skipped",
                reason=f"skipped: {left:.0f} s left in the phase, ~{need_s:.0f} s needed",
            )
        else:
            try:
                item.update(fn())
                item.setdefault("status", "ok")
            except PhaseTimeout:
                item.update(status="error", error="stopped at the phase's budget")
                items.append(item)
                self.save()
                raise
            except Exception as exc:
                item.update(status="error", error=_error_text(exc))
                with contextlib.suppress(Exception):
                    if self.backend is not None:
                        self.backend.free_pool()
        items.append(item)
        self.save()
        return item


def _on_alarm(signum: int, frame: Any) -> None:
    raise PhaseTimeout()


OK_SKIPS = ("skipped: no CuPy", "skipped: --dry-run")


def _has_failures(x: Any) -> bool:
    """Whether a result holds an error, or a skip other than for want of CuPy."""
    if isinstance(x, dict):
        if x.get("status") == "error":
            return True
        if x.get("status") == "skipped" and not str(x.get("reason", "")).startswith(OK_SKIPS):
            return True
        return any(_has_failures(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_failures(v) for v in x)
    return False


# ------------------------------------------------------------------------------ data
def make_inputs(sizes: Sizes, side: int, n_templates: int, n_images: int, seed: int) -> dict:
    """Host inputs: Hermitian templates and images, CTFs and the translation kernel."""
    from benchmarks.problems import hermitian
    from cryolike_dask.grids import DisplacementGrid
    from cryolike_dask.kernels import ctf_polar, translation_kernel

    g = sizes.grid
    rng = np.random.default_rng(seed)
    disp = DisplacementGrid.from_search(2.0, side, side, 1.0)
    box = float(sizes.pixels)
    return {
        "grid": g,
        "templates": hermitian(rng, n_templates, g.n_shells, g.n_inplanes),
        "images": hermitian(rng, n_images, g.n_shells, g.n_inplanes),
        "ctf": ctf_polar(
            rng.uniform(8e3, 2e4, n_images),
            rng.uniform(8e3, 2e4, n_images),
            rng.uniform(0, 3, n_images),
            np.zeros(n_images),
            voltage_kv=300,
            spherical_aberration_mm=2.7,
            amplitude_contrast=0.1,
            radii=g.radii,
            theta=g.theta,
            box_size=box,
        ).astype(np.float32),
        "kernel": translation_kernel(g.x_points, g.y_points, disp.x, disp.y, box, np.complex64),
        "n_displacements": int(disp.n_displacements),
    }


def n_displacements(side: int) -> int:
    """``D`` of a ``side × side`` search (an even side adds the zero shift)."""
    return side * side + (1 if side % 2 == 0 else 0)


def kernel_plan(n_shells: int, n_inplanes: int, n_d: int, device: str) -> Any:
    """The kernel's memory model (``kernel_memory``) for ``device``."""
    from cryolike_dask.kernels.cross_correlation import kernel_memory

    return kernel_memory(n_shells, n_inplanes, n_d, "single", device=device)


def step_shape(
    n_templates: int, n_images: int, n_d: int, n_w: int, integrated: bool, work: int
) -> tuple[int, int]:
    """``correlate_block``'s ``(images, templates)`` per internal step for these sizes."""
    from cryolike_dask.kernels import BlockOutputs
    from cryolike_dask.kernels.cross_correlation import batch_sizes

    fake = types.SimpleNamespace(
        n_displacements=n_d,
        n_inplanes=n_w,
        n_templates=n_templates,
        spectrum=np.empty(0, np.complex64),
    )
    outputs = BlockOutputs(integrated_likelihood=integrated)
    return batch_sizes(fake, n_images, outputs, work)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ phases
def phase_environment(run: Run, res: dict) -> None:
    res["python"] = sys.version
    res["executable"] = sys.executable
    res["platform"] = platform.platform()
    res["cpu_count"] = os.cpu_count()
    pkgs = {}
    for name in (
        "numpy", "scipy", "cupy", "cupy-cuda12x", "cupy-cuda13x", "dask", "distributed",
        "zarr", "xarray", "torch", "pynvml", "nvidia-ml-py", "dask-cuda", "pytest",
    ):  # fmt: skip
        try:
            pkgs[name] = _md.version(name)
        except Exception:
            pkgs[name] = None
    res["packages"] = pkgs
    res["cryolike_dask"] = run.package
    try:
        res["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except Exception:
        res["git_commit"] = None
    keys = ("CUDA_VISIBLE_DEVICES", "CUPY_TF32", "CUPY_CACHE_DIR", "CUPY_ACCELERATORS",
            "OMP_NUM_THREADS", "PYTHONPATH")  # fmt: skip
    res["env"] = {k: os.environ.get(k) for k in keys}
    cu: dict[str, Any] = {"available": run.cupy is not None, "error": run.cupy_reason}
    res["cupy"] = cu
    if run.cupy is not None:
        try:
            cupy_devices(run.cupy, cu)
        except Exception as exc:
            cu["devices_error"] = _error_text(exc)
    res["nvidia_smi"] = nvidia_smi()
    res["nvml"] = nvml()
    # CUDA 13 dropped the clock rates from the device properties: NVML's maximum SM clock
    nv_list = res["nvml"] if isinstance(res["nvml"], list) else []
    for d, nv in zip(cu.get("devices", []), nv_list, strict=False):
        cc = tuple(int(v) for v in d["compute_capability"].split("."))
        lanes = FP32_LANES.get(cc, 128 if cc >= (9, 0) else None)
        if "fp32_peak_tflops_estimate" not in d and lanes and d.get("multiprocessors"):
            mhz = nv.get("sm_clock_max_mhz")
            if mhz:
                d["fp32_peak_tflops_estimate"] = d["multiprocessors"] * lanes * 2 * mhz / 1e6


def cupy_devices(cp: Any, cu: dict) -> None:
    """CuPy's versions and each device's properties into ``cu``."""
    cu["version"] = getattr(cp, "__version__", None)
    rt = cp.cuda.runtime
    cu["device_count"] = rt.getDeviceCount()
    for key, call in (
        ("runtime_version", lambda: rt.runtimeGetVersion()),
        ("driver_version", lambda: rt.driverGetVersion()),
        ("cufft_version", lambda: cp.cuda.cufft.getVersion()),
    ):
        try:
            cu[key] = call()
        except Exception as exc:
            cu[key] = f"unavailable: {exc}"
    devices = []
    for i in range(cu["device_count"]):
        p = rt.getDeviceProperties(i)
        cc = (int(p.get("major", 0)), int(p.get("minor", 0)))
        d: dict[str, Any] = {
            "index": i,
            "name": p.get("name"),
            "total_memory_bytes": p.get("totalGlobalMem"),
            "compute_capability": f"{cc[0]}.{cc[1]}",
            "multiprocessors": p.get("multiProcessorCount"),
            "clock_khz": p.get("clockRate"),
            "memory_clock_khz": p.get("memoryClockRate"),
            "memory_bus_bits": p.get("memoryBusWidth"),
            "l2_bytes": p.get("l2CacheSize"),
        }
        with contextlib.suppress(Exception), cp.cuda.Device(i):
            d["free_memory_bytes"] = rt.memGetInfo()[0]
        lanes = FP32_LANES.get(cc, 128 if cc >= (9, 0) else None)
        if lanes and d["multiprocessors"] and d["clock_khz"]:
            d["fp32_peak_tflops_estimate"] = (
                d["multiprocessors"] * lanes * 2 * d["clock_khz"] * 1e3 / 1e12
            )
        if d["memory_clock_khz"] and d["memory_bus_bits"]:
            d["hbm_peak_gb_s_estimate"] = (
                2 * d["memory_clock_khz"] * 1e3 * d["memory_bus_bits"] / 8 / 1e9
            )
        devices.append(d)
    cu["devices"] = devices


def nvidia_smi() -> dict:
    """``nvidia-smi``'s query line and plain text (or why not)."""
    smi: dict[str, Any] = {}
    try:
        q = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,"
                "clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,"
                "utilization.gpu",
                "--format=csv",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
        smi["query"] = q.stdout.strip() or q.stderr.strip()
        t = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15)
        smi["text"] = t.stdout[-4000:]
    except Exception as exc:
        smi["error"] = f"{type(exc).__name__}: {exc}"
    return smi


def nvml() -> Any:
    """Names, memory and clocks from NVML, when pynvml imports."""
    try:
        import pynvml

        pynvml.nvmlInit()
        nv = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            nv.append(
                {
                    "name": pynvml.nvmlDeviceGetName(h),
                    "memory_total": mem.total,
                    "memory_used": mem.used,
                    "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                }
            )
        return nv
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"


def gpu_test_files() -> list[str]:
    """Test files that hold GPU-marked tests (so that no other module must import)."""
    out = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if "gpu_standin" in path.parts:
            continue
        text = path.read_text(errors="replace")
        if "mark.gpu" in text:
            out.append(str(path.relative_to(ROOT)))
    return out


def phase_pytest(run: Run, res: dict) -> str | None:
    files = gpu_test_files()
    res["files"] = files
    if not files:
        return "skipped: no test file holds a gpu mark"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    res["command"] = " ".join(cmd[1:])
    timeout = max(1.0, run.phase_left() - 2.0)  # before the alarm, to keep the output
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        out, res["returncode"] = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        raw = (exc.stdout or b"") + (exc.stderr or b"")
        out = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        res["returncode"] = None
        res["timeout_seconds"] = timeout
        res["error"] = f"pytest ran past {timeout:.0f} s"
        res["status"] = "error"
    counts = {}
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped)", ln)]
    if lines:
        for n, word in re.findall(r"(\d+) (\w+)", lines[-1]):
            counts[word] = int(n)
    res["counts"] = counts
    res["tail"] = out[-3000:]
    if res.get("returncode") not in (0, 5, None):
        res["status"] = "error"
        res["error"] = f"pytest exited {res['returncode']}"
    return None


def _compare(a: Any, b: Any, host: Callable[[Any], np.ndarray]) -> dict:
    """Agreement of two BlockResults (a: reference on NumPy)."""
    cc_a, cc_b = np.asarray(a.cross_correlation_msdw), host(b.cross_correlation_msdw)
    pose_a, pose_b = np.asarray(a.best_pose), host(b.best_pose)
    m = cc_a.shape[0]
    flat = cc_a.reshape(m, -1)
    differ = np.nonzero(pose_a != pose_b)[0]
    gap = (
        float(np.max(flat[differ, pose_a[differ]] - flat[differ, pose_b[differ]]))
        if differ.size
        else 0.0
    )
    ll_a, ll_b = np.asarray(a.log_likelihood_ms), host(b.log_likelihood_ms)
    out = {
        "max_abs_diff_cross_correlation": float(np.max(np.abs(cc_a - cc_b))),
        "max_abs_diff_best_cross_correlation": float(
            np.max(np.abs(np.asarray(a.best_cross_correlation) - host(b.best_cross_correlation)))
        ),
        "identical_best_pose_fraction": float(np.mean(pose_a == pose_b)),
        "identical_pose_ms_fraction": float(np.mean(np.asarray(a.pose_ms) == host(b.pose_ms))),
        "max_tie_gap": gap,
        "max_abs_diff_log_likelihood_ms": float(np.max(np.abs(ll_a - ll_b))),
        "max_rel_diff_log_likelihood_ms": float(
            np.max(np.abs(ll_a - ll_b) / np.maximum(np.abs(ll_a), 1e-30))
        ),
        "max_abs_diff_log_likelihood_sum": float(
            np.max(np.abs(np.asarray(a.log_likelihood_sum) - host(b.log_likelihood_sum)))
        ),
    }
    out["ok"] = all(out[k] <= tol for k, tol in TOLERANCES.items())
    return out


def _agreement_block(be: Backend, inp: dict, n_pixels: int) -> tuple[float, Any]:
    from cryolike_dask.kernels import (
        BlockOutputs,
        LikelihoodConstants,
        correlate_block,
        prepare_images,
        prepare_templates,
    )

    g = inp["grid"]
    n_s = inp["templates"].shape[0]
    consts = LikelihoodConstants.for_grid(g, n_pixels)
    outputs = BlockOutputs(full=True, integrated_likelihood=True)

    def go() -> Any:
        pt = prepare_templates(
            be.asarray(inp["templates"]), be.asarray(inp["kernel"]), g, workers=be.workers
        )
        pi = prepare_images(
            be.asarray(inp["images"]), be.asarray(inp["ctf"]), g, workers=be.workers
        )
        prior = be.xp.full(n_s, -np.log(n_s))
        return correlate_block(
            pt, pi, outputs, likelihood=consts, log_prior=prior, workers=be.workers
        )

    return be.wall(go)


def phase_agreement(run: Run, res: dict) -> str | None:
    sz = run.sizes
    if run.backend is None:
        return run.no_cupy()
    ref = Backend(np)
    gpu = run.backend if run.backend.gpu else None
    n_pixels = sz.pixels * sz.pixels
    res["tolerances"] = TOLERANCES
    res["cases"] = cases = []
    for side in sz.displacement_sides:

        def case(side: int = side) -> dict:
            inp = make_inputs(sz, side, sz.agree_templates, sz.agree_images, seed=side)
            g = inp["grid"]
            info = {
                "n_shells": g.n_shells,
                "n_inplanes": g.n_inplanes,
                "n_displacements": inp["n_displacements"],
                "n_templates": sz.agree_templates,
                "n_images": sz.agree_images,
            }
            t_np, a = _agreement_block(ref, inp, n_pixels)
            info["numpy_seconds"] = t_np
            if gpu is None:
                info["status"] = "skipped"
                info["reason"] = run.no_cupy()
                _, b = _agreement_block(ref, inp, n_pixels)
                info["self_check"] = _compare(a, b, ref.host)
                return info
            t_cp, b = _agreement_block(gpu, inp, n_pixels)
            info["cupy_seconds"] = t_cp
            info.update(_compare(a, b, gpu.host))
            del b
            return info

        run.measure(cases, {"side": side}, case, need_s=3.0)
    return None


class Random:
    """float32 random numbers made where they are used (the host's RNG as a fallback)."""

    def __init__(self, be: Backend, seed: int):
        self.be = be
        self.rng = np.random.default_rng(seed)

    def real(self, shape: tuple[int, ...], normal: bool = True) -> Any:
        xp = self.be.xp
        if self.be.gpu:
            with contextlib.suppress(AttributeError, TypeError):
                f = xp.random.standard_normal if normal else xp.random.random
                return f(shape, dtype=xp.float32)
        f = self.rng.standard_normal if normal else self.rng.random
        return self.be.asarray(f(shape, dtype=np.float32))

    def complex(self, *shape: int) -> Any:
        return (self.real(shape) + 1j * self.real(shape)).astype(np.complex64)


def correlate_steps(sz: Sizes) -> dict[tuple[int, int, int, bool], list[str]]:
    """The distinct internal steps ``(m, s, D, integrated)`` of the correlate_block cases."""
    n_w = sz.grid.n_inplanes
    steps: dict[tuple[int, int, int, bool], list[str]] = {}
    for side in sz.displacement_sides:
        n_d = n_displacements(side)
        for integrated in (False, True):
            for work in sz.work_bytes:
                m, s = step_shape(sz.templates, sz.images, n_d, n_w, integrated, work)
                steps.setdefault((m, s, n_d, integrated), []).append(
                    f"D={n_d} {'IL' if integrated else 'no IL'} work={work // MiB} MiB"
                )
    return steps


def measure_copy(be: Backend) -> dict:
    """Device-to-device copy (bytes read + written): the bandwidth ceiling."""
    xp = be.xp
    n = (512 * MiB if be.gpu else 16 * MiB) // 4
    a = xp.ones(n, dtype=xp.float32)
    b = xp.empty_like(a)
    t = be.timeit(lambda: b.__setitem__(Ellipsis, a), repeats=10, warmup=2)
    return {"bytes": 2 * a.nbytes, **t, "gb_s": 2 * a.nbytes / t["seconds"] / 1e9}


def measure_gemm(be: Backend, rnd: Random, q: int, m: int, n: int, cols: int) -> dict:
    """A complex64 batched product ``[q, m, n] @ [q, n, cols]``."""
    a, b = rnd.complex(q, m, n), rnd.complex(q, n, cols)
    t = be.timeit(lambda: be.xp.matmul(a, b), repeats=10, warmup=2, max_seconds=3.0)
    return {**t, "tflops": 8.0 * q * m * n * cols / t["seconds"] / 1e12}


def measure_passes(
    be: Backend, rnd: Random, sz: Sizes, m: int, s: int, n_d: int, integrated: bool
) -> dict:
    """Each pass of one ``correlate_block`` step, as the kernel runs it, on random data."""
    from cryolike_dask.kernels import LikelihoodConstants
    from cryolike_dask.kernels.cross_correlation import _integrated_log_likelihood

    xp, fft = be.xp, be.fft
    g = sz.grid
    n_n, n_w = g.n_shells, g.n_inplanes
    n_q = n_w // 2 + 1
    cols = s * n_d
    poses = float(m * cols * n_w)
    a, b = rnd.complex(n_q, m, n_n), rnd.complex(n_q, n_n, cols)
    xq = xp.matmul(a, b)  # [Q, m, s·D]
    cbytes = xq.nbytes
    rbytes = m * cols * n_w * 4

    def entry(t: dict, nbytes: float) -> dict:
        return {**t, "gb_s": nbytes / t["seconds"] / 1e9, "poses_per_s": poses / t["seconds"]}

    def irfft(z: Any) -> Any:
        return fft.irfft(z, n=n_w, axis=-1, norm="forward", **be.fft_kw)

    r: dict[str, Any] = {}
    t = be.timeit(lambda: xp.matmul(a, b), repeats=5, max_seconds=2.0)
    r["gemm"] = entry(t, a.nbytes + b.nbytes + cbytes)
    r["gemm"]["tflops"] = 8.0 * n_q * m * n_n * cols / t["seconds"] / 1e12
    t = be.timeit(lambda: irfft(xq.transpose(1, 2, 0)), repeats=5, max_seconds=2.0)
    r["irfft"] = entry(t, cbytes + rbytes)
    t = be.timeit(lambda: xp.ascontiguousarray(xq.transpose(1, 2, 0)), repeats=5, max_seconds=2.0)
    r["transpose_copy"] = entry(t, 2 * cbytes)
    contiguous = xp.ascontiguousarray(xq.transpose(1, 2, 0))
    t = be.timeit(lambda: irfft(contiguous), repeats=5, max_seconds=2.0)
    r["irfft_contiguous"] = entry(t, cbytes + rbytes)
    x = irfft(contiguous).reshape(m, s, n_d, n_w).astype(np.float32, copy=False)
    if be.gpu:  # the C2R transform alone: CuPy copies a C2R input unless it may overwrite it
        with contextlib.suppress(ImportError):
            import cupyx.scipy.fft as cufft

            t = be.timeit(
                lambda: cufft.irfft(contiguous, n=n_w, axis=-1, norm="forward", overwrite_x=True),
                repeats=5,
                max_seconds=2.0,
            )
            r["irfft_overwrite"] = entry(t, cbytes + rbytes)
    contiguous = xq = a = b = None  # free the step's complex buffers
    ixx = xp.ones((m, s, n_w), dtype=xp.float32)
    ones = xp.ones(m, dtype=xp.float32)

    def normalise_max() -> Any:
        cc = x  # in place, as the kernel does (norms of 1 keep the values)
        inv = 1.0 / xp.sqrt(ixx * ones[:, None, None])
        cc *= inv[:, :, None, :]
        flat = cc.reshape(m, s, n_d * n_w)
        arg = xp.argmax(flat, axis=-1)
        return xp.take_along_axis(flat, arg[..., None], axis=-1)

    t = be.timeit(normalise_max, repeats=5, max_seconds=2.0)
    r["normalise_max"] = entry(t, 3 * rbytes)  # read, write, read again for the arg-max
    total = r["gemm"]["seconds"] + r["irfft"]["seconds"] + r["normalise_max"]["seconds"]
    if integrated:
        consts = LikelihoodConstants.for_grid(g, sz.pixels * sz.pixels)
        u = rnd.real(x.shape, normal=False)  # |X| < 1 < Iyy: the logs are finite
        u *= 2
        u -= 1
        x[...] = u
        del u
        iyy = xp.full(m, 1e3, dtype=xp.float32)
        isx = xp.zeros((m, s), dtype=xp.complex64)
        isy = xp.zeros(m, dtype=xp.complex64)
        t = be.timeit(
            lambda: _integrated_log_likelihood(x, ixx, iyy, isx, isy, consts, xp),
            repeats=5,
            max_seconds=2.0,
        )
        r["integrated_likelihood"] = entry(t, 2 * rbytes)  # X read, one temporary written
        total += r["integrated_likelihood"]["seconds"]
    r["step_seconds"] = total
    r["poses_per_s"] = poses / total
    return r


def phase_gemm(run: Run, res: dict) -> str | None:
    be = run.backend
    if be is None or (not be.gpu and not run.args.dry_run):
        return run.no_cupy()
    sz = run.sizes
    g = sz.grid
    n_n, n_q = g.n_shells, g.n_inplanes // 2 + 1
    rnd = Random(be, 1)
    res["backend"] = be.name
    res["copy"] = run.measure([], {}, lambda: measure_copy(be), need_s=2.0)

    steps = correlate_steps(sz)
    gemms: dict[tuple[int, int], list[str]] = {}
    for (m, s, n_d, _), uses in steps.items():
        gemms.setdefault((m, s * n_d), []).extend(uses)
    d0 = n_displacements(sz.displacement_sides[0])
    for m in sz.gemm_wide_images:
        gemms.setdefault((m, sz.templates * d0), []).append(f"all S={sz.templates}, D={d0}")
    res["cgemm"] = cgemm = []
    for (m, cols), uses in sorted(gemms.items()):
        label = {
            "m": m,
            "n": n_n,
            "q": n_q,
            "cols": cols,
            "shape": f"[{n_q},{m},{n_n}]@[{n_q},{n_n},{cols}]",
            "use": uses,
        }
        run.measure(
            cgemm, label, lambda m=m, cols=cols: measure_gemm(be, rnd, n_q, m, n_n, cols), 2.0
        )
    rates = [c["tflops"] for c in cgemm if c.get("status") == "ok"]
    res["peak_tflops"] = max(rates) if rates else None

    res["steps"] = out = []
    for (m, s, n_d, il), uses in steps.items():
        label = {"m": m, "s": s, "d": n_d, "integrated": il, "use": uses}
        run.measure(
            out,
            label,
            lambda m=m, s=s, n_d=n_d, il=il: measure_passes(be, rnd, sz, m, s, n_d, il),
            3.0,
        )
    return None


@dataclasses.dataclass
class CorrelateSetup:
    """One displacement grid's prepared blocks and what its cases share."""

    be: Backend
    sz: Sizes
    n_d: int
    templates: Any  # PreparedTemplates
    images: Any  # PreparedImages
    plan: Any  # KernelMemory
    gemm_peak: float | None
    step_seconds: dict


def prepare_correlate(run: Run, side: int, holder: dict) -> dict:
    """Upload and prepare one displacement grid's templates and images (timed)."""
    from cryolike_dask.kernels import prepare_images, prepare_templates

    be, sz = run.backend, run.sizes
    assert be is not None
    g = sz.grid
    be.free_pool()
    inp = make_inputs(sz, side, sz.templates, sz.images, seed=100 + side)
    n_d = inp["n_displacements"]
    t_t, pt = be.wall(
        lambda: prepare_templates(
            be.asarray(inp["templates"]), be.asarray(inp["kernel"]), g, workers=be.workers
        )
    )
    t_i, pi = be.wall(
        lambda: prepare_images(
            be.asarray(inp["images"]), be.asarray(inp["ctf"]), g, workers=be.workers
        )
    )
    gemm = run.report["phases"].get("gemm", {}).get("result", {})
    holder["setup"] = CorrelateSetup(
        be=be,
        sz=sz,
        n_d=n_d,
        templates=pt,
        images=pi,
        plan=kernel_plan(g.n_shells, g.n_inplanes, n_d, "gpu" if be.gpu else "cpu"),
        gemm_peak=gemm.get("peak_tflops"),
        step_seconds={
            (st["m"], st["s"], st["d"], st["integrated"]): st.get("step_seconds")
            for st in gemm.get("steps", [])
            if st.get("status") == "ok"
        },
    )
    return {
        "n_displacements": n_d,
        "prepare_templates_seconds": t_t,
        "prepare_images_seconds": t_i,
        "prepared_template_bytes": pt.nbytes,
        "pool_bytes": be.pool_total(),
    }


def correlate_case(run: Run, c: CorrelateSetup, integrated: bool, work: int) -> dict:
    """Time one ``correlate_block`` configuration and read its memory high-water mark."""
    from cryolike_dask.kernels import BlockOutputs, LikelihoodConstants, correlate_block
    from cryolike_dask.kernels.cross_correlation import kernel_flops

    be, sz, n_d = c.be, c.sz, c.n_d
    g = sz.grid
    n_n, n_w = g.n_shells, g.n_inplanes
    n_s, n_m = c.templates.n_templates, c.images.n_images
    consts = LikelihoodConstants.for_grid(g, sz.pixels * sz.pixels) if integrated else None
    outputs = BlockOutputs(integrated_likelihood=integrated)
    prior = be.xp.full(n_s, -np.log(n_s)) if integrated else None

    def call() -> Any:
        return correlate_block(
            c.templates,
            c.images,
            outputs,
            likelihood=consts,
            log_prior=prior,
            workers=be.workers,
            work_bytes=work,
        )

    m_step, s_step = step_shape(n_s, n_m, n_d, n_w, integrated, work)
    n_steps = math.ceil(n_m / m_step) * math.ceil(n_s / s_step)
    be.free_pool()
    base = be.pool_total()
    with be.peak_hook() as hook:
        t_first, r = be.wall(call)
    pool_peak = be.pool_total()
    best_max = float(be.host(r.best_cross_correlation).max())
    del r
    times: list[float] = []
    most = 3 if t_first < 1 else 2 if t_first < 4 else 1
    while len(times) < most and run.phase_left() > 2.5 * t_first + 5:
        t, r = be.wall(call)
        del r
        times.append(t)
    seconds = float(np.median(times)) if times else t_first
    poses = float(n_m) * n_s * n_d * n_w
    tflops = kernel_flops(n_m, n_s, n_d, n_n, n_w) / seconds / 1e12
    st = c.step_seconds.get((m_step, s_step, n_d, integrated))
    plan_bytes = c.plan.task_bytes(n_m, n_s, full=False, work_bytes=work)
    fixed = int(getattr(c.plan, "fixed", 0))
    plan_work = int(work * getattr(c.plan, "work_factor", 1.0))
    out: dict[str, Any] = {
        "n_images": n_m,
        "n_templates": n_s,
        "step": [m_step, s_step],
        "n_steps": n_steps,
        "seconds_first": t_first,
        "seconds": seconds,
        "repeats": len(times),
        "pose_evaluations": poses,
        "poses_per_s": poses / seconds,
        "contraction_tflops": tflops,
        "fraction_of_gemm_peak": tflops / c.gemm_peak if c.gemm_peak else None,
        "predicted_seconds": n_steps * st if st else None,
        "best_cc_max": best_max,
        "plan_task_bytes": plan_bytes,
        "plan_work_bytes": plan_work,
        "plan_fixed_bytes": fixed,
        "pool_baseline_bytes": base,
        "pool_peak_bytes": pool_peak,
        "hook_peak_extra_bytes": hook.peak if hook is not None else None,
    }
    if pool_peak is not None:
        out["peak_over_plan"] = pool_peak / max(plan_bytes - fixed, 1)
        out["temporaries_over_plan"] = (pool_peak - (base or 0)) / max(plan_work, 1)
    else:
        out["memory"] = run.no_cupy()
    return out


def phase_correlate(run: Run, res: dict) -> str | None:
    be = run.backend
    if be is None or (not be.gpu and not run.args.dry_run):
        return run.no_cupy()
    sz = run.sizes
    res["backend"] = be.name
    res["prepare"] = prepare = []
    res["cases"] = cases = []
    for side in sz.displacement_sides:
        holder: dict[str, Any] = {}
        item = run.measure(
            prepare,
            {"side": side},
            lambda side=side, h=holder: prepare_correlate(run, side, h),
            5.0,
        )
        if item.get("status") != "ok":
            continue
        setup = holder["setup"]
        res["gemm_peak_tflops"] = setup.gemm_peak
        for integrated in (False, True):
            for work in sz.work_bytes:
                label = {"n_displacements": setup.n_d, "integrated": integrated, "work_bytes": work}
                run.measure(
                    cases,
                    label,
                    lambda il=integrated, w=work, c=setup: correlate_case(run, c, il, w),
                    need_s=5.0,
                )
        holder.clear()
        setup = None
        be.free_pool()
    return None


def _pipeline_once(device: str, options: dict) -> tuple[float, Any, dict]:
    import dask

    import cryolike_dask as cd

    t0 = time.perf_counter()
    images = cd.open_images(REFERENCE / "particles", n_stacks=2)
    templates = cd.open_templates(REFERENCE / "templates")
    ds = cd.likelihood(images, templates, device=device, **options)
    with dask.config.set(scheduler="sync"):
        result = ds.compute()
    attrs = {k: ds.attrs.get(k) for k in ("device", "kernel_tasks", "image_block",
                                          "template_block", "precision")}  # fmt: skip
    return time.perf_counter() - t0, result, attrs


POSE_VARS = (
    "optimal_template",
    "optimal_displacement_x",
    "optimal_displacement_y",
    "optimal_inplane_rotation",
)


def _same_pose(a: Any, b: dict | Any, prefix: str = "") -> float:
    same = np.ones(np.asarray(a["cross_correlation"]).shape[-1], bool)
    for v in POSE_VARS:
        x = np.asarray(a[v])[0]
        y = np.asarray(b[prefix + v]) if prefix else np.asarray(b[v])[0]
        same &= x == y
    return float(same.mean())


def phase_pipeline(run: Run, res: dict) -> str | None:
    if run.package.get("import_mode") != "full":
        return f"skipped: the pipeline does not import ({run.package.get('import_error')})"
    if not REFERENCE.is_dir():
        return f"skipped: no reference case at {REFERENCE}"
    options = dict(
        max_displacement_pixels=1.5,
        n_displacements_x=3,
        n_displacements_y=3,
        integrated_likelihood=True,
    )
    res["case"] = {"reference": str(REFERENCE.relative_to(ROOT)), "n_stacks": 2, **options,
                   "scheduler": "sync"}  # fmt: skip
    holder: dict[str, Any] = {}

    def cpu() -> dict:
        t, r, attrs = _pipeline_once("cpu", options)
        holder["cpu"] = r
        return {"seconds": t, "attrs": attrs}

    items: list = []
    res["cpu"] = run.measure(items, {}, cpu, need_s=5.0)
    if "cpu" in holder:
        ref = np.load(REFERENCE / "numpy" / "outputs.npz")
        r = holder["cpu"]
        res["cpu_vs_reference"] = {
            "max_abs_diff_cross_correlation": float(
                np.max(np.abs(np.asarray(r["cross_correlation"])[0] - ref["t0_cross_correlation"]))
            ),
            "identical_optimal_pose_fraction": _same_pose(r, ref, prefix="t0_"),
        }
    if run.backend is None or not run.backend.gpu:
        res["gpu_cold"] = {"status": "skipped", "reason": run.no_cupy()}
        return None
    cupy = run.cupy
    try:
        for key in ("gpu_cold", "gpu_warm"):

            def gpu(key: str = key) -> dict:
                t, r, attrs = _pipeline_once("gpu", options)
                holder[key] = r
                return {"seconds": t, "attrs": attrs}

            res[key] = run.measure(items, {}, gpu, need_s=5.0)
    finally:
        with contextlib.suppress(Exception):
            cupy.get_default_memory_pool().set_limit(size=0)  # the pipeline set one
    r_gpu = holder.get("gpu_warm", holder.get("gpu_cold"))
    if r_gpu is not None and "cpu" in holder:
        a, b = holder["cpu"], r_gpu
        ll_a = np.asarray(a["log_likelihood_integrated_fourier"], dtype=np.float64)
        ll_b = np.asarray(b["log_likelihood_integrated_fourier"], dtype=np.float64)
        res["gpu_vs_cpu"] = {
            "max_abs_diff_cross_correlation": float(
                np.max(
                    np.abs(np.asarray(a["cross_correlation"]) - np.asarray(b["cross_correlation"]))
                )
            ),
            "identical_optimal_pose_fraction": _same_pose(a, b),
            "max_abs_diff_log_likelihood_integrated": float(np.max(np.abs(ll_a - ll_b))),
            "max_rel_diff_log_likelihood_integrated": float(
                np.max(np.abs(ll_a - ll_b) / np.maximum(np.abs(ll_a), 1e-30))
            ),
        }
    return None


# ------------------------------------------------------------------------------ summary
def _g(x: Any, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _why(item: dict) -> str:
    """A measurement's skip reason or the last line of its error."""
    if item.get("reason"):
        return str(item["reason"])
    err = (item.get("error") or "").strip().splitlines()
    return f"{item.get('status')}: {err[-1][-200:] if err else ''}"


def _b(x: Any) -> str:
    """Bytes for people."""
    if x is None:
        return "n/a"
    return f"{x / GiB:.2f} GiB" if abs(x) >= GiB else f"{x / MiB:.1f} MiB"


def summary(report: dict) -> list[str]:
    ph = report["phases"]
    lines = [f"gpu_check ({report['mode']}, backend {report['backend']}), "
             f"{report['elapsed_seconds']:.0f} s of {report['budget_seconds']:.0f}"]  # fmt: skip
    for name, e in ph.items():
        head = f"{name}: {e['status']}"
        if e.get("reason"):
            head += f" ({e['reason']})"
        lines.append(head)
        if e["status"] == "skipped":
            continue
        r = e.get("result") or {}
        if name == "environment":
            cu = r.get("cupy", {})
            for d in cu.get("devices", []) or []:
                lines.append(
                    f"  {_clean(d.get('name'))}, CC {d.get('compute_capability')}, "
                    f"{_g((d.get('total_memory_bytes') or 0) / GiB, '.0f')} GiB, "
                    f"CuPy {cu.get('version')}, CUDA runtime {cu.get('runtime_version')}, "
                    f"driver {cu.get('driver_version')}"
                )
            ck = r.get("cryolike_dask", {})
            lines.append(f"  cryolike_dask import: {ck.get('import_mode')}")
        elif name == "pytest_gpu":
            lines.append(f"  {r.get('counts')} (exit {r.get('returncode')})")
        elif name == "agreement":
            for c in r.get("cases", []):
                if c.get("status") == "ok":
                    lines.append(
                        f"  D={c['n_displacements']}: max|Δcc| "
                        f"{_g(c['max_abs_diff_cross_correlation'])}, same pose "
                        f"{c['identical_best_pose_fraction']:.1%} (tie gap "
                        f"{_g(c['max_tie_gap'])}), max rel ΔLL "
                        f"{_g(c['max_rel_diff_log_likelihood_ms'])}, ok={c['ok']}"
                    )
                else:
                    lines.append(f"  side {c.get('side')}: {_why(c)}")
        elif name == "gemm":
            cp = r.get("copy") or {}
            lines.append(f"  copy {_g(cp.get('gb_s'), '.0f')} GB/s; CGEMM peak "
                         f"{_g(r.get('peak_tflops'))} TFLOP/s")  # fmt: skip
            for c in r.get("cgemm", []):
                if c.get("status") == "ok":
                    lines.append(f"  {c['shape']}: {c['tflops']:.3g} TFLOP/s")
            for st in r.get("steps", []):
                if st.get("status") == "ok":
                    parts = [f"{k} {_g(st[k].get('poses_per_s'))}"
                             for k in ("gemm", "irfft", "normalise_max", "integrated_likelihood")
                             if k in st]  # fmt: skip
                    lines.append(
                        f"  step m={st['m']} s={st['s']} D={st['d']}"
                        f"{' IL' if st['integrated'] else ''}: poses/s "
                        + ", ".join(parts)
                        + f"; irfft {_g(st['irfft']['gb_s'], '.0f')} GB/s -> "
                        f"{_g(st['poses_per_s'])} poses/s"
                    )
        elif name == "correlate_block":
            for c in r.get("cases", []):
                tag = (f"  D={c.get('n_displacements')} "
                       f"{'IL' if c.get('integrated') else 'no IL'} "
                       f"work {(c.get('work_bytes') or 0) // MiB} MiB")  # fmt: skip
                if c.get("status") == "ok":
                    mem = (
                        f"pool peak {_b(c.get('pool_peak_bytes'))} (temporaries "
                        f"{_b(c['pool_peak_bytes'] - (c.get('pool_baseline_bytes') or 0))}) vs "
                        f"plan {_b(c['plan_task_bytes'])} (work {_b(c['plan_work_bytes'])})"
                        if c.get("pool_peak_bytes") is not None
                        else "pool n/a"
                    )
                    lines.append(
                        f"{tag}: {c['poses_per_s']:.3g} poses/s, "
                        f"{_g(c.get('fraction_of_gemm_peak'), '.0%')} of GEMM peak, "
                        f"step {c['step']}, {mem}"
                    )
                else:
                    lines.append(f"{tag}: {_why(c)}")
        elif name == "pipeline":
            for key in ("cpu", "gpu_cold", "gpu_warm"):
                v = r.get(key)
                if v and v.get("status") == "ok":
                    lines.append(f"  {key}: {v['seconds']:.2f} s, {v['attrs']}")
                elif v:
                    lines.append(f"  {key}: {_why(v)}")
            for key in ("cpu_vs_reference", "gpu_vs_cpu"):
                if key in r:
                    lines.append(f"  {key}: {json.dumps(_clean(r[key]))}")
        if e.get("error"):
            lines.append("  error: " + e["error"].strip().splitlines()[-1][-300:])
    return lines


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="gpu_report.json", help="the JSON report")
    ap.add_argument("--budget-seconds", type=float, default=float(TOTAL_BUDGET))
    ap.add_argument("--quick", action="store_true", help="fewer images and templates")
    ap.add_argument("--dry-run", action="store_true", help="NumPy at tiny sizes, no CuPy")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CuPy (smoke test)")
    args = ap.parse_args(argv)
    run = Run(args)
    run.save()
    try:
        run.package = import_package()
    except Exception as exc:
        run.package = {"import_mode": "failed", "import_error": _error_text(exc)}
        run.report["phases"]["environment"] = {"status": "error", "error": _error_text(exc)}
        run.save()
        print("cryolike_dask does not import:", exc)
        return 1
    run.cupy, run.cupy_reason = import_cupy()
    if args.dry_run or run.cupy is None:
        run.backend = Backend(np) if args.dry_run else None
        run.sizes = TINY if args.dry_run else FULL
        run.report["mode"] = "dry-run" if args.dry_run else "no-gpu"
    else:
        run.backend = Backend(run.cupy)
        run.sizes = TINY if args.tiny else QUICK if args.quick else FULL
        run.report["mode"] = "tiny" if args.tiny else "quick" if args.quick else "gpu"
    run.report["backend"] = run.backend.name if run.backend else None
    run.report["sizes"] = dataclasses.asdict(run.sizes)

    run.phase("environment", lambda res: phase_environment(run, res))
    run.phase("pytest_gpu", lambda res: phase_pytest(run, res))
    run.phase("agreement", lambda res: phase_agreement(run, res))
    run.phase("gemm", lambda res: phase_gemm(run, res))
    run.phase("correlate_block", lambda res: phase_correlate(run, res))
    run.phase("pipeline", lambda res: phase_pipeline(run, res))

    run.report["finished"] = _now()
    run.save()
    run.report["summary"] = summary(_clean(run.report))
    run.save()
    print()
    print("\n".join(run.report["summary"]))
    print(f"\nreport: {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
