"""Runs, sweeps and tokenized datasets as Python objects, for notebooks (docs/notebooks.md).

    run = analysis.load_run("runs/tiny")          # config, metrics, checkpoints, samples, evals
    analysis.plot_loss(run)                       # matplotlib Figures
    sweep = analysis.load_sweep("runs/sweep")     # one row per job of ROOT/sweep.json
    analysis.config_diff(run_a, run_b)            # the dotted fields that differ
    params = analysis.load_params("runs/tiny")    # numpy tree, whatever mesh saved it
    analysis.show_videos(run.samples[4])          # inline videos

Everything reads the files of docs/formats.md (metrics.jsonl, checkpoints/, samples/,
eval/, sweep.json, manifest.json); nothing here writes to a run.
"""

from sora_jax.analysis.plots import (
    dataset_table,
    dataset_tokenizer,
    decode_records,
    plot_buckets,
    plot_frames,
    plot_image,
    plot_loss,
    plot_loss_per_timestep,
    plot_lr,
    plot_sweep,
    plot_sweep_curves,
    plot_throughput,
    read_records,
    show_video,
    show_videos,
    video_html,
)
from sora_jax.analysis.runs import (
    Run,
    config_diff,
    flat_config,
    load_params,
    load_run,
    load_sweep,
    read_metrics,
    repo_path,
)

__all__ = [
    "Run",
    "config_diff",
    "dataset_table",
    "dataset_tokenizer",
    "decode_records",
    "flat_config",
    "load_params",
    "load_run",
    "load_sweep",
    "plot_buckets",
    "plot_frames",
    "plot_image",
    "plot_loss",
    "plot_loss_per_timestep",
    "plot_lr",
    "plot_sweep",
    "plot_sweep_curves",
    "plot_throughput",
    "read_metrics",
    "read_records",
    "repo_path",
    "show_video",
    "show_videos",
    "video_html",
]
