"""RequestMetrics counts requests in plain numbers; its page must read exactly as the
prometheus_client Counter and Histogram it replaced would have read for the same requests."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from keyval.observe.metrics import REQUEST_SECONDS_BUCKETS, NodeMetrics, RequestMetrics

Request = tuple[str, str | None, float]

# Every bound itself, either side of it, zero and far past the last bucket.
ELAPSED = st.one_of(
    st.sampled_from([0.0, *REQUEST_SECONDS_BUCKETS, 1e9]),
    st.floats(min_value=0.0, max_value=60.0, allow_nan=False),
    st.sampled_from(REQUEST_SECONDS_BUCKETS).map(lambda bound: bound * (1 + 1e-12)),
)
REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["kv.get", "kv.put", "db.grant_key"]),
        st.sampled_from([None, None, "NOT_FOUND", "UNAUTHORIZED"]),
        ELAPSED,
    ),
    max_size=40,
)


def _page(registry: CollectorRegistry) -> str:
    """The exposition text with every `_created` timestamp blanked (they are clock reads)."""
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", generate_latest(registry).decode())


def _prometheus_client_page(requests: list[Request]) -> str:
    registry = CollectorRegistry()
    total = Counter("keyval_requests", "requests served, by message type", ["op"], registry=None)
    errors = Counter(
        "keyval_request_errors",
        "requests answered with an error, by message type and error code",
        ["op", "code"],
        registry=None,
    )
    seconds = Histogram(
        "keyval_request_duration_seconds",
        "time from a request's arrival to its reply being queued, by message type",
        ["op"],
        buckets=REQUEST_SECONDS_BUCKETS,
        registry=None,
    )
    for metric in (total, errors, seconds):
        registry.register(metric)
    for op, code, elapsed_s in requests:
        total.labels(op).inc()
        seconds.labels(op).observe(elapsed_s)
        if code is not None:
            errors.labels(op, code).inc()
    return _page(registry)


@given(REQUESTS)
def test_the_page_matches_prometheus_client_counters_and_histogram(
    requests: list[Request],
) -> None:
    registry = CollectorRegistry()
    tally = RequestMetrics()
    registry.register(tally)
    for op, code, elapsed_s in requests:
        tally.done(op, code, elapsed_s)
    assert _page(registry) == _prometheus_client_page(requests)


def test_request_done_records_into_the_nodes_registry_with_created_times() -> None:
    metrics = NodeMetrics("n", "drone", process=False)
    metrics.request_done("kv.get", None, 0.0003)
    metrics.request_done("kv.get", "NOT_FOUND", 0.5)
    page = generate_latest(metrics.registry).decode()
    assert 'keyval_requests_total{op="kv.get"} 2.0' in page
    assert 'keyval_request_errors_total{code="NOT_FOUND",op="kv.get"} 1.0' in page
    assert 'keyval_request_duration_seconds_bucket{le="0.00025",op="kv.get"} 0.0' in page
    assert 'keyval_request_duration_seconds_bucket{le="0.0005",op="kv.get"} 1.0' in page
    assert 'keyval_request_duration_seconds_sum{op="kv.get"} 0.5003' in page
    assert re.search(r'keyval_requests_created\{op="kv.get"\} 1\.\d+e\+09', page)
    unbound = NodeMetrics("-", "", process=False)  # no role: counted, not shown
    unbound.request_done("kv.get", None, 0.1)
    assert "keyval_requests" not in generate_latest(unbound.registry).decode()
