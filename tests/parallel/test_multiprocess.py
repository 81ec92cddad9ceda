"""Multi-process training: 2 processes x 4 CPU devices (gloo collectives, started by
launch/multiprocess.sh) against the same run in one process with 8 devices, on meshes
whose batch shards live on one process (data x fsdp) and on meshes whose context groups
span both processes (rows that follow the mesh: sora_jax/data/global_batch.py); a SIGKILL
and resume of such a run continues bit-identically; and a lost process makes the other
exit non-zero instead of hanging."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "multiprocess.sh"
CONFIG = [
    "--config=experiments/demo.py:tiny",
    "--config.log_every_steps=1",
    "--config.data.global_batch_size=8",
    "--config.mesh.ici_data=2",
    "--config.mesh.ici_fsdp=4",
]
ENV = {**os.environ, "TQDM_DISABLE": "1", "JAX_PLATFORMS": "cpu"}
ENV.pop("XLA_FLAGS", None)


def _cmd(module, workdir, *extra):
    return [sys.executable, "-m", f"sora_jax.{module}", *CONFIG, f"--workdir={workdir}", *extra]


def _metrics(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("tokenized")
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run(_cmd("tokenize", work), cwd=ROOT, env=env, check=True, capture_output=True)
    return work / "data"


@pytest.mark.slow
def test_two_processes_match_one(dataset, tmp_path):
    steps = ["--config.total_steps=3", "--config.checkpoint_every_steps=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    for w in (one, two):
        w.mkdir()
        shutil.copytree(dataset, w / "data")
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run(_cmd("train", one, *steps), cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.run(
        ["bash", str(LAUNCH), "2", "4", *_cmd("train", two, *steps)],
        cwd=ROOT,
        env={**ENV, "PORT": "12391"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "".join(p.read_text() for p in sorted((two / "logs").glob("host_*.log")))
    assert proc.returncode == 0, proc.stderr + logs
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=2e-5)
    assert (two / "checkpoints" / "3").is_dir()


@pytest.mark.slow
def test_a_lost_process_stops_the_other(dataset, tmp_path):
    shutil.copytree(dataset, tmp_path / "data")
    timeout = 15
    procs = [
        subprocess.Popen(
            _cmd(
                "train",
                tmp_path,
                "--config.total_steps=100000",
                "--config.checkpoint_every_steps=100000",
                "--coordinator_address=localhost:12393",
                "--num_processes=2",
                f"--process_id={i}",
                f"--distributed_timeout_s={timeout}",
            ),
            cwd=ROOT,
            env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 600
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, "training did not start"
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()
            time.sleep(1)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=timeout * 6)
        waited = time.monotonic() - t0
        assert rc != 0
        assert waited < timeout * 6
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# --- Rows that follow the mesh --------------------------------------------------------

# Global batch 4 on the tiny config (4 heads): Ulysses needs heads / tensor divisible by
# context, so context 8 runs ring and data 2 x context 4 runs Ulysses.
MESH_BASE = [
    "--config=experiments/demo.py:tiny",
    "--config.log_every_steps=1",
    "--config.data.global_batch_size=4",
]
LAYOUTS = {
    # One batch shard on all 8 devices: both processes read the same 4 rows.
    "context8_ring": ["--config.mesh.ici_context=8", "--config.model.context_parallel=ring"],
    # A context group of 4 on each process: each reads its own 2 rows.
    "data2_context4_ulysses": [
        "--config.mesh.ici_context=4",
        "--config.model.context_parallel=ulysses",
    ],
    # Tensor pairs (2i, 2i + 1) inside a process: each reads the rows of its 2 data shards.
    # (Pairs across processes: tests/parallel/test_rows.py, with a reordered mesh.)
    "data4_tensor2": ["--config.mesh.ici_tensor=2"],
}
PORTS = {"data2_context4_ulysses": 12396, "data4_tensor2": 12397}  # context 8: 12395
# The context-8 run's length: 3 compared with one process, all with the resume (killed after
# checkpoint 2, it resumes through steps 3 and 4).
STEPS = 4


def _run_two(workdir, flags, *extra, port, **popen):
    """launch/multiprocess.sh 2 4 train ... in its own session (to SIGKILL it whole)."""
    cmd = [sys.executable, "-m", "sora_jax.train", *MESH_BASE, *flags, f"--workdir={workdir}"]
    return subprocess.Popen(
        ["bash", str(LAUNCH), "2", "4", *cmd, *extra],
        cwd=ROOT,
        env={**ENV, "PORT": str(port)},
        start_new_session=True,
        **popen,
    )


def _finish(proc, workdir):
    out, err = proc.communicate(timeout=900)
    logs = "".join(p.read_text() for p in sorted((workdir / "logs").glob("host_*.log")))
    assert proc.returncode == 0, (err or "") + logs


def _steps(total, every):
    return [f"--config.total_steps={total}", f"--config.checkpoint_every_steps={every}"]


def _fresh(dataset, workdir):
    workdir.mkdir()
    shutil.copytree(dataset, workdir / "data")
    return workdir


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """Losses of the 1-process 8-device run (context 8, ring), 3 steps."""
    work = _fresh(dataset, tmp_path_factory.mktemp("mesh") / "one")
    cmd = [sys.executable, "-m", "sora_jax.train", *MESH_BASE, *LAYOUTS["context8_ring"]]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run(
        [*cmd, f"--workdir={work}", *_steps(3, 3)], cwd=ROOT, env=env, check=True,
        capture_output=True,
    )  # fmt: skip
    return _metrics(work)


@pytest.fixture(scope="module")
def context8_straight(dataset, tmp_path_factory):
    """The uninterrupted 2-process context-8 run of STEPS steps, a checkpoint every 2."""
    work = _fresh(dataset, tmp_path_factory.mktemp("mesh") / "straight")
    proc = _run_two(
        work, LAYOUTS["context8_ring"], *_steps(STEPS, 2), port=12395,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _finish(proc, work)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_meshes_spanning_processes_match_one_process(
    layout, dataset, one_process, context8_straight, tmp_path
):
    """The losses of 3 steps on 2 processes equal the 1-process 8-device run's: other
    meshes than the reference's change only the order of float32 sums."""
    if layout == "context8_ring":
        work = context8_straight
    else:
        work = _fresh(dataset, tmp_path / "two")
        proc = _run_two(
            work, LAYOUTS[layout], *_steps(3, 3), port=PORTS[layout],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _finish(proc, work)
    two = _metrics(work)[:3]
    assert [m["step"] for m in two] == [1, 2, 3]
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(
            [m[key] for m in two], [m[key] for m in one_process], rtol=2e-5, err_msg=key
        )
    log = (work / "logs" / "host_1.log").read_text()
    readers = {"context8_ring": 1, "data2_context4_ulysses": 2, "data4_tensor2": 2}[layout]
    assert f"{readers} distinct reader(s)" in log


@pytest.mark.slow
def test_sigkill_and_resume_on_a_mesh_spanning_processes(dataset, context8_straight, tmp_path):
    """Kill both processes of a context-8 run after its checkpoint 2, resume: every later
    step's metrics are bit-identical to the uninterrupted run's."""
    work = _fresh(dataset, tmp_path / "killed")
    flags = [*LAYOUTS["context8_ring"], *_steps(STEPS, 2)]
    proc = _run_two(work, flags, port=12399, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (work / "checkpoints" / "2").is_dir():  # committed: renamed into place
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes
    finally:
        proc.wait()
    assert not (work / "checkpoints" / str(STEPS)).exists()  # really killed part-way
    resumed = _run_two(
        work, flags, port=12400, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _finish(resumed, work)
    assert "resumed from" in (work / "logs" / "host_0.log").read_text()
    train = lambda m: {k: v for k, v in m.items() if k.startswith("train/")}  # noqa: E731
    straight = [train(m) for m in _metrics(context8_straight)]
    assert len(straight) == STEPS
    assert [train(m) for m in _metrics(work)] == straight
