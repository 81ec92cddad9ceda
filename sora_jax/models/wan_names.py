r"""The Wan 2.1 name map: each diffusers `WanTransformer3DModel` tensor <-> its VideoDiT
parameter, and the layout change between them. Used by the import (wan_import) and the
export (wan_export).

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
`norm_out`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np


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


def leaf_paths(tree) -> dict[tuple[str, ...], Any]:
    """`{path: leaf}` of a plain parameter tree, paths as tuples of keys."""
    return {
        tuple(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_covered(rules: list[Rule], leaves: Mapping[tuple[str, ...], Any]) -> None:
    """A ValueError unless the rules and the tree's `leaves` (`leaf_paths`) name the same
    parameters: a model outside Wan's architecture, or the wrong fields."""
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
