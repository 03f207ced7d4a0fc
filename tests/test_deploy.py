"""deploy/: the dask-jobqueue profiles, the SLURM and PBS batch scripts, the GPU extras.

The profiles are rendered with dask-jobqueue and their worker command is expanded by bash
with ``TMPDIR`` unset. The batch scripts run for real under a fake allocation: ``srun``,
``pbsdsh``, ``dask``, ``python`` and ``cryolike-dask`` are stubs on ``PATH`` (put there by the
script's ``ACTIVATE`` file) that log their arguments, host and ``CUDA_VISIBLE_DEVICES``;
``srun`` starts its tasks with the GPU binding SLURM gives them, ``pbsdsh`` runs its command
as on the node of the given line of ``PBS_NODEFILE``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
from collections import Counter
from pathlib import Path

import dask
import pytest
import yaml
from dask.utils import parse_timedelta

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SBATCH = DEPLOY / "slurm" / "batch.sbatch"
PBS = DEPLOY / "pbs" / "batch.pbs"

# ---------------------------------------------------------------- jobqueue profiles


@pytest.fixture
def jobqueue_profiles(monkeypatch, tmp_path):
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.chdir(tmp_path)  # dask-jobqueue creates the log directory here
    profiles = yaml.safe_load((DEPLOY / "dask" / "jobqueue.yaml").read_text())
    with dask.config.set(profiles):
        yield


def _job_script(kind: str, profile: str) -> str:
    from dask_jobqueue import PBSCluster, SLURMCluster

    cls = SLURMCluster if kind == "slurm" else PBSCluster
    cluster = cls(config_name=profile, scheduler_options={"dashboard_address": ":0"})
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def _worker_argv(script: str, env: dict[str, str]) -> list[str]:
    """The worker command of a job script as the job's bash expands it (``set -u``)."""
    line = next(x for x in script.splitlines() if "distributed.cli.dask_worker" in x)
    head, tail = line.split("distributed.cli.dask_worker", 1)
    assert head.split()[-1] == "-m", line
    out = subprocess.run(
        ["bash", "-c", f"set -u; printf '%s\\n' {tail}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def _option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


PROFILES = [
    (
        "slurm",
        "slurm",
        [
            "#SBATCH -n 1",
            "#SBATCH --cpus-per-task=32",
            "#SBATCH --mem=120G",
            "#SBATCH -t 08:00:00",
            "--nworkers 32",
            "--nthreads 1",
        ],
    ),
    (
        "slurm",
        "slurm-gpu",
        [
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem=64GB",
            "#SBATCH -p gpu",
            "#SBATCH --gres=gpu:1",
            "--nthreads 2",
            "--resources GPU=1",
        ],
    ),
    ("pbs", "pbs", ["#PBS -q workq", "#PBS -l select=1:ncpus=32:mem=128GB", "--nworkers 32"]),
    (
        "pbs",
        "pbs-gpu",
        [
            "#PBS -q gpu",
            "#PBS -l select=1:ncpus=8:ngpus=1:mem=64GB",
            "#PBS -l walltime=08:00:00",
            "--nthreads 2",
            "--resources GPU=1",
        ],
    ),
]


@pytest.mark.parametrize(("kind", "profile", "expected"), PROFILES)
def test_jobqueue_profiles_render(jobqueue_profiles, kind, profile, expected) -> None:
    assert "TMPDIR" not in os.environ
    script = _job_script(kind, profile)
    for line in expected:
        assert line in script, (line, script)
    assert "source ~/cryolike-dask/.venv/bin/activate" in script
    assert (Path.cwd() / "logs").is_dir()  # the log directory exists before submission


@pytest.mark.parametrize(("kind", "profile"), [p[:2] for p in PROFILES])
def test_jobqueue_local_directory_with_tmpdir_unset(jobqueue_profiles, kind, profile) -> None:
    script = _job_script(kind, profile)
    assert "--local-directory ${TMPDIR:-/tmp}" in script, script
    base = {"PATH": os.environ["PATH"]}
    argv = _worker_argv(script, base)  # TMPDIR unset: set -u would fail on a bare $TMPDIR
    assert _option(argv, "--local-directory") == "/tmp"
    argv = _worker_argv(script, {**base, "TMPDIR": "/local/job42"})
    assert _option(argv, "--local-directory") == "/local/job42"


@pytest.mark.parametrize(("kind", "profile"), [p[:2] for p in PROFILES])
def test_jobqueue_lifetime_below_walltime(jobqueue_profiles, kind, profile) -> None:
    script = _job_script(kind, profile)
    argv = _worker_argv(script, {"PATH": os.environ["PATH"]})
    lifetime = parse_timedelta(_option(argv, "--lifetime"))
    stagger = parse_timedelta(_option(argv, "--lifetime-stagger"))
    assert "--lifetime-restart" not in argv  # a restart in the same job meets the same walltime
    walltime = re.search(r"^#(?:SBATCH -t|PBS -l walltime=) ?(\d+):(\d+):(\d+)$", script, re.M)
    assert walltime, script
    h, m, s = map(int, walltime.groups())
    assert 0 < stagger and lifetime + stagger + 5 * 60 <= 3600 * h + 60 * m + s


@pytest.mark.parametrize(("kind", "profile"), [("slurm", "slurm-gpu"), ("pbs", "pbs-gpu")])
def test_jobqueue_gpu_profiles_one_gpu_two_threads(jobqueue_profiles, kind, profile) -> None:
    script = _job_script(kind, profile)
    argv = _worker_argv(script, {"PATH": os.environ["PATH"]})
    assert _option(argv, "--nthreads") == "2" and "--nworkers" not in argv
    assert _option(argv, "--resources") == "GPU=1"
    if kind == "slurm":
        gpu_lines = [x for x in script.splitlines() if re.match(r"#SBATCH (--gres|--gpu|-G)", x)]
        assert gpu_lines == ["#SBATCH --gres=gpu:1"], script
        assert "#SBATCH -n 1" in script
    else:
        (select,) = re.findall(r"^#PBS -l select=(.*)$", script, re.M)
        assert select.split(":")[0] == "1" and "ngpus=1" in select.split(":"), select


# ---------------------------------------------------------------- batch scripts

_LOG = r"""
_stub_log() {
  local host=${STUB_HOST:-${SLURMD_NODENAME:-batch}}
  local rec
  rec=$(printf '%s\037' "$(basename "$0")" "$host" "${CUDA_VISIBLE_DEVICES-<unset>}" "$@")
  printf '%s\036' "$rec" >>"$STUB_LOG"
}
"""

STUBS = {
    "dask": r"""
_stub_log "$@"
if [ "${1:-} ${2:-} ${3:-}" = "cuda worker --help" ]; then
  [ -n "${STUB_DASK_CUDA:-}" ] && exit 0
  echo "Error: No such command 'cuda'." >&2
  exit 2
fi
if [ "${1:-}" = scheduler ]; then
  while [ $# -gt 0 ] && [ "$1" != --scheduler-file ]; do shift; done
  echo '{"address": "tcp://10.0.0.1:8786"}' >"$2"
fi
""",
    # python - SCHED N WAIT (the wait for the workers): until the stubs saw N workers start
    "python": r"""
_stub_log "$@"
cat >/dev/null
for _ in $(seq 300); do
  n=$(awk 'BEGIN { RS = "\036"; FS = "\037"; n = 0 }
    $1 == "dask" && $4 == "worker" { n += 1 }
    $1 == "dask" && $4 == "cuda" && $5 == "worker" && $6 != "--help" { n += split($3, d, ",") }
    END { print n }' "$STUB_LOG")
  [ "$n" -ge "$3" ] && exit 0
  sleep 0.1
done
echo "stub python: $n of $3 workers started" >&2
exit 1
""",
    "cryolike-dask": r"""
_stub_log "$@"
""",
    # srun: the tasks of one step, each with the GPUs SLURM would bind to it
    "srun": r"""
_stub_log "$@"
nodes=1 ntasks=1 per_node="" gpt="" gres=""
while [ $# -gt 0 ]; do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --ntasks=*) ntasks=${1#*=} ;;
    --ntasks-per-node=*) per_node=${1#*=} ;;
    --gpus-per-task=*) gpt=${1#*=} ;;
    --gres=gpu:*) gres=${1#--gres=gpu:} ;;
    --*=*) ;;
    -*) echo "stub srun: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
per_node=${per_node:-$(((ntasks + nodes - 1) / nodes))}
for ((t = 0; t < ntasks; t++)); do
  local_id=$((t % per_node))
  if [ -n "$gpt" ]; then cvd=$(seq -s, $((local_id * gpt)) $((local_id * gpt + gpt - 1)))
  elif [ -n "$gres" ]; then cvd=$(seq -s, 0 $((gres - 1)))
  else cvd=""
  fi
  SLURMD_NODENAME=node$((t / per_node)) SLURM_PROCID=$t SLURM_LOCALID=$local_id \
    CUDA_VISIBLE_DEVICES=$cvd "$@" &
done
wait
""",
    # pbsdsh -n I -- CMD: CMD on the host of line I of PBS_NODEFILE, in the job's environment
    # (STUB_PBS_DEVICES: the CUDA_VISIBLE_DEVICES a cgroup hook sets there)
    "pbsdsh": r"""
_stub_log "$@"
[ "$1" = -n ] || { echo "stub pbsdsh: -n INDEX expected" >&2; exit 2; }
host=$(sed -n "$(($2 + 1))p" "$PBS_NODEFILE")
shift 2
[ "$1" = -- ] && shift
if [ -n "${STUB_PBS_DEVICES:-}" ]; then
  exec env STUB_HOST="$host" CUDA_VISIBLE_DEVICES="$STUB_PBS_DEVICES" "$@"
fi
exec env -u CUDA_VISIBLE_DEVICES STUB_HOST="$host" "$@"
""",
}


def _stub_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment (no TMPDIR, no CUDA_VISIBLE_DEVICES) whose ACTIVATE file puts
    the stubs first on PATH."""
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\nset -u\n" + _LOG + body)
        path.chmod(0o755)
    activate = tmp_path / "activate"
    activate.write_text(f"export PATH={shlex.quote(str(bin_dir))}:$PATH\n")
    (tmp_path / "run_config.yaml").write_text("output: results/\n")
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ACTIVATE": str(activate),
        "STUB_LOG": str(tmp_path / "calls.log"),
    }


def _calls(tmp_path: Path) -> list[dict]:
    records = (tmp_path / "calls.log").read_text().split("\x1e")
    calls = []
    for rec in filter(None, records):
        name, host, cvd, *args = rec.split("\x1f")[:-1]
        calls.append({"cmd": name, "host": host, "cvd": cvd, "args": args})
    return calls


def _run(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(
        ["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.stdout, done.stderr)


def _gpu_workers(calls: list[dict]) -> list[tuple[str, str]]:
    """(host, GPU) of every Dask worker process the stubs saw started."""
    slots = []
    for c in calls:
        if c["cmd"] != "dask" or "--help" in c["args"]:
            continue
        if c["args"][:1] == ["worker"]:  # one worker on its single visible GPU
            assert "," not in c["cvd"] and c["cvd"] not in ("", "<unset>"), c
            slots.append((c["host"], c["cvd"]))
        elif c["args"][:2] == ["cuda", "worker"]:  # one worker per visible GPU
            slots += [(c["host"], d) for d in c["cvd"].split(",")]
    return slots


def _check_worker_args(calls: list[dict], sched: Path) -> None:
    for c in calls:
        if c["cmd"] == "dask" and "worker" in c["args"][:2] and "--help" not in c["args"]:
            argv = c["args"]
            assert _option(argv, "--nthreads") == "2"
            assert _option(argv, "--resources") == "GPU=1"
            assert _option(argv, "--scheduler-file") == str(sched)
            assert _option(argv, "--local-directory") == "/tmp"  # TMPDIR unset
            assert 0 < float(_option(argv, "--memory-limit")) <= 0.25


def _check_scheduler_and_driver(calls: list[dict], sched: Path, n_workers: int) -> None:
    (scheduler,) = [c for c in calls if c["cmd"] == "dask" and c["args"][:1] == ["scheduler"]]
    # on the batch host, outside any srun/pbsdsh task, and with no GPU
    assert scheduler["host"] == "batch" and scheduler["cvd"] == "", scheduler
    assert _option(scheduler["args"], "--scheduler-file") == str(sched)
    (wait,) = [c for c in calls if c["cmd"] == "python"]
    assert wait["args"][1:3] == [str(sched), str(n_workers)] and wait["cvd"] == ""
    driver = calls[-1]
    assert driver["cmd"] == "cryolike-dask" and driver["host"] == "batch" and driver["cvd"] == ""
    assert driver["args"][:2] == ["run", "run_config.yaml"]
    assert _option(driver["args"], "--scheduler-file") == str(sched)
    assert calls.index(scheduler) < calls.index(wait) < calls.index(driver)


def _directives(path: Path, prefix: str) -> list[str]:
    return [
        x.split("#", 2)[1][len(prefix) :].strip()
        for x in path.read_text().splitlines()
        if x.startswith("#" + prefix)
    ]


@pytest.mark.parametrize("script", [SBATCH, PBS], ids=["slurm", "pbs"])
def test_batch_scripts_parse(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--scheduler-file" in text and "cryolike-dask run" in text
    assert ("#SBATCH --gres=gpu:" in text) or ("#PBS -l select=" in text)


def _slurm_allocation() -> tuple[int, int, int]:
    """(nodes, GPUs per node, CPUs per task) from the #SBATCH lines."""
    d = dict(x.split("=", 1) for x in _directives(SBATCH, "SBATCH ") if "=" in x)
    assert d["--gres"].startswith("gpu:")
    gpus = int(d["--gres"].removeprefix("gpu:"))
    assert int(d["--ntasks-per-node"]) == gpus  # a task slot per GPU, none for the scheduler
    # SLURM does not create the folder of --output: the job would fail before it starts
    assert "/" not in d["--output"]
    return int(d["--nodes"]), gpus, int(d["--cpus-per-task"])


@pytest.mark.parametrize(
    ("dask_cuda", "gpus_on_node"),
    [(False, True), (True, True), (False, False)],
    ids=["dask-worker", "dask-cuda-worker", "dask-worker-no-SLURM_GPUS_ON_NODE"],
)
def test_sbatch_renders_one_worker_per_gpu(tmp_path, dask_cuda, gpus_on_node) -> None:
    nodes, gpus, cpus = _slurm_allocation()
    assert (nodes, gpus) == (2, 4)
    env = _stub_env(tmp_path)
    env.update(
        SLURM_JOB_ID="1",
        SLURM_NNODES=str(nodes),
        SLURM_NTASKS=str(nodes * gpus),
        SLURM_CPUS_PER_TASK=str(cpus),
        STUB_DASK_CUDA="1" if dask_cuda else "",
    )
    if gpus_on_node:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    _run(SBATCH, ["run_config.yaml"], env, tmp_path)
    calls = _calls(tmp_path)
    sched = tmp_path / "scheduler-1.json"

    (srun,) = [c for c in calls if c["cmd"] == "srun"]  # one step: the workers
    argv = srun["args"]
    assert f"--nodes={nodes}" in argv
    if dask_cuda:  # one dask-cuda task per node, with all of its GPUs
        assert {f"--ntasks={nodes}", "--ntasks-per-node=1", f"--gres=gpu:{gpus}"} <= set(argv)
        assert f"--cpus-per-task={cpus * gpus}" in argv
        assert argv[argv.index("--gres=gpu:4") + 1 :][:3] == ["dask", "cuda", "worker"]
    else:  # one task per GPU, SLURM binding each task to its own GPU
        assert {f"--ntasks={nodes * gpus}", f"--ntasks-per-node={gpus}"} <= set(argv)
        assert {"--gpus-per-task=1", f"--cpus-per-task={cpus}"} <= set(argv)
        assert argv[argv.index("--gpus-per-task=1") + 1 :][:2] == ["dask", "worker"]

    slots = _gpu_workers(calls)
    assert len(slots) == len(set(slots)) == nodes * gpus == 8, slots
    assert Counter(h for h, _ in slots) == {f"node{n}": gpus for n in range(nodes)}
    _check_worker_args(calls, sched)
    _check_scheduler_and_driver(calls, sched, nodes * gpus)
    assert (tmp_path / "logs").is_dir()


def _pbs_allocation() -> tuple[int, int]:
    """(nodes, GPUs per node) from the select line, checked against GPUS_PER_NODE."""
    (select,) = [x for x in _directives(PBS, "PBS -l ") if x.startswith("select=")]
    n, *chunk = select.removeprefix("select=").split(":")
    gpus = int(dict(x.split("=") for x in chunk)["ngpus"])
    default = re.search(r"^GPUS_PER_NODE=\$\{GPUS_PER_NODE:-(\d+)\}", PBS.read_text(), re.M)
    assert default and int(default.group(1)) == gpus
    assert "place=scatter" in _directives(PBS, "PBS -l ")  # a chunk per node
    return int(n), gpus


@pytest.mark.parametrize(
    ("dask_cuda", "devices"),
    [(False, ""), (True, ""), (False, "4,5,6,7")],
    ids=["dask-worker", "dask-cuda-worker", "dask-worker-cgroup-devices"],
)
def test_pbs_renders_one_worker_per_gpu(tmp_path, dask_cuda, devices) -> None:
    nodes, gpus = _pbs_allocation()
    assert (nodes, gpus) == (2, 4)
    env = _stub_env(tmp_path)
    hosts = [f"gpu-{i}" for i in range(nodes)]
    nodefile = tmp_path / "nodefile"  # a line per MPI rank: each host twice
    nodefile.write_text("".join(f"{h}\n{h}\n" for h in hosts))
    env.update(
        PBS_JOBID="7.pbs-server",
        PBS_O_WORKDIR=str(tmp_path),
        PBS_NODEFILE=str(nodefile),
        CONFIG="run_config.yaml",
        STUB_DASK_CUDA="1" if dask_cuda else "",
        STUB_PBS_DEVICES=devices,
    )
    _run(PBS, [], env, tmp_path)
    calls = _calls(tmp_path)
    sched = tmp_path / "scheduler-7.json"

    launches = [c for c in calls if c["cmd"] == "pbsdsh"]
    assert sorted(c["args"][1] for c in launches) == ["0", "2"]  # each host once, by line
    slots = _gpu_workers(calls)
    assert len(slots) == len(set(slots)) == nodes * gpus == 8, slots
    assert Counter(h for h, _ in slots) == {h: gpus for h in hosts}
    expected = devices.split(",") if devices else [str(g) for g in range(gpus)]
    assert sorted(d for h, d in slots if h == hosts[0]) == expected
    _check_worker_args(calls, sched)
    _check_scheduler_and_driver(calls, sched, nodes * gpus)
    assert (tmp_path / "logs").is_dir()


# ---------------------------------------------------------------- adaptive.py, extras


def test_adaptive_keeps_the_gpu_jobs_and_waits_for_them(monkeypatch, tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("adaptive", DEPLOY / "slurm" / "adaptive.py")
    adaptive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adaptive)
    seen: dict = {}

    class Cluster:
        scheduler_address = "tcp://10.0.0.1:8786"

        def __init__(self, config_name):
            seen["profile"] = config_name

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen["closed"] = True

        def job_script(self):
            return "#!/usr/bin/env bash"

        def adapt(self, **kw):
            seen["adapt"] = kw

    class Client:
        dashboard_link = "http://10.0.0.1:8787/status"

        def __init__(self, cluster):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def wait_for_workers(self, n, timeout=None):
            seen.setdefault("waits", []).append((n, timeout))

    def run_config(cfg):
        seen["address"] = cfg.cluster.scheduler_address
        seen["waits_before_run"] = list(seen["waits"])

    monkeypatch.setattr(adaptive, "SLURMCluster", Cluster)
    monkeypatch.setattr(adaptive, "Client", Client)
    monkeypatch.setattr(adaptive, "run_config", run_config)
    adaptive.main(str(DEPLOY / "examples" / "run_config.yaml"), jobs=8)
    assert seen["profile"] == "slurm-gpu" and seen["closed"]
    # minimum_jobs=0 would submit nothing until work appears, and the driver waits for a worker
    assert seen["adapt"] == {"minimum_jobs": 8, "maximum_jobs": 8}
    assert seen["waits_before_run"] == [(1, None), (8, adaptive.WAIT_S)]
    assert seen["address"] == Cluster.scheduler_address


def test_gpu_extras_pick_the_cupy_wheel() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        return {re.split(r"[\[<>=;]", r)[0] for r in extras[extra]}

    assert names("gpu-cuda12") == {"cupy-cuda12x", "dask-cuda"}
    assert names("gpu-cuda13") == {"cupy-cuda13x", "dask-cuda"}
    assert extras["gpu"] == extras["gpu-cuda12"]  # the alias
    readme = (DEPLOY / "README.md").read_text()
    assert "gpu-cuda12" in readme and "gpu-cuda13" in readme
    for env_file in ["environment-gpu.yml", "requirements-gpu.txt", "requirements-gpu-cuda13.txt"]:
        assert "dask-cuda" in (DEPLOY / "env" / env_file).read_text(), env_file
    assert "gpu-cuda12" in (DEPLOY / "container" / "apptainer.def").read_text()
