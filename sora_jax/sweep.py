r"""Run an experiment's `get_sweep` as named jobs, here or on a cluster; show their status.

    python -m sora_jax.sweep --config=experiments/demo.py:tiny --workdir_root=runs/sweep \
        [--launcher=local|multiprocess|slurm|tpu_vm|gke] [--max_parallel=2] [--dry_run] \
        [-- --config.total_steps=100 ...]
    python -m sora_jax.sweep --workdir_root=runs/sweep --status

Each override dict of `get_sweep(ARG)` becomes a job with a name built from its overrides
and the workdir ROOT/<name>; flags after `--` go to every job. The sweep records every
job's command and state in ROOT/sweep.json. `local` and `multiprocess` run the jobs here
(up to --max_parallel at once, output in ROOT/logs/<job>.log), `tpu_vm` runs them one after
another on the slice, `slurm` and `gke` submit them. Re-running the same command skips the
finished jobs and resumes the others. --dry_run prints the commands (for gke, the
manifests) and starts nothing. Launchers and their flags: docs/launching.md.
"""

import shlex
import sys

from absl import app, flags

from sora_jax import config as config_lib
from sora_jax import launchers, sweeping

SPEC = flags.DEFINE_string("config", None, "Experiment file with get_sweep, e.g. FILE.py:ARG.")
ROOT = flags.DEFINE_string("workdir_root", None, "Directory holding sweep.json and the workdirs.")
LAUNCHER = flags.DEFINE_string(
    "launcher", "local", "local | multiprocess | slurm | tpu_vm | gke (sora_jax/launchers.py)."
)
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each job's launch command; start nothing.")
STATUS = flags.DEFINE_bool("status", False, "Print the table of ROOT/sweep.json's jobs and exit.")
MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 1, "local/multiprocess: jobs run at once.")
RESUBMIT = flags.DEFINE_bool(
    "resubmit", False, "slurm/gke: submit unfinished jobs again even if submitted before."
)
LAUNCH_DIR = flags.DEFINE_string("launch_dir", None, "The checkout's launch/ directory.")
PROCESSES = flags.DEFINE_integer("processes", 2, "multiprocess: processes per job.")
DEVICES = flags.DEFINE_integer("devices_per_process", 1, "multiprocess: CPU devices each.")
PORT = flags.DEFINE_integer(
    "port", 12355, "multiprocess: coordinator port of job 0 (job i: +i); gke: coordinator port."
)
SBATCH_ARGS = flags.DEFINE_string("sbatch_args", "", "slurm: sbatch options, e.g. '--nodes=4'.")
TPU_NAME = flags.DEFINE_string("tpu_name", "", "tpu_vm: the TPU VM's name.")
ZONE = flags.DEFINE_string("zone", "", "tpu_vm: the TPU VM's zone.")
GKE_VARIANT = flags.DEFINE_string("gke_variant", "tpu", "gke: node pool variant, tpu | gpu.")
GKE_IMAGE = flags.DEFINE_string("gke_image", "", "gke: container image with sora_jax.")
GKE_HOSTS = flags.DEFINE_integer("gke_hosts", 1, "gke: pods (JAX processes) per job.")
GKE_CHIPS = flags.DEFINE_integer("gke_chips_per_host", 4, "gke: TPU chips or GPUs per pod.")
GKE_ACCELERATOR = flags.DEFINE_string(
    "gke_accelerator", "", "gke: node selector, e.g. tpu-v5p-slice or nvidia-h100-80gb."
)
GKE_TOPOLOGY = flags.DEFINE_string("gke_tpu_topology", "", "gke tpu: slice topology, e.g. 2x2x4.")
GKE_PVC = flags.DEFINE_string("gke_runs_pvc", "runs", "gke: PVC mounted at /runs on every pod.")


def _options():
    return launchers.Options(
        launch_dir=LAUNCH_DIR.value or launchers.Options.launch_dir,
        processes=PROCESSES.value,
        devices_per_process=DEVICES.value,
        port=PORT.value,
        sbatch_args=tuple(shlex.split(SBATCH_ARGS.value)),
        tpu_name=TPU_NAME.value,
        zone=ZONE.value,
        gke_variant=GKE_VARIANT.value,
        gke_image=GKE_IMAGE.value,
        gke_hosts=GKE_HOSTS.value,
        gke_chips_per_host=GKE_CHIPS.value,
        gke_accelerator=GKE_ACCELERATOR.value,
        gke_tpu_topology=GKE_TOPOLOGY.value,
        gke_runs_pvc=GKE_PVC.value,
    )


def main(argv):
    common_flags = argv[1:]  # everything after `--`
    if not ROOT.value:
        _fail("--workdir_root is required")
    if STATUS.value:
        print(sweeping.status_table(ROOT.value))
        return
    if not SPEC.value:
        _fail("--config is required (an experiment file with get_sweep, e.g. FILE.py:ARG)")
    options = _options()
    launcher = launchers.get(LAUNCHER.value, options)
    jobs = sweeping.expand(SPEC.value, ROOT.value, common_flags=common_flags)
    if DRY_RUN.value:
        print(sweeping.dry_run(jobs, launcher, options, ROOT.value))
        return
    failures = sweeping.run(
        jobs,
        launcher,
        options,
        ROOT.value,
        spec=SPEC.value,
        max_parallel=MAX_PARALLEL.value,
        resubmit=RESUBMIT.value,
    )
    print(sweeping.status_table(ROOT.value))
    if failures:
        _fail(
            f"{failures} job(s) failed, logs in {ROOT.value}/logs/; re-running the sweep "
            "retries them",
            code=1,
        )


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing with one-line errors; `--config.x` before `--` says where it belongs."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    stray = [a for a in head if a.startswith("--config.")]
    if stray:
        _fail(
            f"{stray[0]}: flags for every job go after `--`, e.g. python -m sora_jax.sweep "
            f"--config=... --workdir_root=... -- {stray[0]}"
        )
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}\nTry --help for the flags of sora_jax.sweep.")


def run():
    def safe_main(argv):
        try:
            main(argv)
        except config_lib.ConfigError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            # The runner has stopped its jobs (each saved a checkpoint on SIGTERM).
            _fail("interrupted: running jobs stopped; re-run the same command to resume", 130)

    app.run(safe_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
