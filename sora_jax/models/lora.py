"""LoRA (Hu et al. 2021, arXiv:2106.09685) for the VideoDiT as a transform of parameter trees.

A targeted kernel `W` (shape `in_shape + out_shape`, e.g. a query kernel `[D, N, E]`, an
attention output kernel `[N, E, D]`) gets two trainable factors

    A  [*in_shape, r]        B  [r, *out_shape]        scale = alpha / r
    W' = W + scale · (A B)   (A B contracts r; flattened: [in, r] @ [r, out] -> [in, out])

With `model.scan_layers=True` the kernels carry a leading layer axis `[layers, ...]`, and so
do A and B: `A [layers, *in_shape, r]`, `B [layers, r, *out_shape]`, one pair per block.
A starts Kaiming-uniform (bound 1/sqrt(fan_in), as PEFT), B at zero, so `merge(base, lora)`
equals `base` exactly at initialization. No module changes: the train step merges the
factors into the frozen base inside jit and differentiates only A and B.

The LoRA tree mirrors the base tree down to each targeted kernel, which becomes a dict
`{'lora_a': A, 'lora_b': B}`: `blocks_0/self_attn/query/kernel/lora_a`. Targets are a regex
matched (`re.fullmatch`) against kernel paths written with '/', e.g.
`blocks.*/(self_attn|cross_attn)/(query|key|value|out)/kernel` (the real names; list them
with `kernel_paths(jax.eval_shape(model.init, ...)['params'])`).

Where the kernel splits into input and output axes comes from its logical axis names: the
model width `embed` is the whole input side (`[embed | heads, kv]`) or the whole output side
(`[heads, kv | embed]`); a kernel without `embed` splits after its first axis. A keeps the
input axes' names plus `None` for the rank, B `None` plus the output axes' names (and both
keep `layers`): the rank axis is replicated, every other axis shards like the base kernel's.

Exported weights are one safetensors file: tensors named by path
(`blocks_0/self_attn/query/kernel/lora_a`) and metadata `rank`, `alpha`, `targets`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sora_jax.models import dit

# Self- and cross-attention projections of every block: the usual LoRA targets for DiTs.
DEFAULT_TARGETS = r"blocks.*/(self_attn|cross_attn)/(query|key|value|out)/kernel"
A, B = "lora_a", "lora_b"


class LoraError(ValueError):
    """A LoRA config or tree does not fit the model; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `config.lora` section: rank r (0 = off), alpha, target regex."""

    rank: int = 0
    alpha: float = 0.0  # 0 = alpha = rank (scale 1)
    targets: str = DEFAULT_TARGETS

    @classmethod
    def from_config(cls, section) -> LoraConfig:
        """From a config section (ConfigDict, dict or None: LoRA off)."""
        if not section:
            return cls()
        get = section.get
        return cls(
            rank=int(get("rank", 0) or 0),
            alpha=float(get("alpha", 0.0) or 0.0),
            targets=str(get("targets", DEFAULT_TARGETS) or DEFAULT_TARGETS),
        )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / r (the paper's scaling; alpha = r when alpha is 0)."""
        return (self.alpha or self.rank) / self.rank


# --- Paths ------------------------------------------------------------------------------


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def _value(x):
    return x.value if _is_box(x) else x


def kernel_paths(params) -> list[str]:
    """Every kernel of a parameter tree (boxed, plain or abstract) with at least 2 axes."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_box)
    return [
        _path(p) for p, x in leaves if _path(p).endswith("kernel") and len(np.shape(_value(x))) >= 2
    ]


def target_paths(params, targets: str) -> list[str]:
    """The kernel paths `targets` matches (fullmatch); an error listing real paths if none."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise LoraError(f"lora.targets={targets!r} is not a valid regex: {e}") from e
    paths = kernel_paths(params)
    hits = [p for p in paths if pattern.fullmatch(p)]
    if not hits:
        # The first block's kernels name every kind; then the others outside the blocks.
        first = [p for p in paths if p.startswith(("blocks_0/", "blocks/"))]
        rest = [p for p in paths if not p.startswith("blocks")]
        raise LoraError(
            f"lora.targets={targets!r} matches no kernel of the model (matched against the "
            f"whole path with re.fullmatch); its kernels are {first + rest[:4]} and "
            f"{len(paths) - len(first) - len(rest[:4])} more"
        )
    return hits


def model_params_shape(model_cfg, in_channels: int = 4, text_dim: int = 8):
    """The abstract boxed parameters of a model config (`jax.eval_shape`, nothing allocated),
    for its kernel paths; channels and text width change shapes, never paths."""
    model = dit.build_model(model_cfg, in_channels=in_channels, text_dim=text_dim)
    c = in_channels + model.cond_channels
    x = jax.ShapeDtypeStruct((1, *model.patch_size, c), jnp.float32)  # one token
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 1, text_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, text, mask)["params"]


def config_errors(config) -> list[str]:
    """The `lora` section of a run config: rank >= 0, alpha >= 0, and a `targets` regex
    that matches kernels of the model (checked on the abstract parameters of `config.model`)."""
    if "lora" not in config or not config.lora:
        return []
    section = config.lora
    rank, alpha = section.get("rank", 0), section.get("alpha", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        return [f"lora.rank={rank!r} must be an integer >= 0 (0 = full fine-tuning, no LoRA)"]
    if not isinstance(alpha, int | float) or alpha < 0:
        return [f"lora.alpha={alpha!r} must be a number >= 0 (0 = alpha equals the rank)"]
    if rank == 0:
        return []
    try:
        target_paths(model_params_shape(config.model), section.targets)
    except (LoraError, ValueError) as e:
        return [str(e)]
    return []


def layout(names: tuple, ndim: int) -> tuple[int, int]:
    """`(leading layer axes, input axes)` of a kernel from its logical axis names."""
    names = tuple(names) if names else (None,) * ndim
    lead = 0
    while lead < ndim and names[lead] == "layers":
        lead += 1
    rest = names[lead:]
    if len(rest) < 2:
        raise LoraError(f"a kernel with axes {names} has no input and output axes to factor")
    if rest[-1] == "embed" and rest[0] != "embed":
        return lead, len(rest) - 1  # [heads, kv | embed]: the output is the width
    return lead, 1  # [embed | heads, kv], [embed | mlp], [mlp | embed], ...


# --- Initialization -------------------------------------------------------------------


def init(rng: jax.Array, params, config: LoraConfig) -> dict:
    """The LoRA tree for the boxed parameters `model.init(...)['params']` (before unboxing:
    the logical names place the factors' axes). Leaves are boxed too, so the state's
    sharding code shards them like any parameter. B = 0: merged == base at init."""
    if not config.enabled:
        raise LoraError("lora.rank must be > 0 to build LoRA factors")
    targets = set(target_paths(params, config.targets))
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_box)
    out: dict = {}
    for i, (p, box) in enumerate(leaves):
        path = _path(p)
        if path not in targets:
            continue
        if not _is_box(box):
            raise LoraError(
                f"lora.init needs boxed parameters (model.init(...)['params'] before "
                f"nn.meta.unbox): {path} has no logical axis names"
            )
        kernel, names = box.value, tuple(box.names)
        lead, n_in = layout(names, kernel.ndim)
        shape = kernel.shape
        lead_shape, in_shape = shape[:lead], shape[lead : lead + n_in]
        out_shape = shape[lead + n_in :]
        r = config.rank
        fan_in = int(np.prod(in_shape))
        bound = 1.0 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), PEFT's default for A
        a = jax.random.uniform(
            jax.random.fold_in(rng, i), (*lead_shape, *in_shape, r), jnp.float32, -bound, bound
        )
        b = jnp.zeros((*lead_shape, r, *out_shape), jnp.float32)
        node = out
        for k in path.split("/"):
            node = node.setdefault(k, {})
        node[A] = nn.LogicallyPartitioned(a, names[: lead + n_in] + (None,))
        node[B] = nn.LogicallyPartitioned(b, names[:lead] + (None,) + names[lead + n_in :])
    return out


# --- Merge, unmerge, count --------------------------------------------------------------


def factors(lora) -> dict[str, tuple[Any, Any]]:
    """`{kernel path: (A, B)}` of a LoRA tree."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict) and A in node and B in node:
            out[prefix] = (_value(node[A]), _value(node[B]))
            return
        for k, v in node.items():
            walk(v, f"{prefix}/{k}" if prefix else str(k))

    walk(lora, "")
    return out


def delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """`A B` in the kernel's shape. A `[*lead, *in, r]`, B `[*lead, r, *out]`."""
    ndim = len(kernel_shape)
    lead = (a.ndim - 1) + (b.ndim - 1) - ndim  # layer axes are in both factors
    r = a.shape[-1]
    if lead < 0 or b.shape[lead] != r or a.shape[:lead] != b.shape[:lead]:
        raise LoraError(f"LoRA factors {a.shape} x {b.shape} do not fit a kernel {kernel_shape}")
    n = int(np.prod(kernel_shape[:lead], dtype=np.int64))
    a2 = a.reshape(n, -1, r)  # [layers, in, r]
    b2 = b.reshape(n, r, -1)  # [layers, r, out]
    d = jnp.einsum("nir,nro->nio", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return d.reshape(kernel_shape)


def _apply(params, lora, sign_scale: float):
    pairs = factors(lora)

    def update(p, w):
        name = _path(p)
        if name not in pairs:
            return w
        a, b = pairs[name]
        return w + (sign_scale * delta(a, b, w.shape)).astype(w.dtype)

    missing = set(pairs) - set(kernel_paths(params))
    if missing:
        raise LoraError(f"LoRA factors for kernels the model lacks: {sorted(missing)[:5]}")
    return jax.tree_util.tree_map_with_path(update, params)


def merge(base, lora, scale: float):
    """`W + scale · A B` for every factored kernel; other leaves pass through (plain trees)."""
    return _apply(base, lora, scale)


def unmerge(merged, lora, scale: float):
    """`W' - scale · A B`: the base back from merged parameters (to float round-off)."""
    return _apply(merged, lora, -scale)


def count(lora) -> int:
    """Trainable LoRA parameters: sum over factored kernels of r (in + out) (x layers)."""
    return sum(
        int(np.prod(np.shape(a))) + int(np.prod(np.shape(b))) for a, b in factors(lora).values()
    )


# --- Export and load ----------------------------------------------------------------------


def export(path: str | os.PathLike, lora, config: LoraConfig) -> pathlib.Path:
    """Writes the factors (float32) and `rank`, `alpha`, `targets` to one safetensors file."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in factors(jax.device_get(lora)).items():
        tensors[f"{name}/{A}"] = np.ascontiguousarray(np.asarray(a, np.float32))
        tensors[f"{name}/{B}"] = np.ascontiguousarray(np.asarray(b, np.float32))
    meta = {"format": "sora_jax.lora", "rank": str(config.rank), "alpha": str(config.alpha)}
    meta["targets"] = config.targets
    save_file(tensors, str(path), metadata=meta)
    return path


def load(path: str | os.PathLike) -> tuple[dict, LoraConfig]:
    """`(LoRA tree of numpy arrays, LoraConfig)` from a file written by `export`."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights {path} do not exist (write them with lora.export)")
    tree: dict = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "sora_jax.lora":
            raise LoraError(
                f"{path} is not a sora_jax LoRA export (metadata {json.dumps(meta)[:200]})"
            )
        for name in f.keys():
            node = tree
            *parents, leaf = name.split("/")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = f.get_tensor(name)
    config = LoraConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=meta["targets"])
    return tree, config
