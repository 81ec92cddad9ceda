"""Orbax checkpoints of the train state and the data iterator state.

One checkpoint holds everything a continuation needs, so a resumed run loses nothing:
the train state (step, params, optimizer state, EMA) under `state`, the input pipeline's
position under `data` and the resolved config under `config`. Restoring always targets
the abstract state built from the *current* mesh, so a checkpoint written on one device
layout restores onto any other: a run continues on another device count, and a notebook
reads it on one CPU (docs/design.md, Decisions).

LoRA runs (`config.lora.rank > 0`): the state's frozen `base` is never saved (only the
factors, their optimizer state and EMA); the run records where its base came from in
`WORKDIR/lora_base.json` (`record_lora_base`), and a resume or `restore_params_for_sampling`
reloads it from there.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from sora_jax.run import train_state as state_lib

log = logging.getLogger(__name__)


def manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    keep_period: int | None = None,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        keep_period=keep_period,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "config"))


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state,
    data_state: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> bool:
    """Starts a (possibly asynchronous) save of `state`, `data_state` and the resolved
    `config` (a JSON dict) at `step`."""
    items = dict(state=ocp.args.StandardSave(stored(state)), data=ocp.args.JsonSave(data_state))
    if config is not None:
        items["config"] = ocp.args.JsonSave(config)
    return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def stored(state):
    """What a checkpoint's `state` item holds: a TrainState as the dict `step, params,
    opt_state, ema, base` with `base` always None. The frozen parts (a LoRA run's base, a
    text encoder run in the step) are never saved; `restore` returns them as None and the
    caller puts them back (`state.with_frozen`). A plain dict keeps the stored tree fixed
    when TrainState gains a frozen field, so older checkpoints keep restoring."""
    if not isinstance(state, state_lib.TrainState):
        return state
    return dict(
        step=state.step, params=state.params, opt_state=state.opt_state, ema=state.ema, base=None
    )


def _from_stored(tree, abstract_state):
    """Inverse of `stored`: the restored dict as a TrainState with its frozen parts None."""
    if not isinstance(abstract_state, state_lib.TrainState):
        return tree
    return state_lib.TrainState(**{k: v for k, v in tree.items() if k != "base"})


def saved_config(directory: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """The resolved config saved with checkpoint `step`, or None (older checkpoints)."""
    path = pathlib.Path(directory) / str(step) / "config" / "metadata"
    return json.loads(path.read_text()) if path.is_file() else None


def _step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    """`step`, or the latest committed one; an error naming the directory when none."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {mngr.directory}")
    return step


def restore(
    mngr: ocp.CheckpointManager, abstract_state, step: int | None = None
) -> tuple[Any, dict[str, Any], int]:
    """Restores `(state, data_state, step)` into the shardings of `abstract_state` (a LoRA
    state comes back with `base=None`)."""
    step = _step(mngr, step)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(stored(abstract_state)), data=ocp.args.JsonRestore()
        ),
    )
    return _from_stored(restored["state"], abstract_state), dict(restored["data"] or {}), step


def restore_latest_valid(
    mngr: ocp.CheckpointManager, abstract_state, before: int | None = None
) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest committed checkpoint that reads back, newest first (optionally
    only steps `< before`); a step that fails to restore (corrupt or truncated files) is
    skipped with a warning naming it. None when no checkpoint restores."""
    steps = sorted((s for s in mngr.all_steps() if before is None or s < before), reverse=True)
    for step in steps:
        try:
            return restore(mngr, abstract_state, step)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, loudly
            log.warning(
                "checkpoint %s/%d could not be restored (%s: %s); trying the previous one",
                mngr.directory,
                step,
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
            )
    return None


def restore_params(directory: str | os.PathLike, abstract_params, step: int | None = None):
    """Restores only the parameter tree (`state.params` or one EMA) for sampling.

    `abstract_params` is a dict `{'params': tree}` or `{'ema': {key: tree}}` of
    `jax.ShapeDtypeStruct` with shardings; the rest of the state is not read.
    """
    mngr = manager(directory, async_save=False)
    try:
        step = _step(mngr, step)
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract_params,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params),
                    partial_restore=True,
                )
            ),
        )
        return restored["state"], step
    finally:
        mngr.close()


# --- Initialization from another run (`--init_from`) -----------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> tuple[pathlib.Path, int]:
    """`(checkpoints directory, step)` for a run workdir, a checkpoints directory (latest
    committed step) or one step's directory `checkpoints/<step>`."""
    path = pathlib.Path(path).expanduser().absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--init_from={path} does not exist: give a run's workdir, its checkpoints/ "
            "directory, or one checkpoints/<step> directory"
        )
    mngr = manager(path, async_save=False)
    try:
        return path, _step(mngr, None)
    finally:
        mngr.close()


def saved_shapes(directory: pathlib.Path, step: int, prefix: str) -> dict[str, tuple]:
    """`{'a/b/c': shape}` of the saved state's leaves under `prefix` ('params', 'ema/…')."""
    meta = ocp.StandardCheckpointer().metadata(directory / str(step) / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    for key in prefix.split("/") if prefix else ():
        if key not in tree:
            raise KeyError(f"checkpoint {directory}/{step} has no {prefix!r} (it has {list(tree)})")
        tree = tree[key]
    return flat_shapes(tree)


def flat_shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _key_name(k) -> str:
    """A path entry as plain text: dict key, dataclass field or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def load_report(saved: dict[str, tuple], wanted: dict[str, tuple]) -> dict[str, list]:
    """Leaves the model wants but the checkpoint lacks, has but the model does not want, and
    has with another shape."""
    return {
        "missing": sorted(set(wanted) - set(saved)),
        "unexpected": sorted(set(saved) - set(wanted)),
        "reshaped": sorted(
            f"{k}: saved {saved[k]} vs model {wanted[k]}"
            for k in set(saved) & set(wanted)
            if tuple(saved[k]) != tuple(wanted[k])
        ),
    }


def load_for_init(
    path: str | os.PathLike,
    abstract_params,
    fresh_params,
    *,
    source: str = "params",
    allow: tuple[str, ...] = (),
):
    """Parameters for a new run from another run's checkpoint, and the load report.

    `source` is 'params' or 'ema/<ema_key>'. Leaves the checkpoint lacks or holds with
    another shape keep their `fresh_params` value when their path matches one of the glob
    patterns in `allow` (e.g. 'patch_embedding/*' after adding conditioning channels);
    any other mismatch is an error listing every difference. Unexpected saved leaves are
    ignored only when allowed too.
    """
    directory, step = resolve_checkpoint(path)
    saved = saved_shapes(directory, step, source)
    wanted = flat_shapes(abstract_params)
    report = load_report(saved, wanted)
    reshaped = {entry.split(":")[0] for entry in report["reshaped"]}
    problems = [
        f"{kind} {name}"
        for kind in ("missing", "unexpected", "reshaped")
        for name in report[kind]
        if not any(fnmatch.fnmatch(name.split(":")[0], pat) for pat in allow)
    ]
    if problems:
        raise ValueError(
            f"--init_from={directory}/{step} ({source}) does not fit the model:\n  "
            + "\n  ".join(problems)
            + "\nfix the model config, or allow these leaves to start fresh with "
            "training.init_from_allow=('pattern/*', ...)"
        )
    keep = {k for k in wanted if k in saved and k not in reshaped}
    flat = jax.tree_util.tree_leaves_with_path(abstract_params)
    name = lambda p: "/".join(_key_name(k) for k in p)  # noqa: E731
    target = {}
    for p, leaf in flat:
        if name(p) in keep:
            node = target
            keys = [_key_name(k) for k in p]
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = leaf
    wrapped = {}
    node = wrapped
    parts = source.split("/")
    for k in parts[:-1]:
        node = node.setdefault(k, {})
    node[parts[-1]] = target
    restored, _ = restore_params(directory, wrapped, step)
    for k in parts:
        restored = restored[k]
    loaded = dict(_flatten(restored))
    params = jax.tree_util.tree_map_with_path(
        lambda p, fresh: loaded.get(name(p), fresh), fresh_params
    )
    report.update(checkpoint=f"{directory}/{step}", source=source, loaded=len(loaded))
    return params, report


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flatten(v, key)
        else:
            yield key, v


def write_init_checkpoint(out: str | os.PathLike, params: dict) -> pathlib.Path:
    """Writes a plain parameter tree as step 0 of `OUT/checkpoints` (`{'params': params}`),
    which `--init_from=OUT` (`load_for_init`, source 'params') reads: parameters made
    outside training, e.g. by `python -m sora_jax.wan import`.

    The tree's numpy leaves are replaced, in place and one at a time, by jax arrays: Orbax
    copies numpy leaves while saving (a second copy of the model), but not jax ones.
    """

    def to_device(tree: dict) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                to_device(value)
            else:
                tree[key] = jax.device_put(value)

    to_device(params)

    directory = pathlib.Path(out).absolute() / "checkpoints"
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty: choose a new --out")
    mngr = manager(directory, async_save=False, max_to_keep=None)
    try:
        save(mngr, 0, {"params": params}, {})
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return directory


# --- LoRA runs: the recorded base, and merged parameters for sampling --------------------

LORA_BASE_FILE = "lora_base.json"


def record_lora_base(
    workdir: str | os.PathLike, checkpoint: str, source: str, allow: tuple[str, ...]
) -> None:
    """Writes `WORKDIR/lora_base.json`: the checkpoint step (`dir/step`, resolved, so the base
    stays fixed while its run goes on), the tree and the allow patterns of the frozen base."""
    if jax.process_index() != 0:
        return
    path = pathlib.Path(workdir) / LORA_BASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(checkpoint), "source": source, "allow": list(allow)}
    path.write_text(json.dumps(record, indent=2) + "\n")


def recorded_lora_base(workdir: str | os.PathLike) -> dict[str, Any]:
    """The record `record_lora_base` wrote, or an error saying how to provide the base."""
    path = pathlib.Path(workdir) / LORA_BASE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: a LoRA run (lora.rank > 0) reloads its frozen base from "
            "the checkpoint recorded there when it started with --init_from; start the run "
            "with --init_from=BASE_RUN (or write the file: "
            '{"checkpoint": "BASE_RUN/checkpoints/STEP", "source": "params", "allow": []})'
        )
    return json.loads(path.read_text())
