"""Shared plumbing of the absl entry points: flags, logging, config loading."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from sora_jax import config as config_lib
from sora_jax.parallel import compiler_flags, distributed
from sora_jax.run import validate as validate_lib

CONFIG = config_lib.define_config_flag()
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/sora_jax/jax_cache"),
    "Persistent XLA compilation cache shared by runs ('' = off); --mode=plan fills it.",
)
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "", ["", "auto", "off"], "'auto': let JAX detect the cluster (TPU, SLURM)."
)
DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds to wait for every process to join, and for a lost one."
)
flags.declare_key_flag("config")


def enable_compilation_cache() -> None:
    """Compiled steps are stored on disk so re-runs (resume, plan then train) skip XLA."""
    if not COMPILATION_CACHE.value:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE.value))
    # Cache everything that took a second or more to compile (the default skips under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_main(main) -> None:
    """`app.run` with one-line config errors instead of tracebacks, and the compiler flags
    of sora_jax/parallel/compiler_flags.py for this host's accelerator.

    Library INFO logs (Orbax, JAX) are hidden by default; `--verbosity=0` shows them.
    """

    def quiet_main(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        # The production compiler flags of this host's accelerator, before JAX starts its
        # backend (an ssh command on TPU VM workers carries no exported variables).
        compiler_flags.apply_for_host()
        enable_compilation_cache()
        distributed.initialize(
            coordinator_address=COORDINATOR.value,
            num_processes=NUM_PROCESSES.value,
            process_id=PROCESS_ID.value,
            mode=DISTRIBUTED.value,
            timeout_s=DISTRIBUTED_TIMEOUT.value,
            heartbeat_timeout_s=DISTRIBUTED_TIMEOUT.value,
        )
        return main(argv)

    app.run(quiet_main, flags_parser=config_lib.parse_flags)


def require(flag, name: str) -> None:
    if flag.value is None:
        print(f"error: --{name} is required", file=sys.stderr)
        sys.exit(2)


def loaded_config(from_workdir: bool = False, validate: bool = True):
    """The `--config` ConfigDict (with overrides applied), validated unless `validate` is
    False (a plan for other devices validates against those). With `from_workdir`
    (sampling, evaluation) and no --config, the run's resolved `WORKDIR/config.json`."""
    saved = os.path.join(WORKDIR.value or "", "config.json")
    if CONFIG.value is None and from_workdir and WORKDIR.value and os.path.isfile(saved):
        print(
            f"config: {saved} (the run's resolved config; pass --config to change it)",
            file=sys.stderr,
        )
        config = config_lib.load_run_config(WORKDIR.value)
    else:
        require(CONFIG, "config")
        config = CONFIG.value
    try:
        if validate:
            validate_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return config
