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
from sora_jax.parallel import topology
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
TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "--mode=plan: compile for this TPU slice instead of this host's devices, e.g. v5p-64, "
    "v5e:4x4, v6e-8 (needs the 'tpu' extra: libtpu; no TPU). docs/launching.md.",
)
NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "--mode=plan --topology: slices of that topology (multi-slice, over DCN)."
)


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    if TOPOLOGY.value and MODE.value != "plan":
        print("error: --topology applies to --mode=plan only", file=sys.stderr)
        sys.exit(2)
    # A plan for a TPU topology validates the mesh against that slice, not this host.
    config = entry.loaded_config(validate=not TOPOLOGY.value)
    if MODE.value == "plan":
        try:
            plan.plan(
                config,
                memory_gb=PLAN_MEMORY_GB.value,
                topology=TOPOLOGY.value,
                num_slices=NUM_SLICES.value,
            )
        except (plan.PlanError, topology.TopologyError, config_lib.ConfigError) as e:
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
