"""Shared plumbing of the absl entry points: flags, logging, config loading."""

from __future__ import annotations

import sys

from absl import app, flags, logging

from sora_jax import config as config_lib

CONFIG = config_lib.define_config_flag()
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.declare_key_flag("config")


def run_main(main) -> None:
    """`app.run` with one-line config errors instead of tracebacks.

    Library INFO logs (Orbax, JAX) are hidden by default; `--verbosity=0` shows them.
    """

    def quiet_main(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        return main(argv)

    app.run(quiet_main, flags_parser=config_lib.parse_flags)


def require(flag, name: str) -> None:
    if flag.value is None:
        print(f"error: --{name} is required", file=sys.stderr)
        sys.exit(2)


def loaded_config():
    """The `--config` ConfigDict (with overrides applied), validated."""
    require(CONFIG, "config")
    config = CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return config
