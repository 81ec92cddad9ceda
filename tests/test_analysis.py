"""sora_jax.analysis: runs, sweeps, config diffs, parameters from any mesh, datasets, plots
and inline videos, on small workdirs written here."""

import base64
import json
import pathlib
import re

import jax
import numpy as np
import pytest

pytest.importorskip("pandas", reason="pip install -e '.[notebooks]'")
matplotlib = pytest.importorskip("matplotlib", reason="pip install -e '.[notebooks]'")
matplotlib.use("Agg")  # no display in tests

from sora_jax import analysis, video_io  # noqa: E402
from sora_jax import config as config_lib  # noqa: E402
from sora_jax.data import tokenization  # noqa: E402
from sora_jax.parallel import mesh as mesh_lib  # noqa: E402
from sora_jax.run import checkpoint as ckpt_lib  # noqa: E402
from sora_jax.run import setup  # noqa: E402
from sora_jax.run import train_state as state_lib  # noqa: E402
from sora_jax.training import plan  # noqa: E402

DEMO = str(pathlib.Path(__file__).resolve().parent.parent / "experiments" / "demo.py")


def _tiny():
    return config_lib.load_config(f"{DEMO}:tiny")


def _write_config(workdir: pathlib.Path, config) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(config)))


def _write_metrics(workdir: pathlib.Path, rows: list[dict], tail: str = "") -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (workdir / "metrics.jsonl").write_text(text)


# --- Parameters from a checkpoint saved on an 8-device FSDP mesh -----------------------


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory, devices):
    config = _tiny()
    config.mesh.ici_data = 1
    config.mesh.ici_fsdp = 8
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
    _, _, init_fn, _, _ = setup.setup_state(config, plan.dataset_geometry(config), mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, seed=3)
    key = state_lib.ema_key(config.sample.ema_decay)
    # An EMA unlike the parameters, so a test can tell which tree came back.
    with jax.set_mesh(mesh):
        state = state.replace(ema={key: jax.tree.map(lambda x: x + 1.0, state.params)})
    sharded = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
    assert sharded, "the fsdp=8 state has no sharded leaf: the test would prove nothing"
    workdir = tmp_path_factory.mktemp("fsdp") / "run"
    mngr = ckpt_lib.manager(workdir / "checkpoints", async_save=False)
    with jax.set_mesh(mesh):
        ckpt_lib.save(mngr, 6, state, {"next_step": 6}, config_lib.to_dict(config))
    mngr.close()
    return workdir, jax.device_get(state.params), jax.device_get(state.ema[key])


def _assert_tree_equal(got, want):
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    assert flat_got.keys() == flat_want.keys()
    for path, leaf in flat_want.items():
        assert isinstance(flat_got[path], np.ndarray), jax.tree_util.keystr(path)
        assert flat_got[path].shape == leaf.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(flat_got[path], leaf, err_msg=jax.tree_util.keystr(path))


def test_load_params_from_fsdp8_onto_one_cpu(fsdp_checkpoint):
    workdir, params, ema = fsdp_checkpoint
    # Default: the EMA named by the saved config's sample.ema_decay.
    _assert_tree_equal(analysis.load_params(workdir), ema)
    _assert_tree_equal(analysis.load_params(workdir / "checkpoints", ema=False), params)
    _assert_tree_equal(analysis.load_params(workdir / "checkpoints" / "6", ema=0.99), ema)


def test_load_params_errors_name_what_to_give(fsdp_checkpoint, tmp_path):
    workdir, _, _ = fsdp_checkpoint
    with pytest.raises(ValueError, match=r"no EMA decay_0p5; it has \['decay_0p99'\]"):
        analysis.load_params(workdir, ema=0.5)
    with pytest.raises(FileNotFoundError, match="give a run's workdir"):
        analysis.load_params(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"steps there are \[6\]"):
        analysis.load_params(workdir, step=7)


# --- Runs --------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    work = tmp_path / "run"
    _write_config(work, _tiny())
    train = {"train/loss": 2.0, "train/loss/5x16x16": 2.0, "train/lr": 1e-4}
    _write_metrics(
        work,
        [
            {"step": 2, **train, "train/loss_t/0.00-0.50": 1.5, "perf/steps_per_s": 3.0},
            {"step": 4, **train, "train/loss": 1.0, "train/loss_t/0.00-0.50": 1.2},
            {"step": 4, "eval/val_loss/5x16x16": 1.1, "eval/val_loss_t=0.5/5x16x16": 1.3},
        ],
        tail='{"step": 6, "train/lo',  # the line a running job is writing
    )
    (work / "checkpoints" / "4").mkdir(parents=True)
    (work / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # a save in progress
    video = np.zeros((3, 8, 8, 3), np.uint8)
    video_io.write_video(work / "samples" / "4" / "000_a_red_square.mp4", video)
    (work / "samples" / "4" / "000_a_red_square.json").write_text('{"prompt": "a red square"}')
    (work / "eval").mkdir()
    (work / "eval" / "4.json").write_text('{"scores": {"both": 0.5}}')
    (work / "eval" / "10.json").write_text('{"scores": {"both": 0.75}}')
    return work


def test_load_run_reads_every_file(run_dir):
    run = analysis.load_run(run_dir)
    assert run.name == "run" and run.config.model.dim == 64
    assert list(run.metrics.index) == [2, 4]  # eval row merged, partial line left out
    assert run.metrics.loc[4, "train/loss"] == 1.0
    assert run.metrics.loc[4, "eval/val_loss/5x16x16"] == 1.1
    assert np.isnan(run.metrics.loc[2, "eval/val_loss/5x16x16"])
    assert run.checkpoints == [4]
    (sample,) = run.samples[4]
    assert sample["path"].name == "000_a_red_square.mp4"
    assert sample["sidecar"] == {"prompt": "a red square"}
    assert list(run.evals) == [4, 10]  # by step, not by file name
    assert run.evals[10] == {"scores": {"both": 0.75}}
    assert run.columns("train/loss_t/") == ["train/loss_t/0.00-0.50"]


def test_load_run_errors(run_dir, tmp_path):
    text = (run_dir / "metrics.jsonl").read_text().replace('"step": 2,', '"step": 2,,', 1)
    (run_dir / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{run_dir / 'metrics.jsonl'}:1 is not")):
        analysis.load_run(run_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(config_lib.ConfigError, match="config.json does not exist"):
        analysis.load_run(tmp_path / "empty")


def test_plots_draw_the_logged_metrics(run_dir):
    run = analysis.load_run(run_dir)
    ax = analysis.plot_loss(run).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["train/loss", "train/loss/5x16x16", "eval/val_loss/5x16x16"]
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [2.0, 1.0])
    over_steps, over_t = analysis.plot_loss_per_timestep(run).axes
    assert [line.get_label() for line in over_steps.get_lines()] == ["0.00-0.50"]
    np.testing.assert_array_equal(over_t.get_lines()[0].get_xdata(), [0.25])  # bin middle
    np.testing.assert_array_equal(over_t.get_lines()[1].get_ydata(), [1.3])  # validation
    assert [a.get_title() for a in analysis.plot_throughput(run).axes] == ["perf/steps_per_s"]
    assert analysis.plot_lr(run).axes[0].get_lines()[0].get_ydata().tolist() == [1e-4, 1e-4]
    with pytest.raises(ValueError, match="no train/loss columns"):
        analysis.plot_loss(run.metrics.drop(columns=["train/loss", "train/loss/5x16x16"]))


# --- Configs and sweeps --------------------------------------------------------------


def test_config_diff_finds_changed_and_missing_fields(run_dir):
    a, b = _tiny(), _tiny()
    b.optimizer.lr = 3e-4
    with b.unlocked():
        b.model.extra = 1
    diff = analysis.config_diff(a, b)
    assert list(diff.index) == ["model.extra", "optimizer.lr"]
    assert diff.loc["optimizer.lr"].tolist() == [1e-3, 3e-4]
    assert diff.loc["model.extra"].tolist() == ["<missing>", 1]
    # A run's config.json against the config it came from: tuples and lists compare equal.
    assert analysis.config_diff(analysis.load_run(run_dir), a).empty
    assert list(analysis.config_diff(run_dir, b, ("run", "b")).columns) == ["run", "b"]


def test_load_sweep_one_row_per_job(tmp_path):
    root = tmp_path / "sweep"
    jobs, config = {}, _tiny()
    config.total_steps = 6  # the job's final checkpoint is checkpoints/6
    for name, lr, losses in (("lr_0.001", 1e-3, [2.0, 1.5, 1.7]), ("lr_0.01", 1e-2, [2.0])):
        work = root / name
        _write_config(work, config)
        _write_metrics(work, [{"step": 2 * (i + 1), "train/loss": v} for i, v in enumerate(losses)])
        # Relative as a sweep launched from another directory records it.
        record = {"overrides": {"optimizer.lr": lr}, "total_steps": 6, "state": "done"}
        jobs[name] = {**record, "workdir": f"elsewhere/{name}"}
    (root / "lr_0.001" / "checkpoints" / "6").mkdir(parents=True)  # finished
    (root / "lr_0.001" / "eval").mkdir()
    (root / "lr_0.001" / "eval" / "6.json").write_text('{"scores": {"both": 0.25, "n": 8}}')
    (root / "sweep.json").write_text(json.dumps({"config": "x.py", "jobs": jobs}))

    df = analysis.load_sweep(root / "sweep.json")
    assert list(df.index) == ["lr_0.001", "lr_0.01"]
    assert df.attrs["overrides"] == ["optimizer.lr"]
    assert df["optimizer.lr"].tolist() == [1e-3, 1e-2]
    assert df["state"].tolist() == ["done", "stopped"]  # lr_0.01 lacks its final checkpoint
    assert df.loc["lr_0.001", "final train/loss"] == 1.7
    assert df.loc["lr_0.001", "best train/loss"] == 1.5
    assert df.loc["lr_0.001", "best step"] == 4
    assert df.loc["lr_0.001", "score/both"] == 0.25
    assert df.loc["lr_0.01", "workdir"] == str(root / "lr_0.01")
    ax = analysis.plot_sweep(df).axes[0]
    assert ax.get_xscale() == "log"  # 1e-3 .. 1e-2 spans a decade
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [1.7, 2.0])
    assert len(analysis.plot_sweep_curves(df).axes[0].get_lines()) == 2
    with pytest.raises(ValueError, match="x='model.dim' is not a column"):
        analysis.plot_sweep(df, x="model.dim")


# --- Datasets and videos ---------------------------------------------------------------


def test_dataset_records_decode_to_their_clips(tmp_path):
    config = _tiny()
    config.data.source.num_clips = 8
    _write_config(tmp_path / "run", config)
    tokenization.run(config, tmp_path / "run", process_index=0, process_count=1)
    data = tmp_path / "run" / "data"
    table = analysis.dataset_table(data)
    assert table.loc["5x16x16", "clips"] == 8
    assert table.loc["5x16x16", "latent_shape"] == (5, 8, 8, 12)
    records = analysis.read_records(data, "5x16x16", n=3)
    assert len(records) == 3 and all(r["caption"] for r in records)
    videos = analysis.decode_records(records, analysis.dataset_tokenizer(data))
    assert videos.shape == (3, 5, 16, 16, 3)
    assert videos.min() >= -1.0 and videos.max() <= 1.0 and videos.std() > 0
    other = _tiny()
    other.tokenizer.space_to_depth = 4
    with pytest.raises(ValueError, match="pixels-s2d2 .* the config's tokenizer is pixels-s2d4"):
        analysis.dataset_tokenizer(data, other)
    with pytest.raises(KeyError, match="no bucket '9x32x32'"):
        analysis.read_records(data, "9x32x32")


def test_video_html_embeds_a_playable_video(tmp_path):
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    frames[:, :4] = 255  # top half white
    page = analysis.video_html(frames, fps=4, title="half <white>")
    assert "<video" in page and "half &lt;white&gt;" in page
    data = re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1)
    (tmp_path / "back.mp4").write_bytes(base64.b64decode(data))
    back = video_io.read_video(tmp_path / "back.mp4")
    assert back.shape == (4, 8, 8, 3)
    assert back[:, :4].mean() > 200 and back[:, 4:].mean() < 50
    gif = video_io.write_video(tmp_path / "clip.gif", frames)
    assert analysis.video_html(gif).count("data:image/gif;base64,") == 1


def test_show_videos_uses_mediapy_for_frames_when_it_has_ffmpeg(monkeypatch, tmp_path):
    import IPython.display
    import mediapy

    shown, calls = [], []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    frames = np.zeros((2, 4, 4, 3), np.float32)  # grey in [-1, 1]
    monkeypatch.setattr(mediapy, "video_is_available", lambda: True)
    monkeypatch.setattr(mediapy, "show_videos", lambda *a, **k: calls.append((a, k)))
    analysis.show_videos([frames], ["grey"], fps=4)
    ((args, kwargs),) = calls
    assert args[0][0].dtype == np.uint8 and args[1] == ["grey"] and kwargs["fps"] == 4
    assert shown == []
    # Without ffmpeg the same frames become an HTML5 <video>; files always do.
    monkeypatch.setattr(mediapy, "video_is_available", lambda: False)
    path = video_io.write_video(tmp_path / "a.mp4", frames)
    analysis.show_videos([frames])
    analysis.show_video({"path": path, "sidecar": {"prompt": "a grey clip"}})
    assert len(calls) == 1 and len(shown) == 2
    assert all(page.data.count("<video") == 1 for page in shown)
    assert "a grey clip" in shown[1].data
