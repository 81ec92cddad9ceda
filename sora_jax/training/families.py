"""Model families: what the one training loop (training/loop.py) asks of a kind of model.

The loop owns everything a run must guarantee whatever it trains: the mesh, resume from
the newest readable checkpoint (a corrupt one moved aside, a structure-changing config
refused), `--init_from`, skipping non-finite updates and rolling back after a streak of
them, SIGTERM save-and-exit, the watchdog, metrics and throughput, checkpoints. A family
supplies the rest, in the order the loop calls it:

    data()           the input source: `next()` gives a host batch with 'bucket' and
                     'step' besides its `fields`; `get_state`/`set_state` (saved in every
                     checkpoint), `report()`, `close()`
    check_schedule   (every so many steps) that all processes agree on the next batch
    state()          `(init_fn, abstract state, shardings)`
    fresh / resumed  the state of a new run (with `--init_from`) or after a restore
    place, describe  frozen parts put on the mesh; a line naming the parameters
    compile()        one compiled step per bucket (`CompiledStep`)
    evaluate         the in-loop evaluation: the `config.evals` entries due at the step
                     (training/eval_hook.py), or every `eval_every_steps`
    finish           what a run does after its last step (the VAE exports its artifact)

Families by `model.name`: the DiT (`DiT`, here; `PackedDiT` on packed rows, chosen by
`dit_family` from `data.packing`) and the causal VAE (training/vae.py).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import ml_collections

from sora_jax.data import global_batch, packing
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.run import params as params_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.training import eval_hook
from sora_jax.training import plan as plan_lib
from sora_jax.training import step as step_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One bucket's compiled `train_step(state, batch) -> (state, metrics)`, the batch it
    was compiled for, and what throughput needs of one step (training/perf.py)."""

    executable: Any
    batch: dict[str, jax.ShapeDtypeStruct]
    global_batch: int
    tokens: int | None  # per sample; None for a model without tokens
    flops: float | None  # model FLOPs of one step; None for a model without a formula
    fingerprint: str = ""  # what it computes (plan.step_fingerprint); "" = not known


class Family:
    """The defaults: a state without frozen parts, `--init_from` loading parameters and
    EMA copies by name (run/params.py), no evaluation, nothing after the last step."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh, rules):
        self.config, self.workdir, self.mesh, self.rules = config, workdir, mesh, rules
        self.opts = setup.options(config)

    def data(self):
        raise NotImplementedError

    def check_schedule(self, step: int) -> None:
        del step

    def state(self) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def fresh(self, init_fn, abstract, init_from: str):
        state = state_lib.create_sharded_state(init_fn, self.mesh, self.rules, self.config.seed)
        if init_from:
            state = params_lib.init_from(
                state, abstract, init_from, self.opts, self.mesh, workdir=self.workdir
            )
        return state

    def resumed(self, state, init_fn, abstract, shardings):
        del init_fn, abstract, shardings
        return state

    def place(self, state, shardings):
        del shardings
        return state

    def describe(self, state) -> str:
        return f"model: {state_lib.param_count(state.params):,} parameters"

    def compile(self, abstract, shardings) -> dict[str, CompiledStep]:
        raise NotImplementedError

    def evaluate(self, state, step: int) -> dict[str, float]:
        del state, step
        return {}

    def finish(self, state, writer, start: int) -> dict[str, Any]:
        del state, writer, start
        return {}


class DiT(Family):
    """The video DiT on tokenized shards (data/pipeline.py), LoRA and the text encoder in
    the step included (run/setup.py, training/step.py)."""

    def data(self):
        # Datasets, weights and per-bucket global batches from config.data; every manifest
        # is checked against the model's tokenizer and text encoder (docs/data_pipeline.md).
        shape = self.mesh.shape
        self.pipeline = pipeline_lib.from_config(
            self.config, self.workdir, data_parallel=shape["data"] * shape["fsdp"]
        )
        self.manifest = self.pipeline.manifest  # shared tokenizer / text encoder, buckets
        return self.pipeline

    def check_schedule(self, step: int) -> None:
        # Every process derives the same bucket and batch for this step, or all stop here
        # with a named error instead of hanging in a mismatched collective.
        pipeline_lib.check_schedule_agreement(self.pipeline, step)

    def state(self):
        self.model, self.tx, init_fn, abstract, shardings = setup.setup_state(
            self.config, self.manifest, self.mesh, self.rules
        )
        self.lora = abstract.base is not None  # checkpoints hold the factors, not the base
        return init_fn, abstract, shardings

    def fresh(self, init_fn, abstract, init_from: str):
        if self.lora and not init_from:
            raise ValueError(
                f"lora.rank={self.config.lora.rank} fine-tunes a trained model, but no base "
                "was given: pass --init_from=BASE_RUN (or training.init_from), or set lora.rank=0"
            )
        state = state_lib.create_sharded_state(init_fn, self.mesh, self.rules, self.config.seed)
        if init_from:  # the patch size lets a t2v kernel grow conditioning channels
            state = params_lib.init_from(
                state, abstract, init_from, self.opts, self.mesh,
                patch=self.model.patch_size, workdir=self.workdir,
            )  # fmt: skip
        return state

    def resumed(self, state, init_fn, abstract, shardings):
        if not self.lora:
            return state
        base = params_lib.lora_base(
            self.workdir, init_fn, abstract, shardings, self.mesh, self.rules, self.config
        )
        return state.replace(base=base)

    def place(self, state, shardings):
        return setup.place_text_encoder(state, self.config, shardings)

    def describe(self, state) -> str:
        n_params = state_lib.param_count(state.params)
        if self.lora:
            n_base = state_lib.param_count(state.base)
            return f"model: {n_base:,} frozen + {n_params:,} LoRA parameters"
        return f"model: {n_params:,} parameters"

    def compile(self, abstract, shardings) -> dict[str, CompiledStep]:
        jitted = step_lib.jit_train_step(self.model, self.tx, self.config, self.mesh, shardings)
        # One executable per bucket, compiled now (or loaded from the persistent cache): a
        # batch that does not fit its bucket's executable fails loudly, never recompiles.
        shapes = plan_lib.pipeline_step_shapes(self.pipeline)
        compiled, plans = plan_lib.compile_steps(
            jitted, abstract, self.manifest, shapes, self.config, self.mesh, self.rules
        )
        log.info("compiled %d bucket(s) in %.1f s", len(plans), sum(p.compile_s for p in plans))
        self.evaluator = eval_hook.Evaluator(
            self.config, self.workdir, self.pipeline, self.model, self.mesh, self.manifest
        )
        return {
            p.bucket: CompiledStep(
                executable=compiled[p.bucket],
                batch=plan_lib.abstract_batch(self.manifest, s, self.mesh),
                global_batch=p.global_batch,
                tokens=p.tokens,
                flops=p.model_tflops_per_step * 1e12,
                fingerprint=p.fingerprint,
            )
            for s, p in zip(shapes, plans, strict=True)
        }

    def evaluate(self, state, step: int) -> dict[str, float]:
        return self.evaluator(state, step)


class PackedDiT(DiT):
    """The video DiT on packed rows of a native-shape dataset (`data.packing.tokens_per_row
    > 0`; data/packing.py, diffusion/packed.py): one step shape, so exactly one compiled
    executable for the run; the packer's state (its next step and what the rows depend on)
    is the data state of every checkpoint. Not yet: evaluation in the loop (the evaluators
    read fixed-shape buckets) and context parallelism (models/attention.py refuses it)."""

    def data(self):
        dataset_dir = self.config.data.dataset_dir or self.workdir / "data"
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        rows = packing.options_from_config(self.config).rows_per_batch
        if rows % shards:
            raise ValueError(
                f"data.packing.rows_per_batch={rows} is not a multiple of the {shards} batch "
                "shards of the mesh (mesh data x fsdp): every shard holds whole rows"
            )
        layout = global_batch.row_layout(self.mesh) if jax.process_count() > 1 else None
        self.pipeline = packing.from_config(
            self.config, dataset_dir,
            process_index=jax.process_index(), process_count=jax.process_count(), layout=layout,
        )  # fmt: skip
        self.manifest = self.pipeline.manifest
        _check_manifest(self.config, self.manifest, self.pipeline.dir)
        return self.pipeline

    def check_schedule(self, step: int) -> None:
        del step  # rows are a pure function of (seed, step, the clips' shapes): no schedule

    def state(self):
        manifest = plan_lib.packed_init_manifest(self.config, self.manifest)
        self.model, self.tx, init_fn, abstract, shardings = setup.setup_state(
            self.config, manifest, self.mesh, self.rules
        )
        self.lora = abstract.base is not None
        return init_fn, abstract, shardings

    def compile(self, abstract, shardings) -> dict[str, CompiledStep]:
        jitted = step_lib.jit_packed_train_step(
            self.model, self.tx, self.config, self.mesh, shardings
        )
        batch = plan_lib.packed_abstract_batch(self.config, self.manifest, self.mesh)
        exe, p = plan_lib.compile_packed_step(
            jitted, abstract, batch, self.config, self.mesh, self.rules
        )
        log.info("compiled the packed step in %.1f s", p.compile_s)
        # perf/tokens_per_s counts row slots (padding included); train/useful_tokens the
        # clips' own tokens per step.
        step = CompiledStep(exe, batch, p.global_batch, p.tokens, None, p.fingerprint)
        return {packing.BUCKET: step}

    def evaluate(self, state, step: int) -> dict[str, float]:
        del state, step
        return {}


def _check_manifest(config, manifest: dict, where) -> None:
    """The native dataset's tokenizer and text encoder against the config (the fields the
    model is built from), naming each field that differs."""
    geometry = plan_lib.dataset_geometry(config)
    want = {
        "tokenizer.latent_channels": geometry["tokenizer"]["latent_channels"],
        "text_encoder.dim": geometry["text_encoder"]["dim"],
    }
    have = {
        "tokenizer.latent_channels": manifest["tokenizer"]["latent_channels"],
        "text_encoder.dim": manifest["text_encoder"]["dim"],
    }
    diffs = [f"{k} (dataset {have[k]}, config {want[k]})" for k in want if have[k] != want[k]]
    if diffs:
        raise ValueError(
            f"the native dataset {where} does not match the config: {', '.join(diffs)}; "
            "re-tokenize it with this config"
        )


def dit_family(config: ml_collections.ConfigDict) -> type[Family]:
    """The DiT family of a config: packed rows when `data.packing.tokens_per_row > 0`."""
    return PackedDiT if packing.enabled(config) else DiT
