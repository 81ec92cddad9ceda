"""launch/* scripts (with fake python, srun, scontrol and gcloud on PATH), the GKE template,
and `python -m sora_jax.env`: the report, out-of-range versions, and --check_cluster with 2
local processes, including its failures."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from sora_jax import env as env_lib
from sora_jax import launchers
from sora_jax.parallel import compiler_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
# Environment of a plain process: no fake-device flags from conftest.
BASE_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}

# Records its command line, pid-independent task id and environment as JSON, then exits
# with $FAKE_EXIT (default 0): stands in for python, srun's tasks and gcloud.
RECORDER = """#!{python}
import json, os, pathlib, sys
out = pathlib.Path(os.environ["RECORD_DIR"])
tag = os.environ.get("SLURM_PROCID") or os.environ.get("RECORD_TAG") or str(os.getpid())
name = pathlib.Path(sys.argv[0]).name
keep = ("SLURM_PROCID", "JAX_PLATFORMS", "XLA_FLAGS", "PORT")
record = {{"argv": sys.argv[1:], "env": {{k: os.environ[k] for k in keep if k in os.environ}}}}
(out / f"{{name}}-{{tag}}.json").write_text(json.dumps(record))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _fake_bin(tmp_path, *names):
    """A directory of recorder executables named `names`, and the directory they write to."""
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    bin_dir.mkdir(exist_ok=True)
    records.mkdir(exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(0o755)
    return bin_dir, records


def _records(records, prefix):
    return {
        p.stem.split("-", 1)[1]: json.loads(p.read_text())
        for p in sorted(records.glob(f"{prefix}-*.json"))
    }


def _bash(script, *args, env=None, timeout=60):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**BASE_ENV, **(env or {})},
        cwd=ROOT,
    )


def test_local_sh_runs_the_train_command(tmp_path):
    bin_dir, records = _fake_bin(tmp_path, "python")
    env = {"PYTHON": str(bin_dir / "python"), "RECORD_DIR": str(records), "RECORD_TAG": "0"}
    proc = _bash("local.sh", "experiments/demo.py:tiny", "runs/x", "--config.seed=3", env=env)
    assert proc.returncode == 0, proc.stderr
    assert _records(records, "python")["0"]["argv"] == [
        "-m",
        "sora_jax.train",
        "--config=experiments/demo.py:tiny",
        "--workdir=runs/x",
        "--config.seed=3",
    ]
    usage = _bash("local.sh", "only-a-config")
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_multiprocess_sh_wires_every_process(tmp_path):
    bin_dir, records = _fake_bin(tmp_path, "python")
    work = tmp_path / "w"
    env = {"RECORD_DIR": str(records), "PORT": "12477", "XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    proc = _bash("multiprocess.sh", 3, 2, "--", bin_dir / "python", f"--workdir={work}", env=env)
    assert proc.returncode == 0, proc.stderr
    runs = [r for r in _records(records, "python").values()]
    assert len(runs) == 3
    ids = set()
    for run in runs:
        argv = run["argv"]
        assert argv[:4] == [
            f"--workdir={work}",
            "--coordinator_address=localhost:12477",
            "--num_processes=3",
            argv[3],
        ]
        ids.add(argv[3])
        assert run["env"]["JAX_PLATFORMS"] == "cpu"
        # The caller's XLA flags are kept; the device count is appended.
        assert run["env"]["XLA_FLAGS"].split() == [
            "--xla_dump_to=/tmp/d",
            "--xla_force_host_platform_device_count=2",
        ]
    assert ids == {"--process_id=0", "--process_id=1", "--process_id=2"}
    assert sorted(p.name for p in (work / "logs").iterdir()) == [f"host_{i}.log" for i in range(3)]


def test_multiprocess_sh_stops_the_others_when_one_fails(tmp_path):
    script = 'case "$*" in *process_id=1*) echo failing; exit 3;; *) exec sleep 120;; esac'
    proc = _bash(
        "multiprocess.sh", 3, "bash", "-c", script, "x", env={"LOG_DIR": str(tmp_path)}, timeout=60
    )
    assert proc.returncode == 3  # within the timeout: the sleeping processes were stopped
    assert "process 1 (pid" in proc.stderr and "exited with 3" in proc.stderr
    assert (tmp_path / "host_1.log").read_text().strip() == "failing"

    for args, message in [
        (("two", "python"), "usage:"),
        ((2,), "usage:"),
        ((2, 4, "--"), "no COMMAND"),
        ((2, "python", "--process_id=1"), "sets --process_id"),
    ]:
        bad = _bash("multiprocess.sh", *args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def _slurm_env(tmp_path, records, bin_dir, **extra):
    # scontrol prints the allocation's hosts; srun starts SLURM_NTASKS tasks of its command
    # with SLURM_PROCID set, as SLURM does (options before the command are skipped).
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[[ "$1 $2 $3" == "show hostnames node-[a-b]" ]] || exit 9\n'
        "printf 'node-a\\nnode-b\\n'\n"
    )
    (bin_dir / "srun").write_text(
        textwrap.dedent("""\
        #!/usr/bin/env bash
        echo "$*" > "$RECORD_DIR/srun-args.txt"
        while [[ $1 == --* ]]; do shift; done
        for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
        """)
    )
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "RECORD_DIR": str(records),
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        **extra,
    }


def test_slurm_sbatch_wires_coordinator_and_process_ids(tmp_path):
    bin_dir, records = _fake_bin(tmp_path, "python")
    env = _slurm_env(tmp_path, records, bin_dir)
    proc = _bash("slurm.sbatch", "experiments/demo.py", "runs/s", "--config.seed=1", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "coordinator node-a:20077" in proc.stdout  # first node; port from the job id
    assert "--kill-on-bad-exit=1" in (records / "srun-args.txt").read_text()
    tasks = _records(records, "python")
    assert sorted(tasks) == ["0", "1", "2", "3"]
    for i, task in tasks.items():
        assert task["argv"] == [
            "-m",
            "sora_jax.train",
            "--config=experiments/demo.py",
            "--workdir=runs/s",
            "--coordinator_address=node-a:20077",
            "--num_processes=4",
            "--config.seed=1",
            f"--process_id={i}",
        ]

    shutil.rmtree(records)
    records.mkdir()
    auto = _bash("slurm.sbatch", "c.py", "w", env={**env, "DISTRIBUTED": "auto"})
    assert auto.returncode == 0, auto.stderr
    argvs = [t["argv"] for t in _records(records, "python").values()]
    assert (
        argvs
        == [["-m", "sora_jax.train", "--config=c.py", "--workdir=w", "--distributed=auto"]] * 4
    )

    no_tasks = {k: v for k, v in env.items() if k != "SLURM_NTASKS"}
    bad = _bash("slurm.sbatch", "c.py", "w", env=no_tasks)
    assert bad.returncode != 0 and "SLURM_NTASKS is unset" in bad.stderr


def test_tpu_vm_sh_runs_one_quoted_command_on_every_worker(tmp_path):
    bin_dir, records = _fake_bin(tmp_path, "gcloud", "python")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD_DIR": str(records),
        "RECORD_TAG": "0",
        "PROJECT": "my-project",
        "REPO_DIR": str(tmp_path),
        "PYTHON": str(bin_dir / "python"),
    }
    odd = "--config.data.dataset_dir=/mnt/my data/it's here"
    proc = _bash(
        "tpu_vm.sh", "my-v5p-32", "us-east5-a", "experiments/demo.py", "/mnt/r", odd, env=env
    )
    assert proc.returncode == 0, proc.stderr
    gcloud = _records(records, "gcloud")["0"]["argv"]
    command = [a for a in gcloud if a.startswith("--command=")]
    assert gcloud[:8] == [
        "compute", "tpus", "tpu-vm", "ssh", "my-v5p-32", "--zone=us-east5-a", "--worker=all",
        command[0],
    ]  # fmt: skip
    assert gcloud[8:] == ["--project=my-project"]
    # What each worker's shell does with the command string: the flags arrive intact.
    remote = command[0].removeprefix("--command=")
    subprocess.run(["bash", "-c", remote], env={**BASE_ENV, **env}, check=True)
    assert _records(records, "python")["0"]["argv"] == [
        "-m",
        "sora_jax.train",
        "--config=experiments/demo.py",
        "--workdir=/mnt/r",
        "--distributed=auto",
        odd,
    ]


def _gke_values(**extra):
    return {
        "NAME": "demo-b",
        "IMAGE": "us-docker.pkg.dev/p/r/sora_jax:1",
        "NUM_HOSTS": "4",
        "CHIPS_PER_HOST": "4",
        "ACCELERATOR": "tpu-v5p-slice",
        "TPU_TOPOLOGY": "2x2x4",
        "PORT": "8476",
        "RUNS_PVC": "runs",
        "CONFIG": "experiments/demo.py",
        "WORKDIR": "/runs/demo-b",
        **extra,
    }


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext) not installed")
def test_gke_template_by_hand_matches_the_sweep_rendering():
    """The template header's sed + envsubst recipe gives the manifest the sweep renders."""
    template = (LAUNCH / "gke_jobset.yaml").read_text()
    values = _gke_values()
    by_hand = subprocess.run(
        "sed -e '/# gpu$/d' -e '/\"${FLAGS}\"/d' launch/gke_jobset.yaml | envsubst",
        shell=True,
        cwd=ROOT,
        env={**BASE_ENV, **values},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rendered = launchers.render_gke(template, values, (), "tpu")
    assert yaml.safe_load(by_hand) == yaml.safe_load(rendered)
    container = yaml.safe_load(rendered)["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert container["parallelism"] == 4


def test_gke_render_rejects_unsafe_values_and_missing_ones():
    template = (LAUNCH / "gke_jobset.yaml").read_text()
    with pytest.raises(launchers.ConfigError, match="IMAGE"):
        launchers.render_gke(template, _gke_values(IMAGE="img: x"), (), "tpu")
    with pytest.raises(launchers.ConfigError, match=r"\$\{TPU_TOPOLOGY\} has no value"):
        launchers.render_gke(template, _gke_values(TPU_TOPOLOGY=""), (), "tpu")
    # GPU pools have no topology; quotes in flags stay one YAML string each.
    flags = ('--config.sample.prompts=("a \\"red\\" square",)',)
    doc = yaml.safe_load(launchers.render_gke(template, _gke_values(TPU_TOPOLOGY=""), flags, "gpu"))
    args = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert args["containers"][0]["args"][-1] == flags[0]
    names = {launchers.k8s_name(n, "/runs/sweep") for n in ("lr_0.1", "lr-0.1", "LR_0.1")}
    assert len(names) == 3  # same after sanitizing, still distinct


# ---------------------------------------------------------------------------------------
# Compiler settings: sora_jax/parallel/compiler_flags.py, exported by the launchers
# ---------------------------------------------------------------------------------------


def test_gpu_xla_flags_are_accepted_by_this_jaxlib():
    """XLA aborts on an unknown XLA_FLAGS entry, and a CPU jaxlib parses the GPU flags too:
    start a backend with exactly the flags a GPU run exports (plus a bad one to show the
    check can fail)."""
    code = "import jax; print(jax.numpy.ones(3).sum())"
    gpu = compiler_flags.env("gpu", environ={})
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu["XLA_FLAGS"]
    for flags, ok in ((gpu["XLA_FLAGS"], True), ("--xla_gpu_no_such_flag=true", False)):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env={**BASE_ENV, **gpu, "XLA_FLAGS": flags},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (proc.returncode == 0 and proc.stdout.strip() == "3.0") == ok, proc.stderr[-2000:]


def test_env_appends_to_the_users_flags_and_keeps_their_values():
    user = {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_gpu_enable_pipelined_all_gather=false"}
    out = compiler_flags.env("gpu", environ={**user, "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"})
    flags = out["XLA_FLAGS"].split()
    assert flags[:2] == user["XLA_FLAGS"].split()  # the user's first, unchanged
    assert "--xla_gpu_enable_pipelined_all_gather=true" not in flags  # theirs wins
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert out["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".5"
    fresh = compiler_flags.env("gpu", environ={})
    assert fresh["XLA_PYTHON_CLIENT_MEM_FRACTION"] == compiler_flags.GPU_MEM_FRACTION
    assert set(compiler_flags.env("tpu", environ={})) == {"LIBTPU_INIT_ARGS"}
    assert compiler_flags.env("cpu") == {}


def test_launchers_export_the_compiler_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    job = launchers.Job(
        "demo-b", {}, "/runs/demo-b", ("python",), spec="experiments/demo.py", flags=("--x=1",)
    )
    slurm = launchers.get("slurm", launchers.Options()).build(job, 0, "/runs", launchers.Options())
    assert slurm.env == compiler_flags.env("gpu", environ={})
    assert "XLA_FLAGS=" in slurm.shell()
    for variant, accelerator in (("gpu", "nvidia-h100-80gb"), ("tpu", "tpu-v5p-slice")):
        options = launchers.Options(
            gke_variant=variant,
            gke_image="img:1",
            gke_accelerator=accelerator,
            gke_tpu_topology="2x2x4" if variant == "tpu" else "",
        )
        launch = launchers.get("gke", options).build(job, 0, "/runs", options)
        doc = yaml.safe_load(launch.stdin)
        pod = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        for name, value in compiler_flags.env(variant, environ={}).items():
            assert env[name] == value, name
        assert env["PYTHONUNBUFFERED"] == "1"  # the template's own entries stay


# ---------------------------------------------------------------------------------------
# python -m sora_jax.env
# ---------------------------------------------------------------------------------------


def _env_cli(*args, env=None, cwd=ROOT, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "sora_jax.env", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**BASE_ENV, **(env or {})},
        cwd=cwd,
    )


def test_env_report():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "SLURM_JOB_ID": "5"}
    proc = _env_cli("--json", env=env)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    packages = {row["package"]: row for row in rep["packages"]}
    assert list(packages)[: len(env_lib.PACKAGES)] == list(env_lib.PACKAGES)
    from importlib import metadata

    assert packages["jax"]["installed"] == metadata.version("jax")
    assert packages["flax"]["tested"].startswith(">=")  # from sora_jax's install_requires
    assert packages["jaxlib"]["tested"]  # from jax's own requirement
    assert all(row["status"] == "ok" for row in rep["packages"]), rep["packages"]
    assert rep["environment"]["SLURM_JOB_ID"] == "5"
    assert rep["xla_flags"] == ["--xla_force_host_platform_device_count=2"]
    assert (rep["device_count"], rep["process_count"]) == (2, 1)
    text = _env_cli(env=env).stdout
    assert "SLURM_JOB_ID=5" in text and "--xla_force_host_platform_device_count=2" in text


def test_env_marks_versions_outside_the_tested_ranges(tmp_path):
    # A sora_jax distribution found first on the path, declaring a jax range that excludes
    # the installed one and requiring a package that is not installed.
    dist = tmp_path / "site" / "sora_jax-9.9.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sora_jax\nVersion: 9.9\n"
        "Requires-Dist: jax<0.1\nRequires-Dist: flax>=0.1\nRequires-Dist: not-a-package>=1\n"
        'Requires-Dist: pytest>=999; extra == "test"\n'
    )
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"}
    text = _env_cli(env=env, cwd=tmp_path).stdout
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert rows["jax"][2:] == ["<0.1", "OUT", "OF", "RANGE"]
    assert rows["flax"][-1] == "ok"
    assert rows["not-a-package"][1:] == ["-", ">=1", "missing"]
    assert "pytest" not in rows  # extras are not requirements of a run
    assert "2 package(s) outside the tested ranges: jax, not-a-package" in text


def test_check_cluster_two_local_processes(tmp_path):
    work = tmp_path / "w"
    proc = subprocess.run(
        ["bash", str(LAUNCH / "multiprocess.sh"), "2", "2", sys.executable, "-m", "sora_jax.env",
         "--check_cluster", f"--workdir={work}", "--distributed_timeout_s=60"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env={**BASE_ENV, "PORT": "12481"},
    )  # fmt: skip
    logs = [(work / "logs" / f"host_{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, proc.stderr + "".join(logs)
    for i, log in enumerate(logs):
        assert f"check_cluster: OK (process {i} of 2, 4 devices)" in log
        assert f"read the files of all 2 processes in {work}/check_cluster: ok" in log
        written = json.loads((work / "check_cluster" / f"host_{i}.txt").read_text())
        assert written["process"] == i
    assert "process 0: device ids" in logs[0] and "process 1: device ids" in logs[0]
    assert "all-gather over 2 processes and sum over 4 devices: ok" in logs[0]


def test_check_cluster_fails_on_an_unshared_workdir(tmp_path):
    # Each process gets its own directory: what hosts without a shared filesystem see.
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sora_jax.env",
                "--check_cluster",
                f"--workdir={tmp_path / f'host{i}'}",
                "--coordinator_address=localhost:12483",
                "--num_processes=2",
                f"--process_id={i}",
                "--distributed_timeout_s=60",
            ],
            cwd=ROOT,
            env=BASE_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 1, err
        assert "check_cluster: FAILED" in err
        other = 1 - i
        assert f"cannot read {tmp_path / f'host{i}'}/check_cluster/host_{other}.txt" in err
        assert "shared by every host" in err


def test_check_cluster_names_an_unreachable_coordinator():
    proc = _env_cli(
        "--check_cluster",
        "--coordinator_address=localhost:12485",
        "--num_processes=2",
        "--process_id=1",
        "--distributed_timeout_s=2",
    )
    assert proc.returncode == 1
    assert "no coordinator answered at --coordinator_address=localhost:12485 within 2 s" in (
        proc.stderr
    )


def test_every_entry_point_applies_the_flags_of_the_hosts_accelerator(tmp_path):
    """TPU VM workers (ssh, no exported variables) and GPU nodes get the production flags
    from the entry points themselves; the host's kind is read from its device files."""
    for files, kind in (
        (["accel0"], "tpu"),
        (["vfio/0", "vfio/vfio"], "tpu"),
        (["nvidia0", "nvidiactl"], "gpu"),
        (["null", "vfio/vfio"], "cpu"),
    ):
        root = tmp_path / kind / str(len(files))
        for f in files:
            (root / "dev" / f).parent.mkdir(parents=True, exist_ok=True)
            (root / "dev" / f).touch()
        assert compiler_flags.host_platform(str(root)) == kind, files
    # This CPU host: the entry point leaves the environment as it was.
    code = (
        "import os, sys; from sora_jax import entry; from absl import app; "
        "entry.run_main(lambda argv: print(os.environ.get('LIBTPU_INIT_ARGS', 'unset'), "
        "os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 'unset')))"
    )
    env = {k: v for k, v in BASE_ENV.items() if k not in ("LIBTPU_INIT_ARGS",)}
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["unset", "unset"], proc.stderr
