"""Client workloads for simulation and fault runs, recorded into a history, with their checks.

Each workload, like a FoundationDB test spec, has `setup` (before faults), `client` (one
process's loop, run by many tasks during the fault and quiet phases) and `check` (over the
recorded history and a final read). Keys are prefixed per run, so runs can share a cluster.

- register: random get / put / cas on a few keys; checked for per-key linearizability,
  acknowledged writes kept, no read of an aborted write.
- bank: transfers between accounts of one `{tag}` (one slot, one drone) and snapshots of all
  accounts; every snapshot sums to the initial total.
- cycle: FoundationDB's cycle: each node names the next; transactions rotate three links;
  every snapshot shows one intact ring.

Outcomes: `ok` when keyval answered success, `fail` when it certainly did not apply the
operation (CONFLICT, a refused CAS, a transaction refused before commit), `info` otherwise
(timeouts, lost connections, cancellation at the end of a phase): the write may have happened.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from keyval.client.aio import AsyncClient
from keyval.sim.checks import (
    CheckResult,
    check_bank,
    check_cycle,
    check_no_aborted_reads,
    check_no_lost_writes,
)
from keyval.sim.history import ABSENT, Key, OpKind, Recorder, Step
from keyval.sim.linearizability import Verdict, check_linearizable
from wire.errors import Conflict, WireError

# A few keys make operations collide often, which is what finds linearizability bugs; the
# checker's search grows fast with concurrent operations per key, so keep it small.
REGISTER_KEYS = 3

BANK_ACCOUNTS = 5
BANK_INITIAL_BALANCE = 100

CYCLE_NODES = 6

# Attempts to set up a workload's initial keys (a fault phase has not started, but the cluster
# may still be settling).
SETUP_ATTEMPTS = 50
SETUP_RETRY_S = 0.2

# A final read retries this long for the cluster to answer after the quiet phase.
FINAL_READ_ATTEMPTS = 50

# The history process that takes the final snapshot, above any client process number.
FINAL_PROCESS = 1_000_000


async def recorded_put(
    recorder: Recorder, client: AsyncClient, process: int, key: Key, value: Any
) -> bool:
    """Put `key` = `value` with invoke/ok/info recorded; False when the outcome is unknown."""
    recorder.invoke(process, OpKind.WRITE, trio.current_time(), key=key, value=value)
    try:
        await client.put(key, value)
    except WireError:
        recorder.info(process, trio.current_time())
        return False
    except BaseException:
        recorder.info(process, trio.current_time())
        raise
    recorder.ok(process, trio.current_time())
    return True


class WorkloadError(RuntimeError):
    """A workload could not set up or read its final state (the cluster did not answer)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's result, as the runner reports it."""

    name: str
    ok: bool
    checked: int
    detail: str


class Workload(Protocol):
    name: str

    async def setup(self, client: AsyncClient) -> None: ...

    async def step(self, client: AsyncClient, process: int, rng: random.Random) -> bool:
        """One operation, recorded; True if it completed ok."""
        ...

    async def check(self, client: AsyncClient) -> list[Finding]: ...


def _result(result: CheckResult) -> Finding:
    return Finding(result.name, result.ok, result.checked, "" if result.ok else result.describe())


async def _retry(client: AsyncClient, what: str, attempts: int, action: Any) -> Any:
    """Run `await action()` until it succeeds (for set-up and final reads only)."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return await action()
        except WireError as error:
            last = error
            await trio.sleep(SETUP_RETRY_S)
    raise WorkloadError(f"{what} failed {attempts} times: {last}")


class Register:
    """Single-key reads, writes and CAS on a few keys."""

    name = "register"

    def __init__(self, recorder: Recorder, prefix: str) -> None:
        self.recorder = recorder
        self.keys = [f"{prefix}-reg-{index}" for index in range(REGISTER_KEYS)]
        self._values = itertools.count(1)
        self._seen: dict[tuple[int, Key], tuple[object, int]] = {}  # process, key -> last read

    async def setup(self, client: AsyncClient) -> None:
        pass  # keys start absent

    async def step(self, client: AsyncClient, process: int, rng: random.Random) -> bool:
        key = rng.choice(self.keys)
        choice = rng.random()
        if choice < 0.4:
            return await self._read(client, process, key)
        if choice < 0.7 or (process, key) not in self._seen:
            return await self._write(client, process, key)
        return await self._cas(client, process, key)

    async def _read(self, client: AsyncClient, process: int, key: Key) -> bool:
        self.recorder.invoke(process, OpKind.READ, trio.current_time(), key=key)
        try:
            entry = await client.get_entry(key)
        except WireError:
            self.recorder.info(process, trio.current_time())
            return False
        except BaseException:
            self.recorder.info(process, trio.current_time())
            raise
        value = entry.value if entry.version else ABSENT
        self._seen[(process, key)] = (value, entry.version)
        self.recorder.ok(process, trio.current_time(), value=value)
        return True

    async def _write(self, client: AsyncClient, process: int, key: Key) -> bool:
        return await recorded_put(self.recorder, client, process, key, next(self._values))

    async def _cas(self, client: AsyncClient, process: int, key: Key) -> bool:
        expected, version = self._seen[(process, key)]
        value = next(self._values)
        self.recorder.invoke(
            process, OpKind.CAS, trio.current_time(), key=key, value=value, expected=expected
        )
        try:
            await client.cas(key, version, value)
        except Conflict:
            self.recorder.fail(process, trio.current_time())
            return False
        except WireError:
            self.recorder.info(process, trio.current_time())
            return False
        except BaseException:
            self.recorder.info(process, trio.current_time())
            raise
        self.recorder.ok(process, trio.current_time())
        return True

    async def check(self, client: AsyncClient) -> list[Finding]:
        history = self.recorder.history()
        final = await _retry(
            client, "final read", FINAL_READ_ATTEMPTS, lambda: _read_all(client, self.keys)
        )
        linear = check_linearizable(history)
        findings = [
            Finding(
                "linearizable",
                linear.verdict is not Verdict.VIOLATION,
                sum(result.operations for result in linear.keys),
                "" if linear.verdict is not Verdict.VIOLATION else linear.describe(),
            )
        ]
        findings.append(_result(check_no_lost_writes(history, final)))
        findings.append(_result(check_no_aborted_reads(history)))
        return findings


async def _read_all(client: AsyncClient, keys: Sequence[Key]) -> dict[Key, object]:
    entries = await client.get_many_entries(keys)
    return {key: entries[key].value if entries[key].version else ABSENT for key in keys}


class _Transactional:
    """Shared by bank and cycle: keys of one tag, transactions recorded with their steps."""

    name = ""

    def __init__(self, recorder: Recorder, keys: Sequence[Key]) -> None:
        self.recorder = recorder
        self.keys = list(keys)

    async def _initial(self, client: AsyncClient, values: Mapping[Key, object]) -> None:
        async def write_all() -> None:
            async with client.transaction() as tx:
                for key, value in values.items():
                    await tx.put(key, value)

        await _retry(client, f"{self.name} set-up", SETUP_ATTEMPTS, write_all)

    async def snapshot(self, client: AsyncClient, process: int) -> bool:
        """A read-only transaction of every key, recorded for the snapshot checks."""
        invoke = [Step(OpKind.READ, key) for key in self.keys]
        self.recorder.invoke(process, OpKind.TXN, trio.current_time(), steps=invoke)
        try:
            async with client.transaction() as tx:
                seen = {key: await tx.get(key, ABSENT) for key in self.keys}
        except BaseException as error:
            self._complete_failed(process, error)
            if isinstance(error, WireError):
                return False
            raise
        steps = [Step(OpKind.READ, key, seen[key]) for key in self.keys]
        self.recorder.ok(process, trio.current_time(), steps=steps)
        return True

    async def final_snapshot(self, client: AsyncClient) -> None:
        """After the quiet phase: a recorded snapshot must succeed (liveness) and pass."""
        for _ in range(FINAL_READ_ATTEMPTS):
            if await self.snapshot(client, FINAL_PROCESS):
                return
            await trio.sleep(SETUP_RETRY_S)
        raise WorkloadError(f"{self.name}: no final snapshot in {FINAL_READ_ATTEMPTS} tries")

    def _complete_failed(self, process: int, error: BaseException) -> None:
        if isinstance(error, Conflict):
            self.recorder.fail(process, trio.current_time())
        else:
            self.recorder.info(process, trio.current_time())


class Bank(_Transactional):
    name = "bank"

    def __init__(self, recorder: Recorder, prefix: str) -> None:
        super().__init__(recorder, [f"{{{prefix}-bank}}a{index}" for index in range(BANK_ACCOUNTS)])
        self.total = BANK_ACCOUNTS * BANK_INITIAL_BALANCE

    async def setup(self, client: AsyncClient) -> None:
        await self._initial(client, dict.fromkeys(self.keys, BANK_INITIAL_BALANCE))

    async def step(self, client: AsyncClient, process: int, rng: random.Random) -> bool:
        if rng.random() < 0.3:
            return await self.snapshot(client, process)
        source, target = rng.sample(self.keys, 2)
        amount = rng.randint(1, 20)
        invoke = [Step(OpKind.READ, source), Step(OpKind.READ, target)]
        self.recorder.invoke(process, OpKind.TXN, trio.current_time(), steps=invoke)
        try:
            async with client.transaction() as tx:
                have = await tx.get(source, 0)
                other = await tx.get(target, 0)
                moved = min(amount, have)
                await tx.put(source, have - moved)
                await tx.put(target, other + moved)
        except BaseException as error:
            self._complete_failed(process, error)
            if isinstance(error, WireError):
                return False
            raise
        steps = [
            Step(OpKind.READ, source, have),
            Step(OpKind.READ, target, other),
            Step(OpKind.WRITE, source, have - moved),
            Step(OpKind.WRITE, target, other + moved),
        ]
        self.recorder.ok(process, trio.current_time(), steps=steps)
        return True

    async def check(self, client: AsyncClient) -> list[Finding]:
        await self.final_snapshot(client)
        history = self.recorder.history()
        return [_result(check_bank(history, self.keys, self.total))]


class Cycle(_Transactional):
    name = "cycle"

    def __init__(self, recorder: Recorder, prefix: str) -> None:
        super().__init__(recorder, [f"{{{prefix}-cycle}}n{index}" for index in range(CYCLE_NODES)])

    async def setup(self, client: AsyncClient) -> None:
        ring = {key: self.keys[(index + 1) % len(self.keys)] for index, key in enumerate(self.keys)}
        await self._initial(client, ring)

    async def step(self, client: AsyncClient, process: int, rng: random.Random) -> bool:
        if rng.random() < 0.3:
            return await self.snapshot(client, process)
        first = rng.choice(self.keys)
        self.recorder.invoke(
            process, OpKind.TXN, trio.current_time(), steps=[Step(OpKind.READ, first)]
        )
        try:
            async with client.transaction() as tx:
                second = await tx.get(first)
                third = await tx.get(second)
                fourth = await tx.get(third)
                # first -> second -> third -> fourth becomes first -> third -> second -> fourth
                await tx.put(first, third)
                await tx.put(third, second)
                await tx.put(second, fourth)
        except BaseException as error:
            self._complete_failed(process, error)
            if isinstance(error, WireError):
                return False
            raise
        steps = [
            Step(OpKind.READ, first, second),
            Step(OpKind.READ, second, third),
            Step(OpKind.READ, third, fourth),
            Step(OpKind.WRITE, first, third),
            Step(OpKind.WRITE, third, second),
            Step(OpKind.WRITE, second, fourth),
        ]
        self.recorder.ok(process, trio.current_time(), steps=steps)
        return True

    async def check(self, client: AsyncClient) -> list[Finding]:
        await self.final_snapshot(client)
        history = self.recorder.history()
        return [_result(check_cycle(history, self.keys))]


WORKLOADS = ("register", "bank", "cycle")


def make_workload(name: str, recorder: Recorder, prefix: str) -> Workload:
    if name == "register":
        return Register(recorder, prefix)
    if name == "bank":
        return Bank(recorder, prefix)
    if name == "cycle":
        return Cycle(recorder, prefix)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
