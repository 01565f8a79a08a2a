"""RESP2, the Redis protocol, without I/O: commands to bytes, bytes to replies.

Like wire/, this never touches a socket: `encode_command(...) -> bytes`;
`RespParser.receive_data(bytes)` then `next_reply()` -> a reply or NEED_DATA. Only what the
bench needs: simple strings, errors, integers, bulk strings and arrays (no RESP3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from keyval.bench.errors import RespProtocolError

# Redis caps a bulk string at 512 MB (proto-max-bulk-len); the bench's values are at most
# a few KiB, so anything over 64 MiB means the stream is out of step.
MAX_BULK_BYTES = 64 * 1024 * 1024
# The bench reads arrays of at most a few hundred items (MGET, EXEC, SCAN pages).
MAX_ARRAY_ITEMS = 1_000_000
# EXEC returns an array of replies; nothing the bench sends nests deeper than that.
MAX_DEPTH = 8
# A header line (+OK, :123, $5, *2) is short; Redis error messages are under 1 KiB.
MAX_LINE_BYTES = 64 * 1024

CRLF: Final = b"\r\n"


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class RespError:
    """An error reply (`-ERR ...`); returned, not raised: the caller decides."""

    message: str


Reply = str | int | bytes | None | RespError | list["Reply"]
Argument = bytes | str | int


def encode_command(*args: Argument) -> bytes:
    """One command as a RESP array of bulk strings."""
    if not args:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif type(arg) is int:
            data = b"%d" % arg
        else:
            raise TypeError(f"a RESP argument is bytes, str or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespParser:
    """Feed bytes with receive_data; take complete replies with next_reply."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_reply(self) -> Reply | NeedData:
        if self._broken:
            raise RespProtocolError("the stream is broken by an earlier protocol error")
        try:
            parsed = self._parse(0, 0)
        except RespProtocolError:
            self._broken = True
            raise
        if parsed is None:
            return NEED_DATA
        reply, end = parsed
        del self._buffer[:end]
        return reply

    def _line(self, start: int) -> tuple[bytes, int] | None:
        end = self._buffer.find(CRLF, start)
        if end < 0:
            if len(self._buffer) - start > MAX_LINE_BYTES:
                raise RespProtocolError(f"no line end within {MAX_LINE_BYTES} bytes")
            return None
        if end - start > MAX_LINE_BYTES:
            raise RespProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
        return bytes(self._buffer[start:end]), end + 2

    def _parse(self, start: int, depth: int) -> tuple[Reply, int] | None:
        if depth > MAX_DEPTH:
            raise RespProtocolError(f"reply nests deeper than {MAX_DEPTH}")
        found = self._line(start)
        if found is None:
            return None
        line, after = found
        if not line:
            raise RespProtocolError("empty reply line")
        kind, body = line[:1], line[1:]
        if kind == b"+":
            return body.decode(errors="replace"), after
        if kind == b"-":
            return RespError(body.decode(errors="replace")), after
        if kind == b":":
            return _integer(body), after
        if kind == b"$":
            return self._bulk(_length(body, MAX_BULK_BYTES), after)
        if kind == b"*":
            return self._array(_length(body, MAX_ARRAY_ITEMS), after, depth)
        raise RespProtocolError(f"unknown reply type byte {kind!r}")

    def _bulk(self, length: int, start: int) -> tuple[Reply, int] | None:
        if length < 0:
            return None, start
        end = start + length
        if len(self._buffer) < end + 2:
            return None
        if self._buffer[end : end + 2] != CRLF:
            raise RespProtocolError("bulk string not followed by CRLF")
        return bytes(self._buffer[start:end]), end + 2

    def _array(self, count: int, start: int, depth: int) -> tuple[Reply, int] | None:
        if count < 0:
            return None, start
        items: list[Reply] = []
        position = start
        for _ in range(count):
            parsed = self._parse(position, depth + 1)
            if parsed is None:
                return None
            item, position = parsed
            items.append(item)
        return items, position


def _integer(body: bytes) -> int:
    text = body.decode("ascii", errors="replace")
    digits = text[1:] if text.startswith("-") else text
    if not digits.isdigit() or len(digits) > 19:
        raise RespProtocolError(f"not a 64-bit integer: {text!r}")
    return int(text)


def _length(body: bytes, limit: int) -> int:
    length = _integer(body)
    if length < -1:
        raise RespProtocolError(f"negative length {length}")
    if length > limit:
        raise RespProtocolError(f"length {length} over the limit {limit}")
    return length
