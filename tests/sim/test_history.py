"""The history model: pairing, validation, and the JSON-lines round trip."""

from __future__ import annotations

import io
import json

import pytest

from keyval.sim.history import (
    ABSENT,
    MAX_JSONL_LINE_CHARS,
    Event,
    EventType,
    History,
    HistoryError,
    OpKind,
    Recorder,
    Step,
    read_jsonl,
    write_jsonl,
)
from tests.sim.builders import Script, outcome_counts


def test_operations_pair_invocations_with_completions() -> None:
    history = (
        Script()
        .write(0, "x", 1)
        .read(1, "x")
        .ok(0)
        .ok(1, 1)
        .cas(0, "x", 1, 2)
        .fail(0)
        .write(2, "x", 3)
        .history()
    )
    write, read, cas, pending = history.operations
    assert (write.kind, write.outcome, write.value, write.start_s, write.end_s) == (
        OpKind.WRITE,
        EventType.OK,
        1,
        1.0,
        3.0,
    )
    assert (read.outcome, read.value, read.invoke_index, read.complete_index) == (
        EventType.OK,
        1,
        1,
        3,
    )
    assert (cas.outcome, cas.expected, cas.value) == (EventType.FAIL, 1, 2)
    # An invocation still open at the end is an unknown outcome with no end.
    assert (pending.outcome, pending.end_s, pending.complete_index) == (EventType.INFO, None, None)
    assert outcome_counts(history) == {EventType.OK: 2, EventType.FAIL: 1, EventType.INFO: 1}


def test_transaction_steps_come_from_the_ok_completion() -> None:
    invoked = (Step(OpKind.READ, "a"), Step(OpKind.WRITE, "b", 5))
    seen = (Step(OpKind.READ, "a", 7, version=3), Step(OpKind.WRITE, "b", 5))
    history = Script().txn(4, *invoked).ok(4, steps=seen).history()
    (operation,) = history.operations
    assert operation.steps == seen
    assert operation.keys() == ("a", "b")
    assert "txn" in operation.describe()


def test_completion_without_invocation_is_refused() -> None:
    recorder = Recorder()
    with pytest.raises(HistoryError, match="nothing open"):
        recorder.ok(3, 1.0)
    with pytest.raises(HistoryError, match="nothing open"):
        recorder.append(Event(EventType.OK, 3, OpKind.READ, 1.0, key="x"))


def test_second_invocation_while_open_is_refused() -> None:
    recorder = Recorder()
    recorder.invoke(0, OpKind.READ, 1.0, key="x")
    with pytest.raises(HistoryError, match="invoked again"):
        recorder.invoke(0, OpKind.READ, 2.0, key="x")


def test_completion_must_match_its_invocation() -> None:
    recorder = Recorder()
    recorder.invoke(0, OpKind.READ, 1.0, key="x")
    with pytest.raises(HistoryError, match="does not match"):
        recorder.append(Event(EventType.OK, 0, OpKind.WRITE, 2.0, key="x"))
    with pytest.raises(HistoryError, match="does not match"):
        recorder.append(Event(EventType.OK, 0, OpKind.READ, 2.0, key="y"))


def test_time_must_not_go_backwards() -> None:
    recorder = Recorder()
    recorder.invoke(0, OpKind.READ, 5.0, key="x")
    with pytest.raises(HistoryError, match="backwards"):
        recorder.invoke(1, OpKind.READ, 4.0, key="x")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"process": -1}, "process"),
        ({"process": True}, "process"),
        ({"time_s": float("nan")}, "time_s"),
        ({"time_s": "1"}, "time_s"),
        ({"key": 1.5}, "key"),
        ({"key": None}, "key"),
        ({"value": {1.5: 1}}, "map key"),
        ({"value": object()}, "not allowed"),
        ({"value": float("inf")}, "non-finite"),
        ({"value": [1, {"x": float("nan")}]}, "non-finite"),
        ({"value": [ABSENT]}, "Absent"),
        ({"version": -2}, "version"),
        ({"steps": (Step(OpKind.READ, "x"),)}, "no transaction steps"),
    ],
)
def test_bad_event_fields_are_refused(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "type": EventType.INVOKE,
        "process": 0,
        "kind": OpKind.WRITE,
        "time_s": 1.0,
        "key": "x",
    }
    base.update(fields)
    with pytest.raises(HistoryError, match=message):
        Event(**base)  # type: ignore[arg-type]


def test_bad_transactions_are_refused() -> None:
    with pytest.raises(HistoryError, match="at least one step"):
        Event(EventType.INVOKE, 0, OpKind.TXN, 1.0)
    with pytest.raises(HistoryError, match="in its steps"):
        Event(EventType.INVOKE, 0, OpKind.TXN, 1.0, key="x", steps=(Step(OpKind.READ, "x"),))
    with pytest.raises(HistoryError, match="reads or writes"):
        Step(OpKind.CAS, "x")
    with pytest.raises(HistoryError, match="Step objects"):
        Event(EventType.INVOKE, 0, OpKind.TXN, 1.0, steps=("read x",))  # type: ignore[arg-type]


def test_round_trip_through_json_lines_keeps_every_field() -> None:
    values = [
        b"\x00\xffbytes",
        {"nested": [1, 2.5, None, True], 7: b"k", b"b": {"deep": -0.5}},
        "text",
        -3,
        None,
        [b"", []],
    ]
    script = Script()
    for process, value in enumerate(values):
        script.write(process, b"key\x00", value).ok(process)
    script.read(9, 42).ok(9, ABSENT)
    script.cas(9, "c", {"a": b"1"}, ABSENT).info(9)
    steps = (Step(OpKind.READ, b"\x01", b"v", version=4), Step(OpKind.WRITE, 3, ABSENT))
    script.txn(10, *steps).ok(10, steps=steps)
    script.read(11, "open")
    history = script.history()

    buffer = io.StringIO()
    assert write_jsonl(history, buffer) == len(history)
    assert '"$bytes"' in buffer.getvalue()
    replayed = read_jsonl(io.StringIO(buffer.getvalue()))
    assert replayed.events == history.events
    assert replayed.operations == history.operations


def test_each_event_is_one_json_object_per_line() -> None:
    buffer = io.StringIO()
    write_jsonl(Script().write(0, "x", b"\x01").ok(0).history(), buffer)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["value"] == {"$bytes": "AQ=="}


def _event_line(**fields: object) -> str:
    line: dict[str, object] = {"type": "invoke", "process": 0, "kind": "read", "time_s": 1.0}
    line["key"] = "x"
    line.update(fields)
    return json.dumps(line) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json\n", "not JSON"),
        ("[1, 2]\n", "an event is an object"),
        (_event_line(color="red"), "an event is an object"),
        (_event_line(type="maybe"), "unknown EventType"),
        (_event_line(kind=3), "must be a string"),
        (_event_line(value={"$bytes": "!!"}), "bad base64"),
        (_event_line(value={"$set": [1]}), "unknown value tag"),
        (_event_line(value={"a": 1, "b": 2}), "exactly one tag"),
        (_event_line(value={"$map": [[1]]}), "pairs"),
        (_event_line(value={"$map": [[1.5, 1]]}), "map key"),
        (_event_line(time_s="NaN"), "time_s"),
        ('{"type": "invoke", "process": 0, "kind": "read", "time_s": NaN, "key": "x"}\n', "NaN"),
        (_event_line(kind="txn", key=None, steps=[{"kind": "read"}]), "step"),
        (_event_line(kind="txn", key=None, steps={"a": 1}), "steps must be a list"),
        (_event_line() + _event_line(time_s=2.0), "line 2: process 0 invoked again"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "not JSON|an event"),
    ],
)
def test_malformed_files_are_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(HistoryError, match=message):
        read_jsonl(io.StringIO(text))


def test_over_long_line_is_refused() -> None:
    text = _event_line(value="v" * MAX_JSONL_LINE_CHARS)
    with pytest.raises(HistoryError, match="longer than"):
        read_jsonl(io.StringIO(text))


def test_blank_lines_are_skipped_and_from_events_validates() -> None:
    buffer = io.StringIO()
    write_jsonl(Script().read(0, "x").ok(0, 1).history(), buffer)
    replayed = read_jsonl(io.StringIO("\n" + buffer.getvalue() + "\n\n"))
    assert len(replayed) == 2
    assert History.from_events(replayed.events) == replayed
    with pytest.raises(HistoryError, match="expected an Event"):
        History.from_events(["invoke"])  # type: ignore[list-item]
