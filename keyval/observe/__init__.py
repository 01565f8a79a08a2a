"""Observability for every daemon: structured logs and Prometheus metrics.

- `setup_logging(node, level, json=...)`: one line per event (text or JSON) with node and
  request/stimulus ids (keyval.observe.logs).
- `await start_node(nursery, name, role, metrics_address)`: called once at the top of a
  daemon's trio main; names the node for logs, makes its `NodeMetrics` current for every
  task the daemon starts, and serves them on `--metrics HOST:PORT` if given.
- `current_metrics()`: where instrumented code records (keyval.observe.metrics).
"""

from __future__ import annotations

import weakref

import trio

from keyval.observe.context import bind_node, stimulus
from keyval.observe.http import serve_metrics
from keyval.observe.logs import parse_level, remove_logging, setup_logging
from keyval.observe.metrics import NodeMetrics, bind_metrics, current_metrics

# The running nodes of this process by name, so in-process tests (and tools) can find a
# daemon's metrics and the address its endpoint bound (`--metrics 127.0.0.1:0`).
_NODES: weakref.WeakValueDictionary[str, NodeMetrics] = weakref.WeakValueDictionary()


def node_metrics(name: str) -> NodeMetrics | None:
    """The metrics of the node called `name` that started last in this process, if any."""
    return _NODES.get(name)


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
        metrics.address = await nursery.start(serve_metrics, metrics_address, metrics.registry)
    _NODES[name] = metrics
    return metrics


__all__ = [
    "NodeMetrics",
    "bind_metrics",
    "bind_node",
    "current_metrics",
    "node_metrics",
    "parse_level",
    "remove_logging",
    "serve_metrics",
    "setup_logging",
    "start_node",
    "stimulus",
]
