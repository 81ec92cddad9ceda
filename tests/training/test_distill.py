"""Distillation as a training mode of the loop: a tiny student of the tiny run (conftest's
tiny_run) on 8 CPU devices with FSDP resumes bit-identically after SIGKILL, trained by
consistency distillation (sCM) and by DMD2 (its fake score in the checkpoint); the student
samples with 1 and 4 consistency steps; fused attention kernels are refused only under
context parallelism; the plan counts the teacher; benchmarks/few_step.py runs on them."""

import json
import os
import pathlib
import re
import shutil
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
# Checkpoints every 2 steps (distill.py:tiny): the SIGKILL test stops a run after step 2's
# and resumes it through steps 3 and 4.
STEPS = 4
# data 2 x fsdp 4: the student, its optimizer state, EMA and the teacher sharded over fsdp.
OVERRIDES = ["--config.mesh.ici_fsdp=4", f"--config.total_steps={STEPS}"]
# The entry points' processes share the tests' compilation cache (tests/conftest.py): the
# killed run loads the step the straight run compiled in this process instead of compiling
# it again (the same program: the cache key is the step's HLO and compile options).
ENV = {
    **os.environ,
    "TQDM_DISABLE": "1",
    "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
}


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


def _straight(teacher, work, method):
    config = student_config(teacher, **{"distill.method": method})
    config_lib.write_run_files(work, config, ["test"])  # config.json, as sora_jax.train does
    summary = loop.train(config, work)
    assert summary["final_step"] == STEPS and np.isfinite(summary["final_loss"])
    return work, config


@pytest.fixture(scope="module")
def student(tiny_run, tmp_path_factory):
    """A straight (uninterrupted) distillation run of the tiny teacher: `(workdir, config)`."""
    return _straight(tiny_run[0], tmp_path_factory.mktemp("student") / "run", "scm")


@pytest.fixture(scope="module")
def dmd2_student(tiny_run, tmp_path_factory):
    """The same with DMD2 (distill.method='dmd2'): generator, fake score in opt_state."""
    return _straight(tiny_run[0], tmp_path_factory.mktemp("dmd2_student") / "run", "dmd2")


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
@pytest.mark.parametrize("method", ["scm", "dmd2"])
def test_sigkill_then_resume_is_bit_identical(method, tiny_run, tmp_path, request):
    straight, _ = request.getfixturevalue("student" if method == "scm" else "dmd2_student")
    resumed = tmp_path / "resumed"
    cmd = [
        sys.executable, "-m", "sora_jax.train",
        f"--config={DISTILL}:tiny,teacher={tiny_run[0]},method={method}",
        f"--workdir={resumed}", *OVERRIDES,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not (resumed / "checkpoints" / "2").is_dir():  # committed: renamed into place
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "checkpoints" / str(STEPS)).exists()  # really killed part-way
    # The same run, resumed in-process.
    loop.train(student_config(tiny_run[0], **{"distill.method": method}), resumed)
    a, b = _saved_state(straight, STEPS), _saved_state(resumed, STEPS)
    # Student, optimizer state (with DMD2: the fake score and its optimizer state), EMA, step.
    jax.tree.map(np.testing.assert_array_equal, a, b)
    if method == "dmd2":
        assert set(a["opt_state"]) == {"generator", "fake_score", "fake_score_opt"}
        fake, teacher = a["opt_state"]["fake_score"], _saved_state(tiny_run[0], 4)["ema"]
        diff = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), fake, teacher["decay_0p99"])
        assert max(jax.tree.leaves(diff)) > 0  # trained from the teacher, and saved
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

    @jax.jit  # compiled once (op by op, the network and the noise draws are slow to run)
    def one_step(params, text, mask):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(one.seed), i))(jnp.arange(2))
        noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
        u = gen.apply_fn(params, noise, jnp.ones(2), text, mask)
        return consistency.consistency_fn(u, noise, jnp.ones(2))

    text, mask = gen.text_encoder.encode(prompts)
    expected = gen.tokenizer.decode(np.asarray(one_step(jax.device_get(gen.params), text, mask)))
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
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    sidecar = json.loads(next(tmp_path.glob("000_*.json")).read_text())
    assert sidecar["sampler"] == "consistency" and sidecar["num_steps"] == 1
    assert sidecar["cfg_scale"] == 1.0
    bad = subprocess.run(
        cmd + ["--cfg=3"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert bad.returncode == 2 and "--cfg=1" in bad.stderr


def test_plan_counts_the_teacher_and_dmd2_fake_score_in_the_step_arguments(
    tiny_run, devices, capsys
):
    config = student_config(tiny_run[0], **{"distill.method": "dmd2"})
    (with_fake,) = plan.plan(config, devices=devices)
    out = capsys.readouterr().out
    assert "frozen teacher 194,544" in out and "fake-score network 194,544" in out
    config.distill.method = "scm"
    (with_teacher,) = plan.plan(config, devices=devices)
    out = capsys.readouterr().out
    assert "frozen teacher 194,544" in out and "fake-score" not in out
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    manifest = plan.dataset_geometry(config)
    _, _, _, dmd2_state, _ = distill_step.setup_state(
        student_config(tiny_run[0], **{"distill.method": "dmd2"}),
        manifest,
        mesh,
        mesh_lib.logical_rules(config.mesh),
    )
    # DMD2 adds exactly the fake score's shards and its optimizer state's (the student's).
    fake = {k: v for k, v in dmd2_state.opt_state.items() if k != "generator"}
    fake_bytes = sum(
        x.dtype.itemsize * int(np.prod(x.sharding.shard_shape(x.shape)))
        for x in jax.tree.leaves(fake)
    )
    np.testing.assert_allclose(
        (with_fake.argument_gb - with_teacher.argument_gb) * 2**30, fake_bytes, rtol=1e-6
    )
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


def test_few_step_benchmark_runs_on_the_tiny_teacher_and_student(tiny_run, student, tmp_path):
    teacher = tmp_path / "teacher"  # the tiny run with the config.json a training run writes
    shutil.copytree(tiny_run[0], teacher)
    config_lib.write_run_files(teacher, tiny_run[1], ["test"])
    cmd = [
        sys.executable, "benchmarks/few_step.py", f"--teacher={teacher}",
        f"--student={student[0]}", "--steps=3", "--repeats=1", "--cache=1e9",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    number = r"[0-9.]+"
    for row in [
        "teacher 3 steps cfg 3",
        "teacher \\+ cache 1e\\+09",
        "student 4 steps",
        "student 1 step",
    ]:
        assert re.search(rf"{row}\s+{number}\s+{number}x", proc.stdout), proc.stdout
    # A huge threshold: the network runs in step 0 only.
    assert "network ran in 1 of 3 steps" in proc.stdout
