r"""Fine-tuning Wan 2.2: TI2V-5B (one transformer, Wan 2.2 VAE) or one expert of A14B.

Start from imported weights (`python -m sora_jax.wan import --src=.../transformer` for TI2V-5B
or the high-noise expert, `.../transformer_2` for the low-noise one; docs/wan.md, "Wan 2.2"):

    python -m sora_jax.train --config=experiments/wan22.py:size=ti2v_5b,mode=lora \
        --config.tokenizer.path=runs/wan22_vae --config.text_encoder.path=/models/umt5-xxl \
        --init_from=runs/wan22_5b_imported --workdir=runs/wan22_5b_lora

    python -m sora_jax.train --config=experiments/wan22.py:size=a14b,expert=low,mode=lora \
        --init_from=runs/wan22_a14b_low_imported --workdir=runs/wan22_a14b_low ...

    # both experts in one run (an --init_from checkpoint holding {'high': ..., 'low': ...})
    python -m sora_jax.train --config=experiments/wan22.py:size=a14b,expert=both,mode=lora ...

Plan before taking the machines (8 simulated devices; the recipes are experiments/
wan_finetune.py's for the nearest Wan 2.1 size and have not been planned for Wan 2.2):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m sora_jax.train \
        --config=experiments/wan22.py:size=ti2v_5b --workdir=runs/plan --mode=plan

Variants: `size=ti2v_5b|a14b`; `expert=high|low|both` (a14b: which expert this run trains;
one expert's training times are restricted to its range, `diffusion.time_range` from
sora_jax.models.wan_experts.time_range with `boundary`; `both` trains the two together,
`config.experts`, sora_jax/training/experts.py); `boundary` (the A14B
boundary_ratio, 0.875 for T2V-A14B); `mode`, `device`, `rank`, `frames`, `height`,
`width` as experiments/wan_finetune.py. TI2V-5B trains text-to-video and, as Wan 2.2 does,
text-image-to-video: the first latent frame given clean with time 0 (`diffusion.tasks.i2v`,
no conditioning channels).
"""

import pathlib

import ml_collections

from sora_jax import config as config_lib
from sora_jax.models import wan_experts

# experiments/wan_finetune.py is the base: memory recipes, LoRA targets, optimizer.
finetune = config_lib.load_module(str(pathlib.Path(__file__).with_name("wan_finetune.py")))

# Wan 2.2 size -> (VideoDiT preset, recipe size of wan_finetune.py, VAE preset).
SIZES = {
    # 48-channel Wan 2.2 VAE (4x16x16): a 480x832 clip is 15x26 tokens per latent frame.
    "ti2v_5b": ("wan2_2_ti2v_5b", "1_3b", "wan2_2"),
    # The A14B experts use Wan 2.1's VAE (16 channels, 4x8x8).
    "a14b": ("wan2_2_a14b", "14b", "wan2_1"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg,
        size="ti2v_5b",
        expert="high",
        boundary=wan_experts.BOUNDARY_RATIO_T2V,
        mode="lora",
        device="h100x8",
        rank=32,
        frames=-1,
        height=480,
        width=832,
    )
    if arg.size not in SIZES:
        raise config_lib.ConfigError(f"size={arg.size!r} is unknown; choose one of {list(SIZES)}")
    if arg.expert not in ("high", "low", "both"):
        raise config_lib.ConfigError(f"expert={arg.expert!r} must be 'high', 'low' or 'both'")
    if arg.expert == "both" and arg.size != "a14b":
        raise config_lib.ConfigError(f"expert=both needs size=a14b (size={arg.size!r} has one)")
    preset, recipe_size, vae_preset = SIZES[arg.size]
    c = finetune.get_config(
        f"size={recipe_size},mode={arg.mode},device={arg.device},rank={arg.rank},"
        f"frames={arg.frames},height={arg.height},width={arg.width}"
    )
    c.model.preset = preset
    c.tokenizer.preset = vae_preset

    if arg.size == "ti2v_5b":
        # TI2V: latent frame 0 given clean at t = 0 (per-frame times), as Wan 2.2 5B's
        # pipelines do (expand_timesteps); no conditioning channels (model.cond_channels 0).
        c.diffusion.tasks = ml_collections.ConfigDict({"t2v": 0.5, "i2v": 0.5})
    elif arg.expert == "both":
        # Both experts in one run (training/experts.py): times over [0, 1], each sample
        # routed to the expert of its time; each expert's parameters, optimizer state and
        # EMA sharded like a one-expert run's.
        # Wan2.2-T2V-A14B-Diffusers/model_index.json boundary_ratio (I2V-A14B: 0.9).
        c.experts = ml_collections.ConfigDict(dict(boundary_ratio=arg.boundary))
    else:
        # One expert per run: it learns only the times it denoises at inference.
        expert = wan_experts.HIGH if arg.expert == "high" else wan_experts.LOW
        c.diffusion.time_range = wan_experts.time_range(expert, arg.boundary)
    return c
