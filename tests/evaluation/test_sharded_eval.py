"""Item evaluators: sharded over processes, resumable after an interruption, and the same
numbers however the items were split. Every report records exactly what was computed: its
protocol is the one in protocol.json, its seeds regenerate the prompts, noise and batches
that were scored, and sampling options appear only where something was sampled."""

import dataclasses
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from sora_jax import video_io
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import synthetic
from sora_jax.diffusion import flow, validation
from sora_jax.evaluation import adherence, evaluators, generate, item_evaluators
from sora_jax.evaluation import items as items_lib
from sora_jax.evaluation import requests as requests_lib

SAMPLE_OPTION_NAMES = {f.name for f in dataclasses.fields(requests_lib.SampleOptions)}


def test_shard_ranges_are_contiguous_and_cover_every_item():
    for n, count in [(10, 3), (7, 7), (2, 4), (96, 8)]:
        blocks = [items_lib.shard_range(n, p, count) for p in range(count)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert all(b.step == 1 for b in blocks)
    with pytest.raises(ValueError, match="process_index=3"):
        items_lib.shard_range(10, 3, 3)


@pytest.fixture(scope="module")
def setup(tiny_run):
    work, config = tiny_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.type = "fvd"
    config.evaluate.fvd_features = "random_conv"
    config.evaluate.num_videos = 6
    config.sample.batch_size = 4
    gen = generate.Generator.from_workdir(work, config, ema_decay=config.sample.ema_decay)
    options = requests_lib.SampleOptions.from_config(config.sample, num_steps=2)
    return work, config, gen, options


def _evaluate(setup, eval_dir, **kw):
    work, config, gen, options = setup
    return evaluators.evaluate(config, work, options, generator=gen, eval_dir=eval_dir, **kw)


def test_interrupted_and_split_runs_give_the_uninterrupted_numbers(setup, tmp_path):
    full = _evaluate(setup, tmp_path / "full")
    assert full["computed"] == 6 and full["scores"]["n"] == 6
    assert full["scores"]["features"] == "random_conv" and full["scores"]["feature_dim"] == 256
    assert np.isfinite(full["scores"]["fd_random_conv"]) and full["scores"]["fd_random_conv"] > 0
    assert not [k for k in full["scores"] if k.startswith("fvd")]  # random features: no FVD
    assert full["protocol"]["reference"] == "synthetic"  # the synthetic data has no split
    written = json.loads((tmp_path / "full" / f"{full['checkpoint_step']}.json").read_text())
    assert written["scores"]["fd_random_conv"] == full["scores"]["fd_random_conv"]
    assert written["protocol"]["features"] == "random_conv"
    assert written["protocol"]["num_items"] == 6

    # Killed after 3 items: no report yet, the rest are listed as missing.
    part = _evaluate(setup, tmp_path / "resumed", stop_after=3)
    assert part["computed"] == 3 and part["missing"] == [3, 4, 5] and "scores" not in part
    assert not (tmp_path / "resumed" / f"{full['checkpoint_step']}.json").exists()
    again = _evaluate(setup, tmp_path / "resumed")
    assert again["computed"] == 3  # only the missing items
    assert again["scores"]["fd_random_conv"] == pytest.approx(
        full["scores"]["fd_random_conv"], rel=1e-9, abs=1e-12
    )

    # Two processes sharing the items: process 1 first, then process 0 aggregates.
    one = _evaluate(setup, tmp_path / "split", process_index=1, process_count=2)
    assert one == {**one, "computed": 3} and "scores" not in one
    zero = _evaluate(setup, tmp_path / "split", process_index=0, process_count=2)
    assert zero["computed"] == 3
    assert zero["scores"]["fd_random_conv"] == pytest.approx(
        full["scores"]["fd_random_conv"], rel=1e-9, abs=1e-12
    )
    items = tmp_path / "split" / str(full["checkpoint_step"]) / "fvd"
    assert (items / "done-0.txt").read_text().split() == ["0", "1", "2"]
    assert (items / "done-1.txt").read_text().split() == ["3", "4", "5"]

    # A re-run with another protocol is refused instead of mixing results.
    work, config, gen, options = setup
    other = requests_lib.SampleOptions.from_config(config.sample, num_steps=3)
    with pytest.raises(ValueError, match="another protocol"):
        evaluators.evaluate(config, work, other, generator=gen, eval_dir=tmp_path / "full")


def test_adherence_items_aggregate_like_the_whole_set(setup, tmp_path):
    work, config, gen, options = setup
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.type = "prompt_adherence"
    config.evaluate.num_videos = 3
    report = evaluators.evaluate(config, work, options, generator=gen, eval_dir=tmp_path)
    prompts = item_evaluators._adherence_prompts(config)
    videos, _ = gen.generate(prompts, options, pad_to=4)
    from sora_jax.evaluation import adherence

    want = adherence.score(videos, prompts)
    assert report["scores"] == json.loads(json.dumps(want))


def _written(report) -> tuple[dict, dict]:
    """The report as written to <step>.json, and its items' protocol.json (or None)."""
    written = json.loads(pathlib.Path(report["path"]).read_text())
    items = report.get("items_dir")
    recorded = json.loads((pathlib.Path(items) / "protocol.json").read_text()) if items else None
    return written, recorded


def test_adherence_report_records_the_prompts_and_sampling_it_used(setup, tmp_path):
    work, config, gen, _ = setup
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.type = "prompt_adherence"
    config.evaluate.num_videos = 3
    config.evaluate.seed = 5  # prompt seed, sample seed and evaluate.seed all differ
    options = requests_lib.SampleOptions.from_config(
        config.sample, num_steps=2, seed=7, cond_frames=1
    )
    written, recorded = _written(
        evaluators.evaluate(config, work, options, generator=gen, eval_dir=tmp_path)
    )
    p = written["protocol"]
    assert p == recorded  # one record of the protocol, not two that disagree
    assert p["params_sha256"] == gen.params_hash

    # The recorded prompt seed gives the captions that were scored.
    prompts = [synthetic.clip_spec(i, p["prompt_seed"]).caption for i in range(p["num_items"])]
    assert prompts == [r["caption"] for r in written["scores"]["per_video"]]

    # Only the options a text-to-video sample uses (no cond_frames), with their values;
    # sampling again from the record alone gives the videos that were scored.
    used = dict(num_steps=2, cfg_scale=options.cfg_scale, sampler=options.sampler, seed=7)
    assert p["sampling"] == {**used, "shift": options.shift}
    assert not SAMPLE_OPTION_NAMES & set(p)
    t, h, w = p["clip_shape"]
    again = requests_lib.SampleOptions(**p["sampling"], num_frames=t, height=h, width=w)
    videos, _ = gen.generate(prompts, again, pad_to=config.sample.batch_size)
    want = adherence.score(videos, prompts)
    assert written["scores"] == json.loads(json.dumps(want))


def test_reconstruction_report_records_no_sampling_options(tiny_run, tmp_path):
    work, config = tiny_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.type = "reconstruction"
    config.evaluate.num_videos = 2
    options = requests_lib.SampleOptions.from_config(config.sample, num_steps=3)
    written, recorded = _written(evaluators.evaluate(config, work, options, eval_dir=tmp_path))
    p = written["protocol"]
    assert p == recorded
    assert "sampling" not in p and not SAMPLE_OPTION_NAMES & set(p), sorted(p)


def test_val_loss_report_records_the_batches_noise_and_times_it_used(setup, tmp_path):
    work, config, gen, _ = setup
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.type = "val_loss"
    options = requests_lib.SampleOptions.from_config(config.sample, num_steps=2)
    report = evaluators.evaluate(config, work, options, generator=gen, eval_dir=tmp_path)
    written, _ = _written(report)
    p = written["protocol"]
    assert "sampling" not in p and not SAMPLE_OPTION_NAMES & set(p), sorted(p)
    assert p["times"] == list(validation.DEFAULT_TIMES)
    assert p["split"] == "train"  # no held-out split in the synthetic data

    # The loss of each recorded batch with the recorded noise seed, times and task is the
    # score: the record is enough to compute the numbers again.
    pipe = pipeline_lib.from_config(config, work, data_parallel=1)
    try:
        batches = {key: pipe.batch_at(b["step"]) for key, b in p["batches"].items()}
    finally:
        pipe.close()
    scored = [k.removeprefix("val_loss/") for k in written["scores"] if k.startswith("val_loss/")]
    assert sorted(batches) == sorted(scored)
    for key, host in batches.items():
        assert host["bucket"] == key and len(host["latents"]) == p["batches"][key]["rows"]
        batch = {k: np.asarray(host[k]) for k in ("latents", "text", "text_mask")}
        alpha = flow.shift_alpha(
            config.diffusion, batch["latents"].shape[1:], tuple(config.model.patch_size)
        )
        want = validation.validation_loss(
            gen.apply_fn, jax.device_get(gen.params), batch, jax.random.key(p["noise_seed"]),
            config.diffusion, alpha, p["times"], task=p["task"],
            cond_channels=int(config.model.get("cond_channels", 0) or 0),
        )  # fmt: skip
        assert written["scores"][f"val_loss/{key}"] == pytest.approx(float(want["loss"]), rel=1e-5)


def test_reconstruction_uses_held_out_clips(tiny_run, tmp_path):
    work, config = tiny_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.type = "reconstruction"
    config.evaluate.num_videos = 4
    options = requests_lib.SampleOptions.from_config(config.sample)
    report = evaluators.evaluate(config, work, options, eval_dir=tmp_path)
    # The pixels tokenizer is exact: PSNR at its 100 dB cap, SSIM 1.
    assert report["scores"]["psnr"] == pytest.approx(100.0)
    assert report["scores"]["ssim"] == pytest.approx(1.0)
    seed = report["protocol"]["held_out_seed"]
    assert (
        seed
        == config.data.source.seed + item_evaluators.HELD_OUT_SEED_OFFSET + config.evaluate.seed
    )
    training = {synthetic.clip_spec(i, config.data.source.seed) for i in range(32)}
    assert not training & {synthetic.clip_spec(i, seed) for i in range(4)}


def test_samples_evaluator_writes_the_grid_it_reports(setup, tmp_path):
    work, config, gen, options = setup
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.type = "samples"
    config.sample.prompts = list(config.sample.prompts)[:2]
    report = evaluators.evaluate(config, work, options, generator=gen, eval_dir=tmp_path)
    assert report["scores"] == {"num_videos": 2} and len(report["videos"]) == 2
    assert report["protocol"]["prompts"] == list(config.sample.prompts)
    assert all(pathlib.Path(v).is_file() for v in report["videos"])
    sheet = video_io.read_image(report["contact_sheet"])
    assert sheet.ndim == 3 and sheet.dtype == np.uint8  # what the trainer logs as an image
    config.sample.prompts = []
    with pytest.raises(ValueError, match="config.sample.prompts"):
        evaluators.evaluate(config, work, options, generator=gen, eval_dir=tmp_path)
