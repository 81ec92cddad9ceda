"""What keeps a long run from losing work or hanging silently (docs/design.md, Failures).

- `Preemption`: SIGTERM (what schedulers and spot VMs send before taking a machine) sets a
  flag; the loop checks it after every step, saves a checkpoint at that step and exits
  cleanly. In multi-process runs the processes agree on the step to stop at (any process
  signalled stops all), so every process saves the same step.
- `Watchdog`: a background thread that expects a heartbeat per step. When a step takes
  `factor` times longer than the median of the recent ones (and at least `min_timeout_s`),
  it writes every thread's stack to stderr and the log directory and exits the process
  with `WATCHDOG_EXIT_CODE`, so a hung collective or a stuck input pipeline ends the job
  with a diagnosis instead of burning the reservation.
- `SkipTracker`: counts non-finite (skipped) updates step by step; after `limit` in a row
  the loop rolls back to the newest checkpoint before the streak's first step
  (training/rollback.py) while the data moves on.
"""

from __future__ import annotations

import collections
import faulthandler
import logging
import os
import pathlib
import signal
import statistics
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

WATCHDOG_EXIT_CODE = 3


class Preemption:
    """`with Preemption() as p: ... if p.should_stop(step): save; break`."""

    def __init__(self, sync_every_steps: int = 1):
        self.sync_every_steps = max(1, int(sync_every_steps))
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        del frame
        log.warning("received signal %d: saving a checkpoint after this step", signum)
        self._flag.set()

    def request(self) -> None:
        """Asks for a stop as SIGTERM would (tests, or a user-defined condition)."""
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process."""
        if jax.process_count() == 1:
            return self._flag.is_set()
        if step % self.sync_every_steps:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self._flag.is_set()))
        return bool(np.any(flags))


class Watchdog:
    """Exits the process with a stack dump when a step stalls far beyond the median."""

    def __init__(
        self,
        *,
        factor: float = 20.0,
        min_timeout_s: float = 300.0,
        window: int = 50,
        log_dir: str | os.PathLike | None = None,
        exit_fn=os._exit,
    ):
        self.factor, self.min_timeout_s = float(factor), float(min_timeout_s)
        self._durations: collections.deque[float] = collections.deque(maxlen=window)
        self._last: float | None = None
        self._step = -1
        self._log_dir = pathlib.Path(log_dir) if log_dir else None
        self._exit = exit_fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self.fired = False

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """Marks the end of `step`. The first beat arms the watchdog (compilation done)."""
        now = time.monotonic()
        if self._last is not None:
            self._durations.append(now - self._last)
        self._last, self._step = now, step

    def timeout_s(self) -> float:
        if not self._durations:
            return float("inf")  # not armed: compilation and the first step can take long
        return max(self.min_timeout_s, self.factor * statistics.median(self._durations))

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.min_timeout_s / 4)):
            if self._last is None:
                continue
            waited = time.monotonic() - self._last
            if waited > self.timeout_s():
                self._fire(waited)
                return

    def _fire(self, waited: float) -> None:
        self.fired = True
        message = (
            f"watchdog: step {self._step + 1} has run {waited:.0f} s, more than "
            f"{self.timeout_s():.0f} s ({self.factor:g} x the median step of "
            f"{statistics.median(self._durations):.2f} s, at least {self.min_timeout_s:g} s); "
            "dumping all thread stacks and exiting. Raise training.watchdog_factor or "
            "watchdog_min_timeout_s if such steps are expected."
        )
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            path = self._log_dir / f"watchdog_host_{jax.process_index()}.txt"
            with path.open("w") as f:
                f.write(message + "\n")
                faulthandler.dump_traceback(file=f, all_threads=True)
        self._exit(WATCHDOG_EXIT_CODE)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class SkipTracker:
    """Skipped (non-finite) updates, step by step: the total, the current streak and, once
    `limit` came in a row, the streak that calls for a rollback.

    Steps are recorded one by one in order, every step of a metrics window (never stopping
    at the first trigger), so `total` counts every skipped update and `start` is the exact
    first step of the current streak, also when it began in an earlier window.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)  # 0 disables the rollback
        self.consecutive = 0  # length of the current streak
        self.start: int | None = None  # first step of the current streak
        self.total = 0
        # (first, last) step of the streak that reached `limit`, until `rolled_back()`.
        self.tripped: tuple[int, int] | None = None

    def record(self, step: int, skipped: int) -> bool:
        """Adds step `step`'s skip flag (0 or 1); True once a streak reached `limit` (and
        until `rolled_back`)."""
        if skipped:
            if not self.consecutive:
                self.start = step
            self.consecutive += 1
            self.total += 1
            if self.tripped is None and self.limit > 0 and self.consecutive >= self.limit:
                self.tripped = (self.start, step)
        else:
            self.consecutive, self.start = 0, None
        return self.tripped is not None

    def rolled_back(self) -> None:
        """The state went back to before the tripped streak: a new streak starts afresh."""
        self.tripped, self.consecutive, self.start = None, 0, None
