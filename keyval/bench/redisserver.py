"""The bench's own redis-server: started on a free loopback port, stopped when done.

Memory mode runs with persistence off (`--save "" --appendonly no`); durable mode with an
append-only file fsynced on every write (`--appendonly yes --appendfsync always`), which is
what keyval's durable acknowledgement promises. Also: a blocking one-shot command for INFO
and PING, and `redis-benchmark` runs whose figure is the upper bound for a shape.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keyval.bench.errors import BenchError, RespProtocolError, RespReplyError
from keyval.bench.resp import Argument, NeedData, Reply, RespError, RespParser, encode_command
from keyval.processes import stop_processes

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0  # redis-server is serving in well under a second when healthy
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL
COMMAND_TIMEOUT_S = 10.0  # one blocking admin command (PING, INFO, FLUSHALL)
POLL_INTERVAL_S = 0.05


class RedisMissing(BenchError):
    """redis-server or redis-benchmark is not installed: that comparison is skipped."""


@dataclass(frozen=True, slots=True)
class RedisServer:
    host: str
    port: int
    pid: int
    durable: bool


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def command(host: str, port: int, *args: Argument, timeout_s: float = COMMAND_TIMEOUT_S) -> Reply:
    """One command over a fresh blocking socket; error replies raise RespReplyError."""
    parser = RespParser()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(encode_command(*args))
        while True:
            data = sock.recv(65536)
            if not data:
                raise RespProtocolError("redis closed the connection before replying")
            parser.receive_data(data)
            reply = parser.next_reply()
            if not isinstance(reply, NeedData):
                break
    if isinstance(reply, RespError):
        raise RespReplyError(reply.message)
    return reply


def info(host: str, port: int, section: str) -> dict[str, str]:
    """INFO <section> as a dict of its `name:value` lines."""
    reply = command(host, port, "INFO", section)
    if not isinstance(reply, bytes):
        raise RespProtocolError(f"INFO answered {type(reply).__name__}, not a bulk string")
    fields = {}
    for line in reply.decode(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name] = value
    return fields


def used_memory_bytes(server: RedisServer) -> int:
    return int(info(server.host, server.port, "memory")["used_memory"])


def _wait_serving(server: RedisServer, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"redis-server exited with code {process.returncode}: {tail}")
        with contextlib.suppress(OSError, RespProtocolError, RespReplyError):
            if command(server.host, server.port, "PING", timeout_s=1.0) == "PONG":
                return
        time.sleep(POLL_INTERVAL_S)
    raise BenchError(f"redis-server did not answer PING within {START_TIMEOUT_S} s")


@contextlib.contextmanager
def running_redis(workdir: Path, *, durable: bool) -> Iterator[RedisServer]:
    """Start a redis-server in `workdir` (its AOF goes there), yield it, stop it."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RedisMissing("skipped: redis-server not installed (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [executable, "--port", str(port), "--bind", HOST, "--dir", str(workdir)]
    argv += ["--save", "", "--daemonize", "no", "--appendfilename", "bench.aof"]
    if durable:
        argv += ["--appendonly", "yes", "--appendfsync", "always"]
    else:
        argv += ["--appendonly", "no"]
    log = workdir / "redis.log"
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = RedisServer(HOST, port, process.pid, durable)
    try:
        _wait_serving(server, process, log)
        yield server
    finally:
        stop_processes([process], STOP_GRACE_S)


@dataclass(frozen=True, slots=True)
class RedisBenchmarkFigure:
    test: str
    ops_per_s: float
    p50_ms: float
    p99_ms: float


# redis-benchmark's test per bench workload; the others have no redis-benchmark shape.
REDIS_BENCHMARK_TESTS = {"get": "get", "put": "set", "put-memory": "set"}


def run_redis_benchmark(
    server: RedisServer,
    *,
    test: str,
    connections: int,
    pipeline: int,
    keys: int,
    value_bytes: int,
    requests: int,
    timeout_s: float,
) -> RedisBenchmarkFigure:
    """`redis-benchmark` for one test; its keys are `key:%012d`, the same as the bench's."""
    executable = shutil.which("redis-benchmark")
    if executable is None:
        raise RedisMissing("skipped: redis-benchmark not installed")
    argv = [executable, "-h", server.host, "-p", str(server.port), "-c", str(connections)]
    argv += ["-P", str(pipeline), "-n", str(requests), "-r", str(keys), "-d", str(value_bytes)]
    argv += ["-t", test, "--csv"]
    try:
        finished = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"redis-benchmark took longer than {timeout_s:.0f} s") from error
    if finished.returncode != 0:
        raise BenchError(f"redis-benchmark failed: {finished.stderr.strip()[:200]}")
    return parse_redis_benchmark_csv(finished.stdout, test)


def parse_redis_benchmark_csv(text: str, test: str) -> RedisBenchmarkFigure:
    """The row for `test` of redis-benchmark's --csv output (Redis 7 columns)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        if row.get("test", "").lower() == test.lower():
            try:
                return RedisBenchmarkFigure(
                    test=test,
                    ops_per_s=float(row["rps"]),
                    p50_ms=float(row["p50_latency_ms"]),
                    p99_ms=float(row["p99_latency_ms"]),
                )
            except (KeyError, ValueError, TypeError) as error:
                raise BenchError(f"redis-benchmark row {row!r} is malformed") from error
    raise BenchError(f"redis-benchmark printed no {test!r} row: {text.strip()[:200]!r}")
