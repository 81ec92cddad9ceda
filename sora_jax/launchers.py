"""How one sweep job's training command is started, per launcher (docs/launching.md).

Every launcher runs the same `python -m sora_jax.train --config=CONFIG --workdir=WORKDIR
FLAGS...`; they differ only in where the processes run and how they find each other:

    local         the command itself, one process on this machine
    multiprocess  launch/multiprocess.sh: N processes x D CPU devices here (gloo)
    slurm         sbatch launch/slurm.sbatch: one task per node or per GPU
    tpu_vm        launch/tpu_vm.sh: every worker of a TPU VM slice through gcloud ssh
    gke           launch/gke_jobset.yaml rendered per job, `kubectl apply -f -`

A launcher either *waits* (the command runs the training to its end here: local,
multiprocess, tpu_vm) or *submits* (the command hands the job to a scheduler and returns:
slurm, gke). The scripts in launch/ hold no logic beyond the wiring; this module builds
their command lines and runs them (`run_all` for waiting launchers, `submit` for the others).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from sora_jax.config import ConfigError
from sora_jax.parallel import compiler_flags

# The checkout's launch/ scripts (next to the sora_jax package).
LAUNCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "launch"


@dataclasses.dataclass(frozen=True)
class Options:
    """Launcher settings from the sweep's command line (flags of the same names)."""

    # Directory holding multiprocess.sh, slurm.sbatch, tpu_vm.sh and gke_jobset.yaml.
    launch_dir: str = str(LAUNCH_DIR)
    # multiprocess: processes per job and CPU devices per process.
    processes: int = 2
    devices_per_process: int = 1
    # multiprocess: coordinator port of the sweep's job i is port + i (jobs may run at once);
    # gke: the coordinator port on pod 0.
    port: int = 12355
    # slurm: extra sbatch options, e.g. ('--nodes=4', '--gpus-per-node=8').
    sbatch_args: tuple[str, ...] = ()
    # tpu_vm: the TPU VM and its zone.
    tpu_name: str = ""
    zone: str = ""
    # gke: node-pool variant ('tpu' | 'gpu') and the template's placeholders.
    gke_variant: str = "tpu"
    gke_image: str = ""
    gke_hosts: int = 1
    gke_chips_per_host: int = 4
    gke_accelerator: str = ""
    gke_tpu_topology: str = ""
    gke_runs_pvc: str = "runs"


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of a sweep (sora_jax.sweeping.expand makes them)."""

    name: str
    overrides: dict[str, Any]
    workdir: str
    # The full training command: python -m sora_jax.train --config=SPEC --workdir=... FLAGS.
    command: tuple[str, ...]
    # `--config` of the command, and the flags after --workdir (common flags, then overrides).
    spec: str = ""
    flags: tuple[str, ...] = ()
    # total_steps of the job's resolved config: its final checkpoint is checkpoints/<this>.
    total_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """One job's launch: a command line, extra environment, and what goes to its stdin."""

    argv: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    stdin: str | None = None

    def shell(self) -> str:
        """The command as one shell line (the stdin, if any, is shown separately)."""
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(self.env.items()))
        return prefix + shlex.join(self.argv)


@dataclasses.dataclass(frozen=True)
class Launcher:
    name: str
    # True: the command trains to the end here; False: it submits and returns at once.
    waits: bool
    # Whether several jobs may run at once (a TPU VM slice holds one job at a time).
    parallel: bool
    build: Callable[[Job, int, str, Options], Launch]  # (job, index, workdir_root, options)
    # Flags this launcher needs, as (flag name, Options field).
    required: tuple[tuple[str, str], ...] = ()


def _script(options: Options, name: str) -> str:
    path = pathlib.Path(options.launch_dir) / name
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: run the sweep from a sora_jax checkout or point "
            "--launch_dir at its launch/ directory"
        )
    return str(path)


def _local(job: Job, index: int, root: str, options: Options) -> Launch:
    del index, root, options
    return Launch(job.command)


def _multiprocess(job: Job, index: int, root: str, options: Options) -> Launch:
    del root
    script = _script(options, "multiprocess.sh")
    argv = ("bash", script, str(options.processes), str(options.devices_per_process), "--")
    return Launch((*argv, *job.command), env={"PORT": str(options.port + index)})


def _slurm(job: Job, index: int, root: str, options: Options) -> Launch:
    del index
    script = _script(options, "slurm.sbatch")
    argv = (
        "sbatch",
        "--parsable",  # prints only the job id, which the sweep records
        f"--job-name={job.name}",
        f"--output={root.rstrip('/')}/logs/{job.name}-%j.out",
        *options.sbatch_args,
        script,
        job.spec,
        job.workdir,
        *job.flags,
    )
    # sbatch exports the submitting environment to the job (its default --export=ALL): the
    # GPU compiler and allocator settings of sora_jax/parallel/compiler_flags.py.
    return Launch(argv, env=compiler_flags.env("gpu"))


def _tpu_vm(job: Job, index: int, root: str, options: Options) -> Launch:
    del index, root
    script = _script(options, "tpu_vm.sh")
    argv = ("bash", script, options.tpu_name, options.zone, job.spec, job.workdir, *job.flags)
    return Launch(argv)


def _gke(job: Job, index: int, root: str, options: Options) -> Launch:
    del index
    template = pathlib.Path(_script(options, "gke_jobset.yaml")).read_text()
    # Only the shared volume outlives a pod: the workdir must be on it.
    mounts = re.findall(r"mountPath:\s*(\S+)", template) or ["/runs"]
    if not any(job.workdir.startswith(m.rstrip("/") + "/") for m in mounts):
        raise ConfigError(
            f"--launcher=gke: workdir {job.workdir} is not under the shared volume that "
            f"launch/gke_jobset.yaml mounts at {mounts[0]}: use --workdir_root={mounts[0]}/NAME"
        )
    variant = options.gke_variant
    # The pods' compiler settings (sora_jax/parallel/compiler_flags.py), not this machine's.
    settings = compiler_flags.env(variant, environ={})
    manifest = render_gke(template, gke_values(job, root, options), job.flags, variant, settings)
    return Launch(("kubectl", "apply", "-f", "-"), stdin=manifest)


LAUNCHERS = {
    "local": Launcher("local", waits=True, parallel=True, build=_local),
    "multiprocess": Launcher("multiprocess", waits=True, parallel=True, build=_multiprocess),
    "slurm": Launcher("slurm", waits=False, parallel=True, build=_slurm),
    "tpu_vm": Launcher(
        "tpu_vm",
        waits=True,
        parallel=False,
        build=_tpu_vm,
        required=(("tpu_name", "tpu_name"), ("zone", "zone")),
    ),
    "gke": Launcher(
        "gke",
        waits=False,
        parallel=True,
        build=_gke,
        required=(("gke_image", "gke_image"), ("gke_accelerator", "gke_accelerator")),
    ),
}


def get(name: str, options: Options) -> Launcher:
    """The launcher called `name`, after checking that `options` has what it needs."""
    if name not in LAUNCHERS:
        raise ConfigError(f"--launcher={name!r} is unknown; choose one of {', '.join(LAUNCHERS)}")
    launcher = LAUNCHERS[name]
    missing = [f"--{flag}" for flag, field in launcher.required if not getattr(options, field)]
    if name == "gke":
        if options.gke_variant not in ("tpu", "gpu"):
            raise ConfigError(f"--gke_variant={options.gke_variant!r} must be 'tpu' or 'gpu'")
        if options.gke_variant == "tpu" and not options.gke_tpu_topology:
            missing.append("--gke_tpu_topology")
    if missing:
        raise ConfigError(f"--launcher={name} needs {' and '.join(missing)} (docs/launching.md)")
    return launcher


def run_all(
    items: Sequence[tuple[str, Launch, str]],
    max_parallel: int,
    on_start: Callable[[str, int], None],
    on_end: Callable[[str, int, float, bool], None],
) -> None:
    """Runs `(key, launch, log path)` items as subprocesses, `max_parallel` at once.

    Each one's output is appended to its log. `on_start(key, pid)` and `on_end(key,
    returncode, seconds, interrupted)` report progress. Ctrl-C sends SIGTERM to every
    running one (sora_jax.train saves a checkpoint and exits), waits for them, reports them
    as interrupted and re-raises.
    """
    queue = list(items)
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    try:
        while queue or running:
            while queue and len(running) < max_parallel:
                key, launch, log_path = queue.pop(0)
                log = open(log_path, "a")  # closed when the process ends
                log.write(f"$ {launch.shell()}\n")
                log.flush()
                proc = subprocess.Popen(
                    launch.argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **launch.env},
                    # Ctrl-C reaches the sweep alone, which then stops each job with SIGTERM
                    # (sora_jax.train saves a checkpoint on SIGTERM, not on SIGINT).
                    start_new_session=True,
                )
                running[key] = (proc, log, time.monotonic())
                on_start(key, proc.pid)
            time.sleep(0.2)
            for key, (proc, log, t0) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[key]
                    on_end(key, proc.returncode, time.monotonic() - t0, False)
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            proc.terminate()
        for key, (proc, log, t0) in running.items():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            on_end(key, proc.returncode, time.monotonic() - t0, True)
        raise


def submit(launch: Launch, log_path: str) -> subprocess.CompletedProcess:
    """Runs a submitting launch (sbatch, kubectl apply) to its end; its output, also
    appended to the log, holds the scheduler's job id."""
    proc = subprocess.run(
        launch.argv,
        input=launch.stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **launch.env},
    )
    with open(log_path, "a") as log:
        log.write(f"$ {launch.shell()}\n{proc.stdout}{proc.stderr}")
    return proc


# ---------------------------------------------------------------------------------------
# GKE: launch/gke_jobset.yaml -> one JobSet manifest per job
# ---------------------------------------------------------------------------------------

# Placeholder values that appear unquoted in the template must be plain YAML words.
_PLAIN = re.compile(r"[A-Za-z0-9._/:@-]+")
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")
_FLAGS_LINE = '- "${FLAGS}"'


def k8s_name(job_name: str, root: str, max_len: int = 40) -> str:
    """A JobSet name for a sweep job: a DNS label, stable, distinct for distinct jobs.

    `<sweep dir>-<job>` lower-cased with other characters as '-', cut to fit, plus a hash of
    the original so that jobs differing only in dropped characters (`lr_0.1` vs `lr-0.1`)
    stay apart. 40 characters leave room for the pod suffix `-workers-0-0` within the
    63-character hostname limit.
    """
    base = f"{pathlib.Path(root.rstrip('/')).name}-{job_name}".lower()
    base = re.sub(r"[^a-z0-9-]+", "-", base).strip("-") or "job"
    if not base[0].isalpha():
        base = f"s-{base}"
    digest = hashlib.sha1(f"{root}/{job_name}".encode()).hexdigest()[:6]
    return f"{base[: max_len - 7].rstrip('-')}-{digest}"


def gke_values(job: Job, root: str, options: Options) -> dict[str, str]:
    return {
        "NAME": k8s_name(job.name, root),
        "IMAGE": options.gke_image,
        "NUM_HOSTS": str(options.gke_hosts),
        "CHIPS_PER_HOST": str(options.gke_chips_per_host),
        "ACCELERATOR": options.gke_accelerator,
        "TPU_TOPOLOGY": options.gke_tpu_topology,
        "PORT": str(options.port),
        "RUNS_PVC": options.gke_runs_pvc,
        "CONFIG": job.spec,
        "WORKDIR": job.workdir,
    }


def render_gke(
    template: str,
    values: dict[str, str],
    flags: tuple[str, ...],
    variant: str,
    env: dict[str, str] | None = None,
) -> str:
    """The JobSet manifest for one job: `variant`'s lines, values in, one item per flag,
    and `env` (the compiler settings) added to the container's environment.

    The same edits as the template's header describes doing by hand with sed and envsubst;
    comment lines are dropped. CONFIG, WORKDIR and the flags sit in double-quoted YAML
    strings and are escaped as JSON strings; every other value must be a plain word.
    """
    other = {"tpu": "gpu", "gpu": "tpu"}[variant]
    for key, value in values.items():
        if key not in ("CONFIG", "WORKDIR") and value and not _PLAIN.fullmatch(value):
            raise ConfigError(f"GKE placeholder {key}={value!r} may only hold [A-Za-z0-9._/:@-]")
    lines = []
    for line in template.splitlines():
        body = (
            line.split("  # ")[0].rstrip() if line.rstrip().endswith(("# tpu", "# gpu")) else line
        )
        if line.rstrip().endswith(f"# {other}") or line.lstrip().startswith("#"):
            continue
        if body.strip() == _FLAGS_LINE:
            indent = body[: len(body) - len(body.lstrip())]
            lines.extend(f"{indent}- {json.dumps(flag)}" for flag in flags)
            continue
        lines.append(body)
        if body.strip() == "env:" and env:
            indent = body[: len(body) - len(body.lstrip())] + "  "
            for name, value in sorted(env.items()):
                # JSON strings are valid double-quoted YAML scalars.
                lines += [f"{indent}- name: {name}", f"{indent}  value: {json.dumps(value)}"]

    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if not values.get(key):
            raise ConfigError(f"launch/gke_jobset.yaml placeholder ${{{key}}} has no value")
        return json.dumps(values[key])[1:-1]

    return _PLACEHOLDER.sub(substitute, "\n".join(lines)) + "\n"
