"""Multi-process training: 2 processes x 4 CPU devices (gloo collectives, started by
launch/multiprocess.sh) against the same run in one process with 8 devices; and a
lost process makes the other exit non-zero instead of hanging."""

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
