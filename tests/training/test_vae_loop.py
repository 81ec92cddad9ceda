"""A causal-VAE run goes through the one training loop (training/loop.py, the family in
training/vae.py) and gets the guarantees of a DiT run (tests/training/test_loop.py):
SIGTERM saves and exits, non-finite updates are skipped and a streak rolls back, a corrupt
checkpoint is skipped, a structure-changing resume is refused, `--init_from` loads another
run's parameters, and a resume continues exactly as an uninterrupted run."""

import importlib.util
import os
import pathlib
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sora_jax.data import pipeline as pipeline_lib
from sora_jax.models import vae as vae_lib
from sora_jax.training import loop
from sora_jax.training import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Two levels, no extra residual blocks: compiles in seconds (tests/models/test_vae.py).
SMALL = vae_lib.VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=0,
                          temporal_downsample=(True,))  # fmt: skip


def vae_config(**overrides):
    spec = importlib.util.spec_from_file_location("vae_experiment", ROOT / "experiments/vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny,steps=8")
    config.model.preset = None
    for field, value in vars(SMALL).items():
        config.model[field] = value
    config.data.source.num_clips = 8  # = the batch: every step sees the same 8 clips
    config.data.eval_clips = 8
    config.export.norm_clips = 8
    config.optimizer.lr = 3e-3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 4
    config.update_from_flattened_dict(overrides)  # dotted keys, e.g. 'data.source.seed'
    return config


def _metrics(work):
    """The lines of `metrics.jsonl` by step (the end's evaluation line merged in)."""
    out = {}
    for m in metrics_lib.read_metrics(work):
        out.setdefault(m["step"], {}).update(m)
    return out


def _poison(monkeypatch, steps):
    """NaN pixels in the batches of the given steps (counted after the step, as metrics;
    a fresh run, so the n-th batch is step n's)."""
    real, calls = pipeline_lib.to_global_batch, []

    def poisoned(host, mesh, **kw):
        calls.append(1)
        if len(calls) in steps:
            host = dict(host, video=np.full_like(host["video"], np.nan))
        return real(host, mesh, **kw)

    monkeypatch.setattr(pipeline_lib, "to_global_batch", poisoned)


def test_sigterm_saves_the_current_step_and_exits_without_export(tmp_path, monkeypatch):
    """A real SIGTERM to this process in the middle of step 3's batch: the loop's handler
    takes it (a fallback handler records it if none does), saves step 3 and stops."""
    fallback = []
    previous = signal.signal(signal.SIGTERM, lambda *a: fallback.append(a))
    real, calls = pipeline_lib.to_global_batch, []

    def signalled(host, mesh, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(host, mesh, **kw)

    monkeypatch.setattr(pipeline_lib, "to_global_batch", signalled)
    try:
        summary = loop.train(vae_config(), tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not fallback, "SIGTERM reached the fallback handler, not the loop's"
    assert summary["preempted"] and summary["final_step"] == 3
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert not (tmp_path / "tokenizer").exists()  # a preempted run does not export
    monkeypatch.setattr(pipeline_lib, "to_global_batch", real)
    summary = loop.train(vae_config(), tmp_path)  # the same command finishes the run
    assert summary["final_step"] == 8 and (tmp_path / "tokenizer").is_dir()
    # ... exactly as an uninterrupted run: state, metrics and the exported tokenizer.
    straight = loop.train(vae_config(), tmp_path / "straight")
    a, b = (ocp.StandardCheckpointer().restore(w / "checkpoints" / "8" / "state")
            for w in (tmp_path / "straight", tmp_path))  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, a, b)
    train = lambda w: {s: {k: v for k, v in m.items() if k.startswith("train/")}  # noqa: E731
                       for s, m in _metrics(w).items()}  # fmt: skip
    assert train(tmp_path / "straight") == train(tmp_path) and sorted(train(tmp_path)) == [
        *range(1, 9)
    ]
    assert straight["hash"] == summary["hash"]


def test_non_finite_updates_are_skipped_and_a_streak_rolls_back(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, (5, 6))
    config = vae_config(log_every_steps=4, checkpoint_every_steps=2)
    config.training = {"max_consecutive_skips": 2}
    summary = loop.train(config, tmp_path)
    assert summary["skipped_updates"] == 2 and summary["rollbacks"] == 1
    assert "rollback: steps 5-6 skipped; parameters of step 4" in capsys.readouterr().out
    m = _metrics(tmp_path)
    assert m[8]["train/skipped"] == 2 and m[8]["train/rollbacks"] == 1
    assert summary["final_step"] == 8 and np.isfinite(summary["eval/psnr"])


def test_corrupt_latest_checkpoint_is_skipped(tmp_path, caplog):
    loop.train(vae_config(), tmp_path)
    for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)  # truncated garbage in every file of the newest step
    summary = loop.train(vae_config(), tmp_path)  # resumes from 4 and redoes 5..8
    assert "could not be restored" in caplog.text and "/8" in caplog.text
    assert summary["final_step"] == 8
    assert sorted(_metrics(tmp_path)) == list(range(1, 9))


def test_resume_with_another_width_is_refused(tmp_path):
    loop.train(vae_config(total_steps=4), tmp_path)
    with pytest.raises(ValueError, match=r"model\.base_dim: checkpoint 4 -> now 8"):
        loop.train(vae_config(total_steps=8, **{"model.base_dim": 8}), tmp_path)


def test_init_from_loads_the_parameters_of_another_run(tmp_path, capsys):
    first = tmp_path / "first"
    loop.train(vae_config(), first)
    second = tmp_path / "second"
    loop.train(vae_config(total_steps=1), second, init_from=str(first))
    assert "init_from" in capsys.readouterr().out
    # Step 1 of the second run starts from the first run's trained weights.
    assert _metrics(second)[1]["train/loss"] < 0.9 * _metrics(first)[1]["train/loss"]
