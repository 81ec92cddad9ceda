r"""Wan 2.1-sized text-to-video training at 480p (81 frames of 832x480), for planning and
for large runs once a Wan-shaped VAE artifact and umT5 weights are at hand.

Plan memory and FLOPs per device without data or allocation (8 simulated devices here):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m sora_jax.train \
        --config=experiments/wan.py --workdir=runs/wan_plan --mode=plan --plan_memory_gb=80

Train (after `sora_jax.tokenize` with the same config wrote the shards):

    python -m sora_jax.train --config=experiments/wan.py \
        --config.tokenizer.path=runs/vae/tokenizer --config.text_encoder.path=/models/umt5-xxl \
        --workdir=runs/wan

Variants: `size=1_3b|14b` (sora_jax.models.dit.PRESETS wan2_1_*), `frames=81` (1 + 4k),
`height=480,width=832`. The shapes follow Wan 2.1 (Wan team, 2025): VAE 4x8x8 with 16
latent channels, patch (1, 2, 2), umT5-XXL text (4096 wide, 512 tokens).
"""

import pathlib

import ml_collections

from sora_jax import config as config_lib

# The demo config is the base: every field is documented there.
demo = config_lib.load_module(str(pathlib.Path(__file__).with_name("demo.py")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, size="1_3b", frames=81, height=480, width=832)
    c = demo.get_config("")
    bucket = f"{arg.frames}x{arg.height}x{arg.width}"

    c.total_steps = 100_000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000

    # The published Wan 2.1 sizes; every field the preset sets is left None here.
    c.model.preset = f"wan2_1_{arg.size}"
    c.model.dim = c.model.num_layers = c.model.num_heads = c.model.mlp_dim = None
    c.model.pos_embed = "none"  # RoPE only, as Wan
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "auto"  # cuDNN flash on GPUs, splash on TPUs
    c.model.scan_layers = True
    c.model.remat = "full"

    # A Wan 2.1-shaped causal VAE (sora_jax.models.vae.PRESETS['wan2_1']); `path` = its
    # exported artifact. Without one the geometry (4x8x8, 16 channels) still plans.
    c.tokenizer = ml_collections.ConfigDict(
        dict(name="vae", path="", preset="wan2_1", decode_chunk_frames=1, decode_tile=0)
    )
    # umT5-XXL from a local Hugging Face directory (docs/text_encoders.md). Its embeddings
    # take 8 MB per caption in the shards; embed='train_step' stores 2 KB of token ids and
    # runs the frozen encoder, sharded over fsdp, inside the train step.
    c.text_encoder = ml_collections.ConfigDict(
        dict(
            name="t5", path="", dim=4096, max_length=512, dtype="bfloat16", batch_size=16,
            embed="tokenize",
        )
    )  # fmt: skip

    c.data.buckets = ml_collections.ConfigDict(
        {bucket: dict(frames=arg.frames, height=arg.height, width=arg.width, weight=1.0)}
    )
    c.data.global_batch_size = 8
    c.data.source.num_clips = 0  # real videos: set data.source for `sora_jax.tokenize`

    c.diffusion.shift = -1.0  # from tokens per frame and latent frames
    c.optimizer.lr = 1e-4
    c.optimizer.ema_decays = (0.9999,)
    c.mesh.ici_data = 1
    c.mesh.ici_fsdp = -1  # parameters, optimizer state and EMA sharded over every device

    c.sample.bucket = bucket
    c.sample.ema_decay = 0.9999
    c.sample.video_scale = 1
    c.sample.num_steps = 50
    c.sample.cfg_scale = 5.0
    return c
