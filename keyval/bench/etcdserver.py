"""The bench's own etcd: a single-node member on free loopback ports in a temporary data dir.

etcd acknowledges a put once its raft log entry is fsynced (its WAL, batched across
concurrent requests): the same promise as keyval's durable ack. The load generator speaks to
its v3 JSON gateway (POST /v3/kv/put, base64 keys and values), which etcd 3.4 serves on the
client port.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keyval.bench.errors import BenchError
from keyval.bench.redisserver import HOST, free_port
from keyval.processes import stop_processes

START_TIMEOUT_S = 30.0  # a single member elects itself within a few seconds when healthy
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL
POLL_INTERVAL_S = 0.1
HEALTH_TIMEOUT_S = 2.0  # one /health probe while waiting for the start
PUT_PATH = "/v3/kv/put"
RANGE_PATH = "/v3/kv/range"


class EtcdMissing(BenchError):
    """etcd is not installed: the comparison is skipped."""


@dataclass(frozen=True, slots=True)
class EtcdServer:
    host: str
    port: int  # the client port (gRPC and the JSON gateway)
    pid: int


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def put_body(key: str, value: bytes) -> bytes:
    return json.dumps({"key": b64(key), "value": b64(value)}).encode()


def range_body(key: str) -> bytes:
    return json.dumps({"key": b64(key)}).encode()


def _healthy(server: EtcdServer) -> bool:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=HEALTH_TIMEOUT_S)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = response.read(4096)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    if response.status != 200:
        return False
    try:
        return json.loads(body).get("health") == "true"
    except (ValueError, AttributeError):
        return False


def _wait_serving(server: EtcdServer, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"etcd exited with code {process.returncode}: {tail}")
        if _healthy(server):
            return
        time.sleep(POLL_INTERVAL_S)
    raise BenchError(f"etcd was not healthy within {START_TIMEOUT_S:.0f} s (log: {log})")


def etcd_argv(executable: str, workdir: Path, client_port: int, peer_port: int) -> list[str]:
    client = f"http://{HOST}:{client_port}"
    peer = f"http://{HOST}:{peer_port}"
    return [
        executable,
        "--name=bench",
        f"--data-dir={workdir / 'data'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=bench={peer}",
        "--initial-cluster-state=new",
        "--logger=zap",
        "--log-level=warn",
    ]


@contextlib.contextmanager
def running_etcd(workdir: Path) -> Iterator[EtcdServer]:
    """Start etcd with its data in `workdir`, yield it once healthy, stop it."""
    executable = shutil.which("etcd")
    if executable is None:
        raise EtcdMissing("skipped: etcd not installed (install etcd-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    client_port = free_port()
    peer_port = free_port()
    log = workdir / "etcd.log"
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            etcd_argv(executable, workdir, client_port, peer_port),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = EtcdServer(HOST, client_port, process.pid)
    try:
        _wait_serving(server, process, log)
        yield server
    finally:
        stop_processes([process], STOP_GRACE_S)
