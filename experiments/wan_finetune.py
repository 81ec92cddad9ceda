r"""Fine-tuning Wan 2.1 (1.3B, 14B) at 480p: full or LoRA, with memory recipes per device kind.

Start from converted Wan 2.1 weights (a run directory whose checkpoint holds the model's
parameters, e.g. written by the Wan importer) given as `--init_from`; the tokenized shards
come from `sora_jax.tokenize` with the same config (docs/finetuning.md):

    python -m sora_jax.train --config=experiments/wan_finetune.py:size=1_3b,mode=lora \
        --config.tokenizer.path=runs/vae/tokenizer --config.text_encoder.path=/models/umt5-xxl \
        --init_from=runs/wan2_1_1_3b_imported --workdir=runs/wan_lora

Check that a recipe fits before taking the machines (8 simulated CPU devices; TPU v5p-8 is
4 chips: use 4):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m sora_jax.train \
        --config=experiments/wan_finetune.py:size=1_3b,mode=lora,device=h100x8 \
        --workdir=runs/plan --mode=plan --plan_memory_gb=80

Variants: `size=1_3b|14b`; `mode=lora|full`; `device=h100x8|v5p8` (mesh, remat and batch
per bucket below, planned in docs/finetuning.md); `rank=N` (LoRA rank, alpha = rank);
`frames` (-1 = the recipe's: 81, or 33 where 81 does not fit), `height`, `width` (one
bucket, as experiments/wan.py); `i2v` adds the image-to-video task with conditioning
channels (a t2v checkpoint gets zero rows for them at `--init_from`, sora_jax.models.surgery).
"""

import pathlib

import ml_collections

from sora_jax import config as config_lib

# experiments/wan.py is the base: the Wan 2.1 model, VAE, text encoder and bucket.
wan = config_lib.load_module(str(pathlib.Path(__file__).with_name("wan.py")))

# LoRA targets: attention projections (self and cross) and the FFN of every block, as the
# common Wan 2.1 LoRA trainers do (q, k, v, o, ffn.0, ffn.2).
LORA_TARGETS = r"blocks.*/((self_attn|cross_attn)/(query|key|value|out)|ffn/(wi|wo))/kernel"

# Memory recipes: (device kind, size, mode) -> mesh sizes (context -1 = every device of the
# slice: 8 H100s, 4 v5p chips), global batch, frames of the bucket, EMA decays.
# Checked with --mode=plan on simulated devices (docs/finetuning.md records the tables):
# XLA's reference attention stores the [heads, L, L] scores on CPU, which ring context
# parallelism cuts to blocks, so these fit with room where cuDNN flash / splash run.
RECIPES = {
    # 8 x H100 80 GB.
    ("h100x8", "1_3b", "lora"): dict(fsdp=1, context=-1, batch=2, frames=81, ema=()),
    ("h100x8", "1_3b", "full"): dict(fsdp=1, context=-1, batch=2, frames=81, ema=(0.9999,)),
    ("h100x8", "14b", "lora"): dict(fsdp=1, context=-1, batch=1, frames=81, ema=()),
    # 81 frames: 86 GiB per device planned (93 with tensor 2 x context 4): 33 frames fit.
    ("h100x8", "14b", "full"): dict(fsdp=1, context=-1, batch=1, frames=33, ema=()),
    # TPU v5p-8: 4 chips x 95 GiB.
    ("v5p8", "1_3b", "lora"): dict(fsdp=1, context=-1, batch=1, frames=81, ema=()),
    ("v5p8", "1_3b", "full"): dict(fsdp=1, context=-1, batch=1, frames=81, ema=(0.9999,)),
    # 81 frames: 162 (LoRA) / 175 (full) GiB per device planned; 33 frames fit.
    ("v5p8", "14b", "lora"): dict(fsdp=1, context=-1, batch=1, frames=33, ema=()),
    ("v5p8", "14b", "full"): dict(fsdp=1, context=-1, batch=1, frames=33, ema=()),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg,
        size="1_3b",
        mode="lora",
        device="h100x8",
        rank=32,
        frames=-1,
        height=480,
        width=832,
        i2v=False,
    )
    key = (arg.device, arg.size, arg.mode)
    if key not in RECIPES:
        known = sorted({k[0] for k in RECIPES}), sorted({k[1] for k in RECIPES})
        raise config_lib.ConfigError(
            f"no recipe for device={arg.device}, size={arg.size}, mode={arg.mode}: devices "
            f"{known[0]}, sizes {known[1]}, modes ['full', 'lora']"
        )
    recipe = RECIPES[key]
    frames = arg.frames if arg.frames > 0 else recipe["frames"]
    c = wan.get_config(f"size={arg.size},frames={frames},height={arg.height},width={arg.width}")

    c.total_steps = 2000 if arg.mode == "lora" else 10_000
    c.checkpoint_every_steps = 250
    c.log_every_steps = 10

    # The base: converted Wan 2.1 weights (--init_from overrides); a LoRA run records it.
    c.training.init_from = ""

    # LoRA (docs/finetuning.md): rank 0 = full fine-tuning.
    c.lora.rank = arg.rank if arg.mode == "lora" else 0
    c.lora.alpha = float(arg.rank)  # scale alpha / r = 1
    c.lora.targets = LORA_TARGETS

    # Fine-tuning rates: LoRA factors take larger steps than the pretrained weights.
    c.optimizer.lr = 1e-4 if arg.mode == "lora" else 1e-5
    c.optimizer.warmup_steps = 50 if arg.mode == "lora" else 100
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 0.0 if arg.mode == "lora" else 0.01
    c.optimizer.ema_decays = recipe["ema"]
    c.sample.ema_decay = recipe["ema"][0] if recipe["ema"] else 0.0

    # Memory recipe: parameters (and for full fine-tuning the Adam moments) sharded over
    # fsdp, the 32,760 tokens of a 480p clip over context with ring attention, every block
    # rematerialized (wan.py), batch per bucket from the recipe.
    c.mesh.ici_data = 1
    c.mesh.ici_fsdp = recipe["fsdp"]
    c.mesh.ici_context = recipe["context"]
    c.mesh.ici_tensor = 1
    c.model.context_parallel = "ring" if recipe["context"] != 1 else "none"
    c.model.remat = "full"
    # Parameters sharded over fsdp and context together: with context parallelism every
    # device of the mesh holds 1 / devices of the weights (gathered per block).
    c.mesh.logical_axis_rules = tuple(
        (name, ("fsdp", "context") if axes == "fsdp" else axes) for name, axes in _default_rules()
    )
    c.data.global_batch_size = recipe["batch"]

    if arg.i2v:
        # Image-to-video: the given first latent frame and its mask enter as 16 + 1 input
        # channels; a t2v checkpoint gets zero rows for them (sora_jax.models.surgery).
        c.model.cond_channels = 17
        c.diffusion.tasks = ml_collections.ConfigDict({"t2v": 0.2, "i2v": 0.8})
    return c


def _default_rules():
    from sora_jax.parallel import mesh as mesh_lib

    return mesh_lib.DEFAULT_RULES
