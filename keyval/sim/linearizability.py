"""Linearizability of single-key register histories (read, write, cas), checked per key.

The search is Wing & Gong's, with Lowe's memoisation ("Testing for linearizability", 2017):
events sit in a linked list in real-time order; the search linearizes any operation whose call
is reachable before the first pending return, and backtracks when it reaches the return of an
operation it has not linearized. A cache of (linearized set as a bitmask, register state)
prunes configurations already explored, which is what makes the search practical.

Outcomes: `fail` operations did not happen and are dropped; an `info` write or cas may or may
not have happened, any time after its invocation, so it has a call and no return: the search
may linearize it or leave it out. An `info` read constrains nothing and is dropped.

Linearizability is local (Herlihy & Wing), so checking each key alone is exact. The search is
bounded by `max_steps` and answers UNKNOWN rather than running on. A violation comes with an
explanation: the smallest set of operations found that still cannot be ordered, shrunk by
relaxing one operation at a time (an ok read dropped, an ok write treated as unknown) for as
long as the rest stays unorderable.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from keyval.sim.history import (
    ABSENT,
    EventType,
    History,
    HistoryError,
    Key,
    Operation,
    OpKind,
    by_key,
)

# Search effort per key, in loop steps (each a few microseconds of Python). A million steps is
# seconds, enough for the hundreds of concurrent operations per key a simulation run produces;
# a history that needs more is reported UNKNOWN, never checked forever.
MAX_SEARCH_STEPS = 1_000_000

# Shrinking a violation re-runs the search once per operation; past this many operations on the
# key it would cost too much, and the explanation is the unshrunk prefix instead.
MAX_EXPLAIN_OPERATIONS = 200

# Each shrinking search gets a budget relative to the search that found the violation: treating
# many writes as unknown can blow the state space up (2**k subsets of unknown writes), and a
# trial that runs out of budget just keeps its operations.
SHRINK_STEPS_FACTOR = 4
SHRINK_STEPS_MIN = 10_000


class Verdict(enum.StrEnum):
    OK = "ok"
    VIOLATION = "violation"
    UNKNOWN = "unknown"  # the search hit its step bound


@dataclass(frozen=True, slots=True)
class KeyResult:
    """The verdict for one key. For a violation, `explanation` holds the operations that could
    not be ordered (as the checker last treated them: a relaxed write shows outcome info), and
    `minimal` says whether shrinking finished."""

    key: Key
    verdict: Verdict
    operations: int
    steps: int
    explanation: tuple[Operation, ...] = ()
    minimal: bool = False

    def describe(self) -> str:
        head = f"key {self.key!r}: {self.verdict} ({self.operations} ops, {self.steps} steps)"
        if self.verdict is not Verdict.VIOLATION:
            return head
        shrunk = "minimal" if self.minimal else "not shrunk"
        lines = [f"{head}; these cannot be ordered ({shrunk}):"]
        lines.extend("  " + operation.describe() for operation in self.explanation)
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class LinearizabilityResult:
    verdict: Verdict
    keys: tuple[KeyResult, ...]

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    @property
    def violations(self) -> tuple[KeyResult, ...]:
        return tuple(result for result in self.keys if result.verdict is Verdict.VIOLATION)

    @property
    def unknown(self) -> tuple[KeyResult, ...]:
        return tuple(result for result in self.keys if result.verdict is Verdict.UNKNOWN)

    def describe(self) -> str:
        lines = [f"linearizability: {self.verdict} over {len(self.keys)} keys"]
        lines.extend(result.describe() for result in self.violations + self.unknown)
        return "\n".join(lines)


def freeze(value: object) -> Hashable:
    """A hashable form of a value that is equal only for equal values of the same type
    (so True, 1 and 1.0 differ, as they do on the wire)."""
    if value is ABSENT:
        return value
    if value is None:
        return ("none",)  # never None itself: the search uses None for "cannot happen"
    if isinstance(value, list | tuple):
        return ("list", tuple(freeze(item) for item in value))
    if isinstance(value, dict):
        return ("map", frozenset((freeze(k), freeze(v)) for k, v in value.items()))
    return (type(value).__name__, value)


@dataclass(frozen=True, slots=True)
class _Op:
    kind: OpKind
    value: Hashable
    expected: Hashable
    call: int  # event position of the invocation
    ret: int | None  # event position of the completion; None: may take effect at any later time
    source: Operation


def _apply(op: _Op, state: Hashable) -> Hashable | None:
    """The register's state after `op`, or None when `op` cannot happen in `state`."""
    if op.kind is OpKind.READ:
        return state if op.value == state else None
    if op.kind is OpKind.WRITE:
        return op.value
    return op.value if op.expected == state else None  # CAS


@dataclass(frozen=True, slots=True)
class _Search:
    verdict: Verdict
    steps: int
    deepest_return: int  # event position of the furthest return the search could not pass


def _search(ops: Sequence[_Op], initial: Hashable, max_steps: int) -> _Search:
    """Wing-Gong search with Lowe's cache over `ops` (any order)."""
    # Entries 1..n in event order, 0 is the head sentinel, -1 the end.
    entries: list[tuple[int, int, bool]] = []  # (position, op index, is call)
    for index, op in enumerate(ops):
        entries.append((op.call, index, True))
        if op.ret is not None:
            entries.append((op.ret, index, False))
    entries.sort()
    count = len(entries)
    op_of = [0] + [entry[1] for entry in entries]
    is_call = [False] + [entry[2] for entry in entries]
    position = [0] + [entry[0] for entry in entries]
    return_of = [-1] * (count + 1)
    call_entry = [0] * len(ops)
    for entry in range(1, count + 1):
        if is_call[entry]:
            call_entry[op_of[entry]] = entry
        else:
            return_of[call_entry[op_of[entry]]] = entry
    following = [*list(range(1, count + 1)), -1]
    preceding = list(range(-1, count))

    def unlink(entry: int) -> None:
        following[preceding[entry]] = following[entry]
        if following[entry] != -1:
            preceding[following[entry]] = preceding[entry]

    def relink(entry: int) -> None:
        following[preceding[entry]] = entry
        if following[entry] != -1:
            preceding[following[entry]] = entry

    remaining = sum(1 for op in ops if op.ret is not None)
    state = initial
    linearized = 0
    seen: set[tuple[int, Hashable]] = {(0, initial)}
    stack: list[tuple[int, Hashable]] = []
    entry = following[0]
    steps = 0
    deepest = -1
    while remaining:
        steps += 1
        if steps > max_steps:
            return _Search(Verdict.UNKNOWN, steps, deepest)
        if entry != -1 and is_call[entry]:
            index = op_of[entry]
            after = _apply(ops[index], state)
            if after is not None:
                mask = linearized | (1 << index)
                if (mask, after) not in seen:
                    seen.add((mask, after))
                    stack.append((entry, state))
                    state, linearized = after, mask
                    unlink(entry)
                    if return_of[entry] != -1:
                        unlink(return_of[entry])
                        remaining -= 1
                    entry = following[0]
                    continue
            entry = following[entry]
            continue
        # A return of an operation not yet linearized (or the end): undo the last choice.
        if entry != -1:
            deepest = max(deepest, position[entry])
        if not stack:
            return _Search(Verdict.VIOLATION, steps, deepest)
        entry, state = stack.pop()
        linearized &= ~(1 << op_of[entry])
        if return_of[entry] != -1:
            relink(return_of[entry])
            remaining += 1
        relink(entry)
        entry = following[entry]
    return _Search(Verdict.OK, steps, deepest)


def _to_op(operation: Operation) -> _Op | None:
    """The search's view of an operation, or None when it constrains nothing."""
    if operation.outcome is EventType.FAIL:
        return None
    if operation.outcome is EventType.INFO and operation.kind is OpKind.READ:
        return None
    if operation.kind is OpKind.TXN:
        raise HistoryError("transactions are not register operations")
    return _Op(
        kind=operation.kind,
        value=freeze(operation.value),
        expected=freeze(operation.expected),
        call=operation.invoke_index,
        ret=operation.complete_index if operation.outcome is EventType.OK else None,
        source=operation,
    )


def _as_unknown(op: _Op) -> _Op:
    source = dataclasses.replace(op.source, outcome=EventType.INFO, end_s=None, complete_index=None)
    return dataclasses.replace(op, ret=None, source=source)


class _Trials:
    """Re-runs the search on smaller candidate histories while a violation is shrunk."""

    def __init__(self, initial: Hashable, max_steps: int) -> None:
        self.initial = initial
        self.max_steps = max_steps
        self.exhausted = False  # some trial ran out of budget: the result may not be minimal

    def fails(self, ops: Sequence[_Op]) -> bool:
        verdict = _search(ops, self.initial, self.max_steps).verdict
        if verdict is Verdict.UNKNOWN:
            self.exhausted = True
        return verdict is Verdict.VIOLATION

    def relax_in_chunks(
        self,
        ops: list[_Op],
        candidates: list[_Op],
        relax: Callable[[list[_Op], set[int]], list[_Op]],
    ) -> list[_Op]:
        """Apply `relax` to ever smaller groups of `candidates` (halving, like ddmin, so a
        large irrelevant part goes in one search), keeping each relaxation that still fails."""
        pending = list(candidates)
        chunk = len(pending)
        while chunk >= 1 and pending:
            kept: list[_Op] = []
            for start in range(0, len(pending), chunk):
                group = pending[start : start + chunk]
                trial = relax(ops, {id(op) for op in group})
                if self.fails(trial):
                    ops = trial
                else:
                    kept.extend(group)
            pending = kept
            chunk //= 2
        return ops


def _drop(ops: list[_Op], group: set[int]) -> list[_Op]:
    return [op for op in ops if id(op) not in group]


def _make_unknown(ops: list[_Op], group: set[int]) -> list[_Op]:
    return [_as_unknown(op) if id(op) in group else op for op in ops]


def _shrink(ops: list[_Op], trials: _Trials, deepest_return: int) -> tuple[list[_Op], bool]:
    """A smaller set of operations that is still a violation, and whether it is 1-minimal:
    relaxing any single one of them further makes it linearizable."""
    # Everything after the furthest return the search failed at can be cut: operations still
    # running then become unknown. Kept only if the search agrees it still fails.
    prefix = [op for op in ops if op.call <= deepest_return]
    prefix = [
        op if op.ret is None or op.ret <= deepest_return else _as_unknown(op) for op in prefix
    ]
    if prefix and trials.fails(prefix):
        ops = prefix
    if len(ops) > MAX_EXPLAIN_OPERATIONS:
        return ops, False
    # Each relaxation only removes constraints, so one pass down to single operations gives a
    # 1-minimal set. Reads go first: dropping them leaves the writes that tell the story.
    ops = trials.relax_in_chunks(ops, [op for op in ops if op.kind is OpKind.READ], _drop)
    writes = [op for op in ops if op.kind is not OpKind.READ and op.ret is not None]
    ops = trials.relax_in_chunks(ops, writes, _make_unknown)
    # Unknown writes whose value no ok operation observes only clutter the report.
    observed = {op.value for op in ops if op.kind is OpKind.READ}
    observed |= {op.expected for op in ops if op.kind is OpKind.CAS and op.ret is not None}
    clutter = [op for op in ops if op.ret is None and op.value not in observed]
    ops = trials.relax_in_chunks(ops, clutter, _drop)
    return ops, not trials.exhausted


def check_key(
    key: Key,
    operations: Iterable[Operation],
    *,
    initial: object = ABSENT,
    max_steps: int = MAX_SEARCH_STEPS,
) -> KeyResult:
    """Linearizability of one key's register operations, starting from `initial`."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be positive, not {max_steps}")
    ops = [op for op in map(_to_op, operations) if op is not None]
    start = freeze(initial)
    found = _search(ops, start, max_steps)
    if found.verdict is not Verdict.VIOLATION:
        return KeyResult(key, found.verdict, len(ops), found.steps)
    shrink_steps = min(max_steps, max(SHRINK_STEPS_MIN, SHRINK_STEPS_FACTOR * found.steps))
    shrunk, minimal = _shrink(ops, _Trials(start, shrink_steps), found.deepest_return)
    explanation = tuple(sorted((op.source for op in shrunk), key=lambda o: o.invoke_index))
    return KeyResult(key, Verdict.VIOLATION, len(ops), found.steps, explanation, minimal)


def check_linearizable(
    history: History,
    *,
    initial: Mapping[Key, object] | None = None,
    max_steps: int = MAX_SEARCH_STEPS,
) -> LinearizabilityResult:
    """Check every key's single-key operations; keys start ABSENT unless `initial` says.

    Raises `HistoryError` when a transaction touches a key that single-key operations use: the
    register model cannot account for its effects (check those with `keyval.sim.checks`).
    """
    initial = initial or {}
    groups = by_key(op for op in history.operations if op.kind is not OpKind.TXN)
    for operation in history.operations:
        if operation.kind is OpKind.TXN:
            for key in operation.keys():
                if key in groups:
                    raise HistoryError(
                        f"key {key!r} is used by transactions and single-key operations"
                    )
    results = tuple(
        check_key(key, ops, initial=initial.get(key, ABSENT), max_steps=max_steps)
        for key, ops in groups.items()
    )
    if any(result.verdict is Verdict.VIOLATION for result in results):
        verdict = Verdict.VIOLATION
    elif any(result.verdict is Verdict.UNKNOWN for result in results):
        verdict = Verdict.UNKNOWN
    else:
        verdict = Verdict.OK
    return LinearizabilityResult(verdict, results)
