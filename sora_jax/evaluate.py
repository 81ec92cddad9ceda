r"""Evaluate a run's checkpoint with the evaluator of `evaluate.type`.

    python -m sora_jax.evaluate --config=experiments/demo.py --workdir=runs/demo
    python -m sora_jax.evaluate ... --config.evaluate.type=fvd \
        --config.evaluate.fvd_features=i3d --config.evaluate.fvd_weights=i3d_kinetics400.npz

Without --config, the run's resolved WORKDIR/config.json is used. Writes
WORKDIR/eval/<step>.json with the numbers and the protocol that produced them.
Item evaluators (prompt_adherence, reconstruction, fvd) split their items over the
processes, keep per-item results under WORKDIR/eval/<step>/<type>/ and skip done items
when re-run (docs/sampling.md).
"""

import json

from absl import flags

from sora_jax import entry
from sora_jax.evaluation import evaluators
from sora_jax.evaluation import requests as requests_lib

STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
CFG = flags.DEFINE_float("cfg", None, "Guidance scale (default: sample.cfg_scale).")
STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: sample.num_steps).")
PROCESS_INDEX = flags.DEFINE_integer(
    "eval_process_index", None, "This job's share of the items (default: jax.process_index())."
)
PROCESS_COUNT = flags.DEFINE_integer(
    "eval_process_count", None, "Jobs sharing the items (default: jax.process_count())."
)


flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config(from_workdir=True)
    s = config.sample
    options = requests_lib.SampleOptions.from_config(s, cfg_scale=CFG.value, num_steps=STEPS.value)
    report = evaluators.evaluate(
        config,
        entry.WORKDIR.value,
        options,
        step=STEP.value,
        ema_decay=s.ema_decay,
        process_index=PROCESS_INDEX.value,
        process_count=PROCESS_COUNT.value,
    )
    if "scores" not in report:
        print(
            json.dumps(
                {
                    "step": report["checkpoint_step"],
                    "computed": report.get("computed", 0),
                    "missing": len(report.get("missing", [])),
                    "items_dir": report.get("items_dir", ""),
                }
            )
        )
        return
    scores = {k: v for k, v in report["scores"].items() if not isinstance(v, list)}
    print(json.dumps({"path": report["path"], "step": report["checkpoint_step"], **scores}))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
