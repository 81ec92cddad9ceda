"""Ahead-of-time compilation of the train step, one executable per bucket, and `--mode=plan`.

The trainer never jits lazily: `compile_steps` lowers and compiles the step for every
bucket's global batch shape before the first step (each served from the persistent
compilation cache when it was compiled before). A batch whose shapes or shardings do not
match its bucket's executable is then an error naming the bucket and the shapes, never a
silent recompilation in the middle of a run.

`python -m sora_jax.train --mode=plan` runs the same compilation without reading any
data or allocating the model (the state and the batch are `jax.ShapeDtypeStruct`s) and
prints per bucket: tokens, global batch, model FLOPs per step, and the per-device memory
XLA reserves (`compiled.memory_analysis()`: arguments, outputs, temporaries). It fails
when a bucket needs more than the device memory: a per-device-kind table below, or
`--plan_memory_gb`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import mixture, packing
from sora_jax.models import flops as flops_lib
from sora_jax.models import lora as lora_lib
from sora_jax.models import text as text_lib
from sora_jax.models import tokenizer as tokenizer_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel import topology as topology_lib
from sora_jax.run import experts as experts_run
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import distill_step
from sora_jax.training import step as step_lib

log = logging.getLogger(__name__)

GB = 1024**3
# Memory per device by `device_kind` substring (first match wins), in GiB: the HBM the
# vendor lists (H100 SXM 80 GB, H200 141 GB, A100 40/80 GB; TPU v4 32 GiB, v5e 16 GiB,
# v5p 95 GiB, v6e 32 GiB). A device kind not listed has no limit unless one is given.
DEVICE_MEMORY_GB = (
    ("H200", 141.0),
    ("H100", 80.0),
    ("A100-SXM4-40GB", 40.0),
    ("A100", 80.0),
    ("TPU v4", 32.0),
    ("TPU v5 lite", 16.0),
    ("TPU v5e", 16.0),
    ("TPU v5p", 95.0),
    ("TPU v5", 95.0),
    ("TPU v6", 32.0),
)


class PlanError(ValueError):
    """A bucket does not fit the device memory."""


def device_memory_gb(device: jax.Device | None = None) -> float | None:
    """The memory `device` (default: the first device) can use, or None when unknown: a
    real accelerator's allocator limit (`memory_stats()['bytes_limit']`), else the listed
    memory of its kind (compile-only TPU devices). CPU devices share the host's RAM: its
    total divided by the local device count."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return ram / GB / jax.local_device_count()
    try:  # a real accelerator: what its allocator may use (a GPU's XLA_PYTHON_CLIENT_MEM_FRACTION)
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # compile-only devices of a topology have no allocator
        limit = None
    if limit:
        return limit / GB
    for key, gb in DEVICE_MEMORY_GB:
        if key.lower() in device.device_kind.lower():
            return gb
    return None


def dataset_geometry(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the model and the batch shapes need from a dataset, derived from the config
    alone (the tokenizer's latent geometry and the text encoder's width), in the layout of
    a shard manifest, so a plan needs no tokenized data."""
    tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
    text = config.text_encoder
    if text.get("dim") and text.get("max_length"):  # no need to open the encoder's weights
        text_entry = {"dim": int(text.dim), "max_length": int(text.max_length)}
    else:
        entry = text_lib.build_text_encoder(text).manifest_entry()
        text_entry = {"dim": entry["dim"], "max_length": entry["max_length"]}
    text_entry["embed"] = text_lib.embed_mode(text)
    return {
        "tokenizer": {"latent_channels": tokenizer.latent_channels},
        "text_encoder": text_entry,
        "buckets": {
            b.name: {"shape": list(tokenizer.latent_shape(b.frames, b.height, b.width))}
            for b in buckets_lib.buckets_from_config(config.data)
        },
    }


@dataclasses.dataclass(frozen=True)
class StepShape:
    """One compiled step: a bucket's schedule key, latent shape and global batch."""

    key: str
    shape: tuple[int, ...]  # latent [T', H', W', C]
    global_batch: int


def config_step_shapes(config, manifest: dict, data_parallel: int) -> list[StepShape]:
    """The steps a config trains, without reading data: each bucket of `data.buckets` with
    its global batch by the pipeline's precedence (docs/data_pipeline.md)."""
    out = []
    for b in buckets_lib.buckets_from_config(config.data):
        shape = tuple(manifest["buckets"][b.name]["shape"])
        tokens = flops_lib.tokens_per_sample(config.model, shape)
        explicit = config.data.buckets[b.name].get("global_batch_size", 0)
        batch, _ = mixture._batch(
            b.name,
            b.name,
            tokens,
            global_batch_size=config.data.global_batch_size,
            bucket_batch_sizes={b.name: explicit} if explicit else {},
            tokens_per_device=config.data.get("tokens_per_device", 0),
            data_parallel=data_parallel,
        )
        out.append(StepShape(b.name, shape, int(batch)))
    return out


def pipeline_step_shapes(pipeline) -> list[StepShape]:
    """The steps a pipeline serves (mixtures and token budgets included)."""
    return [
        StepShape(b.key, tuple(b.shape), b.global_batch) for b in pipeline.buckets if b.weight > 0
    ]


def abstract_batch(manifest: dict, step: StepShape, mesh) -> dict[str, Any]:
    """The global batch of one step as sharded `ShapeDtypeStruct`s (record dtypes)."""
    text = manifest["text_encoder"]
    sharding = mesh_lib.batch_sharding(mesh)
    g = step.global_batch
    spec = {
        "latents": ((g, *step.shape), jnp.float16),  # stored as float16 in records
        "text": ((g, text["max_length"], text["dim"]), jnp.float32),
        "text_ids": ((g, text["max_length"]), jnp.int32),  # embed='train_step'
        "text_mask": ((g, text["max_length"]), jnp.bool_),
    }
    spec = {k: spec[k] for k in ("latents", *text_lib.record_fields(text))}
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in spec.items()}


def check_batch(batch: dict[str, Any], expected: dict[str, Any], bucket: str) -> None:
    """Refuses a batch whose shapes or dtypes differ from its bucket's compiled step (the
    step would otherwise need a recompilation that the trainer does not do mid-run)."""
    got = {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in batch.items()}
    want = {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in expected.items()}
    if got != want:
        diff = {k: f"{got.get(k)} != compiled {want.get(k)}" for k in want if got.get(k) != want[k]}
        same_rows = lambda k: got.get(k) and got[k][0][1:] == want[k][0][1:]  # noqa: E731
        if all(same_rows(k) and got[k][1] == want[k][1] for k in diff):  # only the batch rows
            sharding = getattr(next(iter(expected.values())), "sharding", None)
            spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
            axes = spec[0] if spec else ("data", "fsdp")
            sizes = dict(mesh.shape) if mesh is not None else "of the run"
            raise ValueError(
                f"a batch of bucket {bucket!r} does not match the step compiled for it: {diff}; "
                "this process built a different share of the batch than the mesh needs: rows "
                f"are split over mesh axes {axes} of the mesh {sizes}, and every process must "
                "hold the rows of its devices' batch shards (data/global_batch.py: build the "
                "pipeline and to_global_batch from the same mesh)"
            )
        raise ValueError(
            f"a batch of bucket {bucket!r} does not match the step compiled for it: {diff}; "
            "the dataset's shards disagree with the config (re-tokenize, or fix data.buckets)"
        )


@dataclasses.dataclass
class BucketPlan:
    bucket: str
    latent_shape: tuple[int, ...]
    tokens: int
    global_batch: int
    model_tflops_per_step: float  # training FLOPs (3F, LoRA less) x global batch, models/flops.py
    xla_tflops_per_step: float | None  # XLA's cost analysis of the compiled step
    argument_gb: float  # per device
    output_gb: float
    temp_gb: float
    alias_gb: float  # outputs sharing argument buffers (donated state)
    compile_s: float
    # Mosaic (Pallas TPU) kernels in the compiled step by name, e.g. splash's forward and
    # fused backward: empty on other platforms, and when a kernel was interpreted.
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    # What the compiled step computes (`step_fingerprint`): equal in two processes that
    # run the same step, so a resumed run can tell whether it continues with the same one.
    fingerprint: str = ""

    @property
    def peak_gb(self) -> float:
        """Arguments + temporaries + outputs not aliased to (donated) arguments."""
        return self.argument_gb + self.temp_gb + max(self.output_gb - self.alias_gb, 0.0)


def compile_steps(
    jitted,
    abstract_state,
    manifest: dict,
    steps: list[StepShape],
    config: ml_collections.ConfigDict,
    mesh,
    rules,
) -> tuple[dict[str, Any], list[BucketPlan]]:
    """Compiles `jitted(state, batch)` for every step shape.

    Returns `{bucket key: compiled executable}` and a `BucketPlan` per bucket.
    """
    compiled, plans = {}, []
    text_len = manifest["text_encoder"]["max_length"]
    lora = lora_lib.LoraConfig.from_config(config.get("lora"))
    for step in steps:
        batch = abstract_batch(manifest, step, mesh)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            lowered = jitted.lower(abstract_state, batch)
            try:
                exe = lowered.compile()
            except jax.errors.JaxRuntimeError as e:  # the target's compiler refused the step
                raise _compile_error(step, mesh, e) from e
        compile_s = time.perf_counter() - t0
        compiled[step.key] = exe
        tokens = flops_lib.tokens_per_sample(config.model, step.shape)
        train_flops = flops_lib.train_flops_per_sample(
            config.model, tokens, text_len, lora=lora, global_batch=step.global_batch
        )
        mem = exe.memory_analysis()
        hlo = exe.as_text()
        cost = exe.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        xla_flops = (cost or {}).get("flops")
        plans.append(
            BucketPlan(
                bucket=step.key,
                latent_shape=step.shape,
                tokens=tokens,
                global_batch=step.global_batch,
                model_tflops_per_step=train_flops * step.global_batch / 1e12,
                # XLA counts one device's share of the partitioned program.
                xla_tflops_per_step=(
                    None if xla_flops is None else xla_flops * mesh.devices.size / 1e12
                ),
                argument_gb=_gb(mem, "argument_size_in_bytes"),
                output_gb=_gb(mem, "output_size_in_bytes"),
                temp_gb=_gb(mem, "temp_size_in_bytes"),
                alias_gb=_gb(mem, "alias_size_in_bytes"),
                compile_s=compile_s,
                kernels=mosaic_kernels(hlo),
                fingerprint=step_fingerprint(hlo),
            )
        )
    return compiled, plans


def _compile_error(step: StepShape, mesh, error: Exception) -> PlanError:
    """A compiler refusal as a PlanError naming the bucket, the device and the fixes: out of
    device memory (HBM) or out of a kernel's memory space (SMEM, VMEM) on a TPU."""
    kind = mesh.devices.flat[0].device_kind
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    message = next((ln for ln in lines if "memory" in ln.lower()), lines[0] if lines else "")
    if "smem" in message.lower() or "vmem" in message.lower():
        fix = (
            "a kernel's per-core memory is exceeded: raise model.splash_block_size (fewer, "
            "larger attention blocks), or shard the sequence (mesh.ici_context with "
            "model.context_parallel)"
        )
    else:
        fix = (
            "shrink data.global_batch_size or the bucket, shard more (mesh.ici_fsdp, "
            "ici_context, ici_tensor), or set model.remat"
        )
    return PlanError(
        f"bucket {step.key} (global batch {step.global_batch}) does not compile for "
        f"{mesh.devices.size} x {kind}: {message[:400]}; {fix}"
    )


def mosaic_kernels(hlo_text: str) -> dict[str, int]:
    """Mosaic kernels (custom calls to `tpu_custom_call`) in compiled HLO text, counted by
    kernel name (`splash_mha_fwd_segmented_residuals`, ...). An interpreted Pallas kernel
    is plain HLO and is not counted."""
    counts: dict[str, int] = {}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            m = re.match(r"\s*(?:ROOT\s+)?%?([A-Za-z_][A-Za-z0-9_]*?)(?:\.\d+)*\s*=", line)
            name = m.group(1) if m else "tpu_custom_call"
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# `metadata={op_name=... source_file=... source_line=...}` of an HLO instruction (quoted
# strings may hold braces).
_HLO_METADATA = re.compile(r', metadata=\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}')


def step_fingerprint(hlo_text: str) -> str:
    """A hash of what a compiled step computes: its optimized HLO (`compiled.as_text()`),
    the module's header and computations, without the source locations (instruction
    metadata, the module's file and stack-frame tables), which move with any edit above a
    line and change nothing computed. Two processes that compiled (or loaded from the
    persistent cache) the same step agree; a change of the model or loss code, of the
    compiler's rewrites (an XLA version, its flags) or of the mesh changes it."""
    kept, inside = [], False
    for line in hlo_text.splitlines():
        if line.startswith("HloModule "):
            kept.append(line)
        elif inside or line.startswith(("%", "ENTRY %")):  # a computation, to its "}"
            kept.append(_HLO_METADATA.sub("", line))
            inside = line != "}"
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def _gb(mem, field: str) -> float:
    return float(getattr(mem, field, 0) or 0) / GB if mem is not None else 0.0


def format_plan(
    plans: list[BucketPlan], mesh, limit_gb: float | None, target: str | None = None
) -> str:
    devices = mesh.devices.size
    kind = mesh.devices.flat[0].device_kind
    limit = f"{limit_gb:g} GiB" if limit_gb else "unknown (no check)"
    where = f" for {target}" if target else ""
    lines = [
        f"plan{where}: {devices} x {kind}, mesh {dict(mesh.shape)}, memory per device {limit}",
        f"  {'bucket':<16} {'latent':<18} {'tokens':>7} {'batch':>6} {'TFLOP/step':>11} "
        f"{'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'peak GiB':>9} {'compile s':>9}",
    ]
    for p in plans:
        lines.append(
            f"  {p.bucket:<16} {str(list(p.latent_shape)):<18} {p.tokens:>7} "
            f"{p.global_batch:>6} {p.model_tflops_per_step:>11.3f} {p.argument_gb:>9.3f} "
            f"{p.temp_gb:>9.3f} {p.output_gb:>8.3f} {p.peak_gb:>9.3f} {p.compile_s:>9.1f}"
        )
    kernels = sorted({f"{k} x{n}" for p in plans for k, n in p.kernels.items()})
    if kernels:
        lines.append(f"  Mosaic kernels per step: {', '.join(kernels)}")
    lines.append(
        "  (memory per device from XLA's memory_analysis; TFLOP/step = training FLOPs x batch: "
        "3F, or 2F + the targeted kernels' gradients for LoRA, models/flops.py)"
    )
    return "\n".join(lines)


def check_memory(plans: list[BucketPlan], limit_gb: float | None) -> None:
    if not limit_gb:
        return
    over = [p for p in plans if p.peak_gb > limit_gb]
    if over:
        names = ", ".join(f"{p.bucket} ({p.peak_gb:.3g} GiB)" for p in over)
        raise PlanError(
            f"buckets {names} need more than the {limit_gb:g} GiB per device: shrink "
            "data.global_batch_size or the bucket, shard more (mesh.ici_fsdp, ici_context, "
            "ici_tensor), set model.remat, or pass --plan_memory_gb if the limit is wrong"
        )


def plan(
    config: ml_collections.ConfigDict,
    *,
    memory_gb: float | None = None,
    devices=None,
    topology: str | None = None,
    num_slices: int = 1,
) -> list[BucketPlan]:
    """Compiles the train step for every bucket without data or allocation; prints the
    table and raises PlanError when a bucket exceeds `memory_gb` (default: by device kind).

    `devices`: what to compile for (default: this host's). `topology`: a TPU slice by name
    (`v5p-64`, `v6e:8x8`; sora_jax/parallel/topology.py), `num_slices` of it, compiled
    for on this host whatever it is: the plan of the TPU program the run will execute.
    """
    target = None
    if topology:
        if devices is not None:
            raise ValueError("plan: pass devices or topology, not both")
        slice_ = topology_lib.parse(topology, num_slices)
        devices, target = topology_lib.devices(slice_), slice_.describe()
    validate_lib.validate(config, devices)
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
    manifest = dataset_geometry(config)
    distilling = distill_step.enabled(config)  # a few-step student: its step, its teacher
    two_experts = experts_run.enabled(config)  # Wan 2.2 A14B: both experts in one state
    build = setup.setup_state
    if distilling:
        build = distill_step.setup_state
    elif two_experts:
        build = experts_run.setup_state
    if packing.enabled(config):  # one step shape for the run (the section at the end)
        plans = [plan_packed(config, mesh, rules, manifest)[1]]
        limit = memory_gb if memory_gb else device_memory_gb(mesh.devices.flat[0])
        print(format_plan(plans, mesh, limit, target), flush=True)
        check_memory(plans, limit)
        return plans
    model, tx, _, abstract, shardings = build(config, manifest, mesh, rules)
    jit_step = distill_step.jit_distill_step if distilling else step_lib.jit_train_step
    jitted = jit_step(model, tx, config, mesh, shardings)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    steps = config_step_shapes(config, manifest, data_parallel)
    _, plans = compile_steps(jitted, abstract, manifest, steps, config, mesh, rules)
    limit = memory_gb if memory_gb else device_memory_gb(mesh.devices.flat[0])
    print(format_plan(plans, mesh, limit, target), flush=True)
    if two_experts:
        n = {k: state_lib.param_count(v) for k, v in abstract.params.items()}
        print(
            f"  two experts (boundary {config.experts.boundary_ratio:g}): high {n['high']:,} "
            f"and low {n['low']:,} trainable parameters; every sample runs both experts "
            "(TFLOP/step counts one: the step runs twice that, training/experts.py)",
            flush=True,
        )
    if distilling and distill_step.options(config).method == "dmd2":
        print(
            f"  distillation (DMD2): generator {state_lib.param_count(abstract.params):,} "
            f"trainable parameters, frozen teacher {state_lib.param_count(abstract.base):,}, "
            "fake-score network "
            f"{state_lib.param_count(abstract.opt_state['fake_score']):,} trainable with its "
            "optimizer state (all in 'args GiB'); TFLOP/step counts 3F "
            "(training/distill.py: DMD2_FORWARDS)",
            flush=True,
        )
    elif distilling:  # the frozen teacher is the state's `base`, an argument of the step
        print(
            f"  distillation: student {state_lib.param_count(abstract.params):,} trainable "
            f"parameters, frozen teacher {state_lib.param_count(abstract.base):,} (both in "
            "'args GiB'); TFLOP/step counts 3F, the step runs about 7F "
            "(training/distill.py)",
            flush=True,
        )
    elif abstract.base is not None:  # LoRA: the frozen base is an argument, not trained
        print(
            f"  LoRA rank {config.lora.rank}: {state_lib.param_count(abstract.params):,} "
            f"trainable parameters on a frozen base of {state_lib.param_count(abstract.base):,}",
            flush=True,
        )
    if abstract.text_encoder is not None:  # frozen, read by the step, not trained
        print(
            f"  text encoder in the step: {state_lib.param_count(abstract.text_encoder):,} "
            f"frozen parameters sharded over fsdp={mesh.shape['fsdp']} (in 'args GiB')",
            flush=True,
        )
    check_memory(plans, limit)
    return plans


# --- Packed rows (data.packing): one step shape for the whole run ------------------------
#
# A config with `data.packing.tokens_per_row > 0` trains on packed rows of a native-shape
# dataset (data/packing.py, the model's packed call in models/dit.py, diffusion/packed.py).
# Every step has one shape, so the run compiles exactly one executable:
#
#     tokens [B, L, P·C] float32, segment_ids [B, L] int32, positions [B, L, 3] int32,
#     segment_shapes [B, K, 3] int32, text [B, K, S, D] float32 (text_ids [B, K, S] int32
#     with text_encoder.embed='train_step'), text_mask [B, K, S] bool
#
# with B = data.packing.rows_per_batch, L = tokens_per_row, K = max_segments, rows sharded
# over ('data', 'fsdp'). `tokens` in the plan is per row; model FLOPs are not reported (the
# formula of models/flops.py assumes one clip per sequence).


def packed_init_manifest(config: ml_collections.ConfigDict, manifest: dict) -> dict:
    """`manifest` with one bucket of a single patch (`[p_t, p_h, p_w, C]`) under the first
    name of `data.buckets`, what `run.setup.example_inputs` initializes the model from
    (parameters do not depend on the video's shape); a native manifest has no buckets."""
    names = [b.name for b in buckets_lib.buckets_from_config(config.data)]
    if not names:
        raise ValueError(
            "data.buckets is empty: a packed run still names one bucket (any shape) from "
            "which the model is initialized; keep the config's data.buckets"
        )
    c = int(manifest["tokenizer"]["latent_channels"])
    shape = [*(int(p) for p in config.model.patch_size), c]
    return {**manifest, "buckets": {names[0]: {"shape": shape}}}


def packed_abstract_batch(
    config: ml_collections.ConfigDict, manifest: dict, mesh
) -> dict[str, Any]:
    """The packed global batch (module docstring) as sharded `ShapeDtypeStruct`s."""
    o = packing.options_from_config(config)
    b, length, k = o.rows_per_batch, o.tokens_per_row, o.max_segments
    text = manifest["text_encoder"]
    s = int(text["max_length"])
    p = 1
    for v in config.model.patch_size:
        p *= int(v)
    feat = p * int(manifest["tokenizer"]["latent_channels"])
    spec = {
        "tokens": ((b, length, feat), jnp.float32),
        "segment_ids": ((b, length), jnp.int32),
        "positions": ((b, length, 3), jnp.int32),
        "segment_shapes": ((b, k, 3), jnp.int32),
        "text": ((b, k, s, int(text["dim"])), jnp.float32),
        "text_ids": ((b, k, s), jnp.int32),
        "text_mask": ((b, k, s), jnp.bool_),
    }
    names = (*packing.STEP_FIELDS, *text_lib.record_fields(text))
    sharding = mesh_lib.batch_sharding(mesh)
    return {n: jax.ShapeDtypeStruct(*spec[n], sharding=sharding) for n in names}


def compile_packed_step(jitted, abstract_state, batch, config, mesh, rules):
    """The one compiled packed step and its `BucketPlan` (memory, compile time): what the
    trainer runs (training/families.py `PackedDiT`) and `--mode=plan` reports."""
    o = packing.options_from_config(config)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        exe = jitted.lower(abstract_state, batch).compile()
    mem = exe.memory_analysis()
    hlo = exe.as_text()
    return exe, BucketPlan(
        bucket=packing.BUCKET,
        latent_shape=(o.tokens_per_row,),
        tokens=o.tokens_per_row,
        global_batch=o.rows_per_batch,
        model_tflops_per_step=float("nan"),
        xla_tflops_per_step=None,
        argument_gb=_gb(mem, "argument_size_in_bytes"),
        output_gb=_gb(mem, "output_size_in_bytes"),
        temp_gb=_gb(mem, "temp_size_in_bytes"),
        alias_gb=_gb(mem, "alias_size_in_bytes"),
        compile_s=time.perf_counter() - t0,
        kernels=mosaic_kernels(hlo),
        fingerprint=step_fingerprint(hlo),
    )


def plan_packed(config, mesh, rules, manifest) -> tuple[Any, BucketPlan]:
    """`--mode=plan` of a packed config: the one step, compiled without data."""
    model, tx, _, abstract, shardings = setup.setup_state(
        config, packed_init_manifest(config, manifest), mesh, rules
    )
    jitted = step_lib.jit_packed_train_step(model, tx, config, mesh, shardings)
    batch = packed_abstract_batch(config, manifest, mesh)
    return compile_packed_step(jitted, abstract, batch, config, mesh, rules)
