"""Consistency distillation as a training mode of the loop: a tiny student of the session's
tiny run (conftest's tiny_run) on 8 CPU devices with FSDP resumes bit-identically after
SIGKILL; the student samples with 1 and 4 consistency steps; fused attention kernels are
refused; the plan counts the teacher."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sora_jax import config as config_lib
from sora_jax.config import ConfigError
from sora_jax.diffusion import consistency
from sora_jax.evaluation import generate
from sora_jax.evaluation.requests import SampleOptions
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import setup
from sora_jax.training import distill_step, loop, plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
DISTILL = str(ROOT / "experiments" / "distill.py")
STEPS = 8
# data 2 x fsdp 4: the student, its optimizer state, EMA and the teacher sharded over fsdp.
OVERRIDES = ["--config.mesh.ici_fsdp=4", f"--config.total_steps={STEPS}"]


def student_config(teacher, **fields):
    config = config_lib.load_config(f"{DISTILL}:tiny,teacher={teacher}")
    config.mesh.ici_fsdp = 4
    config.total_steps = STEPS
    config.update_from_flattened_dict(fields)
    return config


def _saved_state(work, step):
    return ocp.StandardCheckpointer().restore(work / "checkpoints" / str(step) / "state")


def _train_keys(work):
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k.startswith("train/")} for m in rows]


@pytest.fixture(scope="module")
def student(tiny_run, tmp_path_factory):
    """A straight (uninterrupted) distillation run of the tiny teacher: `(workdir, config)`."""
    teacher, _ = tiny_run
    work = tmp_path_factory.mktemp("student") / "run"
    config = student_config(teacher)
    config_lib.write_run_files(work, config, ["test"])  # config.json, as sora_jax.train does
    summary = loop.train(config, work)
    assert summary["final_step"] == STEPS and np.isfinite(summary["final_loss"])
    return work, config


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_fused_attention_kernels_are_refused_only_under_context_parallelism(tiny_run, impl):
    config = student_config(tiny_run[0], **{"model.attention_impl": impl})
    distill_step.check_config(config, "cpu")  # a JVP rule (models/attention_jvp.py)
    config = student_config(
        tiny_run[0], **{"model.attention_impl": impl, "model.context_parallel": "ulysses"}
    )
    with pytest.raises(ConfigError, match=f"model.attention_impl='{impl}'.*'blockwise'"):
        distill_step.check_config(config, "cpu")
    # 'auto' is judged by what it resolves to on the target: a fused kernel on GPU (bf16).
    config = student_config(
        tiny_run[0],
        **{
            "model.attention_impl": "auto",
            "model.dtype": "bfloat16",
            "model.context_parallel": "ulysses",
        },
    )
    distill_step.check_config(config, "cpu")  # blockwise on CPU
    with pytest.raises(ConfigError, match="resolves to the fused kernel 'cudnn'"):
        distill_step.check_config(config, "gpu")


def test_student_starts_as_the_teacher_and_checkpoints_hold_no_teacher(student, tiny_run):
    work, _ = student
    saved = _saved_state(work, STEPS)
    assert saved.get("base") is None  # the frozen teacher is reloaded, never saved
    teacher = _saved_state(tiny_run[0], 4)["ema"]["decay_0p99"]
    # A few steps at lr 1e-4 from the teacher: close to it, but trained (not equal).
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), saved["params"], teacher)
    assert 0 < max(jax.tree.leaves(diff)) < 0.05


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(student, tiny_run, tmp_path):
    straight, _ = student
    resumed = tmp_path / "resumed"
    cmd = [
        sys.executable, "-m", "sora_jax.train", f"--config={DISTILL}:tiny,teacher={tiny_run[0]}",
        f"--workdir={resumed}", *OVERRIDES,
    ]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not (resumed / "checkpoints" / "2").is_dir():  # committed: renamed into place
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "checkpoints" / str(STEPS)).exists()  # really killed part-way
    loop.train(student_config(tiny_run[0]), resumed)  # the same run, resumed in-process
    a, b = _saved_state(straight, STEPS), _saved_state(resumed, STEPS)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # student, optimizer state, EMA, step
    assert _train_keys(straight) == _train_keys(resumed)


def test_student_samples_with_one_and_four_consistency_steps(student):
    work, config = student
    gen = generate.Generator.from_workdir(work, config)
    assert gen.student
    prompts = ["a red square moving left slowly", "a green circle moving up quickly"]
    one = SampleOptions.from_config(config.sample, num_steps=1)
    video1, _ = gen.generate(prompts, one, pad_to=8)
    # One step is f(eps, 1) = eps - u(eps, 1), decoded: computed here without the sampler.
    shape = gen._latent_shape(one)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(one.seed), i))(jnp.arange(2))
    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    text, mask = gen.text_encoder.encode(prompts)
    u = gen.apply_fn(jax.device_get(gen.params), noise, jnp.ones(2), text, mask)
    expected = gen.tokenizer.decode(np.asarray(consistency.consistency_fn(u, noise, jnp.ones(2))))
    np.testing.assert_allclose(video1, np.clip(expected, -1, 1), atol=2e-4)
    four = SampleOptions.from_config(config.sample, num_steps=4)
    video4, timings = gen.generate(prompts, four, pad_to=8)
    assert video4.shape == video1.shape and np.isfinite(video4).all()
    assert np.abs(video4 - video1).max() > 1e-3  # the later steps change the sample
    with pytest.raises(ValueError, match="--cfg=1"):
        gen.generate(prompts, SampleOptions.from_config(config.sample, cfg_scale=3.0))


def test_sample_cli_samples_a_student_with_its_recorded_family(student, tmp_path):
    work, _ = student
    cmd = [sys.executable, "-m", "sora_jax.sample", f"--workdir={work}", f"--output={tmp_path}"]
    cmd += ["--prompt=a red square moving left slowly", "--steps=1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    sidecar = json.loads(next(tmp_path.glob("000_*.json")).read_text())
    assert sidecar["sampler"] == "consistency" and sidecar["num_steps"] == 1
    assert sidecar["cfg_scale"] == 1.0
    bad = subprocess.run(
        cmd + ["--cfg=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert bad.returncode == 2 and "--cfg=1" in bad.stderr


def test_plan_counts_the_teacher_in_the_step_arguments(tiny_run, devices, capsys):
    config = student_config(tiny_run[0])
    (with_teacher,) = plan.plan(config, devices=devices)
    out = capsys.readouterr().out
    assert "frozen teacher 194,544" in out
    config.unlock()
    del config["distill"]  # the same model trained as a DiT: no teacher among the arguments
    config.model.attention_impl = "blockwise"
    (alone,) = plan.plan(config, devices=devices)
    # Exactly the teacher's shards: its float32 parameters as the student's are sharded.
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    manifest = plan.dataset_geometry(config)
    _, _, _, abstract, _ = setup.setup_state(
        config, manifest, mesh, mesh_lib.logical_rules(config.mesh)
    )
    per_device = sum(
        4 * int(np.prod(p.sharding.shard_shape(p.shape))) for p in jax.tree.leaves(abstract.params)
    )
    extra = with_teacher.argument_gb - alone.argument_gb
    assert per_device < 194_544 * 4  # sharded, not whole on each device
    np.testing.assert_allclose(extra * 2**30, per_device, rtol=1e-6)
