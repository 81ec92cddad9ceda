r"""The embedded demo: coloured shapes moving in described directions, end to end.

A built-in synthetic set of captioned clips ("a red square moving left slowly") is
tokenized into ArrayRecord shards (pixels tokenizer, hash-words text encoder), a small
VideoDiT is trained on them with the rectified-flow loss through grain on a device mesh,
checkpointed with Orbax, and sampled with classifier-free guidance. `make demo` runs it all:

    python -m sora_jax.demo --workdir=runs/demo

Each stage alone (same config, same workdir):

    python -m sora_jax.tokenize --config=experiments/demo.py --workdir=runs/demo
    python -m sora_jax.train    --config=experiments/demo.py --workdir=runs/demo
    python -m sora_jax.sample   --config=experiments/demo.py --workdir=runs/demo \
        --prompt="a red circle moving up quickly"
    python -m sora_jax.evaluate --config=experiments/demo.py --workdir=runs/demo

Variants: `experiments/demo.py:tiny` shrinks everything to run in seconds (tests);
`packed` tokenizes clips at their native shapes and trains on packed rows (one compiled
step; docs/data_pipeline.md);
`causal` trains a block-causal model with diffusion forcing, sampled chunk by chunk with a
rolling KV cache to any length (docs/sampling.md, Long videos);
`wrap` renders the synthetic clips on a torus (`data.source.motion='wrap'`: shapes leave
one side and re-enter from the other, so motion can go on past the clip), e.g.
`causal,wrap` for the long-video demo and `wrap` for its full-attention baseline;
`steps=N` sets the training length. Override any field, e.g. `--config.optimizer.lr=1e-3`.
"""

import ml_collections

from sora_jax import config as config_lib

PROMPTS = (
    "a red square moving left slowly",
    "a green circle moving right quickly",
    "a blue triangle moving up slowly",
    "a yellow square moving down quickly",
    "a magenta circle moving left quickly",
    "a cyan triangle moving right slowly",
    "a red circle moving down slowly",
    "a green square moving up quickly",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, tiny=False, steps=-1, res=16, frames=5, s2d=2, packed=False, causal=False, wrap=False
    )
    bucket = f"{arg.frames}x{arg.res}x{arg.res}"
    c = ml_collections.ConfigDict()

    # Seed of every random stream: init, data order, noise, times, caption dropout.
    c.seed = 0
    # Optimizer steps to train for.
    c.total_steps = 40 if arg.tiny else 2000
    if arg.steps > 0:
        c.total_steps = arg.steps
    # Write metrics every this many steps.
    c.log_every_steps = 10 if arg.tiny else 100
    # Save a checkpoint every this many steps (and always at the end).
    c.checkpoint_every_steps = 20 if arg.tiny else 400
    # Run the evaluators every this many steps; 0 = only by `sora_jax.evaluate`.
    c.eval_every_steps = 0

    # The model: a VideoDiT over spacetime patches of latents.
    c.model = ml_collections.ConfigDict()
    c.model.name = "video_dit"
    # Size preset from sora_jax.models.dit.PRESETS; fields below override it when not None.
    c.model.preset = None
    c.model.dim = 64 if arg.tiny else 128
    c.model.num_layers = 2 if arg.tiny else 4
    c.model.num_heads = 4
    c.model.mlp_dim = 4 * c.model.dim
    # Latent patch (frames, height, width) per token.
    c.model.patch_size = (1, 2, 2)
    # Absolute positions on top of RoPE: 'none' | 'sincos'. The demo's captions fix where the
    # shape is on each frame (it enters from the side it moves away from), which a model
    # can only express from pure noise if tokens know their absolute position.
    c.model.pos_embed = "sincos"
    # Add the pooled caption to the adaLN conditioning (SD3-style) besides cross-attention.
    c.model.pooled_text = False
    # Compute dtype: 'float32' or 'bfloat16' (parameters are always float32).
    c.model.dtype = "float32"
    # Attention implementation: 'xla' | 'cudnn' | 'splash' | 'auto'.
    c.model.attention_impl = "xla"
    # Context parallelism over mesh axis `context`: 'none' | 'ulysses' | 'ring'
    # (docs/parallelism.md).
    c.model.context_parallel = "none"
    # Stack the blocks with nn.scan (one compiled block: faster compiles for deep models).
    c.model.scan_layers = False
    # Rematerialization (sora_jax/models/remat.py remat_policy): 'none' | 'full' | 'save_dots' |
    # 'save_attention_out' | 'save_attention' | 'offload' | 'offload_attention'.
    c.model.remat = "none"
    # Extra input channels for given frames: 0 (given frames enter through t = 0 only) or
    # latent channels + 1 (given latents and their mask concatenated to x_t).
    c.model.cond_channels = 0

    # Video tokenizer: pixels with s2d x s2d space-to-depth -> 3 s2d² latent channels.
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.name = "pixels"
    c.tokenizer.space_to_depth = arg.s2d

    # Text encoder: fixed hash-word embeddings (the synthetic vocabulary is closed).
    c.text_encoder = ml_collections.ConfigDict()
    c.text_encoder.name = "hash_words"
    c.text_encoder.dim = 64
    # Text tokens S per caption (longer captions are truncated).
    c.text_encoder.max_length = 8
    # 'tokenize': embeddings stored in the shards; 'train_step': token ids stored, the frozen
    # encoder runs in the train step (minilm / t5 only; docs/text_encoders.md).
    c.text_encoder.embed = "tokenize"

    c.data = ml_collections.ConfigDict()
    # Tokenized dataset directory; '' = WORKDIR/data.
    c.data.dataset_dir = ""
    # Source of raw clips for `sora_jax.tokenize`.
    c.data.source = ml_collections.ConfigDict()
    c.data.source.name = "synthetic"
    c.data.source.num_clips = 256 if arg.tiny else 4096
    c.data.source.seed = 0
    # Motion of the synthetic shapes: 'straight' (enter from one side, stay inside) or 'wrap'
    # (toroidal frame: leave one side, re-enter from the other; sora_jax/data/synthetic.py).
    # The adherence evaluators read direction and speed with the matching measure.
    c.data.source.motion = "wrap" if arg.wrap else "straight"
    # Buckets: name -> pixel frames, height, width, sampling weight, and optionally
    # global_batch_size (samples per step of that bucket, overriding the batch fields below).
    c.data.buckets = ml_collections.ConfigDict(
        {
            bucket: ml_collections.ConfigDict(
                dict(frames=arg.frames, height=arg.res, width=arg.res, weight=1.0)
            )
        }
    )
    # How `sora_jax.tokenize` cuts inputs into clips and shards (docs/tokenize.md).
    c.data.tokenize = ml_collections.ConfigDict()
    # Inputs per work unit; each unit writes one shard per bucket it has clips for.
    c.data.tokenize.inputs_per_shard = 256 if arg.tiny else 1024
    # Target frame rate (one frame every round(source fps / fps)); 0 = every frame.
    c.data.tokenize.fps = 0.0
    # Fit of a frame to its bucket: 'crop' (resize to cover, centre crop), 'pad' (resize to
    # fit, pad with black) or 'stretch'.
    c.data.tokenize.fit = "crop"
    # Frames (at the target rate) between clip starts in one video; 0 = one clip per video.
    c.data.tokenize.clip_stride = 0
    # At most this many clips per video; 0 = as many as fit.
    c.data.tokenize.max_clips_per_video = 0
    # Largest enlargement a fit may apply (1 = never upsample; smaller inputs are rejected).
    c.data.tokenize.max_upscale = 1.0
    # Inputs with a side outside [min_side, max_side] pixels are rejected.
    c.data.tokenize.min_side = 8
    c.data.tokenize.max_side = 8192
    # Seed of the keep_prob draws (data.buckets.<b>.keep_prob).
    c.data.tokenize.seed = 0
    # The job fails (after writing everything) when more inputs than this are rejected.
    c.data.tokenize.max_reject_fraction = 0.05
    # A bucket left with fewer clips demotes them to a fuller one; -1 = one global batch, 0 = off.
    c.data.tokenize.min_bucket_clips = -1
    # Fraction of inputs held out from training by a hash of their id (DATASET/holdout/, the
    # reference of val_loss, reconstruction and fvd; docs/tokenize.md); 0 = no held-out split.
    c.data.tokenize.holdout_fraction = 0.0
    # Samples per step over all devices and processes.
    c.data.global_batch_size = 16 if arg.tiny else 32
    # Host batches prefetched in a background thread.
    c.data.prefetch = 2
    # Grain reader threads reading steps in parallel (0 = read in the prefetch thread).
    c.data.worker_count = 0
    # Datasets mixed by weight: (dict(dir=..., weight=1.0, name=''), ...); () = data.dataset_dir.
    c.data.datasets = ()
    # Bucket weights: 'buckets' (weights above) | 'size' (records) | 'uniform' | 'a:1,b:0.5'.
    c.data.bucket_weights = "buckets"
    # Video tokens per data-parallel device per step; > 0 sizes each bucket's batch from it.
    c.data.tokens_per_device = 0
    # Weighted buckets with no records or under one global batch: False = left out and
    # reported (WORKDIR/data_buckets.json), True = an error (docs/data_pipeline.md).
    c.data.strict_buckets = False
    # Check that all processes agree on the step's bucket every this many steps; 0 = never.
    c.data.schedule_check_every_steps = 100
    if arg.packed:  # `:packed`: native-shape clips packed into rows (docs/data_pipeline.md)
        # Each clip keeps its own shape (no bucket crop); data.buckets only names the shape
        # the model is initialized from.
        c.data.tokenize.mode = "native"
        c.data.packing = ml_collections.ConfigDict()
        # Video tokens per row (L): at least the largest clip's; two of the bucket's clips
        # (2 x 80 by default), so B rows hold the bucketed run's global_batch_size clips.
        c.data.packing.tokens_per_row = 2 * (arg.frames * arg.res * arg.res) // (4 * arg.s2d**2)
        # Rows per global step (B).
        c.data.packing.rows_per_batch = max(1, c.data.global_batch_size // 2)
        # Clips per shuffle window packed together (first-fit decreasing).
        c.data.packing.window = 256
        # Clips per row at most (K).
        c.data.packing.max_segments = 8

    # Rectified flow (sora_jax/diffusion/flow.py).
    c.diffusion = ml_collections.ConfigDict()
    # Training-time distribution: 'uniform' | 'logit_normal' | 'mode' | 'cosmap'.
    c.diffusion.time_sampling = "logit_normal"
    c.diffusion.logit_mean = 0.0
    c.diffusion.logit_std = 1.0
    # Timestep shift alpha: > 0 fixed, -1 = from tokens per frame and latent frames. 3 moves
    # training (and sampling) time towards noise, where the caption decides the layout.
    c.diffusion.shift = 3.0
    # Tokens per frame at which the automatic shift is 1 (SD3 used 256 at 256px).
    c.diffusion.shift_base_tokens = 256
    # Probability of training a sample with the null conditioning (for CFG).
    c.diffusion.caption_dropout = 0.1
    # Probability of dropping the given frames of a conditioning task (their own CFG).
    c.diffusion.cond_dropout = 0.0
    # Loss weighting over time: 'none' | 'logit_normal' | 'mode' | 'cosmap' (docs/diffusion.md).
    c.diffusion.loss_weighting = "none"
    # Heavy-tail scale of the 'mode' time sampling / weighting (SD3: 1.29).
    c.diffusion.mode_scale = 1.29
    # Conditioning tasks drawn per sample, by weight: t2v, i2v, last_frame, continuation
    # (images are the T'=1 buckets). Given latent frames get t = 0 and no loss.
    c.diffusion.tasks = ml_collections.ConfigDict({"t2v": 1.0})
    # Largest number of given latent frames for 'continuation'; -1 = up to T' - 1.
    c.diffusion.continuation_frames = -1
    if arg.causal:  # `:causal`: diffusion forcing over 1-frame chunks (diffusion/forcing.py)
        # Latent frames per chunk of block-causal attention; 0 = full attention.
        c.model.causal_chunk_frames = 1
        # Chunk times: 'independent' | 'prefix' (a clean-ish prefix at forcing_context_t).
        c.diffusion.forcing_schedule = "prefix"
        # The noise level of context chunks in training and in the rollout (t_ctx).
        c.diffusion.forcing_context_t = 0.05

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-3
    # Schedule after a linear warmup: 'cosine' | 'constant' | 'wsd'.
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 10 if arg.tiny else 100
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
    # Micro-batches per step (gradients summed): the same update in less activation memory.
    c.optimizer.grad_accum_steps = 1
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

    # LoRA fine-tuning (sora_jax/models/lora.py, docs/finetuning.md): train low-rank factors
    # of the targeted kernels of a frozen base given by --init_from.
    c.lora = ml_collections.ConfigDict()
    # Rank r of the factors; 0 = off (every parameter trains).
    c.lora.rank = 0
    # Scale alpha / r of the update W + (alpha / r) A B; 0 = alpha equals r (scale 1).
    c.lora.alpha = 0.0
    # Regex over kernel paths ('/'-joined, whole path; scan_layers: 'blocks/...').
    c.lora.targets = r"blocks.*/(self_attn|cross_attn)/(query|key|value|out)/kernel"

    # Checkpoints kept (older ones are deleted).
    c.checkpoint_max_to_keep = 3

    # The training loop's behaviour (sora_jax/training/loop.py).
    c.training = ml_collections.ConfigDict()
    # Start a new run from another run's checkpoint ('' = from scratch); --init_from sets it.
    c.training.init_from = ""
    # Which tree of that checkpoint: 'params' or 'ema/decay_0p99'.
    c.training.init_from_source = "params"
    # Glob patterns of leaves that may be missing or reshaped there (kept fresh).
    c.training.init_from_allow = ()
    # Non-finite updates in a row before rolling back to the last checkpoint; 0 = never.
    c.training.max_consecutive_skips = 5
    # A step slower than this x the median step (and than the minimum) ends the run with
    # a stack dump in logs/ instead of hanging.
    c.training.watchdog_factor = 20.0
    c.training.watchdog_min_timeout_s = 600.0
    # Also keep every checkpoint whose step is a multiple of this; 0 = only the latest ones.
    c.training.checkpoint_keep_period = 0
    # Profiler trace of steps [start, end) into WORKDIR/profile; () = none.
    c.training.profile_steps = ()

    # Sampling defaults for `sora_jax.sample` and the evaluators.
    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = PROMPTS
    c.sample.bucket = bucket
    # ODE steps and method ('euler' | 'heun').
    c.sample.num_steps = 8 if arg.tiny else 25
    c.sample.sampler = "euler"
    # Classifier-free guidance scale (1 = no guidance).
    c.sample.cfg_scale = 3.0
    c.sample.seed = 0
    # Sample with this EMA decay's weights; 0 = raw parameters.
    c.sample.ema_decay = 0.99
    c.sample.fps = 8.0
    # Nearest-neighbour upscaling of written videos (32 px clips are tiny on screen).
    c.sample.video_scale = 256 // arg.res
    c.sample.batch_size = 8
    # Step-skipping cache of the ODE sampler: a step reuses the last velocity while the
    # accumulated relative change of its input stays under this (diffusion/sampler.py); 0 = off.
    c.sample.cache_threshold = 0.0
    if arg.causal:
        # Past chunks kept in the rollout's KV cache (W); W + 1 chunks must fit a clip.
        c.sample.rollout_window = arg.frames - 1

    # Evaluators run by `sora_jax.evaluate`.
    c.evaluate = ml_collections.ConfigDict()
    # 'prompt_adherence' (pixels vs prompt) | 'val_loss' (fixed-noise validation loss) |
    # 'reconstruction' (tokenizer PSNR/SSIM) | 'fvd' (Fréchet video distance) |
    # 'temporal_consistency' (drift and per-segment adherence of long videos); docs/sampling.md.
    c.evaluate.type = "prompt_adherence"
    # Pixel frames of temporal_consistency's long videos; 0 = 4x the sample bucket's.
    c.evaluate.long_frames = 0
    # Items evaluated: videos sampled (prompts drawn from the synthetic caption space) or
    # held-out synthetic clips (reconstruction, fvd).
    c.evaluate.num_videos = 8 if arg.tiny else 96
    c.evaluate.seed = 1
    # FVD feature network: 'i3d' (needs fvd_weights) | 'random_conv' (weight-free sanity
    # metric, not comparable to published FVD).
    c.evaluate.fvd_features = "random_conv"
    # I3D weights: an .npz with the names of sora_jax.evaluation.i3d.weight_names(); never
    # downloaded.
    c.evaluate.fvd_weights = ""
    # Side in pixels clips are resized to for I3D (224 in the FVD protocol); 0 = as sampled.
    c.evaluate.fvd_resize = 224
    # Frames per clip fed to I3D (16 in the FVD protocol), resampled evenly.
    c.evaluate.fvd_frames = 16
    # What val_loss, reconstruction and fvd compare against: 'holdout' (the dataset's held-out
    # split), 'synthetic' (synthetic clips), 'auto' (holdout when the dataset has one).
    c.evaluate.reference = "auto"
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """The worked sweep example: two learning rates x two widths."""
    from sora_jax import sweeping

    del arg
    return sweeping.product(
        sweeping.sweep("optimizer.lr", [1e-3, 3e-4]),
        sweeping.sweep("model.dim", [64, 128]),
    )
