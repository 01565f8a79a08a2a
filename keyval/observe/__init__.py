"""Observability for every daemon: structured logs and Prometheus metrics.

- `setup_logging(node, level, json=...)`: one line per event (text or JSON) with node and
  request/stimulus ids (keyval.observe.logs).
- `await start_node(nursery, name, role, metrics_address)`: called once at the top of a
  daemon's trio main; names the node for logs, makes its `NodeMetrics` current for every
  task the daemon starts, and serves them on `--metrics HOST:PORT` if given.
- `current_metrics()`: where instrumented code records (keyval.observe.metrics).
"""

from __future__ import annotations

import trio

from keyval.observe.context import bind_node, stimulus
from keyval.observe.http import serve_metrics
from keyval.observe.logs import parse_level, setup_logging
from keyval.observe.metrics import NodeMetrics, bind_metrics, current_metrics


async def start_node(
    nursery: trio.Nursery, name: str, role: str, metrics_address: str | None = None
) -> NodeMetrics:
    """Bind `name`/`role` and a fresh NodeMetrics to the calling task (so to every task it
    starts afterwards) and, with `metrics_address`, serve them over HTTP in `nursery`.
    Returns the metrics so the daemon can attach its gauges."""
    bind_node(name, role)
    metrics = NodeMetrics(name, role)
    bind_metrics(metrics)
    if metrics_address:
        await nursery.start(serve_metrics, metrics_address, metrics.registry)
    return metrics


__all__ = [
    "NodeMetrics",
    "bind_metrics",
    "bind_node",
    "current_metrics",
    "parse_level",
    "serve_metrics",
    "setup_logging",
    "start_node",
    "stimulus",
]
