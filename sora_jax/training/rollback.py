"""Rolling back after too many non-finite updates in a row (`training.max_consecutive_skips`):
the parameters and optimizer state of the last checkpoint before the bad streak, while the
step counter and the data move on past it.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import train_state as state_lib

log = logging.getLogger(__name__)


def rollback(mngr, abstract_state, state, done: int, skips) -> Any:
    """Parameters and optimizer state of the last checkpoint before the run of skipped
    updates; the step counter (and the data, which moved on) stay at `done`."""
    first_bad = done - skips.consecutive + 1
    restored = ckpt_lib.restore_latest_valid(mngr, abstract_state, before=first_bad)
    if restored is None:
        raise RuntimeError(
            f"{skips.consecutive} consecutive non-finite updates up to step {done} and no "
            f"checkpoint before step {first_bad} to roll back to: lower optimizer.lr, check "
            "the data of these steps, or raise training.max_consecutive_skips"
        )
    good, _, good_step = restored
    good = state_lib.with_frozen(good, state)  # frozen parts are not in checkpoints
    log.warning(
        "%d consecutive non-finite updates up to step %d: rolled the parameters back to "
        "checkpoint %d; the data continues after step %d",
        skips.consecutive,
        done,
        good_step,
        done,
    )
    print(f"rollback: steps {first_bad}-{done} skipped; parameters of step {good_step}")
    skips.consecutive = 0
    step = jax.device_put(jnp.asarray(done, state.step.dtype), state.step.sharding)
    return good.replace(step=step)
