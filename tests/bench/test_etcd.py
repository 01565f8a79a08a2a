"""The etcd comparison's and failover mode's parts: the HTTP/1.1 response reader and
connection, the gateway bodies, cross-drone key pairs, failover rows, and (when etcd is
installed) a real single-node etcd."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from keyval.bench.errors import (
    BenchConfigError,
    BenchError,
    ConnectionLost,
    HttpProtocolError,
    HttpStatusError,
    LoadGeneratorError,
)
from keyval.bench.etcdserver import put_body, range_body, running_etcd
from keyval.bench.failover import probe_keys
from keyval.bench.http import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    HttpConnection,
    ResponseReader,
    encode_post,
    open_http_connection,
)
from keyval.bench.options import parse_options
from keyval.bench.pairs import cross_pairs_from_owners, local_pair, plain_cross_pair
from keyval.bench.report import failover_cells, update_markdown
from keyval.bench.runner import etcd_skip_reason
from keyval.bench.sessions import EtcdSession
from keyval.keys import key_slot

OK = b'{"header":{"revision":"2"}}'
FIXED = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK), OK)
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n" + OK[:5]
CHUNKED += b"\r\n%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(OK) - 5, OK[5:])


@pytest.mark.parametrize("raw", [FIXED, CHUNKED])
def test_reader_takes_responses_split_anywhere(raw: bytes) -> None:
    for cut in range(len(raw) + 1):
        reader = ResponseReader()
        reader.feed(raw[:cut])
        got = reader.next_response()
        if got is None:
            reader.feed(raw[cut:])
            got = reader.next_response()
        assert got == (200, OK), cut
        assert reader.next_response() is None


def test_reader_keeps_back_to_back_responses_in_order() -> None:
    reader = ResponseReader()
    reader.feed(FIXED + CHUNKED + FIXED.replace(b"200 OK", b"404 Not Found"))
    assert [reader.next_response() for _ in range(3)] == [(200, OK), (200, OK), (404, OK)]
    assert reader.next_response() is None


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # neither length nor chunked
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 200 \xff\r\nContent-Length: 0\r\n\r\n",
        b"x" * (MAX_HEAD_BYTES + 1),
    ],
)
def test_reader_refuses_bad_responses(raw: bytes) -> None:
    reader = ResponseReader()
    with pytest.raises(HttpProtocolError):
        reader.feed(raw)
        reader.next_response()


def test_request_encoding_and_bad_paths() -> None:
    request = encode_post("127.0.0.1", 2379, "/v3/kv/put", b"{}")
    assert request.startswith(b"POST /v3/kv/put HTTP/1.1\r\nHost: 127.0.0.1:2379\r\n")
    assert request.endswith(b"Content-Length: 2\r\n\r\n{}")
    for path in ("v3/kv/put", "/a b", "/a\r\nX: y"):
        with pytest.raises(ValueError):
            encode_post("h", 1, path, b"")


def test_gateway_bodies_are_base64_json() -> None:
    body = json.loads(put_body("key:1", b"\x00v"))
    assert base64.b64decode(body["key"]) == b"key:1"
    assert base64.b64decode(body["value"]) == b"\x00v"
    assert base64.b64decode(json.loads(range_body("k"))["key"]) == b"k"


async def _fake_gateway(stream: trio.abc.Stream, responses: list[bytes]) -> None:
    """Answers each request (one per Content-Length-framed POST) with the next response."""
    buffer = b""
    for response in responses:
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            buffer += await stream.receive_some(65536)
        buffer = buffer[length:]
        await stream.send_all(response)


async def test_keep_alive_connection_and_status_errors() -> None:
    client, server = trio.testing.memory_stream_pair()
    not_found = FIXED.replace(b"200 OK", b"404 Not Found")
    session = EtcdSession(HttpConnection(client, "h", 1, timeout_s=5))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_gateway, server, [FIXED, CHUNKED, not_found, FIXED])
        await session.put("k", b"v")
        await session.get("k")
        with pytest.raises(HttpStatusError, match="404"):
            await session.put("k", 1)
        await session.put("k", 2)  # a status error leaves the connection usable


async def test_reply_without_header_is_refused() -> None:
    client, server = trio.testing.memory_stream_pair()
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]"
    session = EtcdSession(HttpConnection(client, "h", 1, timeout_s=5))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_gateway, server, [bad])
        with pytest.raises(HttpProtocolError, match="header"):
            await session.put("k", b"v")
    with pytest.raises(BenchError):
        await session.increment_pair("a", "b")
    with pytest.raises(BenchError):
        await session.scan("a", 1)


async def test_closed_connection_fails_and_stays_broken() -> None:
    client, server = trio.testing.memory_stream_pair()
    connection = HttpConnection(client, "h", 1, timeout_s=5)
    await server.aclose()
    with pytest.raises(ConnectionLost):
        await connection.post("/v3/kv/put", b"{}")
    with pytest.raises(ConnectionLost, match="earlier"):
        await connection.post("/v3/kv/put", b"{}")


async def test_silent_server_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client, _server = trio.testing.memory_stream_pair()
    connection = HttpConnection(client, "h", 1, timeout_s=3)
    started = trio.current_time()
    with pytest.raises(ConnectionLost, match="TooSlow"):
        await connection.post("/v3/kv/put", b"{}")
    assert trio.current_time() - started == pytest.approx(3)


def test_cross_pairs_put_the_two_keys_on_two_owners() -> None:
    def owner_of(key: str) -> str:  # three owners, by the key's last digit
        return f"drone-{int(key[-1]) % 3}"

    pairs = cross_pairs_from_owners(owner_of, 50)
    assert len(pairs) == 50
    assert all(owner_of(a) != owner_of(b) for a, b in pairs)
    keys = [key for pair in pairs for key in pair]
    assert len(set(keys)) == len(keys)  # each key in one pair only
    assert cross_pairs_from_owners(owner_of, 50) == pairs  # every process derives the same


def test_cross_pairs_need_two_owners_and_a_served_map() -> None:
    with pytest.raises(LoadGeneratorError, match="2 drones"):
        cross_pairs_from_owners(lambda key: "drone-1", 5)
    with pytest.raises(LoadGeneratorError, match="no owner"):
        cross_pairs_from_owners(lambda key: None, 5)


def test_local_and_plain_pairs() -> None:
    assert local_pair(7) == ("{t7}:a", "{t7}:b")
    first, second = plain_cross_pair(3)
    assert first != second and plain_cross_pair(4)[0] not in (first, second)


def test_etcd_runs_single_key_workloads_at_depth_one() -> None:
    assert etcd_skip_reason(parse_options(["--workload", "put", "--vs", "etcd"])) is None
    assert "txn-cross" in str(etcd_skip_reason(parse_options(["--workload", "txn-cross"])))
    assert "one request" in str(etcd_skip_reason(parse_options(["--pipeline", "4"])))
    assert parse_options(["--workload", "txn-cross"]).workload == "txn-cross"


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd not installed")
async def test_real_etcd_put_and_get(tmp_path: Path) -> None:
    with running_etcd(tmp_path / "etcd") as server:
        async with open_http_connection(server.host, server.port, timeout_s=10) as connection:
            session = EtcdSession(connection)
            await session.put("key:000000000001", b"v" * 32)
            await session.get("key:000000000001")
            reply = json.loads(
                await connection.post("/v3/kv/range", range_body("key:000000000001"))
            )
            assert base64.b64decode(reply["kvs"][0]["value"]) == b"v" * 32
            with pytest.raises(HttpStatusError):
                await connection.post("/v3/kv/put", b"not json")


# ------------------------------------------------------------------ failover rows


def test_failover_rows_are_rendered_and_replaced_by_event(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    drone = {"event": "drone loss", "keys": 10_000, "seconds": 2.5, "client_errors": 0}
    leader = {"event": "leader loss", "keys": None, "seconds": 0.75, "client_errors": 1}
    update_markdown(path, [], [], [drone, leader])
    update_markdown(path, [], [], [{**drone, "seconds": 1.25}])
    text = path.read_text()
    assert "## Failover" in text
    assert "| drone loss | 10,000 | 1.250 | 0 |" in text and "2.500" not in text
    assert "| leader loss | - | 0.750 | 1 |" in text
    assert failover_cells({"event": "x"})[:3] == ["x", "-", "-"]


@pytest.mark.parametrize("extra", [["--attach", "."], ["--memory-keys", "10"]])
def test_failover_mode_refuses_other_modes(extra: list[str]) -> None:
    with pytest.raises(BenchConfigError, match="--failover"):
        parse_options(["--failover", *extra])


def test_probe_keys_cover_each_slot_once() -> None:
    probes = probe_keys({0, 5, 16383})
    assert sorted(key_slot(key) for key in probes) == [0, 5, 16383]
