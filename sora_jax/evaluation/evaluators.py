r"""Evaluators chosen by `evaluate.type`; each writes WORKDIR/eval/<step>.json.

`prompt_adherence`: samples `evaluate.num_videos` prompts drawn from the synthetic caption
space (fixed seed), measures each video's dominant colour, motion direction, shape and
speed from the pixels (sora_jax.evaluation.adherence, no learned weights) and reports the
fraction that match the prompt, next to chance (1/6 colour, 1/4 direction, 1/3 shape,
1/2 speed, 1/24 colour and direction, 1/144 all four). A run trained on wrapping clips
(`data.source.motion='wrap'`) is read on the torus (adherence's circular measure), here
and in `temporal_consistency`'s segments; the protocol then records `motion`.

The reference (`evaluate.reference`, `reference`): 'holdout', the dataset's held-out split
(sora_jax.data.holdout; made by `data.tokenize.holdout_fraction`), 'synthetic', or 'auto'
(default): the held-out split when the tokenized dataset has one, else synthetic.

`val_loss`: the fixed-noise, fixed-time validation loss (sora_jax.diffusion.validation) of
the checkpoint, overall and per time, per bucket: on the held-out split, the first
`min(count, evaluate.num_videos)` held-out records of each bucket (rounded down to a
multiple of data x fsdp); otherwise on one fixed training batch per bucket (the first
batch the schedule draws from it), the numbers the trainer's eval hook logs as `eval/val_*`.
The protocol's `split` says which (`holdout` or `train`).

`reconstruction`: the tokenizer's PSNR and SSIM (sora_jax.evaluation.metrics) on
`evaluate.num_videos` reference clips: held-out clips cut again from `data.source` (the
pixels that were tokenized, each at its bucket's shape), or clips 0 .. n-1 of the
synthetic set with seed `data.source.seed + HELD_OUT_SEED_OFFSET + evaluate.seed` at the
sample bucket's shape, never the training clips (seed `data.source.seed`). Needs no
checkpoint.

`fvd`: the Fréchet distance (sora_jax.evaluation.frechet) between features of the
reference clips (real; held-out clips resampled to the sample bucket's shape) and videos
sampled for their captions (generated, noise index = clip index), with the feature network
`evaluate.fvd_features` (sora_jax.evaluation.features). The score's key names it:
`fvd_i3d` (I3D, clips resampled to 16 x 224 x 224) or `fd_random_conv` (the weight-free
sanity metric, not comparable to published FVD).

The item evaluators (all but val_loss) are sharded over processes and resumable item by
item (sora_jax.evaluation.items); their `protocol.json` records what each item computes.

`temporal_consistency`: `evaluate.num_videos` synthetic prompts (as prompt_adherence's)
sampled as long videos of `evaluate.long_frames` pixel frames (default 4x the bucket's;
sora_jax.evaluation.long_video: the KV-cache rollout of a causal run, sliding-window
continuation otherwise), measured by sora_jax.evaluation.temporal with segments of the
bucket's frames: colour and histogram drift from the first segment, flicker, and the
colour / direction / shape / speed adherence of every segment on its own.

`samples`: the fixed-seed sample grid of `sample.prompts` into WORKDIR/samples/<step>/,
the grid the trainer writes without `config.evals`; in training its contact sheet (one row
of frames per prompt) also goes to TensorBoard as an image.

`config.evals` names several evaluators, each `name -> {type, every_steps, options}`: the
options are fields of `evaluate` that this entry overrides (`num_videos`, `reference`,
`fvd_features`, ...). The trainer runs each entry every `every_steps` on the live weights
(sora_jax/training/eval_hook.py) and `sora_jax.evaluate` runs them on a checkpoint, both
through `evaluate(..., name=name)`, which writes WORKDIR/eval/<step>/<name>.json: the
same numbers for the same weights. Without `config.evals`, `evaluate` runs the one
evaluator of `evaluate.type` into WORKDIR/eval/<step>.json.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from sora_jax.data import global_batch as rows_lib
from sora_jax.data import holdout, shards, tokenization
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.diffusion import validation
from sora_jax.evaluation import generate
from sora_jax.evaluation import requests as requests_lib
from sora_jax.evaluation.item_evaluators import (
    ITEM_EVALUATORS,
    T2V_SAMPLING_FIELDS,
    clip_shape,
    dataset_manifest,
    reference,
)
from sora_jax.evaluation.items import ItemEvaluator, ItemStore, run_items
from sora_jax.evaluation.val_loss import ValidationLoss

# --- val_loss (one fixed batch per bucket; not sharded) ----------------------------------


def _noise_protocol(config) -> dict[str, Any]:
    return {
        "noise_seed": int(config.seed) + 1,
        "noise": "normal(fold_in(key(noise_seed), flow.PURPOSE_NOISE)), shared by all times",
        "times": list(validation.DEFAULT_TIMES),
        "task": "t2v",
    }


def _val_loss_protocol(config, pipe) -> dict[str, Any]:
    """What `val_loss` computes on training data: per bucket of positive weight, the
    validation loss (sora_jax.diffusion.validation) of its first batch in the data schedule,
    at the grid `times`, with the noise of `noise_seed` (the seed the eval hook uses,
    `seed + 1`)."""
    first = pipe.first_step_of_each_bucket()
    return {
        "type": "val_loss",
        "split": "train",
        "batches": {
            b.key: {"step": first[b.key], "rows": b.global_batch}
            for b in pipe.buckets
            if b.weight > 0
        },
        "data": "training records: the batch the data schedule draws at `step`",
        **_noise_protocol(config),
    }


def _holdout_batches(config, mesh) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per bucket of the held-out split (and of `data.buckets`), its first
    `min(count, evaluate.num_videos)` records rounded down to a multiple of the mesh's data
    parallelism, as this process's host batch; and the protocol."""
    out = tokenization.dataset_dir(config, "")
    manifest = dataset_manifest(config)
    shards.check_manifest_matches(
        manifest, tokenization.expected_manifest_fields(config), dataset_dir=out
    )
    split = holdout.split(manifest)
    fields = pipeline_lib.step_fields(manifest)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    layout = rows_lib.row_layout(mesh)
    cap = int(config.evaluate.num_videos)
    batches, used, skipped = {}, {}, {}
    for name, entry in split["buckets"].items():
        rows = min(entry["count"], cap) // dp * dp
        if name not in config.data.buckets:
            skipped[name] = "not in data.buckets"
        elif rows == 0:
            skipped[name] = f"{entry['count']} held-out clip(s), fewer than data x fsdp = {dp}"
        else:
            full = holdout.read_bucket(out, manifest, name, fields, rows)
            sel = layout.rows(rows)  # this process's rows of the batch
            batches[name] = {**{f: full[f][sel] for f in fields}, "layout": layout}
            used[name] = {"rows": rows, "of": entry["count"], "files": entry["files"]}
    if not batches:
        raise ValueError(
            f"no bucket of the held-out split of {out} fills a batch ({skipped}): raise "
            "data.tokenize.holdout_fraction, or set evaluate.reference='synthetic' to score "
            "the first training batch of each bucket instead"
        )
    protocol = {
        "type": "val_loss",
        "split": "holdout",
        "dataset": str(out),
        "holdout_rule": split["rule"],
        "batches": used,
        "skipped": skipped,
        "data": "held-out records (DATASET/holdout): the first `rows` of each bucket, in "
        "file order",
        **_noise_protocol(config),
    }
    return batches, protocol


_HOLDOUT_LOSSES: dict[str, tuple[ValidationLoss, dict[str, Any]]] = {}


def val_loss(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    generator: generate.Generator,
    options: requests_lib.SampleOptions,
) -> dict[str, Any]:
    """On the held-out split when the dataset has one (`evaluate.reference`), else on the
    first training batch of each bucket; the protocol's `split` says which."""
    del options  # no sampling: the loss of the checkpoint's weights at fixed times
    mesh = generator.mesh
    if reference(config) == "holdout":
        # One compiled loss per config and held-out split: the trainer evaluates often.
        key = json.dumps([config.to_dict(), holdout.split(dataset_manifest(config))], default=str)
        if key not in _HOLDOUT_LOSSES:
            batches, protocol = _holdout_batches(config, mesh)
            loss = ValidationLoss(config, None, generator.model, mesh, batches=batches)
            _HOLDOUT_LOSSES[key] = (loss, protocol)
        loss, protocol = _HOLDOUT_LOSSES[key]
        with jax.set_mesh(mesh):
            scores = loss(generator.params)
    else:
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        pipe = pipeline_lib.from_config(config, workdir, data_parallel=data_parallel)
        try:
            protocol = _val_loss_protocol(config, pipe)
            loss = ValidationLoss(config, pipe, generator.model, mesh)
            with jax.set_mesh(mesh):
                scores = loss(generator.params)
        finally:
            pipe.close()
    scores = {k.removeprefix("eval/"): v for k, v in scores.items()}
    return {"scores": scores, "protocol": protocol}


def samples(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    generator: generate.Generator,
    options: requests_lib.SampleOptions,
) -> dict[str, Any]:
    """The fixed-seed sample grid: `sample.prompts` (noise index = position) through the
    code of `sora_jax.sample`, into WORKDIR/samples/<step>/ (videos, sidecars, contact
    sheet). The trainer also logs the contact sheet to TensorBoard as an image."""
    prompts = list(config.sample.get("prompts") or [])
    if not prompts:
        raise ValueError(
            "evaluator type 'samples' needs prompts: set config.sample.prompts (a list of captions)"
        )
    summary = generate.sample_to_dir(config, workdir, prompts, options, generator=generator)
    fields = {k: getattr(options, k) for k in T2V_SAMPLING_FIELDS}
    return {
        "scores": {"num_videos": len(summary["videos"])},
        "protocol": {
            "type": "samples",
            "prompts": prompts,
            "noise": "normal(fold_in(key(seed), index), latent_shape), index = prompt position",
            "clip_shape": list(clip_shape(config, options)),
            **fields,
        },
        "videos": summary["videos"],
        "contact_sheet": summary["contact_sheet"],
    }


EVALUATORS: dict[str, Any] = {"val_loss": val_loss, "samples": samples, **ITEM_EVALUATORS}


# --- config.evals: named evaluators, each with its schedule ------------------------------

# The fields of a `config.evals` entry that are not options of `evaluate`.
SCHEDULE_FIELDS = ("every_steps",)


def needs_generator(kind: str) -> bool:
    """Whether the evaluator `kind` reads a checkpoint's weights (all but reconstruction)."""
    evaluator = EVALUATORS[kind]
    return not isinstance(evaluator, ItemEvaluator) or evaluator.needs_generator


def named_evals(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """`config.evals` (name -> entry), checked; {} for a config without it."""
    evals = dict(config.get("evals") or {})
    for name, entry in evals.items():
        if entry.get("type") not in EVALUATORS:
            raise ValueError(
                f"config.evals.{name}.type={entry.get('type')!r} is unknown; known: "
                f"{sorted(EVALUATORS)}"
            )
        if int(entry.get("every_steps", 0)) < 0:
            raise ValueError(f"config.evals.{name}.every_steps must be >= 0 (0 = offline only)")
    return evals


def entry_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of `config` whose `evaluate` is `config.evaluate` with the options of
    `config.evals[name]` set: what every evaluator reads."""
    evals = named_evals(config)
    if name not in evals:
        raise ValueError(f"evaluator {name!r} is not in config.evals; known: {sorted(evals)}")
    out = config.copy_and_resolve_references()
    with out.unlocked():
        for k, v in evals[name].items():
            if k not in SCHEDULE_FIELDS:
                out.evaluate[k] = v
    return out


def scalars(name: str, report: dict[str, Any]) -> dict[str, float]:
    """The numeric scores of a report as `eval/<name>/<score>` (metrics.jsonl, TensorBoard)."""
    out = {}
    for k, v in report.get("scores", {}).items():
        if isinstance(v, int | float | np.number) and not isinstance(v, bool):
            out[f"eval/{name}/{k}"] = float(v)
    return out


def _latest_step(workdir: pathlib.Path) -> int:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=0)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    options: requests_lib.SampleOptions,
    *,
    step: int | None = None,
    ema_decay: float | None = None,
    generator: generate.Generator | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    stop_after: int | None = None,
    eval_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Runs the configured evaluator and writes `<eval_dir>/<step>.json` (default eval_dir
    WORKDIR/eval) from process 0 once every item is done; with `name`, the entry
    `config.evals[name]` into `<eval_dir>/<step>/<name>.json` (module docstring).

    `process_index`/`process_count` default to JAX's; passing them splits the items the
    same way without a multi-process runtime (tests, or independent jobs on one
    filesystem). The returned report has `missing` item indices instead of scores while
    items of other processes are not done.
    """
    entry: dict[str, Any] = {}
    if name is not None:
        config = entry_config(config, name)  # an error for a name not in config.evals
        entry = config.evals[name].to_dict()
    kind = config.evaluate.type
    if kind not in EVALUATORS:
        raise ValueError(f"evaluate.type={kind!r} is unknown; known: {sorted(EVALUATORS)}")
    workdir = pathlib.Path(workdir)
    evaluator = EVALUATORS[kind]
    config = config.copy_and_resolve_references()  # the dataset directory made explicit
    with config.unlocked():
        config.data.dataset_dir = str(tokenization.dataset_dir(config, workdir))
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    needs_gen = needs_generator(kind)
    gen = generator
    if gen is None and needs_gen:
        gen = generate.Generator.from_workdir(workdir, config, step=step, ema_decay=ema_decay)
    ckpt_step = gen.step if gen else (step if step is not None else _latest_step(workdir))
    root = pathlib.Path(eval_dir or workdir / "eval")
    report: dict[str, Any] = {
        "type": kind,
        "checkpoint_step": ckpt_step,
        "weights": gen.weights if gen and needs_gen else "",
    }
    if name is not None:
        report["name"], report["entry"] = name, entry
    if isinstance(evaluator, ItemEvaluator):
        protocol = evaluator.protocol(config, options)
        if gen and needs_gen:  # reconstruction depends on the tokenizer alone
            protocol["params_sha256"] = gen.params_hash
        store = ItemStore(root / str(ckpt_step) / (name or kind), protocol)
        result = run_items(
            evaluator,
            config,
            store,
            gen,
            options,
            process_index=pi,
            process_count=pc,
            stop_after=stop_after,
        )
        report["protocol"] = protocol  # what protocol.json records: the items' settings
        report["items_dir"] = str(store.root)
        report.update(result)
        if "scores" not in result:
            report["path"] = ""
            return report
    else:
        report.update(evaluator(config, workdir, gen, options))  # scores and protocol
    out = root / str(ckpt_step) / f"{name}.json" if name else root / f"{ckpt_step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    report["path"] = str(out)
    return report
