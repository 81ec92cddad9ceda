r"""Train (or resume) a video DiT.

    python -m sora_jax.train --config=experiments/demo.py:tiny --workdir=runs/tiny \
        [--config.optimizer.lr=3e-4]

Re-running the same command in the same workdir resumes from the latest checkpoint.
Outputs (DESIGN.md §4.2): WORKDIR/config.json, command.txt, env.json, metrics.jsonl,
tensorboard/, checkpoints/<step>/.
"""

import json
import sys

from absl import flags

from sora_jax import config as config_lib
from sora_jax import entry

flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config()
    config_lib.write_run_files(entry.WORKDIR.value, config, sys.argv)
    from sora_jax.training import loop

    summary = loop.train(config, entry.WORKDIR.value)
    print(json.dumps(summary, indent=2))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
