r"""Expand an experiment's `get_sweep` into named jobs; print them or run them locally.

    python -m sora_jax.sweep --config=experiments/demo.py:tiny --workdir_root=runs/sweep \
        [--run]

Without --run it prints each job's command (a dry run). With --run the jobs run one after
another in this machine's shell; a job whose workdir already holds its final checkpoint is
resumed (the train entry point resumes by itself) and so finishes at once.
"""

import subprocess
import sys

from absl import app, flags

from sora_jax import config as config_lib

SPEC = flags.DEFINE_string("config", None, "Experiment file with get_sweep, e.g. FILE.py:ARG.")
ROOT = flags.DEFINE_string("workdir_root", None, "Directory holding one workdir per job.")
RUN = flags.DEFINE_bool("run", False, "Run the jobs here, one after another.")


def main(argv):
    del argv
    if not SPEC.value or not ROOT.value:
        print("error: --config and --workdir_root are required", file=sys.stderr)
        sys.exit(2)
    from sora_jax import sweeping

    try:
        jobs = sweeping.expand(SPEC.value, ROOT.value)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for job in jobs:
        print(f"# {job.name}\n{sweeping.shell(job)}")
        if RUN.value:
            subprocess.run(job.command, check=True)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
