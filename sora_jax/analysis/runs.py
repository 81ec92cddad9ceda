"""Runs, sweeps, configs and parameters as Python objects (sora_jax.analysis)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

try:
    import pandas as pd
except ImportError as e:  # pandas comes with the notebooks extra, not the core package
    raise ImportError(
        "sora_jax.analysis needs pandas and matplotlib: pip install -e '.[notebooks]'"
    ) from e

from sora_jax import config as config_lib
from sora_jax import sweeping

_REPO = pathlib.Path(__file__).resolve().parents[2]  # the checkout root
_VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")
_MISSING = "<missing>"


def repo_path(path: str | os.PathLike) -> pathlib.Path:
    """`path` as given when it exists (or is absolute), else relative to the checkout root:
    Jupyter runs a notebook in notebooks/, while paths like `runs/demo` are written from
    the root."""
    path = pathlib.Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (_REPO / path).exists():
        return path.absolute()
    return _REPO / path


# --- Runs ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    # One row per logged step (index `step`), one column per metric name.
    metrics: pd.DataFrame
    # Committed checkpoint steps, ascending.
    checkpoints: list[int]
    # step -> [{'path': video file, 'sidecar': its JSON sampling parameters}] by index.
    samples: dict[int, list[dict[str, Any]]]
    # step -> the evaluator's eval/<step>.json.
    evals: dict[int, dict[str, Any]]

    @property
    def name(self) -> str:
        return self.workdir.name

    def columns(self, prefix: str) -> list[str]:
        """Metric names starting with `prefix` (e.g. 'train/loss_t/'), in logged order."""
        return [c for c in self.metrics.columns if c.startswith(prefix)]


def read_metrics(workdir: str | os.PathLike) -> pd.DataFrame:
    """WORKDIR/metrics.jsonl as a DataFrame indexed by step (empty when there is none).

    The eval hook writes its own line at a step the trainer also logged; the two lines
    become one row. An unterminated last line is the one a running job is writing and is
    left out; any other unreadable line is an error naming it.
    """
    path = pathlib.Path(workdir) / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{i + 1} is not a JSON object ({e}): fix or drop it") from e
    if not rows:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    # groupby().first() takes each column's first non-null value within a step.
    return pd.DataFrame(rows).groupby("step", sort=True).first()


def load_run(workdir: str | os.PathLike) -> Run:
    """Everything a run's workdir holds, read once."""
    workdir = repo_path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"run directory {workdir} does not exist: pass a --workdir")
    config = config_lib.load_run_config(workdir)
    samples = {}
    for step in _step_dirs(workdir / "samples"):
        videos = sorted(
            p for p in (workdir / "samples" / str(step)).iterdir() if p.suffix in _VIDEO_SUFFIXES
        )
        samples[step] = [
            {"path": p, "sidecar": _json_or_empty(p.with_suffix(".json"))} for p in videos
        ]
    evals = {step: json.loads(path.read_text()) for step, path in _eval_files(workdir)}
    checkpoints = _step_dirs(workdir / "checkpoints")
    return Run(workdir, config, read_metrics(workdir), checkpoints, samples, evals)


def _step_dirs(directory: pathlib.Path) -> list[int]:
    """Integer-named subdirectories (orbax's in-progress saves carry a suffix: excluded)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _eval_files(workdir: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """`(step, eval/<step>.json)` by step (numerically: 10 after 4)."""
    found = [(int(p.stem), p) for p in (workdir / "eval").glob("*.json") if p.stem.isdigit()]
    return sorted(found)


def _json_or_empty(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _freeze(value):
    """JSON lists to tuples, as config_lib.load_run_config does (patch sizes, prompts)."""
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


# --- Sweeps ----------------------------------------------------------------------------


def load_sweep(path: str | os.PathLike) -> pd.DataFrame:
    """One row per job of a sweep (index `name`): its overrides as columns, state, last step,
    final and best `train/loss`, the last value of every `eval/*` metric, the numeric scores
    of its latest eval/<step>.json as `score/<name>`, and its workdir.

    `path` is the sweep's --workdir_root or its sweep.json. `df.attrs['overrides']` lists
    the override columns.
    """
    path = repo_path(path)
    root = path.parent if path.is_file() else path
    manifest = sweeping.load_manifest(root)
    rows, override_keys = [], []
    for name, record in manifest["jobs"].items():
        workdir = pathlib.Path(record["workdir"])
        if not workdir.is_absolute():
            # Relative to where the sweep was launched; jobs always live at ROOT/<name>.
            workdir = root / name
        record = {**record, "workdir": str(workdir)}
        overrides = {k: _freeze(v) for k, v in record.get("overrides", {}).items()}
        override_keys += [k for k in overrides if k not in override_keys]
        metrics = read_metrics(workdir)
        row = {"name": name, **overrides, "state": sweeping.current_state(record)}
        row["step"] = int(metrics.index[-1]) if len(metrics) else None
        row["total_steps"] = record.get("total_steps")
        loss = (
            metrics["train/loss"].dropna()
            if "train/loss" in metrics
            else pd.Series([], dtype=float)
        )
        row["final train/loss"] = float(loss.iloc[-1]) if len(loss) else math.nan
        row["best train/loss"] = float(loss.min()) if len(loss) else math.nan
        row["best step"] = int(loss.idxmin()) if len(loss) else None
        for col in metrics.columns:
            if col.startswith("eval/") and metrics[col].notna().any():
                row[f"final {col}"] = float(metrics[col].dropna().iloc[-1])
        evals = _eval_files(workdir)
        scores = json.loads(evals[-1][1].read_text()).get("scores", {}) if evals else {}
        for key, value in scores.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[f"score/{key}"] = value
        row["workdir"] = str(workdir)
        rows.append(row)
    df = pd.DataFrame(rows).set_index("name")
    df.attrs.update(overrides=override_keys, root=str(root), config=manifest.get("config"))
    return df


# --- Configs ---------------------------------------------------------------------------


def flat_config(config) -> dict[str, Any]:
    """`{'optimizer.lr': 1e-3, ...}` of a Run, ConfigDict, dict, workdir or config.json."""
    if isinstance(config, Run):
        config = config.config
    if isinstance(config, str | os.PathLike):
        path = repo_path(config)
        config = json.loads((path if path.is_file() else path / "config.json").read_text())
    if isinstance(config, ml_collections.ConfigDict):
        config = config_lib.to_dict(config)
    out: dict[str, Any] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = _freeze(value)

    walk(config, "")
    return out


def config_diff(a, b, names: tuple[str, str] | None = None) -> pd.DataFrame:
    """The dotted fields whose values differ between two configs (index `field`, one
    column per config, `<missing>` where a config lacks the field). Accepts what
    `flat_config` accepts; Runs name their column after their workdir."""
    names = names or tuple(x.name if isinstance(x, Run) else n for x, n in ((a, "a"), (b, "b")))
    fa, fb = flat_config(a), flat_config(b)
    rows = [
        (key, fa.get(key, _MISSING), fb.get(key, _MISSING))
        for key in sorted(fa.keys() | fb.keys())
        if fa.get(key, _MISSING) != fb.get(key, _MISSING)
    ]
    return pd.DataFrame(rows, columns=["field", *names]).set_index("field")


# --- Parameters ------------------------------------------------------------------------


def load_params(
    path: str | os.PathLike, ema: bool | float = True, step: int | None = None
) -> dict[str, Any]:
    """A checkpoint's parameter tree as numpy arrays, restored onto one CPU device whatever
    mesh saved it.

    `path`: a run's workdir, its checkpoints/ (latest step, or `step`) or checkpoints/<step>.
    `ema`: True = the EMA named by the saved config's `sample.ema_decay` (else the first
    EMA kept); a float = the EMA of that decay; False = the raw parameters.
    """
    # Imported here: JAX and Orbax take seconds to load, and reading metrics, configs and
    # sweeps (the rest of this module) needs neither.
    import jax

    from sora_jax.run import checkpoint as ckpt_lib
    from sora_jax.run import train_state as state_lib

    path = repo_path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"load_params({path}): no such path; give a run's workdir, its checkpoints/ "
            "directory or one checkpoints/<step> directory"
        )
    directory, latest = ckpt_lib.resolve_checkpoint(path)
    step = latest if step is None else step
    meta = _state_metadata(directory, step)
    if ema is False or ema == 0:
        source = ("params",)
    else:
        kept = sorted(meta.get("ema", {}))
        if not kept:
            raise ValueError(f"checkpoint {directory}/{step} keeps no EMA: use ema=False")
        if ema is True:
            saved = ckpt_lib.saved_config(directory, step) or _json_or_empty(
                directory.parent / "config.json"
            )
            decay = saved.get("sample", {}).get("ema_decay") or 0.0
            key = state_lib.ema_key(decay) if decay else kept[0]
            key = key if key in kept else kept[0]
        else:
            key = state_lib.ema_key(float(ema))
            if key not in kept:
                raise ValueError(f"checkpoint {directory}/{step} has no EMA {key}; it has {kept}")
        source = ("ema", key)
    tree = meta
    for k in source:
        tree = tree[k]
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu),
        tree,
        is_leaf=lambda x: hasattr(x, "shape"),
    )
    target = abstract
    for k in reversed(source):
        target = {k: target}
    restored, _ = ckpt_lib.restore_params(directory, target, step)
    for k in source:
        restored = restored[k]
    return jax.tree.map(np.asarray, jax.device_get(restored))


def _state_metadata(directory: pathlib.Path, step: int):
    """The saved train state's metadata tree (shapes and dtypes, nothing read)."""
    import orbax.checkpoint as ocp

    if not (directory / str(step) / "state").is_dir():
        raise FileNotFoundError(
            f"{directory}/{step}/state does not exist: steps there are {_step_dirs(directory)}"
        )
    meta = ocp.StandardCheckpointer().metadata(directory / str(step) / "state")
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)
