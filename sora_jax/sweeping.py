"""Sweeps from experiment files: `get_sweep(arg) -> list[dict]` of config overrides.

    def get_sweep(arg):
        return sweeping.product(
            sweeping.sweep("optimizer.lr", [1e-3, 3e-4]),
            sweeping.sweep("model.dim", [64, 128]),
        )

Each override dict becomes a job with a stable name built from its overrides
(`optimizer.lr=0.001,model.dim=64` -> `lr_0.001-dim_64`), its own workdir under the sweep
root, and the full `python -m sora_jax.train` command.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from sora_jax import config as config_lib


def sweep(field: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    """One axis: `[{field: v} for v in values]`."""
    return [{field: v} for v in values]


def product(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cartesian product of axes, merged left to right."""
    return [
        dict(itertools.chain.from_iterable(d.items() for d in combo))
        for combo in itertools.product(*axes)
    ]


def zip_(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Axes of equal length taken element-wise."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(f"sweeping.zip_ needs axes of equal length, got {sorted(lengths)}")
    return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in zip(*axes)]


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    overrides: dict[str, Any]
    workdir: str
    command: tuple[str, ...]


def job_name(overrides: dict[str, Any]) -> str:
    parts = []
    for key, value in overrides.items():
        text = re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_")
        parts.append(f"{key.rsplit('.', 1)[-1]}_{text}")
    return "-".join(parts) or "default"


def expand(spec: str, workdir_root: str, module: str = "sora_jax.train") -> list[Job]:
    """The jobs of `FILE[:ARG]`'s `get_sweep(ARG)`, checked against its config."""
    path, _, arg = spec.partition(":")
    mod = config_lib.load_module(path)
    if not hasattr(mod, "get_sweep"):
        raise config_lib.ConfigError(
            f"{path} defines no get_sweep(arg): add one returning a list of override dicts"
        )
    keys = set(config_lib.flat_keys(config_lib.load_config(spec)))
    jobs, seen = [], {}
    for overrides in mod.get_sweep(arg or None):
        unknown = [k for k in overrides if k not in keys]
        if unknown:
            raise config_lib.ConfigError(f"sweep of {path} overrides unknown fields {unknown}")
        name = job_name(overrides)
        if name in seen:
            raise config_lib.ConfigError(
                f"sweep jobs {seen[name]} and {overrides} share the name {name!r}"
            )
        seen[name] = overrides
        workdir = f"{workdir_root.rstrip('/')}/{name}"
        command = (
            sys.executable,
            "-m",
            module,
            f"--config={spec}",
            f"--workdir={workdir}",
            *(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()),
        )
        jobs.append(Job(name, dict(overrides), workdir, command))
    return jobs


def _flag_value(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list | tuple) else str(value)


def shell(job: Job) -> str:
    return shlex.join(job.command)
