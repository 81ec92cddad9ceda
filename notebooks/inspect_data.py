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
# # Inspect a tokenized dataset
#
# What `python -m sora_jax.tokenize` wrote: the manifest per bucket, rejected inputs, the
# first records of each bucket (captions, latent statistics), and their latents decoded
# back to pixels by the tokenizer that made them. Set the dataset in the parameter cell
# below, or from outside with `SORA_DATA=/path/to/dataset`.

# %%
import collections
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from sora_jax import analysis
from sora_jax.data import shards

# %% tags=["parameters"]
# The dataset directory (data.dataset_dir; WORKDIR/data by default). SORA_DATA overrides
# it; papermill -p DATA ... also works. Relative paths resolve from the checkout root.
DATA = os.environ.get("SORA_DATA", "runs/demo/data")
# A run trained on the dataset, whose config names the tokenizer that decodes it; "" = the
# run whose WORKDIR/data this is.
RUN = ""
# Records previewed per bucket.
N_PREVIEW = 4

# %%
data = analysis.repo_path(DATA)
manifest = shards.read_manifest(data)
print("tokenizer   ", manifest["tokenizer"])
print("text encoder", manifest["text_encoder"])
display(analysis.dataset_table(data))

# %% docs_figure="buckets"
fig = analysis.plot_buckets(data)

# %% [markdown]
# ## Rejected inputs
#
# One line of `rejects.jsonl` per input that could not be used, with the reason.

# %%
rejects_file = data / shards.REJECTS
lines = rejects_file.read_text().splitlines() if rejects_file.is_file() else []
reasons = collections.Counter(json.loads(line).get("reason", "?") for line in lines if line)
print(f"{len(lines)} rejected inputs (manifest says {manifest.get('rejects')})")
for reason, count in reasons.most_common(10):
    print(f"  {count:6d}  {reason}")

# %% [markdown]
# ## Records and their latents

# %%
records = {b: analysis.read_records(data, b, N_PREVIEW) for b in manifest["buckets"]}
rows = []
for bucket, recs in records.items():
    for r in recs:
        latents = np.asarray(r["latents"], np.float32)
        fields = {k: r.get(k) for k in ("caption", "source_id", "fps", "num_frames")}
        rows.append(dict(bucket=bucket, **fields, mean=latents.mean(), std=latents.std()))
display(pd.DataFrame(rows))

# %% docs_figure="latents"
fig, axes = plt.subplots(1, len(records), figsize=(5 * len(records), 3), squeeze=False)
for ax, (bucket, recs) in zip(axes[0], records.items()):
    values = np.concatenate([np.asarray(r["latents"], np.float32).ravel() for r in recs])
    ax.hist(values, bins=50)
    ax.set(title=f"latent values, {bucket} ({len(recs)} records)", xlabel="value")
fig.tight_layout()

# %% [markdown]
# ## Decoded previews
#
# Latents back to pixels (`tokenizer.decode`): what the model learns to generate.

# %% docs_figure="decoded"
config = analysis.load_run(RUN).config if RUN else None
tokenizer = analysis.dataset_tokenizer(data, config)
decoded = {b: analysis.decode_records(recs, tokenizer) for b, recs in records.items()}
for bucket, videos in decoded.items():
    captions = [r.get("caption", "") for r in records[bucket]]
    fig = analysis.plot_frames(videos, [f"{bucket}: {c}" for c in captions])

# %%
for bucket, videos in decoded.items():
    fps = float(records[bucket][0].get("fps", 8.0))
    analysis.show_videos(list(videos), [r.get("caption", "") for r in records[bucket]], fps=fps)
