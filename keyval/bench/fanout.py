"""Start load-generator processes, open the same measured window in all of them, merge results.

Processes are started with multiprocessing's "spawn" method (a fresh interpreter: nothing of
the parent's state or threads leaks in) and spoken to in JSON over pipes.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from keyval.bench.errors import LoadGeneratorError
from keyval.bench.histogram import Histogram
from keyval.bench.loadgen import WorkerSpec, preload_timeout_s, worker_main

START_MARGIN_S = 0.2  # from "go" to the warm-up's start: every process has read its order
STARTUP_TIMEOUT_S = 60.0  # interpreter start-up and connecting, before the preload
RESULT_GRACE_S = 30.0  # after the window closes: cancel in-flight work, report
JOIN_TIMEOUT_S = 10.0  # then terminate


@dataclass
class LoadResult:
    histogram: Histogram
    errors: dict[str, int]
    seconds: float
    loadgen_cpu_s: float
    preloaded: int
    extra: dict[str, Any] = field(default_factory=dict)  # what the window hook measured

    @property
    def ops(self) -> int:
        return self.histogram.count

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def share(total: int, parts: int, index: int) -> tuple[int, int]:
    """[first, stop) of part `index` when `total` items are split as evenly as can be."""
    base, extra = divmod(total, parts)
    first = index * base + min(index, extra)
    return first, first + base + (1 if index < extra else 0)


def _receive(pipe: Connection, process: BaseProcess, deadline: float) -> dict[str, Any]:
    while not pipe.poll(0.1):
        if time.monotonic() > deadline:
            raise LoadGeneratorError("a load generator did not report in time")
        if not process.is_alive() and not pipe.poll(0):
            raise LoadGeneratorError(f"a load generator exited with code {process.exitcode}")
    try:
        message = json.loads(pipe.recv_bytes())
    except (EOFError, ValueError) as error:
        raise LoadGeneratorError(f"a load generator sent no valid report: {error}") from error
    if not isinstance(message, dict):
        raise LoadGeneratorError(f"a load generator sent {message!r}")
    if message.get("kind") == "error":
        raise LoadGeneratorError(f"a load generator failed: {message.get('error')}")
    return message


# Called with "start" / "end" at the window's edges, e.g. to snapshot servers' CPU;
# whatever it returns on "end" lands in LoadResult.extra.
WindowHook = Callable[[str], dict[str, Any]]


def run_load(
    specs: list[WorkerSpec],
    *,
    warmup_s: float,
    seconds: float,
    on_window: WindowHook | None = None,
    after_ready: Callable[[], None] | None = None,
) -> LoadResult:
    """Run the processes; seconds == 0 means preload only (then `after_ready` runs)."""
    if not specs:
        raise ValueError("no load-generator specs")
    context = multiprocessing.get_context("spawn")
    running: list[tuple[BaseProcess, Connection]] = []
    try:
        for spec in specs:
            parent_end, child_end = context.Pipe()
            child: BaseProcess = context.Process(
                target=worker_main, args=(spec.to_json(), child_end), daemon=True
            )
            child.start()
            child_end.close()
            running.append((child, parent_end))
        largest = max(spec.preload_stop - spec.preload_first for spec in specs)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S + preload_timeout_s(largest)
        preloaded = 0
        for process, pipe in running:
            ready = _receive(pipe, process, deadline)
            preloaded += int(ready.get("preloaded", 0))
        if seconds <= 0:
            if after_ready is not None:
                after_ready()
            for _, pipe in running:
                pipe.send_bytes(json.dumps({"kind": "stop"}).encode())
            return LoadResult(Histogram(), {}, 0.0, 0.0, preloaded)
        return _measure(running, warmup_s, seconds, on_window, preloaded)
    finally:
        for process, pipe in running:
            process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(JOIN_TIMEOUT_S)
            pipe.close()


def _measure(
    running: list[tuple[BaseProcess, Connection]],
    warmup_s: float,
    seconds: float,
    on_window: WindowHook | None,
    preloaded: int,
) -> LoadResult:
    first_ns = time.monotonic_ns() + int((START_MARGIN_S + warmup_s) * 1e9)
    last_ns = first_ns + int(seconds * 1e9)
    order = json.dumps({"kind": "go", "window_ns": [first_ns, last_ns]}).encode()
    for _, pipe in running:
        pipe.send_bytes(order)
    extra: dict[str, Any] = {}
    time.sleep(max(0, first_ns - time.monotonic_ns()) / 1e9)
    if on_window is not None:
        on_window("start")
    time.sleep(max(0, last_ns - time.monotonic_ns()) / 1e9)
    if on_window is not None:
        extra = on_window("end")
    deadline = time.monotonic() + RESULT_GRACE_S
    merged = Histogram()
    errors: dict[str, int] = {}
    loadgen_cpu_s = 0.0
    for process, pipe in running:
        report = _receive(pipe, process, deadline)
        if report.get("kind") != "result":
            raise LoadGeneratorError(f"expected a result, got {report.get('kind')!r}")
        merged.merge(Histogram.from_json(report.get("histogram")))
        for name, count in dict(report.get("errors", {})).items():
            errors[str(name)] = errors.get(str(name), 0) + int(count)
        loadgen_cpu_s += float(report.get("loadgen_cpu_s", 0.0))
    return LoadResult(merged, errors, seconds, loadgen_cpu_s, preloaded, extra)


def worker_specs(
    *,
    target: str,
    workload: str,
    connections: int,
    pipeline: int,
    processes: int,
    keys: int,
    value_bytes: int,
    preload: bool,
    config: str = "",
    host: str = "",
    port: int = 0,
    autobatch: bool = True,
) -> list[WorkerSpec]:
    """Connections and preloaded keys split evenly over the processes."""
    specs = []
    for index in range(processes):
        first_connection, stop_connection = share(connections, processes, index)
        first_key, stop_key = share(keys, processes, index) if preload else (0, 0)
        specs.append(
            WorkerSpec(
                index=index,
                target=target,
                workload=workload,
                connections=stop_connection - first_connection,
                pipeline=pipeline,
                keys=keys,
                value_bytes=value_bytes,
                preload_first=first_key,
                preload_stop=stop_key,
                seed=index + 1,
                config=config,
                host=host,
                port=port,
                autobatch=autobatch,
            )
        )
    return specs
