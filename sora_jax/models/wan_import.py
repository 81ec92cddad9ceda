r"""Wan 2.1 transformer (diffusers `WanTransformer3DModel`) -> sora_jax VideoDiT parameters.

Reads a published Wan 2.1 T2V transformer (a diffusers `transformer/` directory: config.json
plus `diffusion_pytorch_model.safetensors`, or shards listed by
`diffusion_pytorch_model.safetensors.index.json`) into a plain VideoDiT parameter tree with
its model fields (`load_diffusers`), and resolves those fields to `config.model` entries
(`resolve_model_config`, `config_flags`). The command line is `python -m sora_jax.wan
import|export` (sora_jax/wan.py), which also writes the tree as an `--init_from`
checkpoint; the tensor name map and layout changes are in `wan_names`, the inverse
direction in `wan_export`.

Timesteps: diffusers takes `1000 t`, sora_jax `t` in [0, 1] (same rectified-flow
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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from safetensors import safe_open

from sora_jax.models import dit as dit_lib
from sora_jax.models import rope as rope_lib
from sora_jax.models import safetensors_io
from sora_jax.models.safetensors_io import Checkpoint, LoadReport, get_path, set_path
from sora_jax.models.wan_names import Rule, check_covered, hf_shape, leaf_paths, name_map, to_sora

CONFIG_FILE = "config.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_CLASS = "WanTransformer3DModel"
# diffusers' WanTransformer3DModel._keys_to_ignore_on_load_unexpected.
IGNORED_SUFFIXES = ("norm_added_q.weight", "norm_added_q.bias")
WAN_EPS = 1e-6  # every Wan 2.1 norm; sora_jax's LayerNorm / HeadsRMSNorm use it
# VideoDiT fields that have no Wan counterpart: they must keep these values.
WAN_FIXED = dict(mlp="gelu", qk_norm=True, pos_embed="none", pooled_text=False)


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
    leaves = leaf_paths(params)
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
    leaves = leaf_paths(abstract)
    check_covered(rules, leaves)
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


def config_flags(model: Mapping[str, Any]) -> list[str]:
    """`--config.model.<field>=<value>` overrides for a resolved model config."""
    out = []
    for k, v in model.items():
        if v is None:  # None = the VideoDiT default
            continue
        text = ",".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)
        out.append(f"--config.model.{k}=" + (f"'({text})'" if isinstance(v, list) else text))
    return out
