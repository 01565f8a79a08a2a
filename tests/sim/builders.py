"""Compact history builders for the checker tests."""

from __future__ import annotations

from keyval.sim.history import EventType, History, Key, OpKind, Recorder, Step


class Script:
    """Builds a history in real-time order; each call appends one event at the next tick
    unless a time is given."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.now_s = 0.0

    def _tick(self) -> float:
        self.now_s += 1.0
        return self.now_s

    def write(self, process: int, key: Key, value: object) -> Script:
        self.recorder.invoke(process, OpKind.WRITE, self._tick(), key=key, value=value)
        return self

    def read(self, process: int, key: Key) -> Script:
        self.recorder.invoke(process, OpKind.READ, self._tick(), key=key)
        return self

    def cas(self, process: int, key: Key, expected: object, value: object) -> Script:
        self.recorder.invoke(
            process, OpKind.CAS, self._tick(), key=key, value=value, expected=expected
        )
        return self

    def txn(self, process: int, *steps: Step) -> Script:
        self.recorder.invoke(process, OpKind.TXN, self._tick(), steps=steps)
        return self

    def ok(self, process: int, value: object = None, *, steps: tuple[Step, ...] = ()) -> Script:
        self.recorder.ok(process, self._tick(), value=value, steps=steps)
        return self

    def fail(self, process: int) -> Script:
        self.recorder.fail(process, self._tick())
        return self

    def info(self, process: int) -> Script:
        self.recorder.info(process, self._tick())
        return self

    def history(self) -> History:
        return self.recorder.history()


def outcome_counts(history: History) -> dict[EventType, int]:
    counts: dict[EventType, int] = {}
    for operation in history.operations:
        counts[operation.outcome] = counts.get(operation.outcome, 0) + 1
    return counts
