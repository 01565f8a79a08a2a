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

import bisect
import contextvars
import time
from collections.abc import Collection, Iterator, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric as MetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        if process:  # CPU, memory, file descriptors of this process (Linux /proc)
            ProcessCollector(registry=self.registry)
        info = Info("keyval_node", "this daemon's node name and role", registry=self.registry)
        info.info({"node": node, "role": role})

        # keyval.net: every request every daemon serves.
        self.requests = RequestMetrics()
        if role in EVERY_ROLE:
            self.registry.register(self.requests)
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
        self.requests.done(op, code, elapsed_s)

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


class RequestMetrics(Collector):
    """keyval_requests_total, keyval_request_errors_total and
    keyval_request_duration_seconds, counted in plain ints and floats and turned into
    Prometheus metric families only when scraped.

    prometheus_client's Counter.inc and Histogram.observe take a lock and check the metric on
    every call (~2.5% of a drone's CPU under gets, several calls per request); a request is
    counted here with one dict lookup, one bisect and three additions. Only the daemon's trio
    thread records requests, so no lock is needed; a scrape (same thread) reads the numbers.
    The page is what the prometheus_client metrics gave: same names, help, labels, buckets
    and `_created` samples.
    """

    _BOUNDS = (*REQUEST_SECONDS_BUCKETS, float("inf"))
    _LE = tuple(floatToGoString(bound) for bound in _BOUNDS)

    def __init__(self) -> None:
        # op -> [seconds sum, per-bucket counts (not cumulative; the last is +Inf)...]
        self._tallies: dict[str, list[float]] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._created: dict[object, float] = {}  # op or (op, code) -> first seen (time.time)

    def done(self, op: str, code: str | None, elapsed_s: float) -> None:
        """Count one request of type `op` answered with error `code` (None: ok)."""
        tally = self._tallies.get(op)
        if tally is None:
            tally = self._tallies[op] = [0.0] * (1 + len(self._BOUNDS))
            self._created[op] = time.time()
        tally[0] += elapsed_s
        tally[1 + bisect.bisect_left(self._BOUNDS, elapsed_s)] += 1  # le: bound >= elapsed
        if code is not None:
            key = (op, code)
            count = self._errors.get(key)
            if count is None:
                self._created[key] = time.time()
                count = 0
            self._errors[key] = count + 1

    def describe(self) -> Iterator[MetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[MetricFamily]:
        requests, errors, seconds = self._families()
        created = getattr(prometheus_metrics, "_use_created", True)
        for op, tally in list(self._tallies.items()):
            labels = {"op": op}
            count = 0.0
            for le, in_bucket in zip(self._LE, tally[1:], strict=True):
                count += in_bucket
                seconds.add_sample(f"{seconds.name}_bucket", {**labels, "le": le}, count)
            seconds.add_sample(f"{seconds.name}_count", labels, count)
            seconds.add_sample(f"{seconds.name}_sum", labels, tally[0])
            requests.add_sample(f"{requests.name}_total", labels, count)
            if created:
                seconds.add_sample(f"{seconds.name}_created", labels, self._created[op])
                requests.add_sample(f"{requests.name}_created", labels, self._created[op])
        for (op, code), value in list(self._errors.items()):
            labels = {"op": op, "code": code}
            errors.add_sample(f"{errors.name}_total", labels, float(value))
            if created:
                errors.add_sample(f"{errors.name}_created", labels, self._created[op, code])
        return iter((requests, errors, seconds))

    @staticmethod
    def _families() -> tuple[MetricFamily, MetricFamily, MetricFamily]:
        return (
            MetricFamily("keyval_requests", "requests served, by message type", "counter"),
            MetricFamily(
                "keyval_request_errors",
                "requests answered with an error, by message type and error code",
                "counter",
            ),
            MetricFamily(
                "keyval_request_duration_seconds",
                "time from a request's arrival to its reply being queued, by message type",
                "histogram",
            ),
        )


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
