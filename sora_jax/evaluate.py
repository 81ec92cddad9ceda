r"""Evaluate a run's checkpoint with the evaluators of `config.evals` (each into
WORKDIR/eval/<step>/<name>.json, the files the trainer writes for them), or, for a config
without `evals`, with the one of `evaluate.type` (into WORKDIR/eval/<step>.json).

    python -m sora_jax.evaluate --config=experiments/demo.py --workdir=runs/demo
    python -m sora_jax.evaluate ... --config.evaluate.type=fvd \
        --config.evaluate.fvd_features=i3d --config.evaluate.fvd_weights=i3d_kinetics400.npz
    python -m sora_jax.evaluate --workdir=runs/videos --evals=val_loss,fd --step=2000

Without --config, the run's resolved WORKDIR/config.json is used. Each file holds the
numbers and the protocol that produced them.
Item evaluators (prompt_adherence, reconstruction, fvd) split their items over the
processes, keep per-item results under WORKDIR/eval/<step>/<type>/ and skip done items
when re-run (docs/sampling.md).
"""

import json

from absl import flags

from sora_jax import entry
from sora_jax.evaluation import evaluators, generate
from sora_jax.evaluation import requests as requests_lib

STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
EVALS = flags.DEFINE_list(
    "evals", None, "Entries of config.evals to run (default: all; none: evaluate.type)."
)
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
    names = EVALS.value or list(evaluators.named_evals(config))
    if EVALS.value and not evaluators.named_evals(config):
        raise ValueError(f"--evals={','.join(names)} but the config has no config.evals")
    kw = dict(
        step=STEP.value,
        ema_decay=s.ema_decay,
        process_index=PROCESS_INDEX.value,
        process_count=PROCESS_COUNT.value,
    )
    if not names:  # a config without `evals`: the evaluator of `evaluate.type`
        _print(evaluators.evaluate(config, entry.WORKDIR.value, options, **kw))
        return
    gen = None  # one restore of the checkpoint for every entry that samples or scores it
    for name in names:
        cfg = evaluators.entry_config(config, name)
        if gen is None and evaluators.needs_generator(cfg.evaluate.type):
            gen = generate.Generator.from_workdir(
                entry.WORKDIR.value, cfg, step=STEP.value, ema_decay=s.ema_decay
            )
        report = evaluators.evaluate(
            config, entry.WORKDIR.value, options, generator=gen, name=name, **kw
        )
        _print(report)


def _print(report) -> None:
    if "scores" not in report:
        print(
            json.dumps(
                {
                    "name": report.get("name", report["type"]),
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
