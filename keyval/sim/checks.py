"""Invariants of transactional workloads, checked over a client history.

- `check_bank`: transfers between accounts keep the total; every transaction that read all
  accounts (a snapshot) must see the same total.
- `check_cycle`: FoundationDB's cycle test. Each node's value names the next node; transactions
  rotate three links at a time, which keeps a single ring. Every snapshot of all nodes must show
  the ring intact: from the first node, each node reached exactly once, then back to the start.
- `check_no_lost_writes`: the final read of each key must show the effect of an acknowledged
  write unless a later acknowledged write superseded it.
- `check_no_aborted_reads`: no read sees a value that only failed (aborted) writes wrote.

"Acknowledged" means an `ok` completion. keyval promises durability only for writes
acknowledged in the durable mode, so a workload that uses the `memory` ack mode must record
those completions as `info` (durable outcome unknown), not `ok`.

The write checks identify a write by its value, so workloads must write values unique per key
(a counter or the operation id); where two writes share a value the checks give the benefit of
the doubt.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from keyval.sim.history import ABSENT, EventType, History, Key, Operation, OpKind
from keyval.sim.linearizability import freeze


@dataclass(frozen=True, slots=True)
class Anomaly:
    operation: Operation
    message: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    """`checked` counts what the check examined (snapshots, reads or acknowledged writes)."""

    name: str
    checked: int
    anomalies: tuple[Anomaly, ...]

    @property
    def ok(self) -> bool:
        return not self.anomalies

    def describe(self) -> str:
        verdict = "ok" if self.ok else f"{len(self.anomalies)} anomalies"
        lines = [f"{self.name}: {verdict} ({self.checked} checked)"]
        lines.extend(f"  {a.message}: {a.operation.describe()}" for a in self.anomalies)
        return "\n".join(lines)


def _check_key_set(keys: Sequence[Key], what: str) -> frozenset[Key]:
    unique = frozenset(keys)
    if not keys or len(unique) != len(keys):
        raise ValueError(f"{what} must be a non-empty list of distinct keys")
    return unique


def _snapshots(
    history: History, keys: frozenset[Key]
) -> Iterator[tuple[Operation, dict[Key, object]]]:
    """Ok transactions that read every key in `keys`, with what each read saw (first read)."""
    for operation in history.operations:
        if operation.kind is not OpKind.TXN or operation.outcome is not EventType.OK:
            continue
        seen: dict[Key, object] = {}
        for step in operation.steps:
            if step.kind is OpKind.READ and step.key in keys:
                seen.setdefault(step.key, step.value)
        if len(seen) == len(keys):
            yield operation, seen


def check_bank(history: History, accounts: Sequence[Key], total: int) -> CheckResult:
    """Every snapshot of all `accounts` sums to `total` (a missing account holds 0)."""
    account_set = _check_key_set(accounts, "accounts")
    anomalies: list[Anomaly] = []
    checked = 0
    for operation, balances in _snapshots(history, account_set):
        checked += 1
        amounts = {key: 0 if value is ABSENT else value for key, value in balances.items()}
        odd = [key for key, amount in amounts.items() if type(amount) is not int]
        if odd:
            message = f"balance of {odd[0]!r} is not an integer: {amounts[odd[0]]!r}"
            anomalies.append(Anomaly(operation, message))
            continue
        seen_total = sum(amounts.values())  # type: ignore[arg-type]  # all ints, checked above
        if seen_total != total:
            message = f"balances sum to {seen_total}, not {total}"
            anomalies.append(Anomaly(operation, message))
    return CheckResult("bank", checked, tuple(anomalies))


def check_cycle(history: History, nodes: Sequence[Key]) -> CheckResult:
    """Every snapshot of all `nodes` shows one ring through all of them."""
    node_set = _check_key_set(nodes, "nodes")
    anomalies: list[Anomaly] = []
    checked = 0
    for operation, links in _snapshots(history, node_set):
        checked += 1
        problem = _ring_problem(nodes[0], links, len(nodes))
        if problem is not None:
            anomalies.append(Anomaly(operation, problem))
    return CheckResult("cycle", checked, tuple(anomalies))


def _ring_problem(start: Key, links: Mapping[Key, object], size: int) -> str | None:
    current: Key = start
    visited = {start}
    for _ in range(size):
        following = links[current]
        if type(following) not in (str, bytes, int) or following not in links:
            return f"node {current!r} points outside the ring: {following!r}"
        current = following  # type: ignore[assignment]  # a key, checked above
        if current == start:
            break
        if current in visited:
            return f"node {current!r} is reached twice"
        visited.add(current)
    if current != start or len(visited) != size:
        return f"the ring through {start!r} has {len(visited)} of {size} nodes"
    return None


@dataclass(frozen=True, slots=True)
class _Write:
    key: Key
    value: Hashable  # frozen
    operation: Operation


def _writes(history: History) -> Iterator[_Write]:
    """Every write each operation asked for (a CAS writes its new value)."""
    for operation in history.operations:
        if operation.kind in (OpKind.WRITE, OpKind.CAS) and operation.key is not None:
            yield _Write(operation.key, freeze(operation.value), operation)
        elif operation.kind is OpKind.TXN:
            for step in operation.steps:
                if step.kind is OpKind.WRITE:
                    yield _Write(step.key, freeze(step.value), operation)


def _precedes(first: Operation, second: Operation) -> bool:
    """`first` completed before `second` was invoked (real-time order)."""
    return first.complete_index is not None and first.complete_index < second.invoke_index


def check_no_lost_writes(history: History, final: Mapping[Key, object]) -> CheckResult:
    """`final` is a read of every key taken after the history; it must hold a value that some
    write (acknowledged or unknown) wrote and that no acknowledged write is known to follow."""
    by_key: dict[Key, list[_Write]] = {}
    for write in _writes(history):
        if write.operation.outcome is not EventType.FAIL:
            by_key.setdefault(write.key, []).append(write)
    anomalies: list[Anomaly] = []
    checked = 0
    for key, writes in by_key.items():
        acknowledged = [w for w in writes if w.operation.outcome is EventType.OK]
        if not acknowledged:
            continue
        if key not in final:
            raise ValueError(f"the final read lacks key {key!r}, which has acknowledged writes")
        checked += len(acknowledged)
        value = freeze(final[key])
        if any(
            write.value == value
            and not any(
                other is not write and _precedes(write.operation, other.operation)
                for other in acknowledged
            )
            for write in writes
        ):
            continue
        latest = [
            w
            for w in acknowledged
            if not any(_precedes(w.operation, other.operation) for other in acknowledged)
        ]
        for write in latest:
            message = f"acknowledged write to {key!r} lost: final value is {final[key]!r}"
            anomalies.append(Anomaly(write.operation, message))
    return CheckResult("no lost writes", checked, tuple(anomalies))


def check_no_aborted_reads(history: History) -> CheckResult:
    """No ok read (single-key, in a transaction, or a CAS's expected value) sees a value that
    only failed writes wrote."""
    failed: dict[Key, set[Hashable]] = {}
    possible: dict[Key, set[Hashable]] = {}
    for write in _writes(history):
        target = failed if write.operation.outcome is EventType.FAIL else possible
        target.setdefault(write.key, set()).add(write.value)
    anomalies: list[Anomaly] = []
    checked = 0
    for operation, key, value in _reads(history):
        checked += 1
        frozen = freeze(value)
        if frozen in failed.get(key, ()) and frozen not in possible.get(key, ()):
            message = f"read of {key!r} saw {value!r}, written only by aborted writes"
            anomalies.append(Anomaly(operation, message))
    return CheckResult("no aborted reads", checked, tuple(anomalies))


def _reads(history: History) -> Iterator[tuple[Operation, Key, object]]:
    for operation in history.operations:
        if operation.outcome is not EventType.OK:
            continue
        if operation.kind is OpKind.READ and operation.key is not None:
            yield operation, operation.key, operation.value
        elif operation.kind is OpKind.CAS and operation.key is not None:
            yield operation, operation.key, operation.expected
        elif operation.kind is OpKind.TXN:
            for step in operation.steps:
                if step.kind is OpKind.READ:
                    yield operation, step.key, step.value
