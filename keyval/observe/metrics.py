"""Each node's Prometheus metrics, in a registry of its own.

A registry per node (not prometheus_client's global one) so that several daemons in one
process (tests, the simulation) keep separate numbers, and each `--metrics` endpoint shows
exactly its own node. The current node's metrics are found through a context variable that
the daemon sets once (`bind_metrics`); code anywhere in the daemon then records with
`current_metrics().<metric>...`. Outside any daemon the records go to a throw-away set.

Metrics of another role are built but not registered, so they cost nothing and a drone's
page shows no empty group-commit histograms.
"""

from __future__ import annotations

import contextvars
from collections.abc import Collection, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase

# Request latencies: in-memory reads answer in tens of microseconds, durable writes wait a
# group commit (milliseconds), long polls and reseeds take seconds.
REQUEST_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Group commit sizes in ops: powers of two up to keyval.dbserver.MAX_BATCH_OPS (16384).
BATCH_OPS_BUCKETS = tuple(float(2**power) for power in range(15))

# A group commit is one SQLite/PostgreSQL transaction with an fsync: 0.1 ms .. seconds.
COMMIT_SECONDS_BUCKETS = REQUEST_SECONDS_BUCKETS[:-1]

EVERY_ROLE = ("auth", "db", "commander", "drone")

Metric = TypeVar("Metric", bound=MetricWrapperBase)


class NodeMetrics:
    """Every metric a keyval daemon exposes; see docs/operations.md for what each means."""

    def __init__(self, node: str, role: str, *, process: bool = True) -> None:
        self.node = node
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self.address: str | None = None  # where the HTTP endpoint is bound, if served
        # op -> (requests child, request_seconds child); message types are a fixed set
        self._request_children: dict[str, tuple[Counter, Histogram]] = {}
        if process:  # CPU, memory, file descriptors of this process (Linux /proc)
            ProcessCollector(registry=self.registry)
        info = Info("keyval_node", "this daemon's node name and role", registry=self.registry)
        info.info({"node": node, "role": role})

        # keyval.net: every request every daemon serves.
        self.requests = self._counter(
            "keyval_requests", "requests served, by message type", EVERY_ROLE, ["op"]
        )
        self.request_errors = self._counter(
            "keyval_request_errors",
            "requests answered with an error, by message type and error code",
            EVERY_ROLE,
            ["op", "code"],
        )
        self.request_seconds = self._histogram(
            "keyval_request_duration_seconds",
            "time from a request's arrival to its reply being queued, by message type",
            EVERY_ROLE,
            REQUEST_SECONDS_BUCKETS,
            ["op"],
        )
        self.connections_open = self._gauge(
            "keyval_connections_open", "authenticated connections being served", EVERY_ROLE
        )

        # The db's group committer.
        self.commit_batch_ops = self._histogram(
            "keyval_commit_batch_ops",
            "ops per group commit (one durable transaction)",
            ("db",),
            BATCH_OPS_BUCKETS,
        )
        self.commit_seconds = self._histogram(
            "keyval_commit_duration_seconds",
            "time one group commit's transaction took",
            ("db",),
            COMMIT_SECONDS_BUCKETS,
        )
        self.commit_failures = self._counter(
            "keyval_commit_failures", "group commits that failed (with all their ops)", ("db",)
        )

        # The drone.
        drone = ("drone",)
        self.slots_owned = self._gauge("keyval_slots_owned", "slots this drone holds", drone)
        self.keys = self._gauge("keyval_keys", "keys held in memory", drone)
        self.reseeds_in_progress = self._gauge(
            "keyval_reseeds_in_progress", "slots being loaded from the db now", drone
        )
        self.reseeds = self._counter(
            "keyval_reseeds", "slots loaded from the db and installed", drone
        )
        self.reseed_keys = self._counter(
            "keyval_reseed_keys", "keys loaded from the db by reseeds", drone
        )
        self.reseed_failures = self._counter(
            "keyval_reseed_failures", "slot reads from the db that failed (and are retried)", drone
        )
        self.lease_renewals = self._counter(
            "keyval_lease_renewals", "heartbeats answered with a grant (lease renewed)", drone
        )
        self.lease_renewal_failures = self._counter(
            "keyval_lease_renewal_failures", "heartbeats that failed or timed out", drone
        )

        # The commander.
        commander = ("commander",)
        self.drones_live = self._gauge(
            "keyval_drones_live", "drones registered and not declared failed", commander
        )
        self.map_version = self._gauge(
            "keyval_map_version", "version of the slot map saved in the db", commander
        )
        self.commander_term = self._gauge(
            "keyval_commander_term", "this commander's term, registered in the db", commander
        )
        self.drone_failures = self._counter(
            "keyval_drone_failures_declared",
            "drones declared failed because their lease expired",
            commander,
        )
        self.elections_won = self._counter(
            "keyval_elections_won", "terms this commander won by the drones' vote", commander
        )
        self.step_downs = self._counter(
            "keyval_leader_step_downs",
            "terms this commander left (lease on a majority lapsed, or fenced by the db)",
            commander,
        )

    def request_done(self, op: str, code: str | None, elapsed_s: float) -> None:
        """Count one served request of type `op`, answered with error `code` (None: ok)."""
        children = self._request_children.get(op)
        if children is None:  # labels() hashes and locks on every call: once per op type
            children = (self.requests.labels(op), self.request_seconds.labels(op))
            self._request_children[op] = children
        children[0].inc()
        children[1].observe(elapsed_s)
        if code is not None:
            self.request_errors.labels(op, code).inc()

    # Metrics are built with registry=None (never prometheus_client's global registry) and
    # registered here only for the roles that record them.

    def _register(self, metric: Metric, roles: Collection[str]) -> Metric:
        if self.role in roles:
            self.registry.register(metric)
        return metric

    def _counter(
        self, name: str, documentation: str, roles: Collection[str], labels: Sequence[str] = ()
    ) -> Counter:
        return self._register(Counter(name, documentation, labels, registry=None), roles)

    def _gauge(self, name: str, documentation: str, roles: Collection[str]) -> Gauge:
        return self._register(Gauge(name, documentation, registry=None), roles)

    def _histogram(
        self,
        name: str,
        documentation: str,
        roles: Collection[str],
        buckets: Sequence[float],
        labels: Sequence[str] = (),
    ) -> Histogram:
        metric = Histogram(name, documentation, labels, buckets=buckets, registry=None)
        return self._register(metric, roles)


_UNBOUND: NodeMetrics | None = None

CURRENT: contextvars.ContextVar[NodeMetrics | None] = contextvars.ContextVar(
    "keyval_metrics", default=None
)


def bind_metrics(metrics: NodeMetrics) -> None:
    """Make `metrics` the current task's (and its future children's) metrics."""
    CURRENT.set(metrics)


def current_metrics() -> NodeMetrics:
    """The metrics of the daemon this task belongs to (a throw-away set outside daemons)."""
    metrics = CURRENT.get()
    if metrics is not None:
        return metrics
    global _UNBOUND
    if _UNBOUND is None:
        _UNBOUND = NodeMetrics("-", "", process=False)
    return _UNBOUND
