"""Sweeps from experiment files: `get_sweep(arg) -> list[dict]` of config overrides.

    def get_sweep(arg):
        return sweeping.product(
            sweeping.sweep("optimizer.lr", [1e-3, 3e-4]),
            sweeping.sweep("model.dim", [64, 128]),
        )

Each override dict becomes a job with a stable name built from its overrides
(`optimizer.lr=0.001,model.dim=64` -> `lr_0.001-dim_64`), its own workdir under the sweep
root, and the full `python -m sora_jax.train` command. `run` starts the jobs with a
launcher (sora_jax/launchers.py) and keeps their state in `ROOT/sweep.json`:

    {"config": ..., "workdir_root": ..., "jobs": {NAME: {"overrides", "workdir",
     "total_steps", "command", "launcher", "launch", "state", "returncode", "log",
     "pid", "host", "submitted", "started", "finished"}}}

States: pending, running, done, failed (with the return code and the log), stopped
(interrupted before its final step), submitted (handed to SLURM or GKE). A job is finished
when its workdir holds the checkpoint of its final step; re-running a sweep skips finished
jobs and starts the others again, and `sora_jax.train` resumes each from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from sora_jax import config as config_lib
from sora_jax import launchers
from sora_jax.launchers import Job

MANIFEST = "sweep.json"


def sweep(field: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    """One axis: `[{field: v} for v in values]`."""
    return [{field: v} for v in values]


def product(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cartesian product of axes, merged left to right."""
    return [
        dict(itertools.chain.from_iterable(d.items() for d in combo))
        for combo in itertools.product(*axes)
    ]


def zip_(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Axes of equal length taken element-wise."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(f"sweeping.zip_ needs axes of equal length, got {sorted(lengths)}")
    return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in zip(*axes)]


def job_name(overrides: dict[str, Any]) -> str:
    parts = []
    for key, value in overrides.items():
        text = re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_")
        parts.append(f"{key.rsplit('.', 1)[-1]}_{text}")
    return "-".join(parts) or "default"


def expand(
    spec: str,
    workdir_root: str,
    module: str = "sora_jax.train",
    common_flags: Sequence[str] = (),
) -> list[Job]:
    """The jobs of `FILE[:ARG]`'s `get_sweep(ARG)`, checked against its config.

    `common_flags` (e.g. `--config.total_steps=100`) go into every job's command before the
    job's own overrides; setting a field that the sweep also varies is an error.
    """
    path, _, arg = spec.partition(":")
    mod = config_lib.load_module(path)
    if not hasattr(mod, "get_sweep"):
        raise config_lib.ConfigError(
            f"{path} defines no get_sweep(arg): add one returning a list of override dicts"
        )
    keys = config_lib.flat_keys(config_lib.load_config(spec))
    common = _check_common_flags(common_flags, spec)
    jobs, seen = [], {}
    for overrides in mod.get_sweep(arg or None):
        unknown = [k for k in overrides if k not in keys]
        if unknown:
            raise config_lib.ConfigError(f"sweep of {path} overrides unknown fields {unknown}")
        both = sorted(set(overrides) & common)
        if both:
            raise config_lib.ConfigError(
                f"--config.{both[0]} is given after `--` for every job, but get_sweep of {path} "
                "varies it: drop one of the two"
            )
        name = job_name(overrides)
        if name in seen:
            raise config_lib.ConfigError(
                f"sweep jobs {seen[name]} and {overrides} share the name {name!r}: make "
                "get_sweep's override dicts distinct"
            )
        seen[name] = overrides
        workdir = f"{workdir_root.rstrip('/')}/{name}"
        job_flags = (
            *common_flags,
            *(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()),
        )
        head = (sys.executable, "-m", module, f"--config={spec}", f"--workdir={workdir}")
        total = resolve_config(spec, job_flags).total_steps
        jobs.append(
            Job(name, dict(overrides), workdir, (*head, *job_flags), spec, job_flags, total)
        )
    return jobs


def _check_common_flags(common_flags: Sequence[str], spec: str) -> set[str]:
    """The config fields set by the flags for every job; errors name the flag at fault."""
    for flag in common_flags:
        name = flag.split("=", 1)[0]
        if name in ("--config", "--workdir"):
            raise config_lib.ConfigError(
                f"{name} after `--` is set by the sweep itself (--config / --workdir_root)"
            )
        if not name.startswith("--"):
            raise config_lib.ConfigError(f"{flag!r} after `--` is not a --flag=value")
    # The entry points' own check: unknown fields fail with the nearest known key.
    config_lib.check_overrides(["sweep", f"--config={spec}", *common_flags])
    return {
        f.split("=", 1)[0][len("--config.") :] for f in common_flags if f.startswith("--config.")
    }


def resolve_config(spec: str, job_flags: Sequence[str]) -> config_lib.ConfigDict:
    """The config a job's `sora_jax.train` will see: `spec` with the `--config.*` flags.

    Parsed by the same ml_collections flag as the entry point, so types and values match.
    """
    argv = ["sweep", f"--config={spec}", *(f for f in job_flags if f.startswith("--config."))]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as e:
        raise config_lib.ConfigError(f"sweep job flags {list(job_flags)}: {e}") from e
    return values.config


def _flag_value(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list | tuple) else str(value)


def shell(job: Job) -> str:
    return shlex.join(job.command)


# ---------------------------------------------------------------------------------------
# The manifest and each job's progress
# ---------------------------------------------------------------------------------------


def manifest_path(root: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(root) / MANIFEST


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(root)
    if not path.is_file():
        raise config_lib.ConfigError(
            f"{path} does not exist: is {root} the --workdir_root of a sweep that was run?"
        )
    return json.loads(path.read_text())


def save_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Written to a temporary file and renamed: a reader never sees half a manifest."""
    path = manifest_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def is_finished(job: Job) -> bool:
    """The workdir holds the checkpoint of the job's final step (orbax renames a step's
    directory into place only once it is complete)."""
    return (pathlib.Path(job.workdir) / "checkpoints" / str(job.total_steps)).is_dir()


def progress(workdir: str | os.PathLike, total_steps: int | None = None) -> dict[str, Any]:
    """Last logged step and train/loss from metrics.jsonl; total_steps from config.json
    (else the given one), and whether the final checkpoint is there."""
    workdir = pathlib.Path(workdir)
    out: dict[str, Any] = {"step": None, "loss": None, "total_steps": total_steps, "final": False}
    config = workdir / "config.json"
    if config.is_file():
        out["total_steps"] = json.loads(config.read_text()).get("total_steps")
    metrics = workdir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a running job is writing right now
            out["step"] = row.get("step", out["step"])
            if row.get("train/loss") is not None:
                out["loss"] = row["train/loss"]
    if out["total_steps"] is not None:
        out["final"] = (workdir / "checkpoints" / str(out["total_steps"])).is_dir()
    return out


def current_state(record: dict[str, Any]) -> str:
    """A job's state now: its recorded state, corrected by what its workdir shows."""
    prog = progress(record["workdir"], record.get("total_steps"))
    if prog["final"]:
        return "done"
    state = record.get("state", "pending")
    if state == "done":
        return "stopped"  # recorded done, but the final checkpoint is gone
    if state == "running" and record.get("host") == socket.gethostname():
        if not _alive(record.get("pid")):
            return "stopped"  # the sweep that ran it was killed
    if state == "submitted" and prog["step"] is not None:
        return "running"
    return state


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_table(root: str | os.PathLike) -> str:
    """The sweep's jobs: state, last step (of total), last train/loss, workdir."""
    manifest = load_manifest(root)
    rows = [("job", "state", "step", "train/loss", "workdir")]
    counts: dict[str, int] = {}
    for name, record in manifest["jobs"].items():
        prog = progress(record["workdir"], record.get("total_steps"))
        step = "-" if prog["step"] is None else str(prog["step"])
        if prog["total_steps"] is not None:
            step += f"/{prog['total_steps']}"
        loss = "-" if prog["loss"] is None else f"{prog['loss']:.4f}"
        state = current_state(record)
        counts[state] = counts.get(state, 0) + 1
        if state == "failed":
            state += f" (exit {record.get('returncode')})"
        rows.append((name, state, step, loss, record["workdir"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join(lines) + f"\n{len(manifest['jobs'])} jobs: {summary}"


# ---------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------


def dry_run(
    jobs: Sequence[Job], launcher: launchers.Launcher, options: launchers.Options, root: str
) -> str:
    """What `run` would start, without starting or writing anything.

    For GKE the output is itself a multi-document YAML (the rendered manifests).
    """
    out = []
    for index, job in enumerate(jobs):
        launch = launcher.build(job, index, root, options)
        state = "finished, would be skipped" if is_finished(job) else "would run"
        if launch.stdin is not None:
            out.append(f"---\n# {job.name} ({state}): {launch.shell()}\n{launch.stdin}")
        else:
            out.append(f"# {job.name} ({state})\n{launch.shell()}")
    return "\n".join(out)


def run(
    jobs: Sequence[Job],
    launcher: launchers.Launcher,
    options: launchers.Options,
    root: str,
    *,
    spec: str,
    max_parallel: int = 1,
    resubmit: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Runs (or submits) every unfinished job; returns how many failed.

    Finished jobs are skipped. Waiting launchers run up to `max_parallel` jobs at once as
    subprocesses, output in ROOT/logs/<job>.log; submitting launchers submit each job once
    (again only with `resubmit`, since the first may still be queued or running).
    """
    manifest = _open_manifest(root, spec)
    logs = pathlib.Path(root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = []
    for index, job in enumerate(jobs):
        launch = launcher.build(job, index, root, options)
        record = manifest["jobs"].setdefault(job.name, {"state": "pending"})
        record.update(
            overrides=job.overrides,
            workdir=job.workdir,
            total_steps=job.total_steps,
            command=list(job.command),
            launcher=launcher.name,
            launch=launch.shell(),
            log=str(logs / f"{job.name}.log"),
        )
        if is_finished(job):
            record["state"] = "done"
            echo(f"{job.name}: finished (checkpoint {job.total_steps}), skipped")
        elif current_state(record) == "running" and record.get("host") == socket.gethostname():
            echo(f"{job.name}: still running in another sweep (pid {record.get('pid')}), skipped")
        elif record["state"] == "submitted" and not launcher.waits and not resubmit:
            echo(
                f"{job.name}: already submitted ({record.get('submitted') or 'no id'}); it may "
                "still be queued or running: pass --resubmit to submit it again"
            )
        else:
            record["state"] = "pending"
            todo.append((job, launch))
    save_manifest(root, manifest)
    if not todo:
        echo("nothing to run: every job is finished or submitted")
        return 0
    program = todo[0][1].argv[0]
    if shutil.which(program) is None:
        raise config_lib.ConfigError(
            f"--launcher={launcher.name} runs {program!r}, which is not on PATH here: run the "
            "sweep where it is (a SLURM login node, a machine with gcloud / kubectl set up)"
        )
    if launcher.waits:
        limit = max_parallel if launcher.parallel else 1
        if limit < max_parallel:
            echo(f"--launcher={launcher.name} runs one job at a time (one slice)")
        return _run_waiting(todo, manifest, root, max(1, limit), echo)
    return _submit(todo, manifest, root, echo)


def _open_manifest(root: str, spec: str) -> dict[str, Any]:
    path = manifest_path(root)
    if not path.is_file():
        return {"config": spec, "workdir_root": root, "jobs": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("config") != spec:
        raise config_lib.ConfigError(
            f"{path} belongs to a sweep of --config={manifest.get('config')}, not {spec}: "
            "use another --workdir_root (or the same --config)"
        )
    return manifest


def _run_waiting(todo, manifest, root, max_parallel: int, echo) -> int:
    jobs = {job.name: job for job, _ in todo}
    failures = 0

    def on_start(name: str, pid: int) -> None:
        record = manifest["jobs"][name]
        record.update(
            state="running",
            pid=pid,
            host=socket.gethostname(),
            started=time.time(),
            returncode=None,
            finished=None,
        )
        save_manifest(root, manifest)
        echo(f"{name}: started (pid {pid}, log {record['log']})")

    def on_end(name: str, rc: int, seconds: float, interrupted: bool) -> None:
        nonlocal failures
        record = manifest["jobs"][name]
        if interrupted:
            state = "stopped"
        elif rc != 0:
            state = "failed"
            failures += 1
        else:
            # Exit 0 before the final step: preempted (SIGTERM) and saved; resumable.
            state = "done" if is_finished(jobs[name]) else "stopped"
        record.update(state=state, returncode=rc, finished=time.time())
        save_manifest(root, manifest)
        tail = f", see {record['log']}" if state != "done" else ""
        echo(f"{name}: {state} (exit {rc}, {seconds:.0f} s){tail}")

    items = [(job.name, launch, manifest["jobs"][job.name]["log"]) for job, launch in todo]
    launchers.run_all(items, max_parallel, on_start, on_end)
    return failures


def _submit(todo, manifest, root, echo) -> int:
    failures = 0
    for job, launch in todo:
        record = manifest["jobs"][job.name]
        proc = launchers.submit(launch, record["log"])
        if proc.returncode == 0:
            record.update(state="submitted", submitted=proc.stdout.strip(), started=time.time())
            echo(f"{job.name}: submitted {proc.stdout.strip()}")
        else:
            failures += 1
            record.update(state="failed", returncode=proc.returncode, finished=time.time())
            echo(f"{job.name}: submission failed (exit {proc.returncode}): {proc.stderr.strip()}")
        save_manifest(root, manifest)
    return failures
