r"""Wan 2.1 transformer (diffusers `WanTransformer3DModel`) <-> sora_jax VideoDiT parameters.

Import a published Wan 2.1 T2V transformer (a diffusers `transformer/` directory: config.json
plus `diffusion_pytorch_model.safetensors`, or shards listed by
`diffusion_pytorch_model.safetensors.index.json`) into a checkpoint that
`python -m sora_jax.train --init_from=OUT` reads, and export sora_jax parameters back:

    python -m sora_jax.models.wan_import --src=Wan2.1-T2V-1.3B-Diffusers/transformer \
        --out=runs/wan_1_3b_init [--preset=wan2_1_1_3b] [--scan_layers=false]
    python -m sora_jax.models.wan_import --export --src=runs/wan --out=runs/wan_diffusers \
        [--source=ema/decay_0p9999] [--step=N] [--dtype=bfloat16]

Import writes `OUT/checkpoints/0/state` (an Orbax checkpoint holding `{'params': tree}`, the
layout `sora_jax.run.checkpoint.load_for_init` reads), `OUT/model_config.json` (the
resolved `config.model` fields, the preset they match, and the data they need: latent
channels and text width) and `OUT/load_report.txt`. Export (`--export`, implemented in
`sora_jax.models.wan_export`) writes `config.json` and `diffusion_pytorch_model*.safetensors`
that `WanTransformer3DModel.from_pretrained` loads; it uses this module's name map.

Name map (diffusers tensor -> VideoDiT parameter; `L` = `blocks_i`, or `blocks` with a
leading layers axis when `scan_layers`), with the layout change each needs:

    patch_embedding.weight [D, C, pt, ph, pw]    patch_embedding/kernel [pt·ph·pw·C, D]
    condition_embedder.time_embedder.linear_1/2  time_embedding_0/1       (Linear: transpose)
    condition_embedder.time_proj                 time_projection
    condition_embedder.text_embedder.linear_1/2  text_embedding_0/1
    blocks.i.scale_shift_table [1, 6, D]         L/modulation [6, D]
    blocks.i.attn1|attn2.to_q|to_k|to_v [N·E, D] L/self_attn|cross_attn/query|key|value/kernel
                                                 [D, N, E] (bias [N·E] -> [N, E])
    blocks.i.attn1|attn2.to_out.0 [D, N·E]       L/.../out/kernel [N, E, D]
    blocks.i.attn1|attn2.norm_q|norm_k [N·E]     L/.../norm_q|norm_k/scale [N, E]
    blocks.i.norm2 (affine, before cross-attn)   L/norm3/scale, bias
    blocks.i.ffn.net.0.proj, ffn.net.2           L/ffn/wi, L/ffn/wo
    proj_out                                     head
    scale_shift_table [1, 2, D]                  head_modulation [2, D]

diffusers' `norm1`, `norm3` and `norm_out` have no parameters (sora_jax `norm1`, `norm2`,
`norm_out`). Timesteps: diffusers takes `1000 t`, sora_jax `t` in [0, 1] (same rectified-flow
convention, x_t = (1 - t) x_0 + t eps, v = eps - x_0). Wan attends to all text positions
(zero padding included); pass an all-True `text_mask` to reproduce it exactly.

Loading is streamed: all names and shapes are checked from the safetensors headers first
(the report lists every missing, unexpected and wrongly shaped tensor, and any problem is an
error before a byte of data is read); then tensors are read one at a time, converted to
float32 and written into their place in the parameter tree (stacked layers fill slices of
one preallocated array), so memory holds the converted tree plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn
from safetensors import safe_open

from sora_jax.models import dit as dit_lib
from sora_jax.models import rope as rope_lib
from sora_jax.models import safetensors_io
from sora_jax.models.safetensors_io import Checkpoint, LoadReport, get_path, set_path

CONFIG_FILE = "config.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
MODEL_CONFIG_FILE = "model_config.json"
REPORT_FILE = "load_report.txt"
DIFFUSERS_CLASS = "WanTransformer3DModel"
# diffusers' WanTransformer3DModel._keys_to_ignore_on_load_unexpected.
IGNORED_SUFFIXES = ("norm_added_q.weight", "norm_added_q.bias")
WAN_EPS = 1e-6  # every Wan 2.1 norm; sora_jax's LayerNorm / HeadsRMSNorm use it
# VideoDiT fields that have no Wan counterpart: they must keep these values.
WAN_FIXED = dict(mlp="gelu", qk_norm=True, pos_embed="none", pooled_text=False)
# wan_export's tensor dtypes; defined here for the --dtype flag.
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# --- Configs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WanShapes:
    """What a parameter tree needs besides the VideoDiT fields: channels and text width."""

    in_channels: int  # latent channels + conditioning channels
    out_channels: int  # latent channels
    text_dim: int


def fields_from_diffusers(config: Mapping[str, Any], source: str = CONFIG_FILE):
    """`(VideoDiT fields, WanShapes)` of a diffusers WanTransformer3DModel config.json.

    Raises a ValueError naming the field for variants sora_jax does not model (image
    conditioning of I2V, learned position embeddings, other norm epsilons).
    """
    cls = config.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ValueError(f"{source}: _class_name={cls!r}, expected {DIFFUSERS_CLASS!r}")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if config.get(key) is not None:
            raise ValueError(
                f"{source}: {key}={config[key]!r} (image-conditioned Wan, e.g. I2V) is not "
                "supported: VideoDiT has no image cross-attention; use a T2V checkpoint"
            )
    eps = float(config.get("eps", WAN_EPS))
    if not math.isclose(eps, WAN_EPS, rel_tol=1e-6):
        raise ValueError(f"{source}: eps={eps} but VideoDiT's norms use {WAN_EPS}")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    in_ch = int(config.get("in_channels", 16))
    out_ch = int(config.get("out_channels") or in_ch)
    if in_ch < out_ch:
        raise ValueError(f"{source}: in_channels={in_ch} < out_channels={out_ch}")
    fields = dict(
        dim=heads * head_dim,
        num_layers=int(config["num_layers"]),
        num_heads=heads,
        mlp_dim=int(config["ffn_dim"]),
        patch_size=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),
        freq_dim=int(config.get("freq_dim", 256)),
        # diffusers' WanAttention always applies RMSNorm to q and k over all heads,
        # whatever `qk_norm` says.
        cross_attn_norm=bool(config.get("cross_attn_norm", True)),
        **WAN_FIXED,
        rope_split=None,
        cond_channels=in_ch - out_ch,  # extra input channels (e.g. control video) come last
    )
    return fields, WanShapes(in_ch, out_ch, int(config.get("text_dim", 4096)))


def diffusers_config(fields: Mapping[str, Any], shapes: WanShapes) -> dict[str, Any]:
    """The diffusers config.json of VideoDiT `fields` (which must be Wan-compatible)."""
    check_wan_fields(fields)
    dim, heads = int(fields["dim"]), int(fields["num_heads"])
    return {
        "_class_name": DIFFUSERS_CLASS,
        "patch_size": [int(p) for p in fields.get("patch_size", (1, 2, 2))],
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": shapes.in_channels,
        "out_channels": shapes.out_channels,
        "text_dim": shapes.text_dim,
        "freq_dim": int(fields.get("freq_dim", 256)),
        "ffn_dim": int(fields["mlp_dim"]),
        "num_layers": int(fields["num_layers"]),
        "cross_attn_norm": bool(fields.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads",
        "eps": WAN_EPS,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def check_wan_fields(fields: Mapping[str, Any]) -> None:
    """A ValueError naming each VideoDiT field that Wan's architecture cannot express."""
    defaults = {f.name: f.default for f in dataclasses.fields(dit_lib.VideoDiT)}
    bad = [
        f"model.{k}={fields.get(k, defaults[k])!r} (Wan: {v!r})"
        for k, v in WAN_FIXED.items()
        if fields.get(k, defaults[k]) != v
    ]
    split = fields.get("rope_split")
    head_dim = int(fields["dim"]) // int(fields["num_heads"])
    if split is not None and tuple(split) != rope_lib.default_split(head_dim):
        bad.append(f"model.rope_split={tuple(split)} (Wan: {rope_lib.default_split(head_dim)})")
    if bad:
        raise ValueError(
            "these model fields have no Wan 2.1 equivalent: " + ", ".join(bad) + "; only "
            "models with Wan's architecture convert to and from the diffusers layout"
        )


def resolve_model_config(fields: Mapping[str, Any], preset: str | None = None) -> dict[str, Any]:
    """The `config.model` entries that build `fields`: a preset plus explicit fields.

    With `preset`, every field the preset sets must agree with `fields` (else a ValueError
    naming them); without, the first preset that agrees is used, or none. Fields that
    training configs commonly change (pos_embed, scan_layers, ...) are always explicit.
    """
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}

    def agrees(name):
        return {
            k: (v, fields.get(k))
            for k, v in dit_lib.PRESETS[name].items()
            if (list(v) if isinstance(v, tuple) else v) != fields.get(k)
        }

    if preset is not None:
        if preset not in dit_lib.PRESETS:
            raise ValueError(
                f"--preset={preset!r} is unknown; choose one of {list(dit_lib.PRESETS)}"
            )
        diff = agrees(preset)
        if diff:
            shown = ", ".join(f"{k}: preset {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the checkpoint does not have the shape of preset {preset!r} ({shown}); drop "
                "--preset to write its fields explicitly"
            )
    else:
        preset = next((p for p in dit_lib.PRESETS if p.startswith("wan") and not agrees(p)), None)
    covered = set(dit_lib.PRESETS[preset]) if preset else set()
    out: dict[str, Any] = {"preset": preset}
    out.update({k: v for k, v in fields.items() if k not in covered})
    return out


# --- Name map ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """One diffusers tensor <-> one VideoDiT parameter (or one layer's slice of it)."""

    name: str  # diffusers tensor name
    path: tuple[str, ...]  # parameter path in the VideoDiT tree
    kind: str  # layout change, see `to_sora`
    layer: int | None = None  # index along the stacked layers axis (scan_layers)


_TOP = [
    ("patch_embedding.weight", "patch_embedding/kernel", "patch"),
    ("patch_embedding.bias", "patch_embedding/bias", "same"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding_0", "linear"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding_1", "linear"),
    ("condition_embedder.time_proj", "time_projection", "linear"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding_0", "linear"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding_1", "linear"),
    ("proj_out", "head", "linear"),
    ("scale_shift_table", "head_modulation", "table"),
]


def _block(cross_attn_norm: bool) -> list[tuple[str, str, str]]:
    out = [("scale_shift_table", "modulation", "table")]
    for hf, ours in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        for proj, name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            out.append((f"{hf}.{proj}.weight", f"{ours}/{name}/kernel", "heads_in"))
            out.append((f"{hf}.{proj}.bias", f"{ours}/{name}/bias", "heads_vec"))
        out.append((f"{hf}.to_out.0.weight", f"{ours}/out/kernel", "heads_out"))
        out.append((f"{hf}.to_out.0.bias", f"{ours}/out/bias", "same"))
        out.append((f"{hf}.norm_q.weight", f"{ours}/norm_q/scale", "heads_vec"))
        out.append((f"{hf}.norm_k.weight", f"{ours}/norm_k/scale", "heads_vec"))
    if cross_attn_norm:  # diffusers' norm2 (before cross-attention) is sora_jax's norm3
        out += [("norm2.weight", "norm3/scale", "same"), ("norm2.bias", "norm3/bias", "same")]
    out += [("ffn.net.0.proj", "ffn/wi", "linear"), ("ffn.net.2", "ffn/wo", "linear")]
    return out


def _expand(entries) -> Iterator[tuple[str, str, str]]:
    """Module-level 'linear' entries -> their weight (transposed) and bias tensors."""
    for hf, ours, kind in entries:
        if kind == "linear":
            yield f"{hf}.weight", f"{ours}/kernel", "linear"
            yield f"{hf}.bias", f"{ours}/bias", "same"
        else:
            yield hf, ours, kind


def name_map(num_layers: int, cross_attn_norm: bool, scan_layers: bool) -> list[Rule]:
    """Every diffusers tensor of a Wan 2.1 transformer and where it goes in VideoDiT."""
    rules = [Rule(hf, tuple(ours.split("/")), kind) for hf, ours, kind in _expand(_TOP)]
    for i in range(num_layers):
        for hf, ours, kind in _expand(_block(cross_attn_norm)):
            prefix, layer = (("blocks",), i) if scan_layers else ((f"blocks_{i}",), None)
            rules.append(Rule(f"blocks.{i}.{hf}", prefix + tuple(ours.split("/")), kind, layer))
    return rules


def hf_shape(kind: str, shape: tuple[int, ...], patch) -> tuple[int, ...]:
    """The diffusers shape of a VideoDiT parameter of `shape` (one layer's slice)."""
    if kind == "same":
        return tuple(shape)
    if kind == "linear":  # kernel [in, out] -> weight [out, in]
        return tuple(shape[::-1])
    if kind == "heads_in":  # [D, N, E] -> [N·E, D]
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":  # [N, E, D] -> [D, N·E]
        return (shape[2], shape[0] * shape[1])
    if kind == "heads_vec":  # [N, E] -> [N·E]
        return (shape[0] * shape[1],)
    if kind == "table":  # [k, D] -> [1, k, D]
        return (1, *shape)
    if kind == "patch":  # [pt·ph·pw·C, D] -> [D, C, pt, ph, pw]
        return (shape[1], shape[0] // math.prod(patch), *patch)
    raise ValueError(f"unknown layout kind {kind!r}")


def to_sora(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A diffusers tensor in VideoDiT layout `shape` (one layer's slice)."""
    if kind == "linear":
        return x.T
    if kind in ("heads_in", "heads_out"):
        return x.T.reshape(shape)  # [N·E, D]ᵀ -> [D, N, E];  [D, N·E]ᵀ -> [N, E, D]
    if kind == "patch":
        # Conv3d weight [D, C, pt, ph, pw] -> [pt, ph, pw, C, D], the order of patchify's
        # token features, then flattened to the Dense kernel [pt·ph·pw·C, D].
        return x.transpose(2, 3, 4, 1, 0).reshape(shape)
    return x.reshape(shape)  # same / heads_vec / table


def to_hf(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `to_sora`: a VideoDiT parameter in the diffusers `shape`."""
    if kind == "linear":
        return x.T
    if kind == "heads_in":  # [D, N, E] -> [D, N·E] -> [N·E, D]
        return x.reshape(shape[::-1]).T
    if kind == "heads_out":  # [N, E, D] -> [N·E, D] -> [D, N·E]
        return x.reshape(shape[::-1]).T
    if kind == "patch":  # [pt·ph·pw·C, D] -> [pt, ph, pw, C, D] -> [D, C, pt, ph, pw]
        d, c, pt, ph, pw = shape
        return x.reshape(pt, ph, pw, c, d).transpose(4, 3, 0, 1, 2)
    return x.reshape(shape)


def _leaf_paths(tree) -> dict[tuple[str, ...], Any]:
    return {
        tuple(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _check_covered(rules: list[Rule], leaves: Mapping[tuple[str, ...], Any]) -> None:
    mapped = {r.path for r in rules}
    extra = sorted("/".join(p) for p in set(leaves) - mapped)
    if extra:
        raise ValueError(
            f"parameters with no Wan 2.1 counterpart: {extra}; only models with Wan's "
            "architecture (no LoRA, pooled text or SwiGLU) convert to the diffusers layout"
        )
    absent = sorted("/".join(p) for p in mapped - set(leaves))
    if absent:
        raise ValueError(f"the parameter tree lacks {absent}: is it a VideoDiT with these fields?")


def abstract_params(fields: Mapping[str, Any], shapes: WanShapes) -> dict:
    """The plain (unboxed) VideoDiT parameter tree of ShapeDtypeStructs; allocates nothing."""
    # Compute-only fields do not change the tree; plain ones trace on any backend.
    compute = dict(attention_impl="xla", context_parallel="none", remat="none", dtype=jnp.float32)
    model = dit_lib.VideoDiT(
        in_channels=shapes.in_channels,
        out_channels=shapes.out_channels,
        text_dim=shapes.text_dim,
        **{**fields, **compute},
    )
    patch = tuple(model.patch_size)
    x_t = jnp.zeros((1, *patch, shapes.in_channels), jnp.float32)  # one token
    text = jnp.zeros((1, 1, shapes.text_dim), jnp.float32)
    args = (x_t, jnp.zeros((1,), jnp.float32), text, jnp.ones((1, 1), bool))
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    return nn.meta.unbox(boxed)


# --- Import -----------------------------------------------------------------------------


def diffusers_files(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The safetensors files of a diffusers model directory: the index's shards, or the one file."""
    return safetensors_io.checkpoint_files(
        directory,
        single=SINGLE_FILE,
        index=INDEX_FILE,
        hint="give the `transformer/` folder of a diffusers Wan 2.1 model (save_pretrained layout)",
    )


def read_diffusers_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: give the `transformer/` folder of a diffusers Wan 2.1 "
            "model, which holds config.json next to the safetensors"
        )
    return json.loads(path.read_text())


def check_names(
    checkpoint: Checkpoint, rules: list[Rule], params: Mapping, patch, source: str
) -> LoadReport:
    """The load report of `checkpoint` against the name map, from the headers alone."""
    leaves = _leaf_paths(params)
    missing, mismatched, loaded = [], [], []
    for r in rules:
        shape = tuple(leaves[r.path].shape)
        want = hf_shape(r.kind, shape[1:] if r.layer is not None else shape, patch)
        if r.name not in checkpoint.shapes:
            missing.append(r.name)
        elif tuple(checkpoint.shapes[r.name]) != want:
            mismatched.append((r.name, want, tuple(checkpoint.shapes[r.name])))
        else:
            loaded.append(r.name)
    mapped = {r.name for r in rules}
    rest = [n for n in sorted(checkpoint.shapes) if n not in mapped]
    ignored = [n for n in rest if n.endswith(IGNORED_SUFFIXES)]
    unexpected = [n for n in rest if n not in ignored]
    return LoadReport(source, sorted(loaded), missing, unexpected, mismatched, ignored)


def load_diffusers(
    src: str | os.PathLike,
    *,
    scan_layers: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict, dict[str, Any], WanShapes, LoadReport]:
    """`(params, fields, shapes, report)` of a diffusers Wan 2.1 transformer directory.

    `params` is the plain float32 VideoDiT tree (numpy) for `VideoDiT(**fields, ...)` with
    `scan_layers` as given. A report that is not ok raises a ValueError listing every
    missing, unexpected and wrongly shaped tensor; nothing is read then. `progress(n)` is
    called after each tensor with the number of its elements.
    """
    src = pathlib.Path(src)
    fields, shapes = fields_from_diffusers(read_diffusers_config(src), str(src / CONFIG_FILE))
    fields["scan_layers"] = bool(scan_layers)
    abstract = abstract_params(fields, shapes)
    rules = name_map(fields["num_layers"], fields["cross_attn_norm"], scan_layers)
    leaves = _leaf_paths(abstract)
    _check_covered(rules, leaves)
    checkpoint = Checkpoint(diffusers_files(src))
    report = check_names(checkpoint, rules, abstract, fields["patch_size"], str(src))
    if not report.ok:
        raise ValueError(
            f"{src} does not match the Wan 2.1 transformer its config.json describes:\n"
            f"{report}\nCheck that config.json belongs to these weights and that no shard is "
            "missing or foreign."
        )
    # Stacked leaves are filled layer by layer; the others are placed whole.
    params: dict = {}
    for path, leaf in leaves.items():
        if path[0] == "blocks":
            set_path(params, path, np.empty(leaf.shape, leaf.dtype))
    by_file: dict[pathlib.Path, list[Rule]] = {}  # each shard is opened once
    for r in rules:
        by_file.setdefault(checkpoint._file_of[r.name], []).append(r)
    for f, group in by_file.items():
        with safe_open(str(f), framework="np") as fh:
            for r in group:
                leaf = leaves[r.path]
                x = fh.get_tensor(r.name)  # the only source tensor in memory
                if r.layer is None:
                    value = to_sora(r.kind, x, tuple(leaf.shape))
                    set_path(params, r.path, np.ascontiguousarray(value, dtype=leaf.dtype))
                else:
                    get_path(params, r.path)[r.layer] = to_sora(r.kind, x, tuple(leaf.shape[1:]))
                if progress is not None:
                    progress(int(x.size))
                del x
    return params, fields, shapes, report


def write_init_checkpoint(out: str | os.PathLike, params: dict) -> pathlib.Path:
    """Writes `{'params': params}` as step 0 of `OUT/checkpoints`, which `--init_from=OUT`
    (sora_jax.run.checkpoint.load_for_init, source 'params') reads.

    The tree's numpy leaves are replaced, in place and one at a time, by jax arrays: Orbax
    copies numpy leaves while saving (a second copy of the model), but not jax ones.
    """
    from sora_jax.run import checkpoint as ckpt_lib

    def to_device(tree: dict) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                to_device(value)
            else:
                tree[key] = jax.device_put(value)

    to_device(params)

    directory = pathlib.Path(out).absolute() / "checkpoints"
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty: choose a new --out")
    mngr = ckpt_lib.manager(directory, async_save=False, max_to_keep=None)
    try:
        ckpt_lib.save(mngr, 0, {"params": params}, {})
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return directory


def import_diffusers(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    scan_layers: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Converts a diffusers Wan 2.1 transformer into an `--init_from` checkpoint at `out`.

    Returns the resolved model config written to `OUT/model_config.json`: `model` (the
    `config.model` entries: preset and explicit fields), `data` (latent channels and text
    width the training data must have), `flags` (the same as --config overrides),
    `num_params` and the `report` text.
    """
    # Resolve the preset first: a wrong --preset fails before anything is read.
    fields, shapes = fields_from_diffusers(read_diffusers_config(src))
    resolve_model_config({**fields, "scan_layers": scan_layers}, preset)
    params, fields, shapes, report = load_diffusers(src, scan_layers=scan_layers, progress=progress)
    model = resolve_model_config(fields, preset)
    out = pathlib.Path(out)
    write_init_checkpoint(out, params)
    resolved = {
        "source": str(pathlib.Path(src).absolute()),
        "model": model,
        "data": {
            "latent_channels": shapes.out_channels,
            "cond_channels": shapes.in_channels - shapes.out_channels,
            "text_dim": shapes.text_dim,
        },
        "flags": config_flags(model),
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "report": str(report),
    }
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(resolved, indent=2) + "\n")
    (out / REPORT_FILE).write_text(str(report) + "\n")
    return resolved


def config_flags(model: Mapping[str, Any]) -> list[str]:
    """`--config.model.<field>=<value>` overrides for a resolved model config."""
    out = []
    for k, v in model.items():
        if v is None:  # None = the VideoDiT default
            continue
        text = ",".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)
        out.append(f"--config.model.{k}=" + (f"'({text})'" if isinstance(v, list) else text))
    return out


# --- Command line -----------------------------------------------------------------------


def main(argv) -> None:
    from absl import flags, logging

    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines drown the report
    if not f.src or not f.out:
        raise SystemExit("error: --src and --out are required")
    try:
        (_export if f.export else _import)(f)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        # Configuration and checkpoint problems: the message says what to fix.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _import(f) -> None:
    from tqdm import tqdm

    src_fields, shapes = fields_from_diffusers(read_diffusers_config(f.src))
    total = int(sum(x.size for x in jax.tree.leaves(abstract_params(src_fields, shapes))))
    with tqdm(total=total, unit="param", unit_scale=True, desc="convert") as bar:
        resolved = import_diffusers(
            f.src, f.out, preset=f.preset, scan_layers=f.scan_layers, progress=bar.update
        )
    print(resolved["report"])
    print(f"wrote {f.out}/checkpoints/0 ({resolved['num_params']:,} params, float32)")
    print(f"model config ({f.out}/{MODEL_CONFIG_FILE}): {json.dumps(resolved['model'])}")
    print(f"data: {json.dumps(resolved['data'])}")
    flags_text = " ".join(resolved["flags"])
    print(f"train from it: python -m sora_jax.train ... --init_from={f.out} {flags_text}")


def _export(f) -> None:
    from tqdm import tqdm

    from sora_jax.models import wan_export  # imports this module: not at import time

    params, fields, where = wan_export.load_run_params(f.src, f.source, f.step)
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    with tqdm(total=total, unit="param", unit_scale=True, desc="export") as bar:
        config = wan_export.export_diffusers(
            params, fields, f.out, dtype=f.dtype, progress=bar.update
        )
    print(f"{where} -> {f.out} ({total:,} params, {f.dtype})")
    print(json.dumps(config, indent=2, sort_keys=True))
    print(f"load with: WanTransformer3DModel.from_pretrained({str(f.out)!r})")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string(
        "src",
        None,
        "Import: a diffusers Wan transformer/ folder. Export: a "
        "run workdir, checkpoints/<step>, or an import output.",
    )
    flags.DEFINE_string("out", None, "Output directory (import: the --init_from checkpoint).")
    flags.DEFINE_string(
        "preset",
        None,
        "Import: the dit.PRESETS entry the checkpoint must "
        "match (default: the matching wan2_1_* preset, if any).",
    )
    flags.DEFINE_bool(
        "scan_layers",
        True,
        "Import: stack the blocks (must equal the training "
        "config's model.scan_layers; experiments/wan.py scans).",
    )
    flags.DEFINE_bool("export", False, "Export sora_jax params to the diffusers layout.")
    flags.DEFINE_string("source", "params", "Export: 'params' or 'ema/<key>' (decay_0p9999).")
    flags.DEFINE_integer("step", None, "Export: checkpoint step (default: the latest).")
    flags.DEFINE_enum("dtype", "float32", list(EXPORT_DTYPES), "Export: tensor dtype.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
