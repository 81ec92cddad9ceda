"""Orbax checkpoints of the train state and the data iterator state.

One checkpoint holds everything a continuation needs (USER_PAINS 2): the train state
(step, params, optimizer state, EMA) under `state`, and the input pipeline's position
under `data`. Restoring always targets the abstract state built from the *current* mesh,
so a checkpoint written on one device layout restores onto any other (USER_PAINS 4).
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp

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
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict[str, Any]) -> bool:
    """Starts a (possibly asynchronous) save of `state` and `data_state` at `step`."""
    return mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=True,
    )


def _step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    """`step`, or the latest committed one; an error naming the directory when none."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {mngr.directory}")
    return step


def restore(
    mngr: ocp.CheckpointManager, abstract_state, step: int | None = None
) -> tuple[Any, dict[str, Any], int]:
    """Restores `(state, data_state, step)` into the shardings of `abstract_state`."""
    step = _step(mngr, step)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], dict(restored["data"] or {}), step


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
