r"""Few-step students: consistency (sCM) or distribution-matching (DMD2) distillation of a
trained demo run.

The student is the teacher's VideoDiT (experiments/demo.py), initialized from its weights
and trained on the teacher's tokenized data to map any point of the teacher's guided ODE
to its end (sora_jax/diffusion/consistency.py; docs/sampling.md, "Few-step students"), or
with `method=dmd2` to match the teacher's distribution with a trained fake-score network
(sora_jax/diffusion/dmd.py):

    python -m sora_jax.train  --config=experiments/distill.py:teacher=runs/demo \
        --workdir=runs/demo_student
    python -m sora_jax.sample --workdir=runs/demo_student \
        --prompt="a red circle moving up quickly" --steps=4      # or --steps=1
    python -m sora_jax.evaluate --workdir=runs/demo_student --steps=1

`--mode=plan` reports the memory of the step with student, teacher (and DMD2's fake score).
Variants: `method=scm|dmd2`, `tiny`
(experiments/demo.py:tiny's model, a few steps; the tests), `teacher=DIR` (the teacher
run's workdir; its `data/` is the training data), `steps=N`, `cfg=S` (the distilled
guidance scale).
"""

import pathlib

import ml_collections

from sora_jax import config as config_lib

# experiments/demo.py is the base: the teacher's model, tokenizer, text encoder and data.
demo = config_lib.load_module(str(pathlib.Path(__file__).with_name("demo.py")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, tiny=False, teacher="", steps=-1, cfg=3.0, method="scm")
    c = demo.get_config("tiny" if arg.tiny else None)
    c.total_steps = 4 if arg.tiny else 400
    if arg.steps > 0:
        c.total_steps = arg.steps
    c.log_every_steps = 1 if arg.tiny else 20
    c.checkpoint_every_steps = 2 if arg.tiny else 100
    # sCM's JVP runs through any kernel ('cudnn' and 'splash' with the blockwise kernel's
    # tangent, models/attention_jvp.py); on the CPU the memory-efficient 'blockwise'.
    c.model.attention_impl = "blockwise"
    # The teacher's tokenized shards ('' = WORKDIR/data).
    c.data.dataset_dir = str(pathlib.Path(arg.teacher) / "data") if arg.teacher else ""
    # sCM fine-tunes at a low learning rate from the teacher (its ImageNet runs: 1e-4 ...
    # 4e-4 with Adam, b2 = 0.99); the demo's small model takes 1e-4 with a short warmup.
    c.optimizer.lr = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 2 if arg.tiny else 20
    c.optimizer.ema_decays = (0.99,)

    c.distill = ml_collections.ConfigDict()
    # 'scm' (continuous-time consistency, diffusion/consistency.py) or 'dmd2' (distribution
    # matching with a fake-score network, diffusion/dmd.py).
    c.distill.method = arg.method
    # The teacher: a sora_jax run's workdir, its checkpoints/ or one checkpoints/<step>.
    c.distill.teacher = arg.teacher
    # Which tree of the teacher's checkpoint: 'params' or 'ema/decay_0p99' (its EMA).
    c.distill.teacher_source = "ema/decay_0p99"
    # Classifier-free guidance scale of the teacher's velocity, distilled into the student
    # (which then samples with cfg 1: one pass per step). 1 = no guidance.
    c.distill.cfg_scale = arg.cfg
    # Training times: t = shift(sigmoid(logit_mean + logit_std z)); sCM's P_mean, P_std at
    # 512 px (-0.8, 1.6), then the teacher's diffusion.shift.
    c.distill.logit_mean = -0.8
    c.distill.logit_std = 1.6
    # Steps over which the tangent's t du/dt term ramps from 0 to 1 (sCM's tangent
    # warmup); 0 = the full tangent from the start.
    c.distill.tangent_warmup_steps = 0 if arg.tiny else 100
    # c of the tangent normalization g / (|g| + c) (sCM: 0.1); < 0 = no normalization.
    c.distill.tangent_norm_c = 0.1
    # DMD2: the generator's steps n (it trains on the n-step grid's times; sample with 1..n).
    c.distill.dmd_steps = 4
    # DMD2's two time-scale rule: fake-score updates per generator update (DMD2: 5).
    c.distill.fake_updates_per_generator = 5
    # DMD2: the range of τ where the scores are compared, before the shift (DMD2: 0.02-0.98).
    c.distill.dmd_t_min = 0.02
    c.distill.dmd_t_max = 0.98

    # The student samples with the consistency sampler: few steps, guidance in its weights.
    c.sample.num_steps = 4
    c.sample.cfg_scale = 1.0
    return c
