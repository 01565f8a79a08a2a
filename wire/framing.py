"""Length-prefixed frames, sans-I/O.

A frame is a 4-byte big-endian unsigned length followed by that many payload bytes. The
decoder checks the length against its maximum as soon as the 4 prefix bytes are in, before it
buffers (or allocates) anything for the payload, so a hostile prefix costs us nothing.
"""

from __future__ import annotations

import struct

from wire.errors import FrameTooLarge, IntegrityError, LocalProtocolError, WireError
from wire.limits import FRAME_HEADER_BYTES, MAX_FRAME_BYTES

_HEADER = struct.Struct(">I")
_LARGEST_ENCODABLE = 2**32 - 1  # what a 4-byte unsigned prefix can say

# Consumed bytes are dropped from the front of the buffer only once they are this many and at
# least half of it, so draining many small frames from one big read stays linear.
_COMPACT_AFTER_BYTES = 64 * 1024


def _check_max(max_frame_bytes: int) -> int:
    if type(max_frame_bytes) is not int or not 0 < max_frame_bytes <= _LARGEST_ENCODABLE:
        raise LocalProtocolError(
            f"max_frame_bytes must be an int in 1..{_LARGEST_ENCODABLE}, got {max_frame_bytes!r}"
        )
    return max_frame_bytes


def frame_header(payload_bytes: int) -> bytes:
    """The 4-byte prefix of a frame whose payload is `payload_bytes` long."""
    return _HEADER.pack(payload_bytes)


def encode_frame(payload: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame holding `payload`. A payload over the limit is our caller's mistake."""
    _check_max(max_frame_bytes)
    if len(payload) > max_frame_bytes:
        raise LocalProtocolError(
            f"frame payload of {len(payload)} bytes is over the {max_frame_bytes}-byte limit",
            detail={"frame_bytes": len(payload), "max_frame_bytes": max_frame_bytes},
        )
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads.

    Feed bytes with `receive_data` (`b""` means the peer closed), then call `next_frame` until
    it returns `None` (it needs more bytes). After an error the decoder stays broken and raises
    the same error again.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = _check_max(max_frame_bytes)
        self._buffer = bytearray()
        self._start = 0  # bytes of _buffer already handed out
        self._eof = False
        self._error: WireError | None = None

    @property
    def eof(self) -> bool:
        """True once the peer closed and every complete frame has been taken."""
        return self._eof and self._start == len(self._buffer)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return len(self._buffer) - self._start

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._error is not None:
            raise self._error
        if self._eof:
            raise LocalProtocolError("receive_data called after EOF")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete payload, or `None` when more bytes are needed."""
        if self._error is not None:
            raise self._error
        available = len(self._buffer) - self._start
        if available >= FRAME_HEADER_BYTES:
            (length,) = _HEADER.unpack_from(self._buffer, self._start)
            if length > self.max_frame_bytes:
                self._fail(
                    FrameTooLarge(
                        f"frame of {length} bytes announced; the limit is {self.max_frame_bytes}",
                        detail={"frame_bytes": length, "max_frame_bytes": self.max_frame_bytes},
                    )
                )
            end = self._start + FRAME_HEADER_BYTES + length
            if end <= len(self._buffer):
                payload = bytes(self._buffer[self._start + FRAME_HEADER_BYTES : end])
                self._start = end
                self._compact()
                return payload
        if self._eof and available:
            self._fail(
                IntegrityError(
                    f"connection closed in the middle of a frame ({available} bytes pending)",
                    detail={"pending_bytes": available},
                )
            )
        return None

    def _compact(self) -> None:
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start >= _COMPACT_AFTER_BYTES and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0

    def _fail(self, error: WireError) -> None:
        self._error = error
        self._buffer.clear()
        self._start = 0
        raise error
