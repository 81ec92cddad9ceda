r"""Sample videos from a run's checkpoint.

    python -m sora_jax.sample --config=experiments/demo.py --workdir=runs/demo \
        --prompt="a red circle moving up quickly" [--cfg=3 --steps=25 --seed=0]

Without --prompt/--prompts, samples `sample.prompts` of the config. Writes
`<index>_<slug>.mp4` with a JSON sidecar of every sampling parameter, and a contact
sheet, into --output (default WORKDIR/samples/<step>/).
"""

import json
import pathlib

from absl import flags

from sora_jax import entry

PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).")
PROMPTS = flags.DEFINE_string("prompts", None, "A file with one prompt per line.")
STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: sample.num_steps).")
CFG = flags.DEFINE_float("cfg", None, "Guidance scale (default: sample.cfg_scale).")
SAMPLER = flags.DEFINE_enum("sampler", None, ["euler", "heun"], "ODE method.")
SEED = flags.DEFINE_integer("seed", None, "Noise seed (default: sample.seed).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
EMA = flags.DEFINE_float("ema", None, "EMA decay of the weights; 0 = raw parameters.")
OUTPUT = flags.DEFINE_string("output", None, "Output directory.")


flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config()
    from sora_jax.evaluation import generate

    prompts = list(PROMPT.value or [])
    if PROMPTS.value:
        lines = pathlib.Path(PROMPTS.value).read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    prompts = prompts or list(config.sample.prompts)
    s = config.sample
    options = generate.SampleOptions.from_config(
        s, num_steps=STEPS.value, cfg_scale=CFG.value, sampler=SAMPLER.value, seed=SEED.value
    )
    summary = generate.sample_to_dir(
        config,
        entry.WORKDIR.value,
        prompts,
        options,
        step=STEP.value,
        ema_decay=s.ema_decay if EMA.value is None else EMA.value,
        output=OUTPUT.value,
    )
    print(json.dumps(summary, indent=2))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
