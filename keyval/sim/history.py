"""Client operation histories, as Jepsen records them, and their JSON-lines form.

Every client operation is an `invoke` event followed by one completion from the same process:
`ok` (it took effect and the client saw the result), `fail` (it certainly did not take effect,
e.g. CONFLICT or a refused CAS) or `info` (the outcome is unknown: a timeout, a lost
connection). An invocation still open when the history ends counts as `info`.

Values are whatever the codec admits, plus the marker `ABSENT` for "no such key": a read of a
missing key returns `ABSENT` and a delete is a write of `ABSENT`. Times are monotonic seconds
passed in by the caller (trio's clock in simulation), never read here; they must not go
backwards, so the order of events is also their real-time order.

`Recorder` appends events and checks that they pair up; `History` is the frozen result with the
operations paired. `write_jsonl` / `read_jsonl` keep a history in a file, bytes base64-tagged,
so a failing history can be replayed through the checkers.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeAlias

from wire.codec import check_value
from wire.errors import LocalProtocolError

Key: TypeAlias = str | bytes | int

# One JSON line holds one event. Values are bounded by the frame size (1 MiB, wire.limits), and
# base64 adds a third: a line beyond 2 MiB cannot be one we wrote.
MAX_JSONL_LINE_CHARS = 2 * 1024 * 1024

# The transactions keyval's workloads run touch tens of keys; a thousand steps bounds the work
# one event can ask of a checker.
MAX_TXN_STEPS = 1000


class HistoryError(ValueError):
    """A malformed event or history: bad fields, a completion with no invocation, a bad file."""


class EventType(enum.StrEnum):
    INVOKE = "invoke"
    OK = "ok"
    FAIL = "fail"
    INFO = "info"


class OpKind(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    CAS = "cas"
    TXN = "txn"


class Absent(enum.Enum):
    """The value of a key that does not exist (a read of nothing; a delete writes it)."""

    ABSENT = "absent"

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = Absent.ABSENT


def _check_value(value: object, what: str) -> None:
    if value is ABSENT:
        return
    try:
        check_value(value)
    except LocalProtocolError as error:
        raise HistoryError(f"{what}: {error.message}") from None
    if not _all_finite(value):
        raise HistoryError(f"{what}: non-finite floats cannot be compared or stored in JSON")


def _all_finite(value: object) -> bool:
    """No NaN or infinity anywhere inside (check_value has bounded the depth)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_all_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_all_finite(k) and _all_finite(v) for k, v in value.items())
    return True


def _check_key(key: object, what: str) -> None:
    if type(key) not in (str, bytes, int):
        raise HistoryError(f"{what}: a key is str, bytes or int, not {type(key).__name__}")


def _check_version(version: object) -> None:
    if version is None:
        return
    if type(version) is not int or version < 0:
        raise HistoryError(f"version must be a non-negative int or None, not {version!r}")


@dataclass(frozen=True, slots=True)
class Step:
    """One read or write inside a transaction. In an invocation a read's value is ignored."""

    kind: OpKind
    key: Key
    value: object = None
    version: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in (OpKind.READ, OpKind.WRITE):
            raise HistoryError(f"a transaction step reads or writes, not {self.kind!r}")
        _check_key(self.key, "step key")
        _check_value(self.value, "step value")
        _check_version(self.version)


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a history.

    `value`: for a write or CAS the value written (on the invocation); for a read the value seen
    (on the ok). `expected`: a CAS's expected value. `version`: the key's version read or
    produced, when the client learned it. `steps`: a transaction's reads and writes.
    """

    type: EventType
    process: int
    kind: OpKind
    time_s: float
    key: Key | None = None
    value: object = None
    expected: object = None
    version: int | None = None
    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.type, EventType):
            raise HistoryError(f"event type must be an EventType, not {self.type!r}")
        if not isinstance(self.kind, OpKind):
            raise HistoryError(f"op kind must be an OpKind, not {self.kind!r}")
        if type(self.process) is not int or self.process < 0:
            raise HistoryError(f"process must be a non-negative int, not {self.process!r}")
        if type(self.time_s) not in (int, float) or not math.isfinite(self.time_s):
            raise HistoryError(f"time_s must be a finite number, not {self.time_s!r}")
        if self.kind is OpKind.TXN:
            if self.key is not None:
                raise HistoryError("a transaction names its keys in its steps, not in key")
            if self.type is EventType.INVOKE and not self.steps:
                raise HistoryError("a transaction invocation needs at least one step")
        else:
            _check_key(self.key, "event key")
            if self.steps:
                raise HistoryError(f"a {self.kind} has no transaction steps")
        if len(self.steps) > MAX_TXN_STEPS:
            raise HistoryError(f"a transaction has at most {MAX_TXN_STEPS} steps")
        if not all(isinstance(step, Step) for step in self.steps):
            raise HistoryError("steps must be Step objects")
        _check_value(self.value, "event value")
        _check_value(self.expected, "event expected value")
        _check_version(self.version)


@dataclass(frozen=True, slots=True)
class Operation:
    """An invocation paired with its completion.

    `outcome` is OK, FAIL or INFO. `invoke_index` / `complete_index` are event positions in the
    history (their real-time order); `complete_index` and `end_s` are None when the outcome is
    unknown. `value`, `expected` and `steps` merge both events: what was asked, and for an ok
    read what was seen.
    """

    process: int
    kind: OpKind
    outcome: EventType
    key: Key | None
    value: object
    expected: object
    version: int | None
    steps: tuple[Step, ...]
    start_s: float
    end_s: float | None
    invoke_index: int
    complete_index: int | None

    def keys(self) -> tuple[Key, ...]:
        """Every key the operation touches, in step order, without repeats."""
        if self.key is not None:
            return (self.key,)
        return tuple(dict.fromkeys(step.key for step in self.steps))

    def describe(self) -> str:
        """A short human form for reports: `p3 write 'x' 5 ok [1.0, 1.2]`."""
        body = [f"p{self.process}", str(self.kind)]
        if self.key is not None:
            body.append(repr(self.key))
        if self.kind is OpKind.CAS:
            body.append(f"{self.expected!r}->{self.value!r}")
        elif self.kind is not OpKind.TXN:
            body.append(repr(self.value))
        else:
            body.append(
                "[" + ", ".join(f"{s.kind} {s.key!r} {s.value!r}" for s in self.steps) + "]"
            )
        end = "?" if self.end_s is None else f"{self.end_s:g}"
        body.append(f"{self.outcome} [{self.start_s:g}, {end}]")
        return " ".join(body)


def _pair(
    invoke: Event, invoke_index: int, completion: Event | None, index: int | None
) -> Operation:
    outcome = EventType.INFO if completion is None else completion.type
    value = invoke.value
    steps = invoke.steps
    version = None
    if completion is not None and completion.type is EventType.OK:
        version = completion.version
        if invoke.kind is OpKind.READ:
            value = completion.value
        if invoke.kind is OpKind.TXN and completion.steps:
            steps = completion.steps
    return Operation(
        process=invoke.process,
        kind=invoke.kind,
        outcome=outcome,
        key=invoke.key,
        value=value,
        expected=invoke.expected,
        version=version,
        steps=steps,
        start_s=invoke.time_s,
        end_s=None if completion is None or outcome is EventType.INFO else completion.time_s,
        invoke_index=invoke_index,
        complete_index=None if outcome is EventType.INFO else index,
    )


@dataclass(frozen=True, slots=True)
class History:
    """A checked, frozen sequence of events and the operations they pair into."""

    events: tuple[Event, ...]
    operations: tuple[Operation, ...] = field(compare=False)

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> History:
        recorder = Recorder()
        for event in events:
            recorder.append(event)
        return recorder.history()

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)


class Recorder:
    """Appends events in real-time order and checks that every completion has an invocation.

    `invoke`, `ok`, `fail` and `info` build the events; completions copy the kind and key of
    the process's open invocation. Not thread-safe: one trio task or one lock.
    """

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._open: dict[int, int] = {}  # process -> index of its open invocation
        self._last_time_s = -math.inf

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: Event) -> Event:
        if not isinstance(event, Event):
            raise HistoryError(f"expected an Event, not {type(event).__name__}")
        if event.time_s < self._last_time_s:
            raise HistoryError(
                f"time went backwards: {event.time_s} after {self._last_time_s} "
                f"(event {len(self._events)})"
            )
        open_index = self._open.get(event.process)
        if event.type is EventType.INVOKE:
            if open_index is not None:
                raise HistoryError(
                    f"process {event.process} invoked again while event {open_index} is open"
                )
            self._open[event.process] = len(self._events)
        else:
            if open_index is None:
                raise HistoryError(f"process {event.process} completed with nothing open")
            invoke = self._events[open_index]
            if event.kind is not invoke.kind or event.key != invoke.key:
                raise HistoryError(
                    f"process {event.process}: completion {event.kind} {event.key!r} does not "
                    f"match invocation {invoke.kind} {invoke.key!r}"
                )
            del self._open[event.process]
        self._last_time_s = event.time_s
        self._events.append(event)
        return event

    def invoke(
        self,
        process: int,
        kind: OpKind,
        time_s: float,
        *,
        key: Key | None = None,
        value: object = None,
        expected: object = None,
        steps: Sequence[Step] = (),
    ) -> Event:
        return self.append(
            Event(
                EventType.INVOKE,
                process,
                kind,
                time_s,
                key=key,
                value=value,
                expected=expected,
                steps=tuple(steps),
            )
        )

    def ok(
        self,
        process: int,
        time_s: float,
        *,
        value: object = None,
        version: int | None = None,
        steps: Sequence[Step] = (),
    ) -> Event:
        """The operation took effect; `value` is what a read saw, `steps` a txn's results."""
        return self._complete(EventType.OK, process, time_s, value, version, tuple(steps))

    def fail(self, process: int, time_s: float) -> Event:
        """The operation certainly did not take effect."""
        return self._complete(EventType.FAIL, process, time_s, None, None, ())

    def info(self, process: int, time_s: float) -> Event:
        """The outcome is unknown: the operation may or may not have taken effect."""
        return self._complete(EventType.INFO, process, time_s, None, None, ())

    def _complete(
        self,
        type_: EventType,
        process: int,
        time_s: float,
        value: object,
        version: int | None,
        steps: tuple[Step, ...],
    ) -> Event:
        open_index = self._open.get(process)
        if open_index is None:
            raise HistoryError(f"process {process} completed with nothing open")
        invoke = self._events[open_index]
        event = Event(
            type_, process, invoke.kind, time_s, key=invoke.key, value=value, version=version,
            steps=steps,
        )  # fmt: skip
        return self.append(event)

    def history(self) -> History:
        """The events so far, paired; open invocations count as unknown (info)."""
        events = tuple(self._events)
        completions: dict[int, tuple[Event, int]] = {}
        open_by_process: dict[int, int] = {}
        for index, event in enumerate(events):
            if event.type is EventType.INVOKE:
                open_by_process[event.process] = index
            else:
                completions[open_by_process.pop(event.process)] = (event, index)
        operations = []
        for index, event in enumerate(events):
            if event.type is EventType.INVOKE:
                completion, completion_index = completions.get(index, (None, None))
                operations.append(_pair(event, index, completion, completion_index))
        return History(events, tuple(operations))


# ---- JSON lines -------------------------------------------------------------------------------
#
# Plain JSON holds str, int, float, bool, None and lists as they are. Everything else is a JSON
# object with exactly one tag, so a decoder never guesses: {"$bytes": base64}, {"$map": [[k, v],
# ...]} (CBOR maps may have int or bytes keys), {"$absent": true}.

_EVENT_FIELDS = frozenset(
    ("type", "process", "kind", "time_s", "key", "value", "expected", "version", "steps")
)
_STEP_FIELDS = frozenset(("kind", "key", "value", "version"))


def _to_json(value: object) -> Any:
    if value is ABSENT:
        return {"$absent": True}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {"$map": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    return value


def _from_json(data: Any) -> object:
    if isinstance(data, list):
        return [_from_json(item) for item in data]
    if not isinstance(data, dict):
        return data
    if len(data) != 1:
        raise HistoryError(f"a tagged value has exactly one tag, not {sorted(data)}")
    ((tag, body),) = data.items()
    if tag == "$absent" and body is True:
        return ABSENT
    if tag == "$bytes" and isinstance(body, str):
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise HistoryError("bad base64 in a $bytes value") from None
    if tag == "$map" and isinstance(body, list):
        result: dict[Any, object] = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise HistoryError("a $map holds [key, value] pairs")
            key = _from_json(pair[0])
            _check_key(key, "map key")
            result[key] = _from_json(pair[1])
        return result
    raise HistoryError(f"unknown value tag {tag!r}")


def _event_to_json(event: Event) -> dict[str, Any]:
    line: dict[str, Any] = {
        "type": str(event.type),
        "process": event.process,
        "kind": str(event.kind),
        "time_s": event.time_s,
    }
    if event.key is not None:
        line["key"] = _to_json(event.key)
    if event.value is not None:
        line["value"] = _to_json(event.value)
    if event.expected is not None:
        line["expected"] = _to_json(event.expected)
    if event.version is not None:
        line["version"] = event.version
    if event.steps:
        line["steps"] = [
            {
                "kind": str(step.kind),
                "key": _to_json(step.key),
                "value": _to_json(step.value),
                "version": step.version,
            }
            for step in event.steps
        ]
    return line


def _enum(kind: type[enum.StrEnum], text: object) -> Any:
    if not isinstance(text, str):
        raise HistoryError(f"{kind.__name__} must be a string, not {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise HistoryError(f"unknown {kind.__name__} {text!r}") from None


def _step_from_json(data: Any) -> Step:
    if not isinstance(data, dict) or not _STEP_FIELDS.issuperset(data):
        raise HistoryError(f"a step is an object with fields {sorted(_STEP_FIELDS)}")
    return Step(
        _enum(OpKind, data.get("kind")),
        _from_json(data.get("key")),  # type: ignore[arg-type]  # Step checks the type
        _from_json(data.get("value")),
        data.get("version"),
    )


def _event_from_json(data: Any) -> Event:
    if not isinstance(data, dict) or not _EVENT_FIELDS.issuperset(data):
        raise HistoryError(f"an event is an object with fields {sorted(_EVENT_FIELDS)}")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise HistoryError("steps must be a list")
    if len(steps) > MAX_TXN_STEPS:
        raise HistoryError(f"a transaction has at most {MAX_TXN_STEPS} steps")
    return Event(
        _enum(EventType, data.get("type")),
        data.get("process"),  # type: ignore[arg-type]  # Event checks every field's type
        _enum(OpKind, data.get("kind")),
        data.get("time_s"),  # type: ignore[arg-type]
        key=_from_json(data.get("key")),  # type: ignore[arg-type]
        value=_from_json(data.get("value")),
        expected=_from_json(data.get("expected")),
        version=data.get("version"),
        steps=tuple(_step_from_json(step) for step in steps),
    )


def write_jsonl(history: History | Iterable[Event], stream: IO[str]) -> int:
    """Write one JSON object per event; returns the number of events written."""
    count = 0
    for event in history:
        stream.write(json.dumps(_event_to_json(event), allow_nan=False, separators=(",", ":")))
        stream.write("\n")
        count += 1
    return count


def read_jsonl(stream: IO[str]) -> History:
    """Read what `write_jsonl` wrote; every line is checked. Raises `HistoryError`."""
    recorder = Recorder()
    for number, line in enumerate(_bounded_lines(stream), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line, parse_constant=_refuse_constant)
            recorder.append(_event_from_json(data))
        except HistoryError as error:
            raise HistoryError(f"line {number}: {error}") from None
        except (json.JSONDecodeError, RecursionError) as error:
            raise HistoryError(f"line {number}: not JSON: {error}") from None
    return recorder.history()


def _bounded_lines(stream: IO[str]) -> Iterator[str]:
    while True:
        line = stream.readline(MAX_JSONL_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_JSONL_LINE_CHARS:
            raise HistoryError(f"a line is longer than {MAX_JSONL_LINE_CHARS} characters")
        yield line


def _refuse_constant(name: str) -> object:
    raise HistoryError(f"{name} is not a JSON number")


def by_key(operations: Iterable[Operation]) -> Mapping[Key, list[Operation]]:
    """Single-key operations grouped by key, in invocation order."""
    groups: dict[Key, list[Operation]] = {}
    for operation in operations:
        if operation.key is not None:
            groups.setdefault(operation.key, []).append(operation)
    return groups
