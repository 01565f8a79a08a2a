"""A minimal HTTP/1.1 keep-alive client over a trio socket, for etcd's JSON gateway.

One request at a time per connection (a lock orders them); the response is read with bounded
sizes (status line and headers, body) and a deadline. Only what the gateway sends is accepted:
`Content-Length` or `Transfer-Encoding: chunked` bodies, status 200 for success.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from keyval.bench.errors import ConnectionLost, HttpProtocolError, HttpStatusError

# Bounds on what one response may hold: the gateway's put and range replies are a few hundred
# bytes; anything past these is not a reply we asked for.
MAX_HEAD_BYTES = 16 * 1024  # status line and headers
MAX_BODY_BYTES = 4 * 1024 * 1024
RECEIVE_BYTES = 64 * 1024  # one read from the socket
MAX_CHUNK_LINE_BYTES = 1024  # "<hex size>[;extensions]\r\n"


class ResponseReader:
    """Sans-IO: feed bytes, take complete responses (status, body) in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_HEAD_BYTES + MAX_BODY_BYTES + MAX_CHUNK_LINE_BYTES:
            raise HttpProtocolError("response larger than the client accepts")

    def next_response(self) -> tuple[int, bytes] | None:
        """(status, body) of the next complete response, or None while bytes are missing."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise HttpProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
            return None
        if end > MAX_HEAD_BYTES:
            raise HttpProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
        status, headers = _parse_head(bytes(self._buffer[:end]))
        start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parsed = _parse_chunked(self._buffer, start)
            if parsed is None:
                return None
            body, stop = parsed
        else:
            length = _content_length(headers)
            if len(self._buffer) < start + length:
                return None
            body, stop = bytes(self._buffer[start : start + length]), start + length
        del self._buffer[:stop]
        return status, body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as error:
        raise HttpProtocolError("response head is not ASCII") from error
    status_line, *lines = text.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[0] != "HTTP/1.1" or not (len(parts[1]) == 3 and parts[1].isdigit()):
        raise HttpProtocolError(f"bad status line {status_line[:80]!r}")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpProtocolError(f"bad header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return int(parts[1]), headers


def _content_length(headers: dict[str, str]) -> int:
    raw = headers.get("content-length")
    if raw is None:
        raise HttpProtocolError("response has neither Content-Length nor chunked encoding")
    if not raw.isdigit():
        raise HttpProtocolError(f"bad Content-Length {raw[:40]!r}")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise HttpProtocolError(f"body of {length} bytes is over {MAX_BODY_BYTES}")
    return length


def _parse_chunked(buffer: bytearray, position: int) -> tuple[bytes, int] | None:
    """The de-chunked body and the offset past it, or None while incomplete."""
    body = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", position, position + MAX_CHUNK_LINE_BYTES)
        if line_end < 0:
            if len(buffer) - position > MAX_CHUNK_LINE_BYTES:
                raise HttpProtocolError("chunk size line too long")
            return None
        size_text = bytes(buffer[position:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as error:
            raise HttpProtocolError(f"bad chunk size {size_text[:20]!r}") from error
        if size < 0 or len(body) + size > MAX_BODY_BYTES:
            raise HttpProtocolError(f"chunked body over {MAX_BODY_BYTES} bytes")
        start = line_end + 2
        if size == 0:  # last chunk; no trailers are sent by the gateway
            if len(buffer) < start + 2:
                return None
            if buffer[start : start + 2] != b"\r\n":
                raise HttpProtocolError("trailers after the last chunk are not supported")
            return bytes(body), start + 2
        if len(buffer) < start + size + 2:
            return None
        if buffer[start + size : start + size + 2] != b"\r\n":
            raise HttpProtocolError("chunk not followed by CRLF")
        body += buffer[start : start + size]
        position = start + size + 2


def encode_post(host: str, port: int, path: str, body: bytes) -> bytes:
    if not path.startswith("/") or any(c in path for c in " \r\n"):
        raise ValueError(f"bad request path {path!r}")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class HttpConnection:
    """One keep-alive connection; `post` sends a request and returns the 200 response's body."""

    def __init__(self, stream: trio.abc.Stream, host: str, port: int, timeout_s: float) -> None:
        self._stream = stream
        self._host = host
        self._port = port
        self._timeout_s = timeout_s
        self._reader = ResponseReader()
        self._lock = trio.Lock()
        self._broken: str | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        async with self._lock:
            if self._broken is not None:
                raise ConnectionLost(f"http connection failed earlier: {self._broken}")
            try:
                with trio.fail_after(self._timeout_s):
                    status, reply = await self._exchange(
                        encode_post(self._host, self._port, path, body)
                    )
            except (
                trio.TooSlowError,
                OSError,
                trio.BrokenResourceError,
                HttpProtocolError,
            ) as error:
                # a half-read response leaves the stream out of step: never reuse it
                self._broken = f"{type(error).__name__}: {error}"
                raise ConnectionLost(f"http request failed: {self._broken}") from error
        if status != 200:
            raise HttpStatusError(f"HTTP {status}: {reply[:200]!r}")
        return reply

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        await self._stream.send_all(request)
        while (response := self._reader.next_response()) is None:
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ConnectionLost("the server closed the connection")
            self._reader.feed(data)
        return response


@contextlib.asynccontextmanager
async def open_http_connection(
    host: str, port: int, *, timeout_s: float
) -> AsyncIterator[HttpConnection]:
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        yield HttpConnection(stream, host, port, timeout_s)
