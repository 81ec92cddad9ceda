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
# # Sample playground
#
# Loads a run's checkpoint once (`sora_jax.evaluation.generate.Generator`, the code path
# of `python -m sora_jax.sample`) and samples one prompt with different guidance scales,
# step counts and seeds, side by side. Set the run in the parameter cell below, or from
# outside with `SORA_RUN=/path/to/workdir`.

# %%
import dataclasses
import os

import pandas as pd
from IPython.display import display

from sora_jax import analysis
from sora_jax.evaluation import generate
from sora_jax.evaluation import requests as requests_lib

# %% tags=["parameters"]
# The run's --workdir. SORA_RUN overrides it; papermill -p RUN ... also works. Relative
# paths resolve from the checkout root.
RUN = os.environ.get("SORA_RUN", "runs/demo")
PROMPT = "a red circle moving up quickly"
# Checkpoint step; None = the latest.
STEP = None

# %%
workdir = analysis.repo_path(RUN)
config = analysis.load_run(workdir).config
gen = generate.Generator.from_workdir(workdir, config, step=STEP, ema_decay=config.sample.ema_decay)
print(f"checkpoint {gen.step} of {workdir}, weights: {gen.weights}")
base = requests_lib.SampleOptions.from_config(config.sample)
print(base)

# %% [markdown]
# ## Variants
#
# Each entry changes the config's sampling options (`sample.*`) in one way. A new
# (steps, cfg) pair compiles the sampler once; seeds reuse it.

# %%
variants = {
    f"config: cfg {base.cfg_scale:g}, {base.num_steps} steps": base,
    "cfg 1 (no guidance)": dataclasses.replace(base, cfg_scale=1.0),
    f"cfg {2 * base.cfg_scale:g}": dataclasses.replace(base, cfg_scale=2 * base.cfg_scale),
    f"{max(1, base.num_steps // 2)} steps": dataclasses.replace(
        base, num_steps=max(1, base.num_steps // 2)
    ),
    f"seed {base.seed + 1}": dataclasses.replace(base, seed=base.seed + 1),
}
videos, timings = {}, {}
for name, options in variants.items():
    video, timing = gen.generate([PROMPT], options)
    videos[name], timings[name] = video[0], timing
display(pd.DataFrame(timings).T.round(3))

# %% docs_figure="variants"
fig = analysis.plot_frames(videos)
fig.suptitle(PROMPT)
fig.tight_layout()

# %%
analysis.show_videos(list(videos.values()), list(videos), fps=config.sample.fps)
