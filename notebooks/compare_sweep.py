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
# # Compare the jobs of a sweep
#
# One row per job of a `python -m sora_jax.sweep` root (its `sweep.json`): overrides,
# state, final and best loss, eval metrics; then the loss against the swept field, every
# job's curve, the best job's config against the worst's, and the best job's samples. Set
# the sweep in the parameter cell below, or from outside with `SORA_SWEEP=/path/to/root`.

# %%
import os

from IPython.display import display

from sora_jax import analysis

# %% tags=["parameters"]
# The sweep's --workdir_root (or its sweep.json). SORA_SWEEP overrides it; papermill -p SWEEP
# ... also works. Relative paths resolve from the checkout root.
SWEEP = os.environ.get("SORA_SWEEP", "runs/sweep")
# The column to rank jobs by (lower is better), e.g. "final eval/val_loss/<bucket>".
METRIC = "final train/loss"

# %%
sweep = analysis.load_sweep(SWEEP)
print(f"sweep {sweep.attrs['root']} of --config={sweep.attrs['config']}")
print("jobs per state:", sweep["state"].value_counts().to_dict())
display(sweep.drop(columns=["workdir"]))

# %% [markdown]
# ## Loss against the swept fields

# %% docs_figure="final_loss"
overrides = sweep.attrs["overrides"]
for field in overrides or [None]:
    if field is None:
        print("the sweep has one job and no overrides: nothing to plot against")
    else:
        fig = analysis.plot_sweep(sweep, x=field, y=METRIC)

# %% docs_figure="curves"
fig = analysis.plot_sweep_curves(sweep, "train/loss")

# %% [markdown]
# ## The best job
#
# Ranked by `METRIC`; what its config changes against the worst job, and its run.

# %%
ranked = sweep[sweep[METRIC].notna()].sort_values(METRIC)
if ranked.empty:
    raise ValueError(f"no job of {SWEEP} has logged {METRIC!r} yet: wait for a logged step")
best, worst = ranked.index[0], ranked.index[-1]
print(f"best: {best} ({METRIC} {ranked.loc[best, METRIC]:.4f})")
print(f"worst: {worst} ({METRIC} {ranked.loc[worst, METRIC]:.4f})")
display(
    analysis.config_diff(ranked.loc[best, "workdir"], ranked.loc[worst, "workdir"], (best, worst))
)

# %%
run = analysis.load_run(ranked.loc[best, "workdir"])
fig = analysis.plot_loss(run)
if run.samples:
    analysis.show_videos(run.samples[max(run.samples)])
else:
    print(f"{best} has no samples yet: python -m sora_jax.sample --workdir={run.workdir} ...")
