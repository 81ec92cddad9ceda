"""Rolling back after too many non-finite updates in a row (`training.max_consecutive_skips`):
the parameters and optimizer state of the newest checkpoint strictly before the streak's
first skipped step, while the step counter and the data move on past it.

Skip flags stay on the device until the loop needs them (a metrics line, a checkpoint):
`account` then records every pending step in order, so a streak is measured exactly even
when it began in an earlier metrics window. The loop saves no periodic checkpoint while a
streak is running (training/loop.py), so a bad streak never fills `checkpoint_max_to_keep`
with copies of its state, and `before=first` never restores one from inside it.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import train_state as state_lib
from sora_jax.training import resilience

log = logging.getLogger(__name__)


def account(pending: list[tuple[int, Any]], skips: resilience.SkipTracker) -> bool:
    """Records the skip flags of `pending` `(step, on-device train/skipped)` in step order
    and empties it; True when a streak reached the limit (a rollback is due)."""
    for step, flag in jax.device_get(pending):
        skips.record(step, int(flag))
    pending.clear()
    return skips.tripped is not None


def settle(pending, skips, mngr, abstract_state, state, done: int) -> tuple[Any, int]:
    """`account` for the pending steps, then `rollback` when due: `(state, rollbacks done:
    0 or 1)`. Call it inside the mesh's context."""
    if not account(pending, skips):
        return state, 0
    return rollback(mngr, abstract_state, state, done, skips), 1


def rollback(mngr, abstract_state, state, done: int, skips: resilience.SkipTracker) -> Any:
    """Parameters and optimizer state of the newest checkpoint before the tripped streak's
    first step; the step counter (and the data, which moved on) stay at `done`."""
    first, last = skips.tripped
    restored = ckpt_lib.restore_latest_valid(mngr, abstract_state, before=first)
    if restored is None:
        raise RuntimeError(
            f"{last - first + 1} consecutive non-finite updates at steps {first}-{last} and "
            f"no checkpoint before step {first} to roll back to: lower optimizer.lr, check "
            "the data of these steps, or raise training.max_consecutive_skips"
        )
    good, _, good_step = restored
    good = state_lib.with_frozen(good, state)  # frozen parts are not in checkpoints
    log.warning(
        "%d consecutive non-finite updates at steps %d-%d: rolled the parameters back to "
        "checkpoint %d; the data continues after step %d",
        last - first + 1,
        first,
        last,
        good_step,
        done,
    )
    print(f"rollback: steps {first}-{last} skipped; parameters of step {good_step}", flush=True)
    skips.rolled_back()
    step = jax.device_put(jnp.asarray(done, state.step.dtype), state.step.sharding)
    return good.replace(step=step)
