"""Fetch and parse a Prometheus page over real HTTP."""

from __future__ import annotations

import trio
from prometheus_client.parser import text_string_to_metric_families

from keyval.nodeconfig import split_address

WAIT_S = 10.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


async def http_exchange(address: str, request: bytes) -> tuple[str, bytes]:
    """Send `request` raw; return (status line, body) of the answer."""
    host, port = split_address(address)
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(request)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
                if len(received) > MAX_RESPONSE_BYTES:
                    raise AssertionError("response too large")
    head, _, body = received.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode("ascii"), body


async def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on http://address/metrics as {(name, sorted labels): value}."""
    status, body = await http_exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.0 200 OK", status
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
