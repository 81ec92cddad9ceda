"""The training loop: exact resume after SIGKILL, SIGTERM saves and exits, non-finite
batches are skipped and k in a row roll back, corrupt checkpoints are skipped, elastic
restore onto other device counts, and resumes that change the state's structure refused."""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from sora_jax import config as config_lib
from sora_jax import video_io
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import tokenization
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.training import eval_hook, loop, perf, plan, resume
from sora_jax.training import metrics as metrics_lib
from sora_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments" / "demo.py")


def tiny(**overrides):
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.log_every_steps = 1
    config.checkpoint_every_steps = 4
    config.total_steps = 12
    config.update_from_flattened_dict(overrides)  # dotted keys, e.g. 'data.source.seed'
    return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("tokenized")
    tokenization.run(tiny(), work)
    return work / "data"


def _workdir(tmp_path, dataset, name="run"):
    work = tmp_path / name
    work.mkdir()
    shutil.copytree(dataset, work / "data")
    return work


def _metrics(work):
    return [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]


def _train_cli(work, *extra, variant="tiny", code=ROOT, **popen):
    cmd = [sys.executable, "-m", "sora_jax.train", f"--config=experiments/demo.py:{variant}"]
    cmd += [
        f"--workdir={work}",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=4",
        *extra,
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.Popen(cmd, cwd=code, env=env, **popen)


def _compiled_steps(work):
    lines = (work / resume.STEPS_FILE).read_text().splitlines()
    return [json.loads(x) for x in lines]


def _saved_state(work, step):
    path = work / "checkpoints" / str(step) / "state"
    return ocp.StandardCheckpointer().restore(path)


def test_nan_batches_are_skipped_and_a_run_of_them_rolls_back(dataset, tmp_path, monkeypatch):
    work = _workdir(tmp_path, dataset)
    real = pipeline_lib.to_global_batch

    def poisoned(host, mesh, **kw):
        if host["step"] in (6, 7, 8):  # steps 7, 8, 9 in metrics (counted after the step)
            host = dict(host, latents=np.full_like(host["latents"], np.nan))
        return real(host, mesh, **kw)

    monkeypatch.setattr(pipeline_lib, "to_global_batch", poisoned)
    config = tiny(**{"training.max_consecutive_skips": 3})
    summary = loop.train(config, work)
    assert summary["skipped_updates"] == 3 and summary["rollbacks"] == 1
    m = {x["step"]: x for x in _metrics(work)}
    assert [m[s]["train/skipped"] for s in range(6, 11)] == [0, 1, 1, 1, 0]
    assert m[9]["train/rollbacks"] == 1
    assert summary["final_step"] == 12 and np.isfinite(summary["final_loss"])
    # The loss keeps falling from the rolled-back weights (those of checkpoint 4).
    assert m[12]["train/loss"] < m[1]["train/loss"]


def _poison(monkeypatch, steps):
    """NaN latents in the batches of the given steps (counted after the step, as metrics)."""
    real = pipeline_lib.to_global_batch

    def poisoned(host, mesh, **kw):
        if host["step"] + 1 in steps:
            host = dict(host, latents=np.full_like(host["latents"], np.nan))
        return real(host, mesh, **kw)

    monkeypatch.setattr(pipeline_lib, "to_global_batch", poisoned)


@pytest.mark.parametrize(
    "bad, limit, restored, unsaved",
    [
        # One window (5-8): the limit is reached at step 6 (the rollback comes at once, at
        # checkpoint 6, which then holds the restored parameters); step 7 is skipped after
        # it and counted. The streak starts at 5, so checkpoint 4 is restored.
        ((5, 6, 7), 2, 4, ()),
        # A streak from window 5-8 into 9-12 (steps 7, 8, 9): checkpoint 8 would lie inside
        # it and is not saved; the rollback goes to 6.
        ((7, 8, 9), 3, 6, (8,)),
    ],
)
def test_rollback_with_long_windows_counts_every_skip_and_restores_before_the_streak(
    dataset, tmp_path, monkeypatch, capsys, bad, limit, restored, unsaved
):
    work = _workdir(tmp_path, dataset)
    _poison(monkeypatch, bad)
    config = tiny(log_every_steps=4, checkpoint_every_steps=2, checkpoint_max_to_keep=20)
    config.training.max_consecutive_skips = limit
    summary = loop.train(config, work)
    out = capsys.readouterr().out
    assert summary["skipped_updates"] == len(bad) and summary["rollbacks"] == 1
    assert (
        f"rollback: steps {bad[0]}-{bad[limit - 1]} skipped; parameters of step {restored}" in out
    )
    m = {x["step"]: x for x in _metrics(work)}
    assert sum(m[s]["train/skipped"] for s in (4, 8, 12)) == len(bad)
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert set(saved) == {2, 4, 6, 8, 10, 12} - set(unsaved)
    assert summary["final_step"] == 12


def test_throughput_covers_the_timed_steps_only(dataset, tmp_path, monkeypatch):
    """A clock that moves 1 s per batch, 100 s per evaluation and 50 s per checkpoint save:
    every window's step time is then ~1 s, whether an evaluation (at 2, 4, 6, 8) or a
    checkpoint (at 3, 6) fell inside it or not, and eval and checkpoint time are reported
    beside it."""
    offset = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(
        loop, "time", types.SimpleNamespace(perf_counter=lambda: real_clock() + offset[0])
    )
    real_batch, real_save = pipeline_lib.to_global_batch, ckpt_lib.save

    def slow_batch(*a, **kw):
        offset[0] += 1.0
        return real_batch(*a, **kw)

    def slow_save(*a, **kw):
        offset[0] += 50.0
        return real_save(*a, **kw)

    def slow_eval(self, state, step):
        offset[0] += 100.0
        return {"eval/fake": 1.0}

    monkeypatch.setattr(pipeline_lib, "to_global_batch", slow_batch)
    monkeypatch.setattr(ckpt_lib, "save", slow_save)
    monkeypatch.setattr(eval_hook.Evaluator, "__call__", slow_eval)
    work = _workdir(tmp_path, dataset)
    config = tiny(total_steps=8, log_every_steps=4, eval_every_steps=2, checkpoint_every_steps=3)
    loop.train(config, work)
    rows = {m["step"]: m for m in _metrics(work) if "perf/steps_per_s" in m}
    assert sorted(rows) == [4, 8]
    for m in rows.values():
        assert 1.0 <= 1 / m["perf/steps_per_s"] < 2.0, m  # 1 s fake + the real step
        assert m["perf/step_time_s"] == pytest.approx(1 / m["perf/steps_per_s"])
        # MFU from the same time: FLOPs / (step time x devices x peak).
        flops = m["perf/model_tflops_per_s_per_device"] * 1e12
        assert m["perf/mfu"] == pytest.approx(flops / perf.peak_flops())
    # Window 1-4 holds the evaluation at 2 and the checkpoint at 3; window 5-8 the
    # evaluations at 4 (after the line of step 4) and 6 and the checkpoint at 6 (those at
    # 8 come after the line of step 8). The fake time plus the real one (the first save
    # initializes Orbax for seconds).
    assert 100 <= rows[4]["perf/eval_s"] < 130 and 200 <= rows[8]["perf/eval_s"] < 230
    assert 50 <= rows[4]["perf/checkpoint_block_s"] < 80
    assert 50 <= rows[8]["perf/checkpoint_block_s"] < 80


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, steps, batch",
    [
        # Batch 64 makes steps slow enough to kill the run part-way, and 4 steps an epoch
        # (6 epochs; 6 checkpoints, 3 kept).
        ("tiny", 24, 64),
        # Diffusion forcing (a time per chunk) and block-causal attention, kept cheap.
        ("tiny,causal", 12, 16),
    ],
)
def test_sigkill_then_resume_is_bit_identical(dataset, code, tmp_path, variant, steps, batch):
    straight, resumed = _workdir(tmp_path, dataset, "a"), _workdir(tmp_path, dataset, "b")
    flags = [f"--config.total_steps={steps}", f"--config.data.global_batch_size={batch}"]
    run = functools.partial(_train_cli, variant=variant, code=code)
    assert run(straight, *flags).wait(timeout=900) == 0
    proc = run(resumed, *flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (resumed / "checkpoints" / "4").is_dir():  # committed: renamed into place
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "checkpoints" / str(steps)).exists()  # really killed part-way
    assert run(resumed, *flags).wait(timeout=900) == 0
    # The three processes ran one compiled step (training/resume.py); the killed one and
    # the one that resumed it each left a record.
    (first,), (killed, after) = _compiled_steps(straight), _compiled_steps(resumed)
    assert killed["start_step"] == 0 and after["start_step"] in (4, 8)
    assert first["steps"] == killed["steps"] == after["steps"] and all(first["steps"].values())
    a, b = _saved_state(straight, steps), _saved_state(resumed, steps)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # params, optimizer state, EMA, step
    train_keys = lambda m: {k: v for k, v in m.items() if k.startswith("train/")}  # noqa: E731
    assert [train_keys(m) for m in _metrics(straight)] == [train_keys(m) for m in _metrics(resumed)]


def test_a_resume_with_another_compiled_step_names_the_bucket(tmp_path):
    """The record of compiled steps: a resume with another step (or another jaxlib) says
    so and names the bucket; records of processes after the checkpoint are dropped."""
    assert resume.record_compiled_steps(tmp_path, 0, {"5x16x16": "aaaa"}) == []
    assert resume.record_compiled_steps(tmp_path, 4, {"5x16x16": "aaaa"}) == []
    # A process that started at 8 and was killed before its first checkpoint.
    assert resume.record_compiled_steps(tmp_path, 8, {"5x16x16": "cccc"})
    out = resume.record_compiled_steps(tmp_path, 8, {"5x16x16": "bbbb", "1x16x16": "dddd"})
    assert "steps 5-8" in out[0] and out[1:] == ["  bucket 5x16x16: step aaaa -> bbbb"]
    assert [r["start_step"] for r in _compiled_steps(tmp_path)] == [0, 4, 8]
    lines = (tmp_path / resume.STEPS_FILE).read_text().splitlines()
    mine = json.loads(lines[-1])["jaxlib"]  # this process's jaxlib, as recorded
    old = json.loads(lines[-1]) | {"jaxlib": "0.0.1"}
    (tmp_path / resume.STEPS_FILE).write_text(json.dumps(old) + "\n")
    out = resume.record_compiled_steps(tmp_path, 12, old["steps"])
    assert out[1:] == [f"  jaxlib 0.0.1 -> {mine}"]


def test_step_fingerprint_ignores_source_locations_and_sees_computations():
    """Two compilations of one function, from different source lines, agree; another
    constant does not (the optimized HLO without its source locations)."""

    def compiled(fn):
        return jax.jit(fn).lower(np.ones((8, 8), np.float32)).compile().as_text()

    a = compiled(lambda x: jnp.sin(x) @ x + 1.0)
    b = compiled(
        lambda x: jnp.sin(x) @ x + 1.0  # another line: other metadata
    )
    c = compiled(lambda x: jnp.sin(x) @ x + 2.0)
    assert "FileLocations" in a and a != b
    assert plan.step_fingerprint(a) == plan.step_fingerprint(b) != plan.step_fingerprint(c)


def test_sigterm_saves_the_current_step_and_exits_cleanly(dataset, tmp_path):
    work = _workdir(tmp_path, dataset)
    proc = _train_cli(
        work,
        "--config.total_steps=100000",
        "--config.checkpoint_every_steps=100000",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not ((work / "metrics.jsonl").is_file() and len(_metrics(work)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "preempted: saved step" in out
    saved = int(out.split("preempted: saved step ")[1].split()[0])
    assert (work / "checkpoints" / str(saved)).is_dir() and saved < 100000
    assert ckpt_lib.saved_config(work / "checkpoints", saved)["total_steps"] == 100000


def test_corrupt_latest_checkpoint_is_skipped(dataset, tmp_path, caplog):
    work = _workdir(tmp_path, dataset)
    loop.train(tiny(total_steps=8), work)
    for f in (work / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)  # truncated garbage in every file of the newest step
    summary = loop.train(tiny(total_steps=8), work)  # resumes from 4 and redoes 5..8
    assert "could not be restored" in caplog.text and "/8" in caplog.text
    assert summary["final_step"] == 8
    assert [m["step"] for m in _metrics(work)] == list(range(1, 9))


def test_resume_with_another_model_width_is_refused(dataset, tmp_path):
    work = _workdir(tmp_path, dataset)
    loop.train(tiny(total_steps=4), work)
    with pytest.raises(ValueError, match=r"model\.dim: checkpoint 64 -> now 32"):
        loop.train(tiny(total_steps=8, **{"model.dim": 32, "model.mlp_dim": 128}), work)


def test_init_from_starts_a_run_from_another_runs_parameters(dataset, tmp_path, capsys):
    """Through the loop: the EMA gets buffers of its own (the step donates the state; the
    same buffer donated twice was an error), and the first step starts from the weights."""
    first = _workdir(tmp_path, dataset, "first")
    loop.train(tiny(total_steps=8), first)
    second = _workdir(tmp_path, dataset, "second")
    summary = loop.train(tiny(total_steps=1), second, init_from=str(first))
    assert "init_from" in capsys.readouterr().out and summary["final_step"] == 1
    loaded = _saved_state(first, 8)["params"]
    # EMA after one step: 0.99 loaded + 0.01 (loaded + an update at warmup's lr = 0).
    one_step = _saved_state(second, 1)["ema"]["decay_0p99"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one_step, loaded)


def test_checkpoint_from_8_devices_continues_on_4_2_and_1(dataset, tmp_path, devices):
    """Elastic restore: the restore target is built from the current mesh."""
    work = _workdir(tmp_path, dataset)
    config = tiny(total_steps=4, **{"mesh.ici_fsdp": 8, "mesh.ici_data": 1})
    config.data.global_batch_size = 8
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
    _, _, init_fn, _, _ = setup.setup_state(config, plan.dataset_geometry(config), mesh, rules)
    mngr = ckpt_lib.manager(work / "checkpoints", async_save=False)
    with jax.set_mesh(mesh):  # a state sharded over 8 devices, saved as step 4
        ckpt_lib.save(mngr, 4, state_lib.create_sharded_state(init_fn, mesh, rules, 0), {})
    mngr.close()
    pipe = pipeline_lib.from_config(config, work, data_parallel=8)
    host = pipe.batch_at(4)  # the batch the run would take next
    losses = []
    for n in (8, 4, 2, 1):
        c = tiny(total_steps=4, **{"mesh.ici_fsdp": n, "mesh.ici_data": 1})
        c.data.global_batch_size = 8
        mesh = mesh_lib.create_mesh(c.mesh, devices[:n])
        rules = mesh_lib.logical_rules(c.mesh)
        geometry = plan.dataset_geometry(c)
        model, tx, _, abstract, shardings = setup.setup_state(c, geometry, mesh, rules)
        mngr = ckpt_lib.manager(work / "checkpoints", async_save=False)
        with jax.set_mesh(mesh):
            state, _, step = ckpt_lib.restore(mngr, abstract)
        mngr.close()
        assert step == 4
        leaf = jax.tree.leaves(state.params)[0]
        assert len(leaf.sharding.device_set) == n
        train_step = step_lib.make_train_step(
            model, tx, c, optimizer_lib.learning_rate(c.optimizer, c.total_steps)
        )
        batch = pipeline_lib.to_global_batch(host, mesh, fields=pipe.fields)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            fn = jax.jit(train_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)))
            _, metrics = fn(state, {k: batch[k] for k in pipe.fields})
        losses.append(float(metrics["train/loss"]))
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)


def test_eval_hook_writes_validation_loss_and_samples(dataset, tmp_path):
    work = _workdir(tmp_path, dataset)
    config = tiny(total_steps=4, eval_every_steps=4)
    config.sample.prompts = config.sample.prompts[:2]
    config.sample.num_steps = 2
    loop.train(config, work)
    (row,) = [m for m in _metrics(work) if "eval/val_loss/5x16x16" in m]
    assert row["step"] == 4 and np.isfinite(row["eval/val_loss/5x16x16"])
    assert "eval/val_loss_t=0.5/5x16x16" in row
    assert len(list((work / "samples" / "4").glob("*.mp4"))) == 2
    # The grid reaches TensorBoard as an image: the contact sheet, one row per prompt.
    ((step, image),) = metrics_lib.read_tensorboard(work)["eval/samples"]
    sheet = video_io.read_image(work / "samples" / "4" / "contact_sheet.png")
    assert step == 4 and (image.image.height, image.image.width) == sheet.shape[:2]
    assert (work / "logs" / "host_0.log").is_file()


def test_eval_schedule_runs_each_entry_of_config_evals_on_its_period():
    config = tiny(eval_every_steps=3)  # ignored once config.evals names the evaluations
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(
            dict(
                loss=dict(type="val_loss", every_steps=2),
                fd=dict(type="fvd", every_steps=4, num_videos=4),
                offline=dict(type="reconstruction", every_steps=0),  # sora_jax.evaluate only
            )
        )
    due = {step: sorted(eval_hook.due(config, step)) for step in range(1, 9)}
    assert due == {1: [], 2: ["loss"], 3: [], 4: ["fd", "loss"], 5: [], 6: ["loss"], 7: [],
                   8: ["fd", "loss"]}  # fmt: skip
    config.evals.fd.type = "fdv"
    with pytest.raises(ValueError, match=r"config.evals.fd.type='fdv' is unknown"):
        eval_hook.due(config, 4)
    # Without config.evals: the validation loss and samples every eval_every_steps.
    legacy = tiny(eval_every_steps=3)
    assert [s for s in range(1, 10) if eval_hook.due(legacy, s)] == [3, 6, 9]
    assert not [s for s in range(1, 10) if eval_hook.due(tiny(eval_every_steps=0), s)]
