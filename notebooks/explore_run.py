# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: docs_figure,tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explore a training run
#
# Curves, evaluation results and samples over training of one `sora_jax.train` workdir,
# read through `sora_jax.analysis` (docs/notebooks.md). Set the run in the parameter cell
# below, or from outside with `SORA_RUN=/path/to/workdir`.

# %%
import os

import pandas as pd
from IPython.display import display

from sora_jax import analysis, video_io

# %% tags=["parameters"]
# The run's --workdir. SORA_RUN overrides it; papermill -p RUN ... also works (this cell is
# tagged `parameters`). Relative paths resolve from the checkout root.
RUN = os.environ.get("SORA_RUN", "runs/demo")

# %%
run = analysis.load_run(RUN)
steps = list(run.metrics.index)
print(f"run            {run.workdir}")
print(f"logged steps   {steps[:1]} .. {steps[-1:]} ({len(steps)} rows)")
print(f"checkpoints    {run.checkpoints}")
print(f"sample steps   {list(run.samples)}")
print(f"eval steps     {list(run.evals)}")
command = run.workdir / "command.txt"
if command.is_file():
    print(f"command        {command.read_text().strip()}")

# %% [markdown]
# ## Config
#
# The resolved config the run trained with (`config.json`), flattened to dotted fields.

# %%
flat = pd.Series(analysis.flat_config(run), name="value", dtype=object)
sections = ("total_steps", "model.", "optimizer.", "diffusion.", "data.global_batch_size")
display(flat[[k for k in flat.index if k.startswith(sections)]].to_frame())

# %% [markdown]
# ## Curves
#
# Training loss overall and per bucket (validation loss per bucket as points when the eval
# hook ran), the loss per timestep bin, the learning rate, and throughput.

# %% docs_figure="loss"
fig = analysis.plot_loss(run)

# %% docs_figure="loss_per_timestep"
fig = analysis.plot_loss_per_timestep(run)

# %%
fig = analysis.plot_lr(run)

# %% docs_figure="throughput"
fig = analysis.plot_throughput(run)

# %%
display(run.metrics.tail())

# %% [markdown]
# ## Evaluation results
#
# The numeric scores of every `eval/<step>.json` written by `python -m sora_jax.evaluate`.

# %%
if run.evals:
    scores = {
        step: {k: v for k, v in e.get("scores", {}).items() if isinstance(v, int | float)}
        for step, e in run.evals.items()
    }
    display(pd.DataFrame.from_dict(scores, orient="index").rename_axis("step"))
    last = run.evals[max(run.evals)]
    print("protocol of the last evaluation:", last.get("protocol"))
else:
    print(f"no eval/<step>.json in {run.workdir}: run python -m sora_jax.evaluate on it")

# %% [markdown]
# ## Samples over training
#
# The first prompts sampled at every step with samples (`samples/<step>/`, written by the
# eval hook or `python -m sora_jax.sample`), one row per prompt and step, first to last
# frame; then the videos of the latest step.

# %% docs_figure="samples"
SHOWN = 2  # prompts per step in the figure
rows = {}
for index in range(SHOWN):
    for step, videos in run.samples.items():
        if index < len(videos):
            prompt = videos[index]["sidecar"].get("prompt", videos[index]["path"].stem)
            rows[f"step {step}: {prompt}"] = video_io.read_video(videos[index]["path"])
if rows:
    fig = analysis.plot_frames(rows)
else:
    print(f"no samples/ in {run.workdir}: run python -m sora_jax.sample on it")

# %%
if run.samples:
    latest = max(run.samples)
    print(f"step {latest}: {len(run.samples[latest])} videos")
    analysis.show_videos(run.samples[latest])
