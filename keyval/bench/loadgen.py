"""One load-generator process: trio, its share of connections, one task per in-flight request.

The parent (keyval.bench.fanout) talks to it over a multiprocessing pipe in JSON (never
pickle): it sends the spec; the process connects, preloads its share of keys and answers
`ready`; the parent answers `go` with the measured window in CLOCK_MONOTONIC nanoseconds
(the same clock in every process on the machine) or `stop`; the process runs until the window
closes and answers `result`: operations and errors completed inside the window, their latency
histogram and its own CPU seconds.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import trio

from keyval.bench.errors import BenchError, LoadGeneratorError
from keyval.bench.histogram import Histogram
from keyval.bench.http import open_http_connection
from keyval.bench.pairs import PairOf, keyval_cross_pairs, local_pair, plain_cross_pair
from keyval.bench.respclient import open_resp_connection
from keyval.bench.sessions import EtcdSession, KeyvalSession, RedisSession
from keyval.bench.workloads import TXN_WORKLOADS, Session, one_operation, preload_items
from keyval.messages import ACK_DURABLE, ACK_MEMORY
from keyval.observe.gctune import tune_gc
from wire.errors import WireError

# Preloading a process's share of the keys may take this long: a fixed part plus a floor on
# the write rate, far below what a healthy cluster or Redis sustains. The floor is 250 keys/s
# per process: on the 2 shared cores with 4 other benchmarks running (load average 8-9), the
# 1M-key memory run's processes preloaded 500k keys each at ~900 keys/s and hit a 1,000 keys/s
# floor; a stalled cluster still fails within minutes.
PRELOAD_BASE_TIMEOUT_S = 60.0
PRELOAD_MIN_KEYS_PER_S = 250.0
GO_TIMEOUT_S = 600.0  # the parent waits for every process to be ready, then says go
PRELOAD_TASKS = 64  # concurrent writes per process while preloading
# A preload write that fails (the client already retried within its own deadline) is tried
# again a few times: a cluster that has just come up may still be settling its slot map.
PRELOAD_ATTEMPTS = 5
PRELOAD_RETRY_PAUSE_S = 1.0
CONNECT_TIMEOUT_S = 10.0
# One etcd gateway request (connect, or send and read the reply); a durable put on a loaded
# machine takes tens of milliseconds, so this only catches a server that stopped answering.
HTTP_TIMEOUT_S = 10.0
# After a failed operation a task waits this long before the next one, so a dead server
# costs a few hundred errors per second per task instead of a hot loop.
ERROR_PAUSE_S = 0.005
# Failures an operation may end with, counted by type name; anything else is a bug and
# stops the process with the traceback.
OPERATION_ERRORS = (WireError, BenchError, OSError, trio.BrokenResourceError)


@dataclass
class WorkerSpec:
    index: int
    target: str  # "keyval", "redis" or "etcd"
    workload: str
    connections: int
    pipeline: int
    keys: int
    value_bytes: int
    preload_first: int
    preload_stop: int
    seed: int
    config: str = ""  # keyval: client.toml
    host: str = ""  # redis, etcd
    port: int = 0
    autobatch: bool = True  # keyval: concurrent gets of a connection share get_many requests

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


@dataclass
class Tally:
    histogram: Histogram = field(default_factory=Histogram)
    errors: dict[str, int] = field(default_factory=dict)
    window_ns: tuple[int, int] = (0, 0)

    def count_error(self, error: BaseException) -> None:
        name = type(error).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


def preload_timeout_s(keys: int) -> float:
    return PRELOAD_BASE_TIMEOUT_S + keys / PRELOAD_MIN_KEYS_PER_S


def keyval_ack(workload: str) -> str:
    """`put-memory` acknowledges after the in-memory apply; everything else is durable."""
    return ACK_MEMORY if workload == "put-memory" else ACK_DURABLE


@contextlib.asynccontextmanager
async def open_sessions(spec: WorkerSpec) -> AsyncIterator[list[Session]]:
    """One Session per concurrent task: tasks of one connection share its session, except
    Redis transactions, whose WATCH needs a connection per task."""
    async with contextlib.AsyncExitStack() as stack:
        per_connection: list[Session] = []
        if spec.target == "keyval":
            from keyval.client import aconnect

            for _ in range(spec.connections):
                client = await stack.enter_async_context(
                    aconnect(spec.config, autobatch=spec.autobatch)
                )
                per_connection.append(KeyvalSession(client, ack=keyval_ack(spec.workload)))
        elif spec.target == "redis":
            sockets = spec.connections
            if spec.workload in TXN_WORKLOADS:
                sockets *= spec.pipeline
            for _ in range(sockets):
                redis = await stack.enter_async_context(
                    open_resp_connection(spec.host, spec.port, timeout_s=CONNECT_TIMEOUT_S)
                )
                per_connection.append(RedisSession(redis))
        elif spec.target == "etcd":
            for _ in range(spec.connections):
                gateway = await stack.enter_async_context(
                    open_http_connection(spec.host, spec.port, timeout_s=HTTP_TIMEOUT_S)
                )
                per_connection.append(EtcdSession(gateway))
        else:
            raise LoadGeneratorError(f"unknown target {spec.target!r}")
        tasks = spec.connections * spec.pipeline
        yield [per_connection[index % len(per_connection)] for index in range(tasks)]


async def pair_source(spec: WorkerSpec, sessions: list[Session]) -> PairOf:
    """Where the transaction workloads' key pairs come from (keyval.bench.pairs)."""
    if spec.workload != "txn-cross":
        return local_pair
    first = sessions[0]
    if isinstance(first, KeyvalSession):
        return await keyval_cross_pairs(first.client, spec.keys)
    return plain_cross_pair


async def preload(spec: WorkerSpec, sessions: list[Session], pair_of: PairOf = local_pair) -> int:
    value = b"v" * spec.value_bytes
    items = iter(
        preload_items(spec.workload, spec.preload_first, spec.preload_stop, value, pair_of)
    )
    written = 0

    async def writer(session: Session) -> None:
        nonlocal written
        for key, item in items:  # the tasks share one iterator: each item is written once
            for attempt in range(1, PRELOAD_ATTEMPTS + 1):
                try:
                    await session.put(key, item)
                    break
                except OPERATION_ERRORS:
                    if attempt == PRELOAD_ATTEMPTS:
                        raise
                    await trio.sleep(PRELOAD_RETRY_PAUSE_S)
            written += 1

    async with trio.open_nursery() as nursery:
        for index in range(min(PRELOAD_TASKS, len(sessions))):
            nursery.start_soon(writer, sessions[index])
    return written


async def drive(
    spec: WorkerSpec,
    session: Session,
    rng: random.Random,
    tally: Tally,
    value: bytes,
    pair_of: PairOf = local_pair,
) -> None:
    first_ns, last_ns = tally.window_ns
    while True:
        started = time.monotonic_ns()
        try:
            await one_operation(spec.workload, session, rng, spec.keys, value, pair_of)
        except OPERATION_ERRORS as error:
            if first_ns <= time.monotonic_ns() <= last_ns:
                tally.count_error(error)
            await trio.sleep(ERROR_PAUSE_S)
            continue
        finished = time.monotonic_ns()
        if first_ns <= finished <= last_ns:
            tally.histogram.record(finished - started)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    spec: WorkerSpec, sessions: list[Session], tally: Tally, pair_of: PairOf = local_pair
) -> float:
    """Run every task until the window closes; this process's CPU seconds in the window."""
    first_ns, last_ns = tally.window_ns
    value = b"v" * spec.value_bytes
    cpu_at_start = 0.0
    async with trio.open_nursery() as nursery:
        for index, session in enumerate(sessions):
            rng = random.Random(spec.seed * 1_000_003 + index)
            nursery.start_soon(drive, spec, session, rng, tally, value, pair_of)
        await trio.sleep(max(0, first_ns - time.monotonic_ns()) / 1e9)
        cpu_at_start = _cpu_s()
        await trio.sleep(max(0, last_ns - time.monotonic_ns()) / 1e9)
        cpu_spent = _cpu_s() - cpu_at_start
        nursery.cancel_scope.cancel()  # in-flight operations end outside the window anyway
    return cpu_spent


def _send(pipe: Connection, message: dict[str, Any]) -> None:
    pipe.send_bytes(json.dumps(message).encode())


def _receive(pipe: Connection, timeout_s: float) -> dict[str, Any]:
    if not pipe.poll(timeout_s):
        raise LoadGeneratorError(f"no word from the parent within {timeout_s:.0f} s")
    message = json.loads(pipe.recv_bytes())
    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
        raise LoadGeneratorError(f"malformed message from the parent: {message!r}")
    return message


async def run_worker(spec: WorkerSpec, pipe: Connection) -> None:
    # Each connection has its own connect deadline (its nursery must not sit inside ours).
    async with open_sessions(spec) as sessions:
        share = spec.preload_stop - spec.preload_first
        with trio.move_on_after(preload_timeout_s(share)) as timer:
            pair_of = await pair_source(spec, sessions)
            written = await preload(spec, sessions, pair_of)
        if timer.cancelled_caught:
            raise LoadGeneratorError(
                f"preloading {share} keys took over {preload_timeout_s(share):.0f} s"
            )
        _send(pipe, {"kind": "ready", "preloaded": written})
        order = await trio.to_thread.run_sync(_receive, pipe, GO_TIMEOUT_S)
        if order["kind"] == "stop":
            return
        window = order.get("window_ns")
        if order["kind"] != "go" or not (
            isinstance(window, list) and len(window) == 2 and all(type(t) is int for t in window)
        ):
            raise LoadGeneratorError(f"expected go with window_ns, got {order!r}")
        tally = Tally(window_ns=(window[0], window[1]))
        cpu_s = await measure(spec, sessions, tally, pair_of)
    _send(
        pipe,
        {
            "kind": "result",
            "histogram": tally.histogram.to_json(),
            "errors": tally.errors,
            "loadgen_cpu_s": cpu_s,
        },
    )


def worker_main(spec_json: str, pipe: Connection) -> None:
    """Entry point of the process (multiprocessing target)."""
    tune_gc()
    try:
        trio.run(run_worker, WorkerSpec.from_json(spec_json), pipe)
    except* (BenchError, WireError, OSError, trio.TooSlowError, trio.BrokenResourceError) as group:
        _send(pipe, {"kind": "error", "error": _describe(group)})
    finally:
        pipe.close()


def _describe(group: BaseExceptionGroup[BaseException]) -> str:
    """The first leaf error of a (nested) group, as "Type: message"."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"
