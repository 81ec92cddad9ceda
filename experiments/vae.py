r"""Causal 3D VAE video tokenizer trained on the synthetic shapes set (issue 5).

Train, export WORKDIR/tokenizer/ and print held-out PSNR against the blurred-mean baseline:

    python benchmarks/vae_quality.py --config=experiments/vae.py --workdir=runs/vae

The library call is `sora_jax.training.loop.train(get_config(arg), workdir)`; a DiT
experiment then uses the artifact with `tokenizer.name='vae'`, `tokenizer.path=
'runs/vae/tokenizer'`. Variants: `tiny` (tests: 16x16 pixels, 5 frames, the tiny preset,
seconds), `steps=N`, `res=R` (pixels, square), `frames=T` (1 + 4k), `preset=wan2_1`
(Wan 2.1's architecture: far beyond a CPU budget).
"""

import ml_collections

from sora_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, tiny=False, steps=-1, res=32, frames=9, preset="")
    if arg.tiny:
        arg.res, arg.frames = 16, 5
    c = ml_collections.ConfigDict()

    # Seed of every random stream: init, data order, posterior samples.
    c.seed = 0
    # Optimizer steps to train for.
    c.total_steps = 20 if arg.tiny else 1800
    if arg.steps > 0:
        c.total_steps = arg.steps
    # Write metrics every this many steps.
    c.log_every_steps = 5 if arg.tiny else 100
    # Save a checkpoint every this many steps (and always at the end).
    c.checkpoint_every_steps = 20 if arg.tiny else 600
    # Held-out PSNR every this many steps; 0 = only at the end (it is always measured there).
    c.eval_every_steps = 0

    # The VAE: sora_jax.models.vae.VAEConfig; fields that are None come from the preset.
    c.model = ml_collections.ConfigDict()
    c.model.name = "causal_vae"
    # Preset of sora_jax.models.vae.PRESETS ('tiny', 'wan2_1'); None = VAEConfig defaults.
    c.model.preset = "tiny" if arg.tiny else (arg.preset or None)
    # Channels of the first level; level i has base_dim * dim_mult[i].
    c.model.base_dim = None if arg.tiny or arg.preset else 8
    # Latent channels C.
    c.model.z_dim = None if arg.tiny or arg.preset else 16
    # Levels: spatial compression 2^(len - 1). 32 px clips get 4x (8x leaves 4x4 latents).
    c.model.dim_mult = None if arg.tiny or arg.preset else (1, 2, 4)
    # Residual blocks per encoder level (the decoder has one more); 0 fits a CPU budget.
    c.model.num_res_blocks = None if arg.tiny or arg.preset else 0
    # Per level transition, whether time halves too: temporal compression 2^(count).
    c.model.temporal_downsample = None if arg.tiny or arg.preset else (True, True)
    # Single-head spatial attention in the mid blocks (Wan 2.1 has it).
    c.model.mid_attention = None

    c.data = ml_collections.ConfigDict()
    c.data.source = ml_collections.ConfigDict()
    # Clips come from sora_jax.data.synthetic (the only source of the VAE trainer so far).
    c.data.source.name = "synthetic"
    # Training clips N (indices 0 .. N-1); held-out clips follow them.
    c.data.source.num_clips = 64 if arg.tiny else 4096
    c.data.source.seed = 0
    # Clip size: frames (1 + 4k), height, width in pixels.
    c.data.frames = arg.frames
    c.data.height = arg.res
    c.data.width = arg.res
    # Held-out clips for the PSNR (indices N .. N + eval_clips - 1).
    c.data.eval_clips = 16 if arg.tiny else 128
    # Clips per step over all devices and processes.
    c.data.global_batch_size = 8

    c.loss = ml_collections.ConfigDict()
    # Reconstruction term: 'l2' or 'l1'. On this set L1 stalls at the all-black median for
    # hundreds of steps (docs/vae.md); L2 leaves it.
    c.loss.recon = "l2"
    # Weight of the per-element KL; small, so latents stay informative but bounded.
    c.loss.kl_weight = 1e-4

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-3
    # Schedule after a linear warmup: 'cosine' | 'constant' | 'wsd'.
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 2 if arg.tiny else 50
    # Final learning rate as a fraction of lr (cosine, wsd).
    c.optimizer.lr_end = 0.05
    # Fraction of steps of the final decay (wsd only).
    c.optimizer.decay_fraction = 0.2
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.99
    c.optimizer.eps = 1e-8
    # Decoupled weight decay on matrices only.
    c.optimizer.weight_decay = 0.0
    # Global-norm gradient clipping; 0 disables.
    c.optimizer.grad_clip = 1.0
    # EMA decays of the parameters (each kept in the checkpoint).
    c.optimizer.ema_decays = (0.99,)

    # Mesh sizes per axis; at most one -1 per family (fills the remaining devices).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.ici_data = -1
    c.mesh.ici_fsdp = 1
    c.mesh.ici_context = 1
    c.mesh.ici_tensor = 1
    c.mesh.dcn_data = -1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_context = 1
    c.mesh.dcn_tensor = 1
    # Logical -> mesh axis rules; () = sora_jax.parallel.mesh.DEFAULT_RULES.
    c.mesh.logical_axis_rules = ()

    # Checkpoints kept (older ones are deleted).
    c.checkpoint_max_to_keep = 2

    c.export = ml_collections.ConfigDict()
    # Artifact directory; '' = WORKDIR/tokenizer.
    c.export.dir = ""
    # Name in the tokenizer id, `causal_vae-<name>`.
    c.export.name = f"synthetic-{arg.res}px"
    # Export this EMA decay's weights; 0 = the raw parameters.
    c.export.ema_decay = 0.99
    # Training clips whose latent means give the per-channel normalization.
    c.export.norm_clips = 32 if arg.tiny else 256
    return c
