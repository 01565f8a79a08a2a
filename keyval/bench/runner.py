"""One benchmark invocation: keyval, then the comparisons, as rows for keyval.bench.report."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from keyval.bench.cluster import ClusterHandle, attach, local_cluster
from keyval.bench.errors import BenchError
from keyval.bench.etcdserver import EtcdMissing, running_etcd
from keyval.bench.failover import drone_failover, leader_failover
from keyval.bench.fanout import LoadResult, run_load, worker_specs
from keyval.bench.loadgen import WorkerSpec
from keyval.bench.options import BenchOptions
from keyval.bench.proc import ServerProcess, cpu_delta_by_role, cpu_snapshot, rss_bytes
from keyval.bench.profile import Profiler, ProfilerMissing
from keyval.bench.redisserver import (
    REDIS_BENCHMARK_TESTS,
    RedisMissing,
    RedisServer,
    run_redis_benchmark,
    running_redis,
    used_memory_bytes,
)
from keyval.bench.report import Row
from keyval.bench.workloads import PRELOADED

# Workloads whose writes keyval acknowledges only once durable; Redis runs them with
# `appendfsync always`. get reads only; put-memory is the memory ack mode.
REDIS_DURABLE = ("put", "mixed", "txn-local", "txn-cross")
# What the etcd load generator drives: single-key gets and puts (puts are always durable there).
ETCD_WORKLOADS = ("get", "put", "mixed")
# Workloads whose gets keyval's client auto-batches when several are in flight per connection.
AUTOBATCHED_WORKLOADS = ("get", "mixed")
MEMORY_VALUE_BYTES = 32  # the memory shape: 16-byte keys, 32-byte values
# After a bulk load, RSS is read once it has settled (write-behind buffers drained).
SETTLE_INTERVAL_S = 0.5
SETTLE_TIMEOUT_S = 15.0
SETTLE_FRACTION = 0.01
# redis-benchmark's request count: enough for it to run about as long as our window at up to
# this many times our own Redis figure, within these bounds.
REDIS_BENCHMARK_SPEEDUP = 4
REDIS_BENCHMARK_MIN_REQUESTS = 20_000
REDIS_BENCHMARK_MAX_REQUESTS = 20_000_000


@dataclass
class Outcome:
    throughput: list[Row] = field(default_factory=list)
    memory: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failover: list[Row] = field(default_factory=list)


@contextlib.contextmanager
def work_folder(options: BenchOptions) -> Iterator[Path]:
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        yield options.workdir.resolve()
        return
    folder = Path(tempfile.mkdtemp(prefix="keyval-bench-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def batching(options: BenchOptions, system: str) -> str:
    """How the requests in flight on one connection travel, so a row says what it measures:
    keyval's client auto-batches concurrent gets into get_many requests (unless
    --no-autobatch); everything else, and Redis always, is pipelined one command each."""
    if options.pipeline == 1:
        return ""
    if system == "keyval" and options.autobatch and options.workload in AUTOBATCHED_WORKLOADS:
        return "auto-batched"
    return "pipelined"


def _shape(options: BenchOptions, system: str) -> Row:
    return {
        "system": system,
        "workload": options.workload,
        "connections": options.connections,
        "pipeline": options.pipeline,
        "batching": batching(options, system),
        "keys": options.keys,
        "value_bytes": options.value_bytes,
        "drones": options.drones if system == "keyval" else None,
        "seconds": options.seconds,
        "processes": options.processes,
    }


def _row(options: BenchOptions, system: str, result: LoadResult) -> Row:
    histogram = result.histogram
    server_cpu_s = sum(result.extra.get("server_cpu_by_role", {}).values())
    row = _shape(options, system)
    row.update(
        ops=result.ops,
        ops_per_s=result.ops_per_s,
        p50_ms=histogram.percentile_ns(0.5) / 1e6,
        p99_ms=histogram.percentile_ns(0.99) / 1e6,
        p999_ms=histogram.percentile_ns(0.999) / 1e6,
        max_ms=histogram.max_ns / 1e6,
        mean_ms=histogram.mean_ns() / 1e6,
        errors=result.errors,
        server_cpu_s=server_cpu_s,
        server_cpu_by_role=result.extra.get("server_cpu_by_role", {}),
        server_cpu_us_per_op=server_cpu_s / result.ops * 1e6 if result.ops else None,
        loadgen_cpu_s=result.loadgen_cpu_s,
    )
    return row


def _cpu_hook(processes: list[ServerProcess]) -> Callable[[str], dict[str, Any]]:
    snapshots: dict[str, dict[str, float]] = {}

    def hook(edge: str) -> dict[str, Any]:
        snapshots[edge] = cpu_snapshot(processes)
        if edge != "end":
            return {}
        return {
            "server_cpu_by_role": cpu_delta_by_role(processes, snapshots["start"], snapshots[edge])
        }

    return hook


def _throughput_specs(options: BenchOptions, target: str, **where: Any) -> list[WorkerSpec]:
    """The load shape the options name, against `target` (`where`: its config or address)."""
    return worker_specs(
        target=target,
        workload=options.workload,
        connections=options.connections,
        pipeline=options.pipeline,
        processes=options.processes,
        keys=options.keys,
        value_bytes=options.value_bytes,
        preload=options.workload in PRELOADED,
        **where,
    )


def run_keyval(options: BenchOptions, handle: ClusterHandle, outcome: Outcome) -> Row:
    specs = _throughput_specs(
        options, "keyval", config=str(handle.client_config), autobatch=options.autobatch
    )
    cpu_hook = _cpu_hook(handle.processes())
    profiler = _profiler(options, handle, outcome)

    def hook(edge: str) -> dict[str, Any]:
        if profiler is not None and edge == "start":
            profiler.start(options.seconds)
        return cpu_hook(edge)

    result = run_load(specs, warmup_s=options.warmup_s, seconds=options.seconds, on_window=hook)
    row = _row(options, "keyval", result)
    if profiler is not None:
        try:
            summary = profiler.finish()
        except BenchError as error:
            outcome.notes.append(f"profile: {error}")
        else:
            row["drone_profile"] = summary.lines()
            outcome.notes += ["profile of drone-1 over the measured window:", *summary.lines()]
    return row


def _profiler(options: BenchOptions, handle: ClusterHandle, outcome: Outcome) -> Profiler | None:
    if not options.profile:
        return None
    drone = handle.drones()[0]
    try:
        return Profiler(drone.pid, handle.root / f"profile-{drone.name}.txt")
    except ProfilerMissing as error:
        outcome.notes.append(f"profile: {error}")
        return None


def _drive_server(options: BenchOptions, target: str, process_name: str, server: Any) -> Row:
    """Our load generator against one comparison server (Redis or etcd): its result row."""
    specs = _throughput_specs(options, target, host=server.host, port=server.port)
    processes = [ServerProcess(target, process_name, server.pid)]
    result = run_load(
        specs, warmup_s=options.warmup_s, seconds=options.seconds, on_window=_cpu_hook(processes)
    )
    return _row(options, target, result)


def run_redis(options: BenchOptions, folder: Path, outcome: Outcome) -> list[Row]:
    """Our load generator against redis-server, then redis-benchmark for the same shape."""
    if options.workload == "scan":
        return [{**_shape(options, "redis"), "skipped": "no Redis equivalent of a tag scan"}]
    durable = options.workload in REDIS_DURABLE
    try:
        with running_redis(folder / f"redis-{options.workload}", durable=durable) as server:
            row = _drive_server(options, "redis", "redis-server", server)
            row["redis_durable"] = durable
            rows = [row]
            if options.redis_benchmark and options.workload in REDIS_BENCHMARK_TESTS:
                rows += _redis_benchmark(options, server, row["ops_per_s"], outcome)
            return rows
    except RedisMissing as error:
        outcome.notes.append(f"redis: {error}")
        return [{**_shape(options, "redis"), "skipped": str(error)}]


def _redis_benchmark(
    options: BenchOptions, server: RedisServer, our_rate: float, outcome: Outcome
) -> list[Row]:
    requests = int(our_rate * options.seconds * REDIS_BENCHMARK_SPEEDUP)
    requests = max(REDIS_BENCHMARK_MIN_REQUESTS, min(requests, REDIS_BENCHMARK_MAX_REQUESTS))
    try:
        figure = run_redis_benchmark(
            server,
            test=REDIS_BENCHMARK_TESTS[options.workload],
            connections=options.connections,
            pipeline=options.pipeline,
            keys=options.keys,
            value_bytes=options.value_bytes,
            requests=requests,
            timeout_s=options.seconds * 10 + 60,
        )
    except BenchError as error:
        outcome.notes.append(f"redis-benchmark: {error}")
        return []
    row = _shape(options, "redis-benchmark")
    row.update(ops_per_s=figure.ops_per_s, p50_ms=figure.p50_ms, p99_ms=figure.p99_ms)
    return [row]


def etcd_skip_reason(options: BenchOptions) -> str | None:
    """Why this shape has no etcd row, or None when it has one."""
    if options.workload not in ETCD_WORKLOADS:
        return f"skipped: {options.workload} is not driven against etcd (get, put, mixed are)"
    if options.pipeline != 1:
        return "skipped: the etcd gateway client sends one request at a time per connection"
    return None


def run_etcd(options: BenchOptions, folder: Path, outcome: Outcome) -> Row:
    """The same load against a single-node etcd through its JSON gateway (durable puts)."""
    reason = etcd_skip_reason(options)
    if reason is not None:
        return {**_shape(options, "etcd"), "skipped": reason}
    try:
        with running_etcd(folder / f"etcd-{options.workload}") as server:
            return _drive_server(options, "etcd", "etcd", server)
    except EtcdMissing as error:
        outcome.notes.append(f"etcd: {error}")
        return {**_shape(options, "etcd"), "skipped": str(error)}


def run_throughput(options: BenchOptions) -> Outcome:
    outcome = Outcome()
    with work_folder(options) as folder:
        if options.attach is not None:
            keyval_row = run_keyval(options, attach(options.attach), outcome)
        else:
            with local_cluster(
                folder / "cluster", drones=options.drones, backend=options.backend
            ) as handle:
                keyval_row = run_keyval(options, handle, outcome)
        outcome.throughput.append(keyval_row)
        for system in options.versus:
            if system == "redis":
                redis_rows = run_redis(options, folder, outcome)
                _set_ratio(keyval_row, redis_rows[0], "vs_redis")
                outcome.throughput += redis_rows
            elif system == "etcd":
                etcd = run_etcd(options, folder, outcome)
                _set_ratio(keyval_row, etcd, "vs_etcd")
                outcome.throughput.append(etcd)
    return outcome


def _set_ratio(keyval_row: Row, other_row: Row, name: str) -> None:
    other_rate = other_row.get("ops_per_s")
    if isinstance(other_rate, (int, float)) and other_rate > 0:
        keyval_row[name] = keyval_row["ops_per_s"] / other_rate


def settled_rss_bytes(pid: int) -> int:
    """RSS once two readings SETTLE_INTERVAL_S apart differ by under SETTLE_FRACTION."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous = rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL_S)
        current = rss_bytes(pid)
        if abs(current - previous) <= previous * SETTLE_FRACTION:
            return current
        previous = current
    return previous


# ------------------------------------------------------------------ failover mode

FAILOVER_DRONES = 3  # the shape: one of three drones is lost
FAILOVER_COMMANDERS = 3  # a leader among three commanders is lost


def run_failover(options: BenchOptions) -> Outcome:
    """Drone loss on a 3-drone cluster with --keys keys, then leader loss among 3 commanders."""
    outcome = Outcome()
    with work_folder(options) as folder:
        with local_cluster(
            folder / "cluster-drone-loss", drones=FAILOVER_DRONES, backend=options.backend
        ) as handle:
            outcome.failover.append(trio.run(drone_failover, handle, options.keys))
        with local_cluster(
            folder / "cluster-leader-loss",
            drones=FAILOVER_DRONES,
            backend=options.backend,
            commanders=FAILOVER_COMMANDERS,
        ) as handle:
            outcome.failover.append(trio.run(leader_failover, handle))
    return outcome


# ------------------------------------------------------------------ memory mode


def _memory_row(system: str, keys: int, grown_bytes: int, measured_as: str) -> Row:
    return {
        "system": system,
        "keys": keys,
        "bytes_per_key": grown_bytes / keys,
        "grown_bytes": grown_bytes,
        "measured_as": measured_as,
    }


def _bulk_load(
    options: BenchOptions, keys: int, measure: Callable[[], None], **target: Any
) -> None:
    specs = worker_specs(
        workload="put-memory",
        connections=options.connections,
        pipeline=options.pipeline,
        processes=options.processes,
        keys=keys,
        value_bytes=MEMORY_VALUE_BYTES,
        preload=True,
        **target,
    )
    result = run_load(specs, warmup_s=0.0, seconds=0.0, after_ready=measure)
    if result.preloaded != keys:
        raise BenchError(f"loaded {result.preloaded} keys, not {keys}")


def run_memory(options: BenchOptions) -> Outcome:
    """Load M keys (16-byte keys, 32-byte values) into a 1-drone cluster and into Redis."""
    keys = options.memory_keys
    if keys is None:
        raise BenchError("memory mode needs --memory-keys")
    outcome = Outcome()
    with work_folder(options) as folder:
        with local_cluster(folder / "cluster-memory", drones=1, backend=options.backend) as handle:
            drone = handle.drones()[0]
            before = settled_rss_bytes(drone.pid)
            after: list[int] = []
            _bulk_load(
                options,
                keys,
                lambda: after.append(settled_rss_bytes(drone.pid)),
                target="keyval",
                config=str(handle.client_config),
            )
        keyval_row = _memory_row("keyval", keys, after[0] - before, "drone RSS after - before")
        outcome.memory.append(keyval_row)
        if "redis" not in options.versus:
            return outcome
        try:
            with running_redis(folder / "redis-memory", durable=False) as server:
                used_before, rss_before = used_memory_bytes(server), rss_bytes(server.pid)
                used_after: list[int] = []

                def measure_redis() -> None:
                    used_after.append(used_memory_bytes(server))
                    used_after.append(settled_rss_bytes(server.pid))

                _bulk_load(
                    options,
                    keys,
                    measure_redis,
                    target="redis",
                    host=server.host,
                    port=server.port,
                )
        except RedisMissing as error:
            outcome.notes.append(f"redis: {error}")
            return outcome
        redis_used = _memory_row("redis", keys, used_after[0] - used_before, "used_memory delta")
        redis_rss = _memory_row("redis-rss", keys, used_after[1] - rss_before, "RSS delta")
        keyval_row["vs_redis"] = keyval_row["bytes_per_key"] / redis_used["bytes_per_key"]
        outcome.memory += [redis_used, redis_rss]
    return outcome
