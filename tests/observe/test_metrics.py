"""The db daemon's --metrics endpoint over real HTTP: request counts, errors by code, group
commits; and the HTTP server's answers to requests that are not a scrape."""

from __future__ import annotations

import pytest
import trio

from keyval.grants import Grant, sign_grant
from keyval.keys import canonical_key, key_slot
from keyval.messages import (
    DbBatchResult,
    DbGrantKey,
    DbGrantKeyReply,
    DbRegisterTerm,
    DbWriteBatch,
    pack_op,
)
from keyval.observe import NodeMetrics, serve_metrics
from keyval.observe.http import MAX_REQUEST_HEAD_BYTES
from tests.observe.conftest import DB_NAME, WAIT_S, Cluster
from tests.observe.scrape import http_exchange, scrape
from wire import codec
from wire.errors import Unauthorized


def op(name: str) -> tuple[tuple[str, str], ...]:
    return (("op", name),)


async def test_requests_and_errors_are_counted_by_op_and_code(cluster: Cluster) -> None:
    before = await scrape(cluster.metrics_address)
    assert before[("keyval_node_info", (("node", DB_NAME), ("role", "db")))] == 1.0
    assert ("keyval_requests_total", op("db.register_term")) not in before

    with trio.fail_after(WAIT_S):
        async with await cluster.connect("commander-1") as commander:
            await commander.request(DbRegisterTerm("commander-1", 1))
            reply = await commander.request(DbGrantKey())
            assert isinstance(reply, DbGrantKeyReply)
        async with await cluster.connect("drone-1") as drone:
            with pytest.raises(Unauthorized):
                await drone.request(DbGrantKey())  # only commanders get the grant key
            grant = sign_grant(Grant("drone-1", 1, ((0, 16383, 1),), 0), reply.key)
            write = (key_slot("k"), canonical_key("k"), 1, codec.encode("v"))
            result = await drone.request(DbWriteBatch.of([grant], [pack_op(b"o" * 16, [write])]))
            assert result == DbBatchResult([("ok", [1])])

    after = await scrape(cluster.metrics_address)
    assert after[("keyval_requests_total", op("db.register_term"))] == 1.0
    assert after[("keyval_requests_total", op("db.grant_key"))] == 2.0
    assert after[("keyval_requests_total", op("db.write_batch"))] == 1.0
    errors = ("keyval_request_errors_total", (("code", "UNAUTHORIZED"), ("op", "db.grant_key")))
    assert after[errors] == 1.0
    assert (
        "keyval_request_errors_total",
        (("code", "UNAUTHORIZED"), ("op", "db.write_batch")),
    ) not in after
    assert after[("keyval_request_duration_seconds_count", op("db.write_batch"))] == 1.0
    assert after[("keyval_commit_batch_ops_count", ())] >= 1.0
    assert after[("keyval_commit_batch_ops_sum", ())] >= 1.0
    assert after[("keyval_commit_duration_seconds_count", ())] >= 1.0
    assert after[("keyval_connections_open", ())] == 0.0
    # a db shows no drone or commander metrics
    assert not any(name.startswith(("keyval_slots", "keyval_drones")) for name, _ in after)


async def test_head_answers_without_a_body(cluster: Cluster) -> None:
    status, body = await http_exchange(cluster.metrics_address, b"HEAD / HTTP/1.0\r\n\r\n")
    assert status == "HTTP/1.0 200 OK"
    assert body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.0 405 Method Not Allowed"),
        (b"GET /secrets HTTP/1.1\r\n\r\n", "HTTP/1.0 404 Not Found"),
        (b"GET /metrics\r\n\r\n", "HTTP/1.0 400 Bad Request"),
        (b"\xff\xfe nonsense\r\n\r\n", "HTTP/1.0 400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\n", "HTTP/1.0 400 Bad Request"),  # EOF before the blank line
        (
            b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 10),
            "HTTP/1.0 431 Request Header Fields Too Large",
        ),
    ],
)
async def test_requests_other_than_a_scrape_get_an_http_error(
    request_bytes: bytes, status: str
) -> None:
    metrics = NodeMetrics("n", "drone", process=False)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_metrics, "127.0.0.1:0", metrics.registry)
        if request_bytes.endswith(b"HTTP/1.1\r\n"):
            got = await _half_close_exchange(address, request_bytes)
        else:
            got, _ = await http_exchange(address, request_bytes)
        assert got == status
        # and the server still serves scrapes
        samples = await scrape(address)
        assert samples[("keyval_node_info", (("node", "n"), ("role", "drone")))] == 1.0
        nursery.cancel_scope.cancel()


async def _half_close_exchange(address: str, request_bytes: bytes) -> str:
    host, _, port = address.rpartition(":")
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request_bytes)
            await stream.send_eof()
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received.split(b"\r\n", 1)[0].decode("ascii")


async def test_bad_metrics_address_is_a_config_error() -> None:
    from keyval.nodeconfig import ConfigError

    with pytest.raises(ConfigError):
        await serve_metrics("no-port", NodeMetrics("n", "db", process=False).registry)


def test_metrics_of_a_role_are_registered_only_for_it() -> None:
    drone = NodeMetrics("d", "drone", process=False)
    drone.slots_owned.set(7)
    drone.commit_batch_ops.observe(3)  # recorded on an unregistered metric: not shown
    names = {metric.name for metric in drone.registry.collect()}
    assert "keyval_slots_owned" in names
    assert "keyval_lease_renewals" in names
    assert "keyval_commit_batch_ops" not in names
    assert "keyval_drones_live" not in names
    assert "keyval_requests" in names


def test_commander_counts_elections_won_and_step_downs() -> None:
    from prometheus_client import generate_latest

    from keyval.observe.metrics import NodeMetrics

    metrics = NodeMetrics("commander-1", "commander", process=False)
    metrics.elections_won.inc()
    metrics.step_downs.inc()
    metrics.step_downs.inc()
    text = generate_latest(metrics.registry).decode()
    assert "keyval_elections_won_total 1.0" in text
    assert "keyval_leader_step_downs_total 2.0" in text
