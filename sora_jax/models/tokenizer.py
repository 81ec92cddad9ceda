"""Video tokenizers behind one interface, chosen by `tokenizer.name`.

A tokenizer maps pixel clips `[B, T, H, W, 3]` in [-1, 1] to latents `[B, T', H', W', C]`
and back. Its `id` and `hash` travel into the shard manifest (docs/formats.md) so that a
trainer refuses latents made by another tokenizer.

`pixels` is the identity up to layout: space-to-depth by `space_to_depth` folds each
s x s pixel block into channels, `C = 3 s²`. It needs no weights and no training, which
makes it the tokenizer of the tests and the demo; learned VAEs register here too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol

import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.models import vae_artifact


class Tokenizer(Protocol):
    id: str
    hash: str
    latent_channels: int

    def check_frames(self, frames: int) -> None: ...

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...

    def encode(self, video): ...

    def decode(self, latents): ...

    def manifest_entry(self) -> dict: ...


class PixelTokenizer:
    """Identity tokenizer with channel-last space-to-depth.

    encode: `[B, T, H, W, 3] -> [B, T, H/s, W/s, 3 s²]`; decode is its exact inverse.
    """

    def __init__(self, space_to_depth: int = 1):
        if space_to_depth < 1:
            raise ValueError(f"tokenizer.space_to_depth={space_to_depth} must be >= 1")
        self.s = int(space_to_depth)
        self.latent_channels = 3 * self.s * self.s
        self.id = f"pixels-s2d{self.s}"
        spec = json.dumps({"name": "pixels", "space_to_depth": self.s, "version": 1})
        self.hash = hashlib.sha256(spec.encode()).hexdigest()[:16]

    def check_frames(self, frames: int) -> None:
        if frames < 1:
            raise ValueError(f"frames={frames} must be >= 1")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        if height % self.s or width % self.s:
            raise ValueError(
                f"pixel size {height}x{width} is not divisible by tokenizer.space_to_depth={self.s}"
            )
        return (frames, height // self.s, width // self.s, self.latent_channels)

    def encode(self, video):
        xp = jnp if isinstance(video, jnp.ndarray) else np
        b, t, h, w, c = video.shape
        self.latent_shape(t, h, w)
        s = self.s
        x = video.reshape(b, t, h // s, s, w // s, s, c)  # split each side into blocks of s
        x = x.transpose(0, 1, 2, 4, 3, 5, 6)  # [B, T, H/s, W/s, s, s, 3]
        return xp.asarray(x).reshape(b, t, h // s, w // s, s * s * c)  # fold blocks into C

    def decode(self, latents):
        xp = jnp if isinstance(latents, jnp.ndarray) else np
        b, t, h, w, _ = latents.shape
        s = self.s
        x = latents.reshape(b, t, h, w, s, s, 3)  # unfold C into s x s blocks of RGB
        x = x.transpose(0, 1, 2, 4, 3, 5, 6)  # [B, T, H/s, s, W/s, s, 3]
        return xp.asarray(x).reshape(b, t, h * s, w * s, 3)

    def manifest_entry(self) -> dict:
        return {
            "id": self.id,
            "hash": self.hash,
            "latent_channels": self.latent_channels,
            "compression": [1, self.s, self.s],
            "normalization": None,
        }


TOKENIZERS = {
    "pixels": lambda cfg: PixelTokenizer(cfg.get("space_to_depth", 1)),
    # A causal 3D VAE artifact at `tokenizer.path` (sora_jax.models.vae_artifact.export_tokenizer).
    "vae": vae_artifact.VAETokenizer.from_config,
}


def build_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by `config.name`."""
    if config.name not in TOKENIZERS:
        raise ValueError(f"tokenizer.name={config.name!r} is unknown; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[config.name](config)
