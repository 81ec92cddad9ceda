r"""What this machine runs: versions against the tested ranges, devices, variables, XLA
flags; and `--check_cluster`, a minute-long rehearsal of a multi-host job's start-up.

    python -m sora_jax.env [--json]                      (console script: sora-env)
    python -m sora_jax.env --check_cluster [--workdir=DIR] [--config=FILE] \
        [--coordinator_address=H:P --num_processes=N --process_id=I | --distributed=auto]

The report compares each installed package with the range sora_jax declares
(`install_requires`, read from the installed package's metadata) and marks those out of
range: the first thing to look at when a run behaves differently on another machine.

`--check_cluster` runs on every process of a job exactly as `sora_jax.train` would be
launched (launch/*, docs/launching.md) and checks, in order, what a long job needs:
1. every process joins jax.distributed within --distributed_timeout_s;
2. each process's devices, and one mesh over all of them (the config's mesh when --config
   is given, else all devices on `data`);
3. a cross-process reduction: the process indices gathered from every process, and a sum
   over every device of the mesh;
4. the workdir is shared: each process writes WORKDIR/check_cluster/host_<i>.txt and, after
   a barrier, reads every other process's file.
Every process agrees on the outcome; on failure each exits 1 with the reasons.
"""

from __future__ import annotations

import configparser
import json
import os
import pathlib
import platform
import random
import socket
import sys
import time
from importlib import metadata
from typing import Any

from absl import app, flags, logging

from sora_jax import config as config_lib
from sora_jax import entry
from sora_jax.parallel import distributed
from sora_jax.parallel import mesh as mesh_lib

flags.adopt_module_key_flags(entry)  # --workdir, --config and the multi-process flags
CHECK_CLUSTER = flags.DEFINE_bool(
    "check_cluster", False, "Check start-up, devices, collectives and the shared workdir."
)
JSON = flags.DEFINE_bool("json", False, "Print the report as JSON.")

DISTRIBUTION = "sora_jax"
# The packages whose versions matter most, shown first (the same list env.json records).
PACKAGES = config_lib.PACKAGES
# Environment variables that change what JAX, XLA or the cluster does.
ENV_PREFIXES = ("JAX_", "XLA_", "TPU_", "LIBTPU", "MEGASCALE_", "SLURM_", "CUDA_", "NCCL_")
ENV_NAMES = (
    "NVIDIA_VISIBLE_DEVICES",
    "JOB_COMPLETION_INDEX",
    "JOBSET_NAME",
    "REPLICATED_JOB_NAME",
    "OMP_NUM_THREADS",
    "TF_CPP_MIN_LOG_LEVEL",
)


# ---------------------------------------------------------------------------------------
# Versions against the tested ranges
# ---------------------------------------------------------------------------------------


def tested_ranges() -> tuple[dict[str, str], str]:
    """`{package: specifier}` sora_jax declares, and where they were read from.

    From the installed distribution's metadata; from setup.cfg beside the package when
    sora_jax runs from a checkout that was never installed. jaxlib's range is the one the
    installed jax declares (jax checks it too, at import).
    """
    from packaging.requirements import Requirement

    try:
        lines = metadata.requires(DISTRIBUTION) or []
        source = f"installed {DISTRIBUTION} {metadata.version(DISTRIBUTION)} metadata"
    except metadata.PackageNotFoundError:
        cfg = configparser.ConfigParser()
        path = pathlib.Path(__file__).resolve().parent.parent / "setup.cfg"
        cfg.read(path)
        lines = cfg.get("options", "install_requires", fallback="").split("\n")
        source = f"{path} ({DISTRIBUTION} is not installed: pip install -e .)"
    ranges = {}
    for line in filter(None, (s.strip() for s in lines)):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            ranges[_canonical(req.name)] = _range(req.specifier)
    try:
        for line in metadata.requires("jax") or []:
            req = Requirement(line)
            if _canonical(req.name) == "jaxlib" and req.marker is None:
                ranges["jaxlib"] = _range(req.specifier)
    except metadata.PackageNotFoundError:
        pass  # jax itself is then reported missing
    return ranges, source


def _range(specifier) -> str:
    """`>=0.8.0,<0.11`: lower bounds first (packaging sorts them as text)."""
    return ",".join(sorted((str(s) for s in specifier), key=lambda s: (s[0] != ">", s)))


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def package_versions(ranges: dict[str, str]) -> list[dict[str, Any]]:
    """One row per package: installed version, tested range, and 'ok' / 'OUT OF RANGE' /
    'missing'. PACKAGES first, then the other declared requirements."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    names = list(PACKAGES) + sorted(set(ranges) - set(PACKAGES))
    rows = []
    for name in names:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        spec = ranges.get(name, "")
        if installed is None:
            status = "missing"
        elif not spec:
            status = "ok"
        else:
            try:
                inside = SpecifierSet(spec).contains(Version(installed), prereleases=True)
            except InvalidVersion:
                inside = False
            status = "ok" if inside else "OUT OF RANGE"
        rows.append({"package": name, "installed": installed, "tested": spec, "status": status})
    return rows


def relevant_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {
        k: v for k, v in sorted(environ.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES
    }


def xla_flags(environ: dict[str, str] | None = None) -> list[str]:
    """XLA_FLAGS and LIBTPU_INIT_ARGS, one flag each."""
    environ = os.environ if environ is None else environ
    return [f for var in ("XLA_FLAGS", "LIBTPU_INIT_ARGS") for f in environ.get(var, "").split()]


def report() -> dict[str, Any]:
    """Everything `python -m sora_jax.env` prints."""
    import jax

    ranges, source = tested_ranges()
    devices = jax.devices()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": package_versions(ranges),
        "tested_ranges_from": source,
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": [str(d) for d in jax.local_devices()],
        "device_count": len(devices),
        "device_kind": devices[0].device_kind,
        "environment": relevant_environment(),
        "xla_flags": xla_flags(),
        "compilation_cache": jax.config.jax_compilation_cache_dir,
    }


def format_report(rep: dict[str, Any]) -> str:
    out = [f"python {rep['python']} on {rep['platform']} ({rep['host']})", ""]
    out.append(f"packages (tested ranges from {rep['tested_ranges_from']}):")
    out.append(f"  {'package':<18} {'installed':<12} {'tested':<18} status")
    for row in rep["packages"]:
        installed, tested = row["installed"] or "-", row["tested"] or "-"
        out.append(f"  {row['package']:<18} {installed:<12} {tested:<18} {row['status']}")
    bad = [r["package"] for r in rep["packages"] if r["status"] != "ok"]
    if bad:
        out.append(f"  {len(bad)} package(s) outside the tested ranges: {', '.join(bad)}")
    out += [
        "",
        f"backend {rep['backend']}: process {rep['process_index']} of {rep['process_count']}, "
        f"{len(rep['local_devices'])} local / {rep['device_count']} devices "
        f"({rep['device_kind']})",
    ]
    out += [f"  {d}" for d in rep["local_devices"]]
    out.append(f"compilation cache: {rep['compilation_cache'] or 'off'}")
    out += ["", "environment:"] + [f"  {k}={v}" for k, v in rep["environment"].items()]
    if not rep["environment"]:
        out.append("  (no JAX_*, XLA_*, TPU_*, SLURM_*, CUDA_*, NCCL_* variables set)")
    out += ["", "XLA flags:"] + [f"  {f}" for f in rep["xla_flags"]]
    if not rep["xla_flags"]:
        out.append("  (none)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# check_cluster
# ---------------------------------------------------------------------------------------


class ClusterError(RuntimeError):
    """A cluster check failed; the message says what and where to look."""


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Processes other than 0 first reach the coordinator's port from Python.

    jax.distributed aborts the process (no Python exception) when it cannot register in
    time; failing here first turns the common case into a message that names the address.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            last = e
            time.sleep(0.5)
    raise ClusterError(
        f"no coordinator answered at --coordinator_address={address} within {timeout_s:.0f} s "
        f"({last}): start process 0 on that host with the same --num_processes, check that the "
        "port is open between the hosts, or raise --distributed_timeout_s"
    )


def check_cluster(workdir: str | None, mesh_config=None, echo=print) -> list[str]:
    """Steps 2-4 of the module docstring on this process; returns the failures seen by any
    process (identical on every process), each naming the process at fault."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    me, count = jax.process_index(), jax.process_count()
    tag = f"[process {me}/{count} {socket.gethostname()}]"
    errors: list[str] = []
    echo(f"{tag} local devices: {', '.join(str(d) for d in jax.local_devices())}")

    # Mesh over every device of every process.
    mesh_config = mesh_config or config_lib.ConfigDict(dict(ici_data=-1, dcn_data=-1))
    mesh = mesh_lib.create_mesh(mesh_config)
    if me == 0:
        echo(f"{tag} mesh {dict(mesh.shape)} over {mesh.devices.size} devices:")
        for p in range(count):
            ids = [d.id for d in mesh.devices.flat if d.process_index == p]
            echo(f"    process {p}: device ids {ids}")

    # Collectives: process indices gathered from all, and a sum over every device.
    gathered = np.asarray(multihost_utils.process_allgather(np.int32(me))).ravel()
    if sorted(gathered.tolist()) != list(range(count)):
        errors.append(f"process {me}: gathered process indices {gathered.tolist()}")
    n = mesh.devices.size
    sharding = NamedSharding(mesh, P(mesh_lib.AXES))  # one element per device
    values = jax.make_array_from_callback(
        (n,), sharding, lambda index: np.arange(n, dtype=np.float32)[index] + 1
    )
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(values)
    total = float(np.asarray(total.addressable_data(0)))
    if total != n * (n + 1) / 2:
        errors.append(f"process {me}: sum over {n} devices gave {total}, not {n * (n + 1) / 2}")
    elif me == 0:
        echo(f"{tag} all-gather over {count} processes and sum over {n} devices: ok")

    # Shared workdir: write own file, barrier, read everyone's.
    if workdir:
        # A fresh token per check: files left by an earlier check are not mistaken for
        # this one's (a host that does not share the directory could still see old files).
        token = int(multihost_utils.broadcast_one_to_all(np.int64(random.getrandbits(62))))
        directory = pathlib.Path(workdir) / "check_cluster"
        mine = directory / f"host_{me}.txt"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            mine.write_text(
                json.dumps({"process": me, "host": socket.gethostname(), "token": token})
            )
        except OSError as e:
            errors.append(f"process {me} on {socket.gethostname()} cannot write {mine}: {e}")
        multihost_utils.sync_global_devices("sora_jax.env check_cluster: files written")
        for p in range(count):
            path = directory / f"host_{p}.txt"
            try:
                seen = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                errors.append(
                    f"process {me} on {socket.gethostname()} cannot read {path} written by "
                    f"process {p}: {e}; the workdir must be one directory shared by every host"
                )
                continue
            if seen.get("token") != token:
                errors.append(
                    f"process {me} reads a stale {path} (not written by this check): the "
                    "workdir is not shared with that process's host"
                )
        if not errors:
            echo(f"{tag} read the files of all {count} processes in {directory}: ok")
    else:
        echo(f"{tag} no --workdir: the shared-directory check is skipped")

    # Every process learns every failure, so all exit with the same verdict.
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(errors)))).ravel()
    if counts.sum() and not errors:
        errors.append(
            "other processes failed: "
            + ", ".join(
                f"process {p} ({c} error(s), see its log)" for p, c in enumerate(counts) if c
            )
        )
    return errors


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def _initialize(explicit_only: bool) -> None:
    mode = entry.DISTRIBUTED.value
    given = any(f.value is not None for f in (entry.COORDINATOR, entry.NUM_PROCESSES))
    if explicit_only and not given and mode != "auto":
        mode = "off"  # a report never joins a cluster by surprise (e.g. inside salloc)
    distributed.initialize(
        coordinator_address=entry.COORDINATOR.value,
        num_processes=entry.NUM_PROCESSES.value,
        process_id=entry.PROCESS_ID.value,
        mode=mode,
        timeout_s=entry.DISTRIBUTED_TIMEOUT.value,
        heartbeat_timeout_s=entry.DISTRIBUTED_TIMEOUT.value,
    )


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    entry.enable_compilation_cache()  # so the report shows the cache train would use
    if not CHECK_CLUSTER.value:
        _initialize(explicit_only=True)
        rep = report()
        print(json.dumps(rep, indent=2) if JSON.value else format_report(rep))
        return
    timeout = entry.DISTRIBUTED_TIMEOUT.value
    address, pid = entry.COORDINATOR.value, entry.PROCESS_ID.value
    try:
        if address and pid:
            wait_for_coordinator(address, timeout)
        if address:
            print(
                f"check_cluster: process {pid} of {entry.NUM_PROCESSES.value} joining "
                f"{address} (up to {timeout} s; an abort with DEADLINE_EXCEEDED below means a "
                "process did not join in time: see the other processes' logs)",
                flush=True,
            )
        _initialize(explicit_only=False)
        mesh_config = entry.CONFIG.value.mesh if entry.CONFIG.value is not None else None
        errors = check_cluster(entry.WORKDIR.value, mesh_config)
    except (ClusterError, ValueError) as e:
        errors = [str(e)]
    import jax

    if errors:
        print("check_cluster: FAILED\n  - " + "\n  - ".join(errors), file=sys.stderr, flush=True)
        sys.exit(1)
    print(
        f"check_cluster: OK (process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.device_count()} devices)",
        flush=True,
    )


def run():
    app.run(main, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
    run()
