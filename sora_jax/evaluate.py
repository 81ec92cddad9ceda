r"""Evaluate a run's checkpoint with the evaluator of `evaluate.type`.

    python -m sora_jax.evaluate --config=experiments/demo.py --workdir=runs/demo

Writes WORKDIR/eval/<step>.json with the numbers and the protocol that produced them.
"""

import json

from absl import flags

from sora_jax import entry

STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
CFG = flags.DEFINE_float("cfg", None, "Guidance scale (default: sample.cfg_scale).")


flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config()
    from sora_jax.evaluation import evaluators, generate

    s = config.sample
    options = generate.SampleOptions.from_config(s, cfg_scale=CFG.value)
    report = evaluators.evaluate(
        config, entry.WORKDIR.value, options, step=STEP.value, ema_decay=s.ema_decay
    )
    scores = {k: v for k, v in report["scores"].items() if not isinstance(v, list)}
    print(json.dumps({"path": report["path"], "step": report["checkpoint_step"], **scores}))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
