"""Admission checks the client makes before sending, so a bad input fails fast and typed."""

from __future__ import annotations

from typing import Any

from keyval.keys import DEFAULT_MAX_VALUE_BYTES, check_key
from keyval.messages import ACK_MODES
from wire import codec
from wire.errors import BadRequest, LocalProtocolError, TooLarge


def admit_key(key: Any) -> bytes:
    """The canonical form of `key`; BadRequest (wrong type) or TooLarge (over 1 KiB)."""
    return check_key(key)


# Most bytes a CBOR byte string's head takes (major type and a 64-bit length).
CBOR_BYTES_HEAD_MAX = 9


def admit_value(value: Any) -> None:
    """BadRequest for a value the codec refuses, TooLarge over the value limit."""
    if type(value) is bytes and len(value) + CBOR_BYTES_HEAD_MAX <= DEFAULT_MAX_VALUE_BYTES:
        return  # the codec admits any bytes, and these fit whatever their head's size
    try:
        codec.check_value(value)
        size = len(codec.encode(value))
    except LocalProtocolError as error:
        raise BadRequest(f"value not storable: {error.message}") from None
    if size > DEFAULT_MAX_VALUE_BYTES:
        raise TooLarge(
            f"value is {size} bytes as CBOR, limit {DEFAULT_MAX_VALUE_BYTES}",
            detail={"size": size, "limit": DEFAULT_MAX_VALUE_BYTES},
        )


def admit_ack(ack: Any) -> str:
    if ack not in ACK_MODES:
        raise BadRequest(f"ack must be one of {', '.join(ACK_MODES)}, not {ack!r}")
    return str(ack)


def admit_version(version: Any) -> int:
    if type(version) is not int or version < 0:
        raise BadRequest(f"a version is an int >= 0 (0: absent), not {version!r}")
    return version
