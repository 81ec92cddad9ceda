"""Hugging Face safetensors checkpoints -> Flax parameter trees, with a load report.

A checkpoint is one `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`{"weight_map": {tensor name: shard file}}`), as `save_pretrained` writes them.

Loading is driven by a name map `{HF tensor name: (Flax parameter path, transpose)}` that a
model module derives from its config, and by the model's abstract parameters
(`jax.eval_shape(module.init, ...)`), which give every expected shape. All names and shapes
are checked from the safetensors headers before any tensor data is read, so a checkpoint
that does not match fails in a second with every problem listed at once:

- missing: the model needs the tensor, the checkpoint lacks it;
- unexpected: the checkpoint has a tensor the model does not use and that is not ignored
  by design (e.g. an extra layer: the config says fewer layers than the weights have);
- mismatched: both have it with different shapes (e.g. a wrong `d_ff` in config.json).

Tensors ignored by design (a decoder, an LM head, a buffer) are counted in the report and
never an error. HF `nn.Linear` weights are `[out, in]`; Flax `Dense` kernels are `[in, out]`,
hence the transpose flag.

Weights are read through safetensors' numpy API; bfloat16 tensors load as `ml_dtypes`
bfloat16 arrays (ml_dtypes registers the dtype with numpy and is imported by jax).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read BF16)
import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# {HF tensor name: (path of the parameter in the Flax tree, transpose a 2-D weight)}
NameMap = Mapping[str, tuple[tuple[str, ...], bool]]


def checkpoint_files(
    directory: str | pathlib.Path,
    *,
    single: str = SINGLE_FILE,
    index: str = INDEX_FILE,
    hint: str = "save the model with Hugging Face `save_pretrained(dir, safe_serialization=True)`",
) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint directory: the shards of the index, or the one
    file. `single` and `index` name them (diffusers: `diffusion_pytorch_model.safetensors`);
    `hint` ends the error when neither exists."""
    directory = pathlib.Path(directory)
    index_path = directory / index
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index_path} lists shards that do not exist: {absent}")
        return files
    if (directory / single).exists():
        return [directory / single]
    found = sorted(p.name for p in directory.glob("*")) if directory.is_dir() else "nothing"
    raise FileNotFoundError(
        f"{directory} holds neither {single} nor {index} (found: {found}); {hint}"
    )


def sha256_files(files: Sequence[pathlib.Path], chunk: int = 1 << 24) -> str:
    """First 16 hex digits of the sha256 of the files' bytes, concatenated in the given order."""
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()[:16]


class Checkpoint:
    """Tensor names and shapes of a (sharded) safetensors checkpoint; data read on demand."""

    def __init__(self, files: Sequence[pathlib.Path]):
        self.files = list(files)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._file_of: dict[str, pathlib.Path] = {}
        for f in self.files:
            with safe_open(str(f), framework="np") as fh:
                for name in fh.keys():
                    if name in self._file_of:
                        raise ValueError(f"tensor {name!r} is in {self._file_of[name]} and {f}")
                    self._file_of[name] = f
                    self.shapes[name] = tuple(fh.get_slice(name).get_shape())

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named tensors as numpy arrays, opening each shard once."""
        out: dict[str, np.ndarray] = {}
        by_file: dict[pathlib.Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        for f, group in by_file.items():
            with safe_open(str(f), framework="np") as fh:
                for name in group:
                    out[name] = fh.get_tensor(name)
        return out


@dataclasses.dataclass
class LoadReport:
    """What a load matched. `ok` iff nothing is missing, unexpected or mismatched."""

    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    # (name, shape the model expects in HF layout, shape in the checkpoint)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    ignored: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        verb = "loaded" if self.ok else "match, nothing loaded"
        lines = [f"{self.source}: {len(self.loaded)} tensors {verb}"]
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (", …" if len(self.ignored) > 5 else "")
            lines.append(f"  ignored by design ({len(self.ignored)}): {shown}")
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for name, want, got in self.mismatched:
            lines.append(f"  wrong shape: {name} is {got}, the model expects {want}")
        return "\n".join(lines)

    def raise_if_mismatched(self, config_file: str) -> None:
        if not self.ok:
            raise ValueError(
                f"checkpoint does not match the model built from {config_file}:\n{self}\n"
                "Check that config.json belongs to these weights (num_layers, d_model, d_ff, "
                "num_heads, vocab_size) and that no shard is missing or foreign."
            )


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_params(
    checkpoint: Checkpoint,
    name_map: NameMap,
    abstract_params: Mapping,
    ignore: Callable[[str], bool] = lambda name: False,
    aliases: Mapping[str, str] | None = None,
    source: str = "checkpoint",
) -> tuple[dict | None, LoadReport]:
    """Maps checkpoint tensors onto the model's parameter tree.

    Args:
      name_map: `{HF name: (Flax path, transpose)}`; must cover every leaf of `abstract_params`.
      abstract_params: the model's parameter tree of `jax.ShapeDtypeStruct`s; the leaves'
        dtypes are the dtypes the tensors are cast to.
      ignore: names the model does not need by design (never reported as unexpected).
      aliases: `{HF name: alternative HF name}` read when the first is absent (tied copies,
        e.g. T5's `encoder.embed_tokens.weight` for `shared.weight`).

    Returns:
      (params, report): params is a nested dict of numpy arrays, or None when the report
      is not ok (no tensor data is read then).
    """
    aliases = dict(aliases or {})
    paths = jax.tree_util.tree_leaves_with_path(abstract_params)
    leaves = {tuple(k.key for k in path) for path, _ in paths}
    unmapped = leaves - {path for path, _ in name_map.values()}
    if unmapped:  # a bug in the model's name map, not in the checkpoint
        raise AssertionError(f"model parameters with no checkpoint name: {sorted(unmapped)}")

    source_of: dict[str, str] = {}  # HF name in the map -> name actually read
    missing, mismatched = [], []
    for name, (path, transpose) in name_map.items():
        found = name if name in checkpoint.shapes else aliases.get(name)
        if found not in checkpoint.shapes:
            missing.append(name)
            continue
        want = tuple(get_path(abstract_params, path).shape)
        want = want[::-1] if transpose else want
        if checkpoint.shapes[found] != want:
            mismatched.append((found, want, checkpoint.shapes[found]))
            continue
        source_of[name] = found
    used = set(source_of.values())
    rest = [n for n in sorted(checkpoint.shapes) if n not in used and n not in name_map]
    # A tied alias that was not needed is a redundant copy, ignored by design.
    ignored = [n for n in rest if ignore(n) or n in aliases.values()]
    unexpected = [n for n in rest if n not in ignored]
    report = LoadReport(source, sorted(source_of), missing, unexpected, mismatched, ignored)
    if not report.ok:
        return None, report

    tensors = checkpoint.read(list(source_of.values()))
    params: dict = {}
    for name, found in source_of.items():
        path, transpose = name_map[name]
        value = tensors[found].T if transpose else tensors[found]
        dtype = get_path(abstract_params, path).dtype
        set_path(params, path, np.ascontiguousarray(value.astype(dtype)))
    return params, report
