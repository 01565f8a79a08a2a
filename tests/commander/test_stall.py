"""A commander whose own loop stalled does not blame the drones for it."""

from __future__ import annotations

from keyval.commander.daemon import STALL_GAP_MS, STALL_GRACE_MS, StallGuard
from keyval.commander.state import CommanderState, DroneFailed
from keyval.timing import FAILURE_CHECK_MS, commander_expiry_ms

EXPIRY_S = commander_expiry_ms(600) / 1000
TICK_S = FAILURE_CHECK_MS / 1000


def test_ticks_on_time_always_detect() -> None:
    guard = StallGuard(0.0)
    now = 0.0
    for _ in range(50):
        now += TICK_S
        assert guard.may_detect(now)
        guard.ran(now + 0.002)  # the tick's own work
    assert guard.stalls == 0


def test_a_late_tick_holds_failure_detection_for_the_grace() -> None:
    guard = StallGuard(10.0)
    woke = 10.0 + TICK_S + STALL_GAP_MS / 1000 + 0.2  # a 300 ms stall
    assert not guard.may_detect(woke)
    guard.ran(woke)
    now, quiet = woke, []
    while now < woke + STALL_GRACE_MS / 1000 + 0.1:
        now += TICK_S
        quiet.append(not guard.may_detect(now))
        guard.ran(now)
    held = round(STALL_GRACE_MS / 1000 / TICK_S)
    assert quiet[: held - 1] == [True] * (held - 1) and not any(quiet[held + 1 :])
    assert guard.stalls == 1


def test_a_slow_save_inside_a_tick_is_not_a_stall() -> None:
    guard = StallGuard(0.0)
    assert guard.may_detect(TICK_S)
    guard.ran(TICK_S + 0.5)  # a map save took 500 ms; heartbeats were served meanwhile
    assert guard.may_detect(TICK_S + 0.5 + TICK_S)
    assert guard.stalls == 0


def test_state_declares_nobody_failed_while_told_not_to_then_does() -> None:
    state = CommanderState(name="commander-1", term=1, now=0.0, expect_drones=1)
    incarnation = state.register("drone-1", "127.0.0.1:1", 0, 0.0).incarnation
    state.tick(0.0)
    late = EXPIRY_S + 0.5
    assert not [i for i in state.tick(late, detect_failures=False) if isinstance(i, DroneFailed)]
    assert "drone-1" in state.drones
    assert DroneFailed("drone-1", incarnation) in state.tick(late + 0.01)
