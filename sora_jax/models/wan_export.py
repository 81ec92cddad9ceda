r"""sora_jax VideoDiT parameters -> a diffusers Wan 2.1 `WanTransformer3DModel` directory
(or, for Wan 2.2 A14B's two experts, a `WanPipeline` folder: `export_two_experts`).

The inverse of `wan_import`, through the same name map (`wan_names`); the command line is
`python -m sora_jax.wan export --src=RUN --out=DIR` (sora_jax/wan.py, which reads the
parameters from a run's checkpoint). `export_diffusers` writes `config.json` and
`diffusion_pytorch_model.safetensors`, or shards of at most `max_shard_bytes` named
`diffusion_pytorch_model-0000i-of-0000n.safetensors` plus
`diffusion_pytorch_model.safetensors.index.json`, as `save_pretrained` lays them out, so
`WanTransformer3DModel.from_pretrained(DIR)` loads them.

Each tensor goes through `to_hf`, the inverse of the import's layout change (Dense kernels
`[in, out]` -> Linear weights `[out, in]`; per-head `[D, N, E]` / `[N, E, D]` -> `[N·E, D]` /
`[D, N·E]`; the patch kernel `[pt·ph·pw·C, D]` -> Conv3d `[D, C, pt, ph, pw]`; modulation
`[k, D]` -> `[1, k, D]`), in float32, then is cast to the export dtype (float32, bfloat16 or
float16). Channels and text width are read from the parameter shapes. Files are written
tensor by tensor (header first, from the shapes alone), so memory holds the source tree
plus one converted tensor. A float32 export of an import reproduces the original tensors
bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sora_jax.models.wan_import import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    WanShapes,
    abstract_params,
    check_wan_fields,
    diffusers_config,
)
from sora_jax.models.wan_names import Rule, check_covered, hf_shape, leaf_paths, name_map, to_hf

# The tensor dtypes an export can write (`--dtype` of `python -m sora_jax.wan export`).
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

_SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
}


def _write_safetensors(
    path: pathlib.Path, tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], dtype
) -> None:
    """Writes a safetensors file tensor by tensor: `(name, shape, make)` with `make()` giving
    the array (called once, just before its bytes are written)."""
    dtype = np.dtype(dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name, shape, make in tensors:
            x = np.ascontiguousarray(make(), dtype=dtype)
            if x.shape != tuple(shape):
                raise AssertionError(f"{name}: made {x.shape}, header says {shape}")
            fh.write(x.tobytes())


def export_plan(
    params: Mapping, fields: Mapping[str, Any], progress: Callable[[int], None] | None = None
) -> tuple[list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], dict[str, Any]]:
    """What `export_diffusers` writes, from the parameters' shapes alone: `(name, diffusers
    shape, make)` per tensor (`make()` converts it, reading the leaf only then, so abstract
    `jax.ShapeDtypeStruct` leaves list a full-size model's tensors without memory) and the
    `config.json`."""
    check_wan_fields(fields)
    patch = tuple(int(p) for p in fields.get("patch_size", (1, 2, 2)))
    leaves = leaf_paths(params)
    scan = ("blocks", "modulation") in leaves
    layers = (
        leaves[("blocks", "modulation")].shape[0]
        if scan
        else sum(1 for p in leaves if p[0].startswith("blocks_") and p[1:] == ("modulation",))
    )
    if layers != int(fields["num_layers"]):
        raise ValueError(f"params hold {layers} blocks, model.num_layers={fields['num_layers']}")
    cross_norm = bool(fields.get("cross_attn_norm", True))
    rules = name_map(layers, cross_norm, scan)
    check_covered(rules, leaves)
    p = math.prod(patch)
    shapes = WanShapes(
        in_channels=leaves[("patch_embedding", "kernel")].shape[0] // p,
        out_channels=leaves[("head", "kernel")].shape[1] // p,
        text_dim=leaves[("text_embedding_0", "kernel")].shape[0],
    )
    expected = leaf_paths(abstract_params(dict(fields, scan_layers=scan), shapes))
    wrong = [
        f"{'/'.join(k)}: {tuple(leaves[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in leaves and tuple(leaves[k].shape) != tuple(v.shape)
    ]
    if wrong or set(expected) != set(leaves):
        raise ValueError(f"params do not fit model fields {dict(fields)}: {wrong}")

    def make(r: Rule, shape):
        def f():
            leaf = leaves[r.path]
            x = np.asarray(leaf[r.layer] if r.layer is not None else leaf)
            if progress is not None:
                progress(int(x.size))
            return to_hf(r.kind, x.astype(np.float32), shape)

        return f

    entries = []
    for r in rules:
        shape = tuple(leaves[r.path].shape)
        shape = hf_shape(r.kind, shape[1:] if r.layer is not None else shape, patch)
        entries.append((r.name, shape, make(r, shape)))
    return entries, diffusers_config(fields, shapes)


def export_diffusers(
    params: Mapping,
    fields: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Writes VideoDiT `params` as a diffusers WanTransformer3DModel directory at `out`.

    `params` is the plain tree (numpy or jax arrays; stacked `blocks` when the model scans
    its layers); `fields` are the VideoDiT fields it was built with (`dit.model_fields` of
    the run's `config.model`). Channels and text width are read from the parameter shapes.
    Tensors are converted and written one at a time, in shards of at most
    `max_shard_bytes` (`diffusion_pytorch_model-0000i-of-0000n.safetensors` plus the index,
    as `save_pretrained` names them), or one file. Returns the config.json written.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(EXPORT_DTYPES)}")
    np_dtype = np.dtype(EXPORT_DTYPES[dtype])
    entries, config = export_plan(params, fields, progress)
    shards, size = [[]], 0
    for e in entries:
        nbytes = math.prod(e[1]) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        _write_safetensors(out / SINGLE_FILE, shards[0], np_dtype)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / name, shard, np_dtype)
            for tensor, shape, _ in shard:
                weight_map[tensor] = name
                total += math.prod(shape) * np_dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


# diffusers' WanPipeline folder of a two-expert model (Wan2.2-T2V-A14B-Diffusers' layout).
MODEL_INDEX_FILE = "model_index.json"
PIPELINE_CLASS = "WanPipeline"
# The components an export does not write: null in model_index.json, so diffusers loads
# them as None; pass them to `WanPipeline.from_pretrained(DIR, vae=..., text_encoder=...,
# tokenizer=..., scheduler=...)` or copy them from the original pipeline folder.
NOT_EXPORTED = ("scheduler", "text_encoder", "tokenizer", "vae")


def export_two_experts(
    params: Mapping,
    fields: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    boundary_ratio: float,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Writes a two-expert tree `{'high': ..., 'low': ...}` (sora_jax/run/experts.py) as the
    transformers of a diffusers `WanPipeline` folder: `transformer/` (high noise),
    `transformer_2/` (low noise), each as `export_diffusers` writes it, and
    `model_index.json` with `boundary_ratio` (the components in `NOT_EXPORTED` null).
    Returns the model index written."""
    if set(params) != {"high", "low"}:
        raise ValueError(
            f"a two-expert export needs parameters {{'high': ..., 'low': ...}}, got keys "
            f"{sorted(params)}: export a one-model run with export_diffusers"
        )
    ratio = float(boundary_ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(
            f"boundary_ratio={boundary_ratio} must lie in (0, 1) (experts.boundary_ratio)"
        )
    out = pathlib.Path(out)
    for key, folder in (("high", "transformer"), ("low", "transformer_2")):
        export_diffusers(
            params[key], fields, out / folder,
            dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress,
        )  # fmt: skip
    index: dict[str, Any] = {
        "_class_name": PIPELINE_CLASS,
        "boundary_ratio": ratio,
        "expand_timesteps": False,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        **{name: [None, None] for name in NOT_EXPORTED},
    }
    (out / MODEL_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index
