r"""Train (or resume) a video DiT.

    python -m sora_jax.train --config=experiments/demo.py:tiny --workdir=runs/tiny \
        [--config.optimizer.lr=3e-4]

Re-running the same command in the same workdir resumes from the latest checkpoint.
`--mode=plan` compiles the step for every bucket on the configured mesh without data or
allocation and prints tokens, FLOPs and per-device memory per bucket (fails when a bucket
does not fit; sora_jax/training/plan.py). `--mode=data_benchmark` runs only the input
pipeline and prints samples/s and MB/s next to what the step consumes
(sora_jax/training/data_benchmark.py).
Outputs (docs/formats.md): WORKDIR/config.json, command.txt, env.json, metrics.jsonl,
tensorboard/, checkpoints/<step>/.
"""

import json
import sys

from absl import flags

from sora_jax import config as config_lib
from sora_jax import entry
from sora_jax.training import data_benchmark, loop, plan

flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort
MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "plan", "data_benchmark"],
    "train: train or resume; plan: compile every bucket and print memory and FLOPs; "
    "data_benchmark: time the input pipeline alone.",
)
INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Start a new run from another run's parameters (a workdir, checkpoints/ or one "
    "checkpoints/<step>); overrides training.init_from. Ignored when resuming.",
)
PLAN_MEMORY_GB = flags.DEFINE_float(
    "plan_memory_gb", None, "--mode=plan: memory per device in GiB (default: by device kind)."
)


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config()
    if MODE.value == "plan":
        try:
            plan.plan(config, memory_gb=PLAN_MEMORY_GB.value)
        except plan.PlanError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        return
    if MODE.value == "data_benchmark":
        data_benchmark.data_benchmark(config, entry.WORKDIR.value)
        return
    config_lib.write_run_files(entry.WORKDIR.value, config, sys.argv)
    summary = loop.train(config, entry.WORKDIR.value, init_from=INIT_FROM.value or "")
    print(json.dumps(summary, indent=2))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
