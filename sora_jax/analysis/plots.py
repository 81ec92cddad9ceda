"""Tokenized datasets, plots (matplotlib Figures) and inline videos (sora_jax.analysis)."""

from __future__ import annotations

import base64
import html
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

try:
    import pandas as pd
except ImportError as e:  # pandas comes with the notebooks extra, not the core package
    raise ImportError(
        "sora_jax.analysis needs pandas and matplotlib: pip install -e '.[notebooks]'"
    ) from e

from sora_jax import config as config_lib
from sora_jax import video_io
from sora_jax.analysis.runs import Run, read_metrics, repo_path
from sora_jax.data import shards

# --- Tokenized datasets ----------------------------------------------------------------


def dataset_table(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per bucket of DATASET/manifest.json: pixel and latent shapes, clips, files,
    MB on disk."""
    dataset_dir = repo_path(dataset_dir)
    manifest = shards.read_manifest(dataset_dir)
    rows = []
    for name, b in manifest["buckets"].items():
        files = [dataset_dir / f for f in b["files"]]
        rows.append(
            dict(
                bucket=name,
                pixel_shape=tuple(b.get("pixel_shape", ())),
                latent_shape=tuple(b["shape"]),
                clips=b["count"],
                files=len(files),
                mb=sum(f.stat().st_size for f in files if f.is_file()) / 2**20,
            )
        )
    return pd.DataFrame(rows).set_index("bucket")


def read_records(dataset_dir: str | os.PathLike, bucket: str, n: int = 8) -> list[dict]:
    """The first `n` records of a bucket, decoded (latents, text, caption, ...)."""
    # Imported here: grain, records and the tokenizer load JAX, which the other helpers
    # (metrics, configs, plots) do without, so a notebook that only plots starts quickly.
    import grain

    from sora_jax.data import records

    dataset_dir = repo_path(dataset_dir)
    buckets = shards.read_manifest(dataset_dir)["buckets"]
    if bucket not in buckets:
        raise KeyError(
            f"{dataset_dir}/manifest.json has no bucket {bucket!r}; it has {list(buckets)}"
        )
    source = grain.sources.ArrayRecordDataSource(
        [str(dataset_dir / f) for f in buckets[bucket]["files"]]
    )
    return [records.decode_record(source[i]) for i in range(min(n, len(source)))]


def dataset_tokenizer(
    dataset_dir: str | os.PathLike, config: ml_collections.ConfigDict | None = None
):
    """The tokenizer that made a dataset, to decode its latents: from `config` (a run's
    config), else from WORKDIR/config.json when the dataset is a run's default WORKDIR/data;
    its hash must match the manifest's."""
    from sora_jax.models import tokenizer as tokenizer_lib  # loads JAX: see read_records

    dataset_dir = repo_path(dataset_dir)
    want = shards.read_manifest(dataset_dir)["tokenizer"]
    if config is None:
        if not (dataset_dir.parent / "config.json").is_file():
            raise FileNotFoundError(
                f"{dataset_dir} is not a run's WORKDIR/data, so its tokenizer config is unknown: "
                "pass config=analysis.load_run(WORKDIR).config of a run trained on it"
            )
        config = config_lib.load_run_config(dataset_dir.parent)
    tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
    if tokenizer.hash != want["hash"]:
        raise ValueError(
            f"{dataset_dir} was tokenized by {want['id']} (hash {want['hash']}), the config's "
            f"tokenizer is {tokenizer.id} (hash {tokenizer.hash}): pass the config of a run "
            "trained on this dataset"
        )
    return tokenizer


def decode_records(records: Sequence[dict], tokenizer) -> np.ndarray:
    """Pixel videos `[N, T, H, W, 3]` in [-1, 1] of records' latents."""
    latents = np.stack([np.asarray(r["latents"], np.float32) for r in records])
    return np.clip(np.asarray(tokenizer.decode(latents)), -1.0, 1.0)


# --- Plots (matplotlib Figures) --------------------------------------------------------


def _metrics(run) -> pd.DataFrame:
    return run.metrics if isinstance(run, Run) else run


def _figure(ncols: int = 1, width: float = 5.5, height: float = 3.5):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def _require(df: pd.DataFrame, columns: list[str], what: str) -> None:
    if not columns:
        raise ValueError(
            f"the metrics have no {what} columns (they have {list(df.columns)}): was the run "
            "trained by this version of sora_jax.train, and has it logged a step yet?"
        )


def plot_loss(run) -> Any:
    """`train/loss` and `train/loss/<bucket>` over steps, with `eval/val_loss/<bucket>`."""
    df = _metrics(run)
    cols = [c for c in df.columns if c == "train/loss" or c.startswith("train/loss/")]
    _require(df, cols, "train/loss")
    fig, (ax,) = _figure()
    for col in cols:
        s = df[col].dropna()
        ax.plot(s.index, s.values, lw=2.0 if col == "train/loss" else 1.0, label=col)
    for col in (c for c in df.columns if c.startswith("eval/val_loss/")):
        s = df[col].dropna()
        ax.plot(s.index, s.values, "o--", label=col)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_loss_per_timestep(run) -> Any:
    """Left: `train/loss_t/<lo>-<hi>` over steps per timestep bin. Right: the last logged
    loss per bin against t, with the last validation loss per t (`eval/val_loss_t=<t>/…`)."""
    import matplotlib as mpl

    df = _metrics(run)
    cols = sorted(c for c in df.columns if c.startswith("train/loss_t/"))
    _require(df, cols, "train/loss_t/<lo>-<hi>")
    fig, (ax, ax_t) = _figure(2)
    colours = mpl.colormaps["viridis"](np.linspace(0, 0.9, len(cols)))
    mids, last = [], []
    for col, colour in zip(cols, colours):
        s = df[col].dropna()
        ax.plot(s.index, s.values, color=colour, label=col.rsplit("/", 1)[1])
        lo, hi = (float(x) for x in col.rsplit("/", 1)[1].split("-"))
        mids.append((lo + hi) / 2)
        last.append(s.iloc[-1] if len(s) else math.nan)
    ax.set(xlabel="step", ylabel="train loss", title="loss per timestep bin")
    ax.legend(title="t", fontsize="small")
    ax_t.plot(mids, last, "s-", label=f"train (step {df.index[-1]})")
    val = [c for c in df.columns if re.match(r"eval/val_loss_t=[\d.]+/", c)]
    for bucket in sorted({c.rsplit("/", 1)[1] for c in val}):
        mine = [c for c in val if c.endswith("/" + bucket)]
        ts = [float(c.split("=")[1].split("/")[0]) for c in mine]
        ys = [df[c].dropna().iloc[-1] for c in mine]
        ax_t.plot(*zip(*sorted(zip(ts, ys))), "o--", label=f"validation {bucket}")
    ax_t.set(xlabel="t (1 = noise)", ylabel="loss", title="loss against t")
    ax_t.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_lr(run) -> Any:
    """The learning rate `train/lr` over steps."""
    df = _metrics(run)
    _require(df, [c for c in df.columns if c == "train/lr"], "train/lr")
    fig, (ax,) = _figure(height=3.0)
    s = df["train/lr"].dropna()
    ax.plot(s.index, s.values)
    ax.set(xlabel="step", ylabel="learning rate", title="train/lr")
    fig.tight_layout()
    return fig


def plot_throughput(run) -> Any:
    """One panel per logged `perf/steps_per_s`, `perf/tokens_per_s` and `perf/mfu`."""
    df = _metrics(run)
    cols = [c for c in ("perf/steps_per_s", "perf/tokens_per_s", "perf/mfu") if c in df]
    _require(df, cols, "perf/*")
    fig, axes = _figure(len(cols), width=4.0, height=3.0)
    for ax, col in zip(axes, cols):
        s = df[col].dropna()
        ax.plot(s.index, s.values, ".-")
        ax.set(xlabel="step", title=col)
    fig.tight_layout()
    return fig


def plot_sweep(sweep: pd.DataFrame, x: str | None = None, y: str = "final train/loss") -> Any:
    """`y` against override `x` (default: the sweep's first override), one line per value
    of the other overrides; a log axis when `x` spans a decade or more."""
    overrides = list(sweep.attrs.get("overrides", []))
    x = x or (overrides[0] if overrides else None)
    for name, col in (("x", x), ("y", y)):
        if col not in sweep.columns:
            raise ValueError(
                f"plot_sweep: {name}={col!r} is not a column; choose from {list(sweep.columns)}"
            )
    others = [k for k in overrides if k != x]
    fig, (ax,) = _figure()
    groups = sweep.groupby(others, dropna=False) if others else [((), sweep)]
    for key, group in groups:
        group = group.sort_values(x)
        label = ", ".join(f"{k}={v}" for k, v in zip(others, np.atleast_1d(key))) or None
        ax.plot(group[x], group[y], "o-", label=label)
    values = pd.to_numeric(sweep[x], errors="coerce").dropna()
    if len(values) and (values > 0).all() and values.max() / values.min() >= 10:
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))])
        ax.minorticks_off()  # log minor labels (2x10^-4, ...) crowd the swept values
    ax.set(xlabel=x, ylabel=y, title=f"{y} against {x}")
    if others:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_sweep_curves(sweep: pd.DataFrame, metric: str = "train/loss") -> Any:
    """`metric` over steps for every job of a sweep, read from each job's workdir."""
    fig, (ax,) = _figure()
    for name, row in sweep.iterrows():
        df = read_metrics(row["workdir"])
        if metric in df:
            s = df[metric].dropna()
            ax.plot(s.index, s.values, label=name)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} per job")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_buckets(dataset_dir: str | os.PathLike) -> Any:
    """Clips per bucket of a tokenized dataset, with each bucket's latent shape."""
    table = dataset_table(dataset_dir)
    fig, (ax,) = _figure(height=3.0)
    bars = ax.bar(table.index, table["clips"])
    ax.bar_label(
        bars, labels=["x".join(map(str, s)) for s in table["latent_shape"]], fontsize="small"
    )
    ax.set(
        xlabel="bucket (frames x height x width)",
        ylabel="clips",
        title="clips per bucket (latent T'xH'xW'xC)",
    )
    fig.tight_layout()
    return fig


def plot_image(image, title: str = "") -> Any:
    """An image (a path such as a contact_sheet.png, or `[H, W, 3]` uint8/float) as a Figure."""
    if isinstance(image, str | os.PathLike):
        image = video_io.read_video(image)[0]
    image = video_io.to_uint8(image)
    h, w, _ = image.shape
    fig, (ax,) = _figure(width=min(12.0, max(3.0, w / 60)), height=min(12.0, max(2.0, h / 60)))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_frames(videos, titles: Sequence[str] | None = None, columns: int = 5) -> Any:
    """One row of `columns` evenly spaced frames per video (`[T, H, W, 3]`, or a dict
    title -> video), titled; for comparing samples side by side on a static page."""
    import matplotlib.pyplot as plt

    if isinstance(videos, dict):
        titles, videos = list(videos), list(videos.values())
    titles = list(titles or [""] * len(videos))
    rows = [video_io.contact_sheet([v], columns=columns) for v in videos]
    fig, axes = plt.subplots(len(rows), 1, figsize=(columns * 1.6, 1.9 * len(rows)), squeeze=False)
    for ax, row, title in zip(axes[:, 0], rows, titles, strict=True):
        ax.imshow(row, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize="small", loc="left")
    fig.tight_layout()
    return fig


# --- Inline videos ---------------------------------------------------------------------


def video_html(video, *, fps: float = 8.0, width: int | None = 256, title: str = "") -> str:
    """An HTML5 <video> (or <img> for a gif) of a video file or of frames `[T, H, W, 3]`
    (uint8 or float in [-1, 1]), embedded as base64. Files are embedded as stored: the
    sample writer's mp4 is H.264, which every browser plays."""
    if isinstance(video, str | os.PathLike):
        path = pathlib.Path(video)
        data = path.read_bytes()
        title = title or path.stem
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = video_io.write_video(pathlib.Path(tmp) / "video.mp4", video, fps=fps)
            data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    size = f' width="{width}"' if width else ""
    if path.suffix == ".gif":
        body = f'<img src="data:image/gif;base64,{b64}"{size}>'
    else:
        kind = "webm" if path.suffix == ".webm" else "mp4"
        src = f"data:video/{kind};base64,{b64}"
        # Pixelated: a 16 px clip shown at 256 px stays sharp instead of being smoothed.
        style = ' style="image-rendering:pixelated"'
        body = f'<video controls autoplay loop muted{size}{style} src="{src}"></video>'
    caption = f"<figcaption>{html.escape(title)}</figcaption>" if title else ""
    return f'<figure style="display:inline-block;margin:4px">{body}{caption}</figure>'


def show_videos(
    videos, titles: Sequence[str] | None = None, *, fps: float = 8.0, width: int | None = 256
):
    """Shows videos side by side: `run.samples[step]` entries, files, or frame arrays.

    Frame arrays go through `mediapy.show_videos` when it finds ffmpeg; otherwise (and for
    files, embedded as stored instead of decoded and re-encoded) an HTML5 <video> per clip.
    """
    from IPython.display import HTML, display

    items = [v["path"] if isinstance(v, dict) else v for v in videos]
    if titles is None:
        titles = [
            v["sidecar"].get("prompt", v["path"].stem) if isinstance(v, dict) else ""
            for v in videos
        ]
    arrays = all(not isinstance(v, str | os.PathLike) for v in items)
    if arrays:
        import mediapy

        if mediapy.video_is_available():
            frames = [video_io.to_uint8(v) for v in items]
            return mediapy.show_videos(frames, list(titles), fps=fps, width=width)
    parts = [
        video_html(v, fps=fps, width=width, title=t) for v, t in zip(items, titles, strict=True)
    ]
    display(HTML("<div>" + "".join(parts) + "</div>"))


def show_video(video, *, title: str = "", fps: float = 8.0, width: int | None = 256):
    """One video: a file, a `run.samples[step]` entry, or frames `[T, H, W, 3]`."""
    return show_videos([video], [title] if title else None, fps=fps, width=width)
