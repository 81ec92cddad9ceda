"""`python -m sora_jax.sample`: prompt files, request validation before any restore,
image-to-video and continuation, reproducible outputs and their sidecars."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax import video_io
from sora_jax.data import synthetic
from sora_jax.evaluation import generate
from sora_jax.evaluation import requests as requests_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "experiments" / "demo.py")


def _config():
    return config_lib.load_config(f"{DEMO}:tiny")


@pytest.fixture(scope="module")
def gen(tiny_run):
    work, config = tiny_run
    return generate.Generator.from_workdir(work, config, ema_decay=config.sample.ema_decay)


def _options(config, **kw):
    return requests_lib.SampleOptions.from_config(config.sample, num_steps=2, **kw)


# --- Prompt files -----------------------------------------------------------------------


def test_prompt_files_plain_and_jsonl(tmp_path):
    config = _config()
    base = _options(config)
    plain = tmp_path / "prompts.txt"
    plain.write_text("a red square moving left slowly\n\n  a blue circle moving up quickly \n")
    reqs = requests_lib.read_prompts(plain, config, base, start=2)
    assert [r.prompt for r in reqs] == [
        "a red square moving left slowly",
        "a blue circle moving up quickly",
    ]
    assert [r.index for r in reqs] == [2, 3] and reqs[1].source == f"{plain}:3"

    jsonl = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "a red square moving left slowly"},
        {"prompt": "a cyan circle moving up quickly", "seed": 7, "cfg": 1.5, "steps": 3},
        {"prompt": "x", "resolution": "8x12", "num_frames": 9, "shift": 2.0, "image": "a.png"},
        {"prompt": "y", "aspect": "1:1", "video": "/abs/clip.mp4", "cond_frames": 2},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b, c, d = requests_lib.read_prompts(jsonl, config, base, start=0)
    assert a.options == base
    assert (b.options.seed, b.options.cfg_scale, b.options.num_steps) == (7, 1.5, 3)
    assert (c.options.height, c.options.width, c.options.num_frames) == (8, 12, 9)
    assert c.options.shift == 2.0 and c.image == str(tmp_path / "a.png")  # relative to file
    assert d.options.bucket == "5x16x16" and d.video == "/abs/clip.mp4"
    assert d.options.cond_frames == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", ', "not valid JSON"),
        ('{"seed": 1}', 'a "prompt" string'),
        ('{"prompt": "a", "sed": 1}', r"unknown field\(s\) \['sed'\]"),
        ('{"prompt": "a", "resolution": "32"}', "HxW"),
        ('{"prompt": "a", "steps": 2.5}', "steps=2.5 is not of type int"),
        ('{"prompt": "a", "aspect": "16:9"}', "no trained bucket has aspect 16:9"),
    ],
)
def test_bad_prompt_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red square moving left slowly"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        requests_lib.read_prompts(path, _config(), _options(_config()), start=0)


# --- Validation before restore ----------------------------------------------------------


def _vae_config():
    c = ml_collections.ConfigDict(_config().to_dict())
    c.tokenizer = ml_collections.ConfigDict({"name": "vae", "preset": "tiny", "path": ""})
    c.data.buckets = {"9x32x32": {"frames": 9, "height": 32, "width": 32, "weight": 1.0}}
    c.sample.bucket = "9x32x32"
    return c


@pytest.mark.parametrize(
    "make, fields, message",
    [
        (_config, {"num_frames": 6}, r"shape 6x16x16 is outside .*5x16x16 .*allow_untrained"),
        (_config, {"resolution": "18x16"}, "height=18 is not divisible by tokenizer stride 2 x "),
        (_vae_config, {"num_frames": 6}, "1 \\+ 4k .*nearest allowed counts are 5 or 9"),
        (_vae_config, {"resolution": "32x36"}, "width=36 is not divisible"),
    ],
)
def test_bad_requests_fail_before_the_checkpoint_is_touched(
    tiny_run, monkeypatch, make, fields, message
):
    def no_restore(*args, **kwargs):
        raise AssertionError("the checkpoint was restored before validation")

    monkeypatch.setattr(generate.Generator, "from_workdir", no_restore)
    config = make()
    options = requests_lib.with_overrides(config, _options(config), fields)
    request = requests_lib.Request("a red square moving left slowly", options)
    with pytest.raises(ValueError, match=message):
        generate.sample_to_dir(config, tiny_run[0], [], options, requests=[request])


def test_other_request_errors(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(generate.Generator, "from_workdir", None)  # calling it would fail
    config = _config()
    o = _options(config)
    cases = [
        (requests_lib.Request("  ", o), "prompt 0: the prompt is empty"),
        (requests_lib.Request("a", o, image=str(tmp_path / "no.png")), "image file .*no.png"),
        (
            requests_lib.Request("a", requests_lib.with_overrides(config, o, {"num_frames": 1})),
            "outside",
        ),
    ]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            requests_lib.validate_requests(config, tiny_run[0], [request])
    with pytest.raises(FileNotFoundError, match="checkpoints does not exist"):
        requests_lib.validate_requests(config, tmp_path / "nowhere", [cases[0][0]])
    with pytest.raises(ValueError, match="no prompts"):
        requests_lib.validate_requests(config, tiny_run[0], [])
    # The explicit flag allows an untrained (but tokenizer-valid) shape.
    untrained = requests_lib.with_overrides(config, o, {"num_frames": 7, "resolution": "8x12"})
    requests_lib.validate_requests(
        config, tiny_run[0], [requests_lib.Request("a", untrained)], allow_untrained_shape=True
    )


# --- Sampling ---------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_video(gen, tiny_run, tmp_path):
    work, config = tiny_run
    prompts = ["a red square moving left slowly", "a green circle moving up quickly"]

    def run(name, seed):
        out = tmp_path / name
        summary = generate.sample_to_dir(
            config, work, prompts, _options(config, seed=seed), generator=gen, output=out
        )
        return [pathlib.Path(v).read_bytes() for v in summary["videos"]], summary

    a, summary = run("a", 0)
    b, _ = run("b", 0)
    c, _ = run("c", 1)
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    assert summary["params_sha256"] == generate.params_sha256(gen.params)
    sidecar = json.loads(pathlib.Path(summary["videos"][1]).with_suffix(".json").read_text())
    for key in ("step", "params_sha256", "seed", "sampler", "num_steps", "cfg_scale", "shift"):
        assert key in sidecar, key
    assert sidecar["index"] == 1 and sidecar["prompt"] == prompts[1]
    assert sidecar["shape"] == [5, 16, 16, 3] and sidecar["shift_alpha"] == 3.0


def test_params_hash_is_of_the_values():
    params = {"a": np.arange(3, dtype=np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
    h = generate.params_sha256(params)
    assert h == generate.params_sha256({"b": params["b"], "a": params["a"].copy()})
    params["b"]["c"][0, 1] = 1.0 + 1e-7
    assert generate.params_sha256(params) != h


def _first_frame(index=3, size=(5, 16, 16)):
    return synthetic.synthetic_clip(index, 0, *size)["video"]


def test_image_to_video_keeps_the_image_as_first_frame(gen, tiny_run, tmp_path):
    work, config = tiny_run
    clip = _first_frame(size=(5, 24, 32))  # another size: centre-cropped and resized
    png = video_io.write_png(tmp_path / "first.png", clip[0])
    o = _options(config)
    request = requests_lib.Request("a red square moving left slowly", o, image=str(png))
    given, task, k = requests_lib.load_given_pixels(request, gen.tokenizer, 5, 16, 16)
    want = video_io.fit_frames(video_io.read_image(png)[None], 16, 16)[0] / 127.5 - 1.0
    assert (task, k, given.shape) == ("i2v", 1, (1, 16, 16, 3))
    video, _ = gen.generate([request.prompt], o, given=given[None], task=task)
    # The pixels tokenizer reconstructs exactly: the given frame comes back unchanged.
    np.testing.assert_allclose(video[0, 0], want, atol=1e-5)
    assert np.abs(video[0, 1:] - want).max() > 0.1  # the other frames are generated

    summary = generate.sample_to_dir(
        config, work, [], o, requests=[request], generator=gen, output=tmp_path / "out"
    )
    frames = video_io.read_video(summary["videos"][0])
    scale = config.sample.video_scale
    first = video_io.to_uint8(np.repeat(np.repeat(want, scale, 0), scale, 1)).astype(int)
    assert np.abs(frames[0].astype(int) - first).mean() < 3  # H.264 at CRF 18
    sidecar = json.loads(pathlib.Path(summary["videos"][0]).with_suffix(".json").read_text())
    assert sidecar["task"] == "i2v" and sidecar["image"] == str(png)
    assert sidecar["image_sha256"] == generate.sha256_file(png)


def test_continuation_keeps_the_last_frames_of_the_video(gen, tiny_run, tmp_path):
    work, config = tiny_run
    path = video_io.write_video(tmp_path / "in.gif", _first_frame(size=(9, 16, 16)))
    o = _options(config, cond_frames=3)
    request = requests_lib.Request("a red square moving left slowly", o, video=str(path))
    given, task, k = requests_lib.load_given_pixels(request, gen.tokenizer, 5, 16, 16)
    frames = video_io.read_video(path).astype(np.float32) / 127.5 - 1.0
    assert (task, k) == ("continuation", 3)
    np.testing.assert_allclose(given, frames[-3:], atol=1e-6)  # the last 3 (r = 1) frames
    video, _ = gen.generate([request.prompt], o, given=given[None], task=task)
    np.testing.assert_allclose(video[0, :3], frames[-3:], atol=1e-5)


# --- The command line -------------------------------------------------------------------


def _cli(work, *extra):
    return subprocess.run(
        [sys.executable, "-m", "sora_jax.sample", f"--config={DEMO}:tiny", f"--workdir={work}"]
        + list(extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )


def test_cli_prompt_file_gif_sidecars_and_time_split(tiny_run, tmp_path):
    work, _ = tiny_run
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a red square moving left slowly"},
        {"prompt": "a green circle moving up quickly", "seed": 5},
        {"prompt": "a blue triangle moving down slowly", "cfg": 1.0},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    flags = ("--steps=2", "--batch_size=1", "--gif", f"--output={out}")
    proc = _cli(work, f"--prompts={prompts}", *flags)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert len(summary["videos"]) == 3
    for key in ("text_encode_s", "denoise_s", "denoise_per_step_s", "decode_s", "write_s"):
        assert summary["timings"][key] >= 0, key
    assert "batch 1/3" in proc.stderr and "ETA" in proc.stderr and "ms/step" in proc.stderr
    for video in summary["videos"]:
        assert pathlib.Path(video).with_suffix(".gif").is_file()
    paths = [pathlib.Path(v).with_suffix(".json") for v in summary["videos"]]
    sidecars = [json.loads(p.read_text()) for p in paths]
    assert [s["seed"] for s in sidecars] == [0, 5, 0]
    assert [s["cfg_scale"] for s in sidecars] == [3.0, 3.0, 1.0]
    assert {s["params_sha256"] for s in sidecars} == {summary["params_sha256"]}
    assert (out / "contact_sheet.png").is_file()


def test_cli_rejects_a_bad_request_with_exit_code_2(tiny_run):
    proc = _cli(tiny_run[0], "--prompt=a red square moving left slowly", "--resolution=18x16")
    assert proc.returncode == 2
    assert "height=18 is not divisible" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_without_config_uses_the_run_config(tiny_run, tmp_path):
    work, config = tiny_run
    run = tmp_path / "run"
    shutil.copytree(work, run)
    out = tmp_path / "out"
    args = ["--prompt=a red square moving left slowly", "--steps=2", f"--output={out}"]
    cmd = [sys.executable, "-m", "sora_jax.sample", f"--workdir={run}", *args]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "--config is required" in proc.stderr  # no config.json
    config_lib.write_run_files(run, config, ["train"])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"{run / 'config.json'}" in proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    # The same video as with the experiment file's config.
    ref = _cli(work, *args[:2], f"--output={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    want = json.loads(ref.stdout[ref.stdout.index("{") :])
    assert summary["params_sha256"] == want["params_sha256"]
    a, b = (video_io.read_video(s["videos"][0]) for s in (summary, want))
    np.testing.assert_array_equal(a, b)


def test_cli_step_cache_is_switched_by_a_flag_and_recorded(tiny_run, tmp_path):
    """The flag reaches the sampler through `sample.cache_threshold` (what the sidecar
    records; the cache itself is tested in tests/diffusion/test_sampler.py)."""
    work, _ = tiny_run
    proc = _cli(work, "--prompt=a red square moving left slowly", "--cache_threshold=-1")
    assert proc.returncode == 2 and "--cache_threshold=-1.0 must be >= 0" in proc.stderr
    out = tmp_path / "out"
    args = ("--prompt=a red square moving left slowly", "--steps=3", f"--output={out}")
    proc = _cli(work, *args, "--cache_threshold=1e9")  # every step reuses step 0's velocity
    assert proc.returncode == 0, proc.stderr
    path = json.loads(proc.stdout[proc.stdout.index("{") :])["videos"][0]
    sidecar = json.loads(pathlib.Path(path).with_suffix(".json").read_text())
    assert sidecar["cache_threshold"] == 1e9
