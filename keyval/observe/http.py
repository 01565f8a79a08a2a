"""A small trio HTTP/1.0 server for the Prometheus exposition (`--metrics HOST:PORT`).

Why not prometheus_client's `start_http_server`: it runs a `ThreadingHTTPServer`, one thread
per connection with no limit and no read deadline, in a daemon thread that outlives the
daemon's nursery (in-process tests could not stop it). This server lives in the daemon's
nursery, stops with it, and bounds what a scraper can claim: few connections, a small
request head, a deadline for the whole exchange. It answers `GET /metrics` (and `/`) only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from keyval.nodeconfig import split_address

logger = logging.getLogger("keyval.observe")

# Scrapers are one or two Prometheus servers; more open connections than this are refused
# rather than queued (each costs a task and a descriptor).
MAX_METRICS_CONNECTIONS = 16

# A GET with its headers is a few hundred bytes; browsers send ~1 KiB. Longer is not a scrape.
MAX_REQUEST_HEAD_BYTES = 8 * 1024

# Reading the request and writing the page; a peer slower than this holds a slot for nothing.
METRICS_EXCHANGE_TIMEOUT_S = 10.0

METRICS_PATHS = frozenset({"/metrics", "/"})


class HttpRequestError(Exception):
    """A request this server does not answer with the metrics; carries the HTTP status."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def parse_request_head(head: bytes) -> str:
    """The path of a `GET` or `HEAD` request head; raises HttpRequestError otherwise."""
    request_line = head.split(b"\r\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        raise HttpRequestError("400 Bad Request")
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        raise HttpRequestError("405 Method Not Allowed")
    try:
        path = target.decode("ascii").split("?", 1)[0]
    except UnicodeDecodeError:
        raise HttpRequestError("400 Bad Request") from None
    if path not in METRICS_PATHS:
        raise HttpRequestError("404 Not Found")
    return method.decode("ascii")


def response(status: str, content_type: str, body: bytes, *, include_body: bool = True) -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body if include_body else head


async def read_request_head(stream: trio.abc.Stream) -> bytes:
    """Bytes up to the blank line ending the head; raises HttpRequestError past the limit."""
    received = b""
    while b"\r\n\r\n" not in received:
        if len(received) > MAX_REQUEST_HEAD_BYTES:
            raise HttpRequestError("431 Request Header Fields Too Large")
        chunk = await stream.receive_some(MAX_REQUEST_HEAD_BYTES)
        if not chunk:
            raise HttpRequestError("400 Bad Request")
        received += chunk
    return received


async def answer(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
    """Serve one exchange on `stream`."""
    try:
        method = parse_request_head(await read_request_head(stream))
    except HttpRequestError as error:
        body = f"{error.status}\n".encode("ascii")
        await stream.send_all(response(error.status, "text/plain; charset=utf-8", body))
        return
    page = generate_latest(registry)
    await stream.send_all(
        response("200 OK", CONTENT_TYPE_LATEST, page, include_body=method == "GET")
    )


def _handler(registry: CollectorRegistry) -> Callable[[trio.SocketStream], Any]:
    limiter = trio.CapacityLimiter(MAX_METRICS_CONNECTIONS)

    async def on_connection(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            with trio.move_on_after(METRICS_EXCHANGE_TIMEOUT_S):
                await answer(stream, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            logger.debug("metrics scrape failed: %s", error)
        finally:
            limiter.release()
            await stream.aclose()

    return on_connection


async def serve_metrics(
    address: str,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` over HTTP on `host:port` (port 0 picks one) until cancelled;
    `task_status.started` receives the bound `host:port`. Raises ConfigError for a bad
    address, OSError when it cannot listen."""
    host, port = split_address(address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    bound = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _handler(registry), listeners)
        logger.info("metrics on http://%s/metrics", bound)
        task_status.started(bound)


__all__ = ["MAX_METRICS_CONNECTIONS", "HttpRequestError", "serve_metrics"]
