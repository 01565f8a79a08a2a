"""Keys: the canonical byte form, the hash slot, and the admission check.

A key is a `str`, `bytes` or `int` (never `bool`). Its canonical form is one type byte and a
payload, so `"1"`, `b"1"` and `1` are three different keys:

- `b"s"` + UTF-8 of a str, `b"b"` + the bytes themselves: byte order equals code-point order.
- `b"i"` + an order-preserving integer form: a header byte carrying sign and length, then the
  magnitude big-endian. Non-negative `n`: header `0x80 + L`, payload `n` in `L` minimal bytes.
  Negative `n`: with `m = -n - 1`, header `0x7F - L`, payload `m` in `L` minimal bytes, each
  byte inverted. Comparing canonical forms bytewise therefore compares the integers.

The slot is CRC16-XMODEM of the hashed part mod 16384, Redis Cluster's rule (so its test
vectors apply): for str and bytes keys, if there is a `{` and a later `}` with at least one
byte between them, only that part is hashed. An int key hashes its decimal form, no tag rule.
"""

from __future__ import annotations

import binascii

from wire.errors import BadRequest, TooLarge

Key = str | bytes | int

# Redis Cluster's slot count: small enough for a per-slot table on every node, large enough
# that slots spread evenly over hundreds of drones.
NUM_SLOTS = 16384

# Default key limit on the canonical form. Keys are indexed in memory and repeated in every
# write and log record; 1 KiB is ample for any name and bounds per-key overhead.
DEFAULT_MAX_KEY_BYTES = 1024

# Default value limit on the encoded CBOR size: half the 1 MiB frame, so one value plus its
# envelope always fits in a frame (Redis allows far more, etcd 1.5 MiB per request).
DEFAULT_MAX_VALUE_BYTES = 512 * 1024

TYPE_STR = b"s"
TYPE_BYTES = b"b"
TYPE_INT = b"i"

# The int header byte: 0x80 + L for non-negative, 0x7F - L for negative, so L stays below 128.
# 127 bytes of magnitude is far beyond any sensible integer key (and the key limit anyway).
_INT_HEADER_ZERO = 0x80
_MAX_INT_MAGNITUDE_BYTES = 127


def _int_magnitude_bytes(magnitude: int) -> bytes:
    length = (magnitude.bit_length() + 7) // 8
    if length > _MAX_INT_MAGNITUDE_BYTES:
        raise TooLarge(f"int key has {length} bytes of magnitude, limit {_MAX_INT_MAGNITUDE_BYTES}")
    return magnitude.to_bytes(length, "big")


def _encode_int(number: int) -> bytes:
    if number >= 0:
        payload = _int_magnitude_bytes(number)
        return bytes([_INT_HEADER_ZERO + len(payload)]) + payload
    payload = _int_magnitude_bytes(-number - 1)
    inverted = bytes(0xFF - byte for byte in payload)
    return bytes([_INT_HEADER_ZERO - 1 - len(payload)]) + inverted


def _decode_int(data: bytes) -> int:
    if not data:
        raise BadRequest("canonical int key has no header byte")
    header, payload = data[0], data[1:]
    if header >= _INT_HEADER_ZERO:
        length, negative = header - _INT_HEADER_ZERO, False
        magnitude_bytes = payload
    else:
        length, negative = _INT_HEADER_ZERO - 1 - header, True
        magnitude_bytes = bytes(0xFF - byte for byte in payload)
    if len(payload) != length:
        raise BadRequest("canonical int key length does not match its header")
    if length > 0 and magnitude_bytes[0] == 0:
        raise BadRequest("canonical int key is not minimal")
    magnitude = int.from_bytes(magnitude_bytes, "big")
    return -magnitude - 1 if negative else magnitude


def _admit_type(key: object) -> Key:
    # bool is an int subclass; True and 1 must not silently name the same key.
    if isinstance(key, bool) or not isinstance(key, str | bytes | int):
        raise BadRequest(f"a key must be str, bytes or int, not {type(key).__name__}")
    return key


def _encode_str(key: str) -> bytes:
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRequest("str key is not valid unicode (lone surrogate)") from error


def canonical_key(key: Key) -> bytes:
    """The unambiguous, order-friendly byte form of `key`. Raises BadRequest on a wrong type."""
    key = _admit_type(key)
    if isinstance(key, str):
        return TYPE_STR + _encode_str(key)
    if isinstance(key, bytes):
        return TYPE_BYTES + key
    return TYPE_INT + _encode_int(key)


def key_from_canonical(data: bytes) -> Key:
    """The key whose canonical form is `data`. Raises BadRequest on malformed input."""
    if not isinstance(data, bytes) or not data:
        raise BadRequest("canonical key must be non-empty bytes")
    kind, payload = data[:1], data[1:]
    if kind == TYPE_STR:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRequest("canonical str key is not valid UTF-8") from error
    if kind == TYPE_BYTES:
        return payload
    if kind == TYPE_INT:
        return _decode_int(payload)
    raise BadRequest(f"unknown canonical key type byte {kind!r}")


def hash_tag_part(data: bytes) -> bytes:
    """The part of `data` the slot hash covers: Redis's `{tag}` rule."""
    start = data.find(b"{")
    if start == -1:
        return data
    end = data.find(b"}", start + 1)
    if end == -1 or end == start + 1:
        return data
    return data[start + 1 : end]


def crc16_xmodem(data: bytes) -> int:
    """CRC16-XMODEM (poly 0x1021, init 0): binascii's CRC-CCITT with a zero start value."""
    return binascii.crc_hqx(data, 0)


def key_slot(key: Key) -> int:
    """The hash slot of `key`, 0 <= slot < NUM_SLOTS."""
    key = _admit_type(key)
    if isinstance(key, str):
        hashed = hash_tag_part(_encode_str(key))
    elif isinstance(key, bytes):
        hashed = hash_tag_part(key)
    else:
        hashed = str(key).encode("ascii")
    return crc16_xmodem(hashed) % NUM_SLOTS


def canonical_slot(data: bytes) -> int:
    """The hash slot of the key whose canonical form is `data`."""
    return key_slot(key_from_canonical(data))


def check_key(key: object, max_key_bytes: int = DEFAULT_MAX_KEY_BYTES) -> bytes:
    """Admit `key`: BadRequest on a wrong type, TooLarge over the limit; its canonical form."""
    data = canonical_key(_admit_type(key))
    if len(data) > max_key_bytes:
        raise TooLarge(
            f"key is {len(data)} bytes in canonical form, limit {max_key_bytes}",
            detail={"size": len(data), "limit": max_key_bytes},
        )
    return data


def check_key_slot(key: object, max_key_bytes: int = DEFAULT_MAX_KEY_BYTES) -> tuple[bytes, int]:
    """`check_key` and `key_slot` in one pass (the key is admitted and encoded once): the
    canonical form and the hash slot. For the per-key loops of batched reads; plain str and
    bytes keys take a short path, anything else (and every refusal) goes through check_key."""
    payload: bytes | None = None
    if type(key) is str:
        try:
            payload, prefix = key.encode("utf-8"), TYPE_STR
        except UnicodeEncodeError:
            pass  # a lone surrogate: check_key below raises the BadRequest
    elif type(key) is bytes:
        payload, prefix = key, TYPE_BYTES
    if payload is not None:
        data = prefix + payload
        if len(data) <= max_key_bytes:
            return data, binascii.crc_hqx(hash_tag_part(payload), 0) % NUM_SLOTS
    data = check_key(key, max_key_bytes)  # int keys, and every refusal
    return data, key_slot(key)  # type: ignore[arg-type]  # check_key admitted its type
