"""Sweeps: named jobs from get_sweep, launchers, the sweep manifest and its states, dry runs
for the cluster launchers, and one real 3-job local sweep of the tiny demo."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from sora_jax import config as config_lib
from sora_jax import launchers, sweeping

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "experiments" / "demo.py")


def test_product_and_zip():
    a = sweeping.sweep("x", [1, 2])
    b = sweeping.sweep("y", ["p", "q"])
    assert sweeping.product(a, b) == [
        {"x": 1, "y": "p"},
        {"x": 1, "y": "q"},
        {"x": 2, "y": "p"},
        {"x": 2, "y": "q"},
    ]
    assert sweeping.zip_(a, b) == [{"x": 1, "y": "p"}, {"x": 2, "y": "q"}]
    with pytest.raises(ValueError, match="equal length"):
        sweeping.zip_(a, sweeping.sweep("y", [1]))


def test_demo_sweep_expands_to_named_jobs(tmp_path):
    jobs = sweeping.expand(f"{DEMO}:tiny", str(tmp_path))
    assert len(jobs) == 4
    assert len({j.name for j in jobs}) == 4
    assert jobs[0].name == "lr_0.001-dim_64"
    assert jobs[0].workdir == f"{tmp_path}/lr_0.001-dim_64"
    assert "--config.optimizer.lr=0.001" in jobs[0].command
    assert "--config.model.dim=64" in jobs[0].command
    assert jobs == sweeping.expand(f"{DEMO}:tiny", str(tmp_path))  # stable across runs


def test_sweep_errors(tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text(pathlib.Path(DEMO).read_text().split("def get_sweep")[0])
    with pytest.raises(config_lib.ConfigError, match="defines no get_sweep"):
        sweeping.expand(str(plain), str(tmp_path))

    def with_sweep(name, body):
        path = tmp_path / name
        path.write_text(pathlib.Path(DEMO).read_text() + f"\n\ndef get_sweep(arg=None):\n{body}")
        return str(path)

    bad = with_sweep("bad.py", "    return [{'optimizer.lrr': 1.0}]\n")
    with pytest.raises(config_lib.ConfigError, match="unknown fields"):
        sweeping.expand(bad, str(tmp_path))
    clash = with_sweep("clash.py", "    return [{'optimizer.lr': 1.0}, {'optimizer.lr': 1.0}]\n")
    with pytest.raises(config_lib.ConfigError, match="share the name"):
        sweeping.expand(clash, str(tmp_path))


# ---------------------------------------------------------------------------------------
# Flags for every job, launchers, the runner's states, dry runs, and a real local sweep
# ---------------------------------------------------------------------------------------


def _cli(*args, check=True, env=None, timeout=600):
    proc = subprocess.run(
        [sys.executable, "-m", "sora_jax.sweep", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_common_flags_go_to_every_job(tmp_path):
    common = ["--config.total_steps=4", "--compilation_cache="]
    jobs = sweeping.expand(f"{DEMO}:tiny", str(tmp_path), common_flags=common)
    for job in jobs:
        assert job.total_steps == 4  # resolved by the same flag parser as sora_jax.train
        assert job.flags[:2] == tuple(common)  # before the job's own overrides
        assert job.command[-len(job.flags) :] == job.flags
        assert f"--workdir={job.workdir}" in job.command
    assert sweeping.expand(f"{DEMO}:tiny", str(tmp_path))[0].total_steps == 40  # tiny default

    with pytest.raises(config_lib.ConfigError, match="did you mean 'total_steps'"):
        sweeping.expand(f"{DEMO}:tiny", str(tmp_path), common_flags=["--config.total_step=4"])
    with pytest.raises(config_lib.ConfigError, match="varies it"):
        sweeping.expand(f"{DEMO}:tiny", str(tmp_path), common_flags=["--config.model.dim=32"])
    with pytest.raises(config_lib.ConfigError, match="set by the sweep itself"):
        sweeping.expand(f"{DEMO}:tiny", str(tmp_path), common_flags=["--workdir=/x"])
    with pytest.raises(config_lib.ConfigError, match="total_steps"):
        sweeping.expand(f"{DEMO}:tiny", str(tmp_path), common_flags=["--config.total_steps=x"])


def test_launcher_errors(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="'nope' is unknown; choose one of local"):
        launchers.get("nope", launchers.Options())
    with pytest.raises(config_lib.ConfigError, match="needs --tpu_name and --zone"):
        launchers.get("tpu_vm", launchers.Options())
    with pytest.raises(config_lib.ConfigError, match="--gke_tpu_topology"):
        launchers.get("gke", launchers.Options(gke_image="i", gke_accelerator="tpu-v5p-slice"))
    gpu = launchers.Options(gke_image="i", gke_accelerator="nvidia-h100-80gb", gke_variant="gpu")
    assert launchers.get("gke", gpu).name == "gke"  # GPU pools need no topology
    (job,) = sweeping.expand(f"{DEMO}:tiny", str(tmp_path))[:1]
    with pytest.raises(config_lib.ConfigError, match="not under the shared volume"):
        launchers.get("gke", gpu).build(job, 0, str(tmp_path), gpu)
    missing = launchers.Options(launch_dir=str(tmp_path))
    with pytest.raises(config_lib.ConfigError, match="multiprocess.sh does not exist"):
        launchers.get("multiprocess", missing).build(job, 0, str(tmp_path), missing)

    # Through the entry point: one line naming the flag, exit 2.
    proc = _cli(
        f"--config={DEMO}:tiny", f"--workdir_root={tmp_path}", "--launcher=pbs", check=False
    )
    assert proc.returncode == 2
    assert "error: --launcher='pbs' is unknown" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli(
        f"--config={DEMO}:tiny", f"--workdir_root={tmp_path}", "--config.seed=1", check=False
    )
    assert proc.returncode == 2 and "go after `--`" in proc.stderr


def _fake_job(root, name, code, total_steps=4):
    workdir = f"{root}/{name}"
    return sweeping.Job(name, {}, workdir, (sys.executable, "-c", code), "fake.py", (), total_steps)


def test_runner_states_parallel_and_rerun(tmp_path):
    root = str(tmp_path / "sweep")
    # `a` waits for `b` to start: it can only finish when the two run at the same time.
    wait_b = (
        "import os, time; t = time.time()\n"
        f"while not os.path.exists({root!r} + '/b_started'):\n"
        "    assert time.time() - t < 60, 'b never started alongside a'\n"
        "    time.sleep(0.1)\n"
    )
    start_b = f"import os; open({root!r} + '/b_started', 'w').close()\n"
    jobs = [
        _fake_job(root, "a", wait_b + f"os.makedirs({root!r} + '/a/checkpoints/4')"),
        _fake_job(root, "b", start_b + f"os.makedirs({root!r} + '/b/checkpoints/4')"),
        _fake_job(root, "c", "print('boom'); raise SystemExit(3)"),
        _fake_job(root, "d", "pass"),  # exits 0 before its final step: stopped, resumable
    ]
    local = launchers.get("local", launchers.Options())
    said = []
    failures = sweeping.run(
        jobs, local, launchers.Options(), root, spec="fake.py", max_parallel=2, echo=said.append
    )
    assert failures == 1
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    states = {name: (r["state"], r["returncode"]) for name, r in manifest["jobs"].items()}
    assert states == {"a": ("done", 0), "b": ("done", 0), "c": ("failed", 3), "d": ("stopped", 0)}
    assert "boom" in pathlib.Path(manifest["jobs"]["c"]["log"]).read_text()
    assert manifest["jobs"]["a"]["command"] == list(jobs[0].command)
    table = sweeping.status_table(root)
    assert re.search(r"^c\s+failed \(exit 3\)", table, re.M)
    assert "4 jobs: 2 done, 1 failed, 1 stopped" in table

    # Re-running skips the finished jobs and runs the others again.
    said.clear()
    sweeping.run(jobs, local, launchers.Options(), root, spec="fake.py", echo=said.append)
    assert "a: finished (checkpoint 4), skipped" in said
    assert "b: finished (checkpoint 4), skipped" in said
    assert sum(s.startswith(("c: started", "d: started")) for s in said) == 2
    with pytest.raises(config_lib.ConfigError, match="belongs to a sweep of --config=fake.py"):
        sweeping.run(jobs, local, launchers.Options(), root, spec="other.py")


def test_dry_run_slurm(tmp_path):
    root = f"{tmp_path}/sw"
    out = _cli(
        f"--config={DEMO}:tiny",
        f"--workdir_root={root}",
        "--launcher=slurm",
        "--sbatch_args=--nodes=2 --gpus-per-node=8",
        "--dry_run",
        "--",
        "--config.total_steps=4",
    ).stdout
    lines = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    assert len(lines) == 4
    for job, argv in zip(sweeping.expand(f"{DEMO}:tiny", root), lines):
        # The GPU compiler settings come first, exported to the job (compiler_flags.py).
        settings = [
            w
            for w in argv[:2]
            if w.split("=", 1)[0] in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")
        ]
        assert len(settings) == 2 and "--xla_gpu_enable_latency_hiding_scheduler" in settings[0]
        argv = argv[2:]
        assert argv[:3] == ["sbatch", "--parsable", f"--job-name={job.name}"]
        assert argv[3] == f"--output={root}/logs/{job.name}-%j.out"
        assert argv[4:6] == ["--nodes=2", "--gpus-per-node=8"]
        assert argv[6] == str(ROOT / "launch" / "slurm.sbatch")
        assert argv[7:9] == [f"{DEMO}:tiny", job.workdir]
        assert argv[9:] == ["--config.total_steps=4", *job.flags]
    assert not pathlib.Path(root).exists()  # a dry run writes nothing


def test_dry_run_tpu_vm(tmp_path):
    root = f"{tmp_path}/sw"
    out = _cli(
        f"--config={DEMO}:tiny",
        f"--workdir_root={root}",
        "--launcher=tpu_vm",
        "--tpu_name=my-v5p-32",
        "--zone=us-east5-a",
        "--dry_run",
    ).stdout
    lines = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    jobs = sweeping.expand(f"{DEMO}:tiny", root)
    assert lines == [
        ["bash", str(ROOT / "launch" / "tpu_vm.sh"), "my-v5p-32", "us-east5-a", f"{DEMO}:tiny",
         job.workdir, *job.flags]
        for job in jobs
    ]  # fmt: skip


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_dry_run_gke_manifests(tmp_path, variant):
    accelerator = {"tpu": "tpu-v5p-slice", "gpu": "nvidia-h100-80gb"}[variant]
    out = _cli(
        f"--config={DEMO}:tiny",
        "--workdir_root=/runs/lr",
        "--launcher=gke",
        f"--gke_variant={variant}",
        "--gke_image=us-docker.pkg.dev/p/r/sora_jax:1",
        f"--gke_accelerator={accelerator}",
        "--gke_tpu_topology=2x2x2",
        "--gke_hosts=2",
        "--gke_chips_per_host=4",
        "--port=8476",
        "--dry_run",
        "--",
        "--config.total_steps=4",
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    jobs = sweeping.expand(f"{DEMO}:tiny", "/runs/lr")
    assert len(docs) == len(jobs) == 4
    assert len({d["metadata"]["name"] for d in docs}) == 4
    for job, doc in zip(jobs, docs):
        assert doc["kind"] == "JobSet"
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z][a-z0-9-]{0,38}[a-z0-9]", name)
        (rjob,) = doc["spec"]["replicatedJobs"]
        spec = rjob["template"]["spec"]
        assert spec["parallelism"] == spec["completions"] == 2
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["python3", "-m", "sora_jax.train"]
        assert container["args"] == [
            f"--config={DEMO}:tiny",
            f"--workdir={job.workdir}",
            "--coordinator_address=$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):8476",
            "--num_processes=2",
            "--process_id=$(JOB_COMPLETION_INDEX)",
            "--config.total_steps=4",
            *job.flags,
        ]
        env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}) for e in container["env"]}
        assert "jobset-name" in env["JOBSET_NAME"]["fieldPath"]
        assert "replicatedjob-name" in env["REPLICATED_JOB_NAME"]["fieldPath"]
        assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["fieldPath"]
        limits = container["resources"]["limits"]
        if variant == "tpu":
            assert pod["nodeSelector"] == {
                "cloud.google.com/gke-tpu-accelerator": accelerator,
                "cloud.google.com/gke-tpu-topology": "2x2x2",
            }
            assert limits == {"google.com/tpu": 4}
        else:
            assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": accelerator}
            assert limits == {"nvidia.com/gpu": 4}
            assert "annotations" not in doc["metadata"]
        assert "${" not in out


EXPERIMENT = '''"""Three learning rates of the tiny demo (tests/test_sweep.py)."""
from sora_jax import config as config_lib
from sora_jax import sweeping

_demo = config_lib.load_module({demo!r})


def get_config(arg=None):
    return _demo.get_config("tiny,steps=4")


def get_sweep(arg=None):
    return sweeping.sweep("optimizer.lr", [1e-3, 3e-3, 1e-2])
'''


@pytest.mark.slow
def test_local_sweep_runs_reports_and_skips_when_done(tmp_path):
    experiment = tmp_path / "lrs.py"
    experiment.write_text(EXPERIMENT.format(demo=DEMO))
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device per job: fastest here
    subprocess.run(
        [sys.executable, "-m", "sora_jax.tokenize", f"--config={experiment}",
         f"--workdir={tmp_path / 'tok'}"],
        cwd=ROOT, check=True, capture_output=True, env={**os.environ, **env},
    )  # fmt: skip
    root = tmp_path / "sweep"
    args = [
        f"--config={experiment}",
        f"--workdir_root={root}",
        "--max_parallel=2",
        "--",
        f"--config.data.dataset_dir={tmp_path / 'tok' / 'data'}",  # one dataset for all jobs
        "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=4",
        f"--compilation_cache={ROOT / '.jax_cache'}",
    ]
    out = _cli(*args, env=env).stdout
    names = ["lr_0.001", "lr_0.003", "lr_0.01"]
    for name, lr in zip(names, [1e-3, 3e-3, 1e-2]):
        work = root / name
        assert json.loads((work / "config.json").read_text())["optimizer"]["lr"] == lr
        steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").open()]
        assert steps == [2, 4]
        assert (work / "checkpoints" / "4").is_dir()
    manifest = json.loads((root / "sweep.json").read_text())
    assert {n: r["state"] for n, r in manifest["jobs"].items()} == dict.fromkeys(names, "done")
    assert all(r["returncode"] == 0 for r in manifest["jobs"].values())
    assert "3 jobs: 3 done" in out

    status = _cli(f"--workdir_root={root}", "--status").stdout
    rows = {line.split()[0]: line.split() for line in status.splitlines()[1:4]}
    assert set(rows) == set(names)
    for name in names:
        job, state, step, loss, workdir = rows[name]
        assert (state, step, workdir) == ("done", "4/4", str(root / name))
        last = json.loads((root / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert float(loss) == pytest.approx(last["train/loss"], abs=1e-4)

    before = {n: (root / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
    again = _cli(*args, env=env).stdout
    assert "nothing to run" in again
    assert {n: (root / n / "metrics.jsonl").stat().st_mtime_ns for n in names} == before


def test_submit_records_job_ids_and_submits_once(tmp_path, monkeypatch):
    root = str(tmp_path / "sw")
    jobs = sweeping.expand(f"{DEMO}:tiny", root)[:2]
    slurm = launchers.get("slurm", launchers.Options())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no sbatch here (nor a real one)
    with pytest.raises(config_lib.ConfigError, match="runs 'sbatch', which is not on PATH"):
        sweeping.run(jobs, slurm, launchers.Options(), root, spec=f"{DEMO}:tiny")

    # A fake sbatch: appends its arguments to a file and prints a job id, as --parsable does.
    sbatch = bin_dir / "sbatch"
    calls = str(tmp_path / "calls")
    sbatch.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"with open({calls!r}, 'a') as f:\n    f.write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"print(1000 + len(open({calls!r}).readlines()))\n"
    )
    sbatch.chmod(0o755)
    said = []
    assert (
        sweeping.run(jobs, slurm, launchers.Options(), root, spec=f"{DEMO}:tiny", echo=said.append)
        == 0
    )
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["submitted"] for r in manifest["jobs"].values()] == ["1001", "1002"]
    assert all(r["state"] == "submitted" for r in manifest["jobs"].values())
    lines = (tmp_path / "calls").read_text().splitlines()
    assert lines[0].startswith(f"--parsable --job-name={jobs[0].name} ")
    assert "submitted" in sweeping.status_table(root)

    said.clear()
    sweeping.run(jobs, slurm, launchers.Options(), root, spec=f"{DEMO}:tiny", echo=said.append)
    assert len((tmp_path / "calls").read_text().splitlines()) == 2  # not submitted twice
    assert any("pass --resubmit" in s for s in said)
    sweeping.run(jobs, slurm, launchers.Options(), root, spec=f"{DEMO}:tiny", resubmit=True)
    assert len((tmp_path / "calls").read_text().splitlines()) == 4
