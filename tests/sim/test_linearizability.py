"""The linearizability checker on hand-written and generated register histories."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyval.sim.history import (
    ABSENT,
    EventType,
    History,
    HistoryError,
    Key,
    OpKind,
    Recorder,
    Step,
)
from keyval.sim.linearizability import (
    Verdict,
    check_key,
    check_linearizable,
    freeze,
)
from tests.sim.builders import Script


def verdict(history: History, **initial: object) -> Verdict:
    start: dict[Key, object] = {}
    start.update(initial)
    return check_linearizable(history, initial=start).verdict


def test_sequential_writes_and_reads_are_linearizable() -> None:
    history = (
        Script()
        .read(0, "x")
        .ok(0, ABSENT)
        .write(0, "x", 1)
        .ok(0)
        .read(1, "x")
        .ok(1, 1)
        .write(1, "x", None)
        .ok(1)
        .read(0, "x")
        .ok(0, None)
        .history()
    )
    result = check_linearizable(history)
    assert result.ok
    assert result.keys[0].operations == 5


def test_stale_read_is_a_violation_explained_by_its_three_operations() -> None:
    history = (
        Script()
        .read(3, "x")
        .ok(3, ABSENT)  # noise: an early read that is fine
        .write(0, "x", 1)
        .ok(0)
        .write(0, "x", 2)
        .ok(0)
        .read(2, "x")
        .ok(2, 2)  # noise: a fresh read
        .read(1, "x")
        .ok(1, 1)  # stale: 2 was acknowledged before this read began
        .history()
    )
    result = check_linearizable(history)
    assert result.verdict is Verdict.VIOLATION
    (violation,) = result.violations
    assert violation.key == "x" and violation.minimal
    explained = [(op.kind, op.value, op.outcome) for op in violation.explanation]
    assert explained == [
        (OpKind.WRITE, 1, EventType.OK),
        (OpKind.WRITE, 2, EventType.OK),
        (OpKind.READ, 1, EventType.OK),
    ]
    assert "cannot be ordered" in result.describe()


def test_lost_update_two_cas_from_the_same_value_is_a_violation() -> None:
    history = (
        Script()
        .cas(0, "x", 0, 1)
        .cas(1, "x", 0, 2)
        .ok(0)
        .ok(1)  # both "won": one of the updates was lost
        .history()
    )
    assert verdict(history, x=0) is Verdict.VIOLATION
    (violation,) = check_linearizable(history, initial={"x": 0}).violations
    assert {op.value for op in violation.explanation} == {1, 2}


def test_concurrent_cas_where_one_fails_is_linearizable() -> None:
    history = (
        Script().cas(0, "x", 0, 1).cas(1, "x", 0, 2).ok(0).fail(1).read(1, "x").ok(1, 1).history()
    )
    assert verdict(history, x=0) is Verdict.OK


def test_cas_from_the_wrong_value_is_a_violation() -> None:
    history = Script().cas(0, "x", 5, 6).ok(0).history()
    assert verdict(history, x=0) is Verdict.VIOLATION
    assert verdict(history, x=5) is Verdict.OK


def test_read_concurrent_with_a_write_may_see_either_value() -> None:
    for seen in (ABSENT, 1):
        history = Script().write(0, "x", 1).read(1, "x").ok(1, seen).ok(0).history()
        assert verdict(history) is Verdict.OK
    history = Script().write(0, "x", 1).read(1, "x").ok(1, 2).ok(0).history()
    assert verdict(history) is Verdict.VIOLATION


def test_reads_may_not_flip_back_during_one_write() -> None:
    # Both reads overlap the write, but once one read saw 1, a later read cannot see ABSENT.
    history = (
        Script().write(0, "x", 1).read(1, "x").ok(1, 1).read(1, "x").ok(1, ABSENT).ok(0).history()
    )
    assert verdict(history) is Verdict.VIOLATION


def test_unknown_write_may_take_effect_late_or_never() -> None:
    late = (
        Script().write(0, "x", 1).info(0).read(1, "x").ok(1, ABSENT).read(1, "x").ok(1, 1).history()
    )
    assert verdict(late) is Verdict.OK
    never = Script().write(0, "x", 1).info(0).read(1, "x").ok(1, ABSENT).history()
    assert verdict(never) is Verdict.OK
    open_at_end = Script().write(0, "x", 1).read(1, "x").ok(1, 1).history()
    assert verdict(open_at_end) is Verdict.OK


def test_unknown_write_takes_effect_at_most_once() -> None:
    history = (
        Script()
        .write(0, "x", 1)
        .info(0)
        .read(1, "x")
        .ok(1, 1)
        .write(1, "x", 2)
        .ok(1)
        .read(1, "x")
        .ok(1, 1)  # would need the unknown write to happen twice
        .history()
    )
    assert verdict(history) is Verdict.VIOLATION


def test_failed_write_never_takes_effect_and_unknown_reads_constrain_nothing() -> None:
    history = Script().write(0, "x", 1).fail(0).read(1, "x").ok(1, 1).history()
    result = check_linearizable(history)
    assert result.verdict is Verdict.VIOLATION
    assert [op.kind for op in result.violations[0].explanation] == [OpKind.READ]
    unknown_read = Script().read(1, "x").info(1).history()
    assert verdict(unknown_read) is Verdict.OK


def test_values_compare_by_type() -> None:
    for written, seen in ((1, True), (1, 1.0), (b"1", "1"), ([1], {1: 1})):
        history = Script().write(0, "x", written).ok(0).read(0, "x").ok(0, seen).history()
        assert verdict(history) is Verdict.VIOLATION, (written, seen)
    nested = {"a": [1, {"b": b"c"}], 2: None}
    history = Script().write(0, "x", nested).ok(0).read(0, "x").ok(0, dict(nested)).history()
    assert verdict(history) is Verdict.OK
    assert freeze(None) is not None


def test_keys_are_checked_independently() -> None:
    history = (
        Script()
        .write(0, "x", 1)
        .ok(0)
        .write(0, b"x", 2)
        .ok(0)
        .read(1, "x")
        .ok(1, 1)
        .read(1, b"x")
        .ok(1, 1)
        .history()
    )
    result = check_linearizable(history)
    assert [(r.key, r.verdict) for r in result.keys] == [
        ("x", Verdict.OK),
        (b"x", Verdict.VIOLATION),
    ]


def test_search_bound_gives_unknown() -> None:
    script = Script()
    for process in range(12):
        script.write(process, "x", process)
    for process in range(12):
        script.ok(process)
    script.read(0, "x").ok(0, 99)
    result = check_linearizable(script.history(), max_steps=50)
    assert result.verdict is Verdict.UNKNOWN
    assert result.unknown[0].steps > 50
    with pytest.raises(ValueError, match="positive"):
        check_key("x", [], max_steps=0)


def test_transactions_on_register_keys_are_refused() -> None:
    history = Script().write(0, "x", 1).ok(0).txn(1, Step(OpKind.READ, "x")).ok(1).history()
    with pytest.raises(HistoryError, match="transactions and single-key"):
        check_linearizable(history)
    separate = Script().write(0, "x", 1).ok(0).txn(1, Step(OpKind.READ, "y")).ok(1).history()
    assert verdict(separate) is Verdict.OK


def random_register_history(seed: int, processes: int, operations: int) -> History:
    """Clients drive a real register; each operation takes effect at one instant between its
    invocation and completion, so the history is linearizable by construction."""
    rng = random.Random(seed)
    recorder = Recorder()
    register: dict[str, object] = {}
    pending: dict[int, tuple[OpKind, str, object, object, bool]] = {}  # kind key value exp done
    results: dict[int, object] = {}
    now_s = 0.0
    started = 0
    while started < operations or pending:
        now_s += rng.choice((0.0, 0.5))
        process = rng.randrange(processes)
        if process not in pending:
            if started >= operations:
                continue
            started += 1
            kind = rng.choice((OpKind.READ, OpKind.WRITE, OpKind.CAS))
            key = rng.choice(("a", "b"))
            value: object = rng.randrange(4)
            expected: object = rng.choice((ABSENT, *range(4)))
            recorder.invoke(process, kind, now_s, key=key, value=value, expected=expected)
            pending[process] = (kind, key, value, expected, False)
            continue
        kind, key, value, expected, done = pending[process]
        if not done and rng.random() < 0.7:  # the linearization point
            current = register.get(key, ABSENT)
            if kind is OpKind.READ:
                results[process] = current
            elif kind is OpKind.WRITE or current == expected:
                register[key] = value
                results[process] = True
            else:
                results[process] = False
            pending[process] = (kind, key, value, expected, True)
            continue
        del pending[process]
        if not done or rng.random() < 0.1:
            recorder.info(process, now_s)  # unknown, whether or not it happened
        elif kind is OpKind.READ:
            recorder.ok(process, now_s, value=results[process])
        elif results[process]:
            recorder.ok(process, now_s)
        else:
            recorder.fail(process, now_s)
    return recorder.history()


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), operations=st.integers(1, 60))
def test_sequential_register_histories_are_linearizable(seed: int, operations: int) -> None:
    history = random_register_history(seed, processes=1, operations=operations)
    result = check_linearizable(history)
    assert result.ok, result.describe()


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), processes=st.integers(2, 6))
def test_concurrent_register_histories_are_linearizable(seed: int, processes: int) -> None:
    history = random_register_history(seed, processes=processes, operations=80)
    result = check_linearizable(history)
    assert result.ok, result.describe()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_a_corrupted_read_is_caught(seed: int) -> None:
    # A read that returns a value nobody ever wrote can never be ordered.
    history = random_register_history(seed, processes=3, operations=40)
    events = list(history.events)
    events.append(
        events[-1].__class__(EventType.INVOKE, 99, OpKind.READ, events[-1].time_s, key="a")
    )
    events.append(
        events[-1].__class__(EventType.OK, 99, OpKind.READ, events[-1].time_s, key="a", value=7)
    )
    assert verdict(History.from_events(events)) is Verdict.VIOLATION


@pytest.mark.sim
@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), processes=st.integers(2, 12))
def test_heavy_concurrent_register_histories_are_linearizable(seed: int, processes: int) -> None:
    history = random_register_history(seed, processes=processes, operations=400)
    result = check_linearizable(history)
    assert result.ok, result.describe()
