"""The bench's command line: `scripts/bench --help`, and the checks on what it is given."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from keyval.bench.errors import BenchConfigError

WORKLOADS = ("get", "put", "put-memory", "mixed", "txn-local", "txn-cross", "scan")
COMPARISONS = ("redis", "etcd")

# Limits: a bench on one machine never needs more; past them a run would only thrash.
MAX_CONNECTIONS = 1024  # keyval and Redis both handle thousands, the load generator does not
MAX_PIPELINE = 1024  # requests in flight per connection (redis-benchmark's -P is similar)
MAX_PROCESSES = 64  # load-generator processes
MAX_KEYS = 100_000_000  # preloading more would take longer than any run
# keyval's default value limit is 512 KiB of encoded CBOR; leave room for the bytes header.
MAX_VALUE_BYTES = 512 * 1024 - 16
MAX_SECONDS = 3600.0  # one measured window
MAX_WARMUP_SECONDS = 600.0
MAX_DRONES = 60  # keyval.cluster.MAX_DRONES


@dataclass(frozen=True, slots=True)
class BenchOptions:
    attach: Path | None
    drones: int
    workload: str
    connections: int
    pipeline: int
    keys: int
    value_bytes: int
    seconds: float
    warmup_s: float
    processes: int
    versus: tuple[str, ...]
    json_out: Path | None
    markdown: Path | None
    memory_keys: int | None
    workdir: Path | None
    backend: str | None
    redis_benchmark: bool
    profile: bool
    failover: bool
    autobatch: bool = True  # keyval's client batches concurrent gets (its default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Drive a local keyval cluster (and, with --vs redis, a redis-server) with "
        "the same load from separate load-generator processes; print ops/s, latency "
        "percentiles, errors and server CPU seconds per operation.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--attach", type=Path, metavar="DIR", help="use the cluster running in DIR")
    where.add_argument("--drones", type=int, default=3, help="drones of the cluster started (3)")
    parser.add_argument("--workload", choices=WORKLOADS, default="get")
    parser.add_argument("--connections", type=int, default=32, help="client connections (32)")
    parser.add_argument(
        "--pipeline", type=int, default=1, help="requests in flight per connection (1)"
    )
    parser.add_argument("--keys", type=int, default=10_000, help="key space, preloaded (10000)")
    parser.add_argument("--value-bytes", type=int, default=32, help="value size (32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured warm-up (2)")
    parser.add_argument(
        "--processes", type=int, default=2, help="load-generator processes (2, one per core)"
    )
    parser.add_argument(
        "--vs",
        action="append",
        choices=COMPARISONS,
        default=[],
        help="also run the same load against this system (repeatable)",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const=Path("BENCHMARKS.md"),
        type=Path,
        metavar="FILE",
        help="write/update the results table in FILE (default BENCHMARKS.md)",
    )
    parser.add_argument(
        "--memory-keys",
        type=int,
        metavar="M",
        help="memory mode: load M keys (16-byte keys, "
        "32-byte values) into a 1-drone cluster; report RSS per key vs Redis's used_memory",
    )
    parser.add_argument(
        "--dir", type=Path, help="working folder for the cluster and redis (default: temporary)"
    )
    parser.add_argument("--backend", help="db backend URL for the cluster started (SQLite)")
    parser.add_argument(
        "--no-redis-benchmark", action="store_true", help="skip the redis-benchmark upper bound"
    )
    parser.add_argument(
        "--no-autobatch",
        action="store_true",
        help="keyval's client sends every get alone (by default it auto-batches the concurrent "
        "gets of one connection into get_many requests: the pipelined get rows say so)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the first drone with py-spy over the measured window (bench extra)",
    )
    parser.add_argument(
        "--failover",
        action="store_true",
        help="failover mode: SIGKILL a drone of a 3-drone cluster with --keys keys on each "
        "drone, then the leader of 3 commanders; report the seconds until everything is served "
        "again",
    )
    return parser


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise BenchConfigError(f"{name} must be between {low:g} and {high:g}, not {value:g}")


def check_options(args: argparse.Namespace) -> BenchOptions:
    """Validated options; raises BenchConfigError naming the first bad one."""
    _check_range("--connections", args.connections, 1, MAX_CONNECTIONS)
    _check_range("--pipeline", args.pipeline, 1, MAX_PIPELINE)
    _check_range("--processes", args.processes, 1, MAX_PROCESSES)
    _check_range("--keys", args.keys, 1, MAX_KEYS)
    _check_range("--value-bytes", args.value_bytes, 1, MAX_VALUE_BYTES)
    _check_range("--seconds", args.seconds, 0.1, MAX_SECONDS)
    _check_range("--warmup", args.warmup, 0.0, MAX_WARMUP_SECONDS)
    _check_range("--drones", args.drones, 1, MAX_DRONES)
    if args.processes > args.connections:
        raise BenchConfigError(
            f"--processes ({args.processes}) must not exceed --connections ({args.connections}):"
            " every load-generator process needs a connection"
        )
    if args.memory_keys is not None:
        _check_range("--memory-keys", args.memory_keys, 1, MAX_KEYS)
        if args.attach is not None:
            raise BenchConfigError("--memory-keys starts its own 1-drone cluster: drop --attach")
    if args.failover and (args.attach is not None or args.memory_keys is not None):
        raise BenchConfigError("--failover starts its own clusters: drop --attach/--memory-keys")
    if args.attach is not None and not (args.attach / "nodes.json").is_file():
        raise BenchConfigError(f"--attach {args.attach}: no nodes.json there (is a cluster up?)")
    return BenchOptions(
        attach=args.attach,
        drones=args.drones,
        workload=args.workload,
        connections=args.connections,
        pipeline=args.pipeline,
        keys=args.keys,
        value_bytes=args.value_bytes,
        seconds=float(args.seconds),
        warmup_s=float(args.warmup),
        processes=args.processes,
        versus=tuple(dict.fromkeys(args.vs)),
        json_out=args.json,
        markdown=args.markdown,
        memory_keys=args.memory_keys,
        workdir=args.dir,
        backend=args.backend,
        redis_benchmark=not args.no_redis_benchmark,
        profile=args.profile,
        failover=args.failover,
        autobatch=not args.no_autobatch,
    )


def parse_options(argv: list[str] | None = None) -> BenchOptions:
    return check_options(build_parser().parse_args(argv))
