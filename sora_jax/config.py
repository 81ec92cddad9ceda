"""Experiment configs: variant arguments, locked configs, resolved-config files.

An experiment file defines `get_config(arg: str | None) -> ConfigDict`. On the command line

    --config=experiments/demo.py:tiny,steps=200  --config.optimizer.lr=3e-4

selects the file, passes `"tiny,steps=200"` to `get_config` (parsed with `parse_arg`), and
overrides single fields. Configs are locked: an unknown key anywhere is an error that names
the nearest known key. `write_run_files` records the resolved config, the command and the
environment in the run's workdir (docs/formats.md). Cross-field checks live in
sora_jax/run/validate.py: this module imports no sora_jax module.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import ml_collections
from absl import flags

ConfigDict = ml_collections.ConfigDict

# Top-level fields every training config must define (docs/design.md, Contracts between stages).
REQUIRED_FIELDS = (
    "seed",
    "total_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "eval_every_steps",
    "model",
    "tokenizer",
    "text_encoder",
    "data",
    "diffusion",
    "optimizer",
    "mesh",
)


class ConfigError(ValueError):
    """A config is malformed; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------
# Variant arguments: "tiny,size=B,res=256" -> ConfigDict(tiny=True, size="B", res=256)
# ---------------------------------------------------------------------------------------


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses a `get_config` argument string against typed defaults.

    `key=value` pairs are converted to the type of the default (bool, int, float, str);
    a bare `key` sets a boolean default to True. An unknown key is an error listing the
    known ones, so a typo in a variant never silently selects the default.
    """
    result = ConfigDict(dict(defaults))
    if not arg:
        return result
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            hint = _did_you_mean(key, list(defaults))
            raise ConfigError(
                f"unknown config argument {key!r} in {arg!r}{hint}; known: {sorted(defaults)}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"config argument {key!r} needs a value: write {key}=VALUE")
            result[key] = True
            continue
        result[key] = _convert(key, raw.strip(), default)
    return result


def _convert(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config argument {key}={raw!r} is not a boolean (true/false)")
    if isinstance(default, int | float) and not isinstance(default, bool):
        try:
            return type(default)(ast.literal_eval(raw))
        except (ValueError, SyntaxError) as e:
            raise ConfigError(
                f"config argument {key}={raw!r} is not a {type(default).__name__}"
            ) from e
    return raw


# ---------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------


def load_config(spec: str) -> ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`; returns it locked."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg): every experiment file must")
    config = module.get_config(arg or None)
    config.lock()
    return config


def load_module(path: str):
    """Imports an experiment file by path."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist (relative to {os.getcwd()})")
    spec = importlib.util.spec_from_file_location(f"sora_experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """All dotted field paths of a config, sections included."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, ConfigDict):
            keys.extend(flat_keys(value, path + "."))
    return keys


def _did_you_mean(key: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:
        # Compare the last components too: `optimizer.lrr` vs `optimizer.lr`.
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        tail = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        match = [tails[tail[0]]] if tail else []
    return f"; did you mean {match[0]!r}?" if match else ""


def check_overrides(argv: Sequence[str], flag_name: str = "config") -> None:
    """Fails fast, with the nearest known key, on `--config.x.y=` overrides of unknown fields.

    ml_collections raises deep inside flag parsing with a traceback; this check runs first
    and turns the same mistake into one line that names the field.
    """
    spec = None
    overrides = []
    for a in argv[1:]:
        if a.startswith(f"--{flag_name}="):
            spec = a.split("=", 1)[1]
        elif a.startswith(f"--{flag_name}."):
            overrides.append(a[len(flag_name) + 3 :].split("=", 1)[0])
    if spec is None or not overrides:
        return
    keys = flat_keys(load_config(spec))
    for key in overrides:
        if key not in keys:
            raise ConfigError(
                f"--{flag_name}.{key}: no such field in {spec}{_did_you_mean(key, keys)}"
            )


def define_config_flag(name: str = "config", help_text: str | None = None):
    """The `--config=FILE[:ARG]` flag of every entry point (ml_collections config_flags)."""
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file(
        name,
        None,
        help_text
        or "Experiment file and variant, e.g. experiments/demo.py:tiny. "
        "Override fields with --config.section.field=value.",
        lock_config=True,
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` that reports config mistakes in one line instead of a traceback."""
    try:
        check_overrides(argv)
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"Try --help for the flags of {pathlib.Path(argv[0]).name}.", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------
# Run files: config.json, command.txt, env.json
# ---------------------------------------------------------------------------------------

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "array-record",
    "ml-collections",
    "numpy",
    "av",
)


def environment() -> dict[str, Any]:
    """Package versions, devices, and the git revision of the checkout (if any)."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        root = pathlib.Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_sha": sha or None,
    }


def to_dict(config: ConfigDict) -> dict[str, Any]:
    """A JSON-ready plain dict of a config (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def write_run_files(workdir: str | os.PathLike, config: ConfigDict, argv: Sequence[str]) -> None:
    """Writes `config.json`, `command.txt` and `env.json` into the workdir (process 0 only)."""
    import jax

    if jax.process_index() != 0:
        return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=2, sort_keys=True))
    (workdir / "command.txt").write_text(shlex.join([sys.executable, *argv]) + "\n")
    (workdir / "env.json").write_text(json.dumps(environment(), indent=2, sort_keys=True))


def load_run_config(workdir: str | os.PathLike) -> ConfigDict:
    """Reads a run's resolved `config.json` back as a locked ConfigDict."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {workdir} the workdir of a training run?")
    config = ConfigDict(_tuples(json.loads(path.read_text())))
    config.lock()
    return config


def _tuples(value):
    """JSON lists of numbers back to tuples (patch sizes and the like)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
