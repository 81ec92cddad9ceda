"""Preemption flag, step watchdog and the consecutive-skip counter (the loop-level
behaviour is tested end to end in tests/training/test_loop.py)."""

import os
import signal
import time

import pytest

from sora_jax.training import resilience


def test_sigterm_sets_the_stop_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with resilience.Preemption() as p:
        assert not p.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert p.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_watchdog_fires_on_a_stalled_step_with_a_stack_dump(tmp_path, capfd):
    exits = []
    dog = resilience.Watchdog(
        factor=3.0, min_timeout_s=0.2, log_dir=tmp_path, exit_fn=exits.append
    ).start()
    try:
        for step in range(5):  # steady 20 ms steps arm it
            time.sleep(0.02)
            dog.beat(step)
        assert dog.timeout_s() == pytest.approx(0.2)  # the floor, above 3 x 20 ms
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)  # no beat: the step "hangs"
    finally:
        dog.close()
    assert exits == [resilience.WATCHDOG_EXIT_CODE]
    err = capfd.readouterr().err
    assert "watchdog: step 5" in err and "Thread" in err  # every thread's stack
    assert "test_watchdog_fires" in (tmp_path / "watchdog_host_0.txt").read_text()


def test_watchdog_is_quiet_while_steps_keep_coming():
    exits = []
    dog = resilience.Watchdog(factor=5.0, min_timeout_s=0.2, exit_fn=exits.append).start()
    try:
        assert dog.timeout_s() == float("inf")  # not armed before the first beat
        for step in range(20):
            time.sleep(0.03)
            dog.beat(step)
    finally:
        dog.close()
    assert exits == [] and not dog.fired


def test_skip_tracker_counts_consecutive_skips_only():
    t = resilience.SkipTracker(limit=3)
    flags = (1, 1, 0, 1, 1)
    assert [t.record(step, s) for step, s in enumerate(flags, 1)] == [False] * 5
    assert (t.consecutive, t.start) == (2, 4)
    assert t.record(6, 1) and t.total == 5 and t.tripped == (4, 6)
    assert t.record(7, 1) and t.total == 6 and t.tripped == (4, 6)  # counted after the trigger
    t.rolled_back()
    assert not t.record(8, 1) and (t.start, t.consecutive, t.total) == (8, 1, 7)
    assert not resilience.SkipTracker(limit=0).record(1, 1)  # 0 disables the rollback
