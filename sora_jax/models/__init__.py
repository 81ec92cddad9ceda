"""Pure-functional Flax Linen models: VideoDiT and presets, layers, tokenizers, text encoders."""

from sora_jax.models.dit import PRESETS, VideoDiT, build_model

__all__ = ["PRESETS", "VideoDiT", "build_model"]
