"""Text encoders behind one interface: `encode(list[str]) -> (embeddings [B,S,D], mask [B,S])`.

Each encoder has an `id` and a weights `hash` recorded in the shard manifest.

`hash_words` is a fixed, weight-free encoder: every lower-cased word gets its own
pseudo-random Gaussian vector (seeded by a stable hash of the word) plus a sinusoidal
position code, so distinct captions get distinct, deterministic embeddings on any machine.
It carries no pretrained knowledge (synonyms are unrelated) and serves the tests and the
synthetic demo, whose vocabulary is small and closed.

The null conditioning of classifier-free guidance is the same for every encoder: all
embeddings zero and all mask entries False (see sora_jax.diffusion.flow).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Sequence

import ml_collections
import numpy as np


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


TEXT_ENCODERS = {
    "hash_words": lambda cfg: HashWordsEncoder(cfg.get("dim", 64), cfg.get("max_length", 16)),
}


def build_text_encoder(config: ml_collections.ConfigDict):
    """The text encoder named by `config.name`."""
    if config.name not in TEXT_ENCODERS:
        raise ValueError(
            f"text_encoder.name={config.name!r} is unknown; known: {sorted(TEXT_ENCODERS)}"
        )
    return TEXT_ENCODERS[config.name](config)
