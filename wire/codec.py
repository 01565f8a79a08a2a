"""CBOR encoding and safe decoding.

Only plain data is admitted: str, bytes, int, float, bool, None, lists and maps with str, bytes
or int keys. No semantic tags (dates, decimals, sets, shared references, ...), no undefined or
simple values, nesting at most `MAX_DEPTH`. cbor2 does the parsing in C; `check_value` then
walks the result so anything cbor2 turned into another Python type is refused.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import cbor2

from wire.errors import DecodeError, LocalProtocolError
from wire.limits import MAX_DEPTH

_SCALARS = (str, bytes, int, float, bool, type(None))
_KEY_TYPES = (str, bytes, int)
# CBOR major types 0 and 1 hold -2**64 .. 2**64-1; larger ints would need bignum tags, which
# decode() refuses, so check_value refuses them too and every admitted value round-trips.
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1


def _refuse_tag(*args: object) -> NoReturn:
    # cbor2 5.x calls hook(decoder, tag); 6.x calls hook(tag, immutable).
    tag = next((a for a in args if isinstance(a, cbor2.CBORTag)), None)
    number = tag.tag if tag is not None else "?"
    raise DecodeError(f"CBOR tag {number} is not allowed")


# Tags cbor2 decodes itself (dates, bignums, decimals, sets, shared references, the
# self-describe marker, ...) never reach `tag_hook`, so each is overridden to refuse.
# tests/wire/test_codec.py probes every tag up to 1100 and 55799, so a cbor2 upgrade that adds
# one shows up there.
_CBOR2_NATIVE_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260)
_CBOR2_NATIVE_TAGS_MORE = (261, 1004, 43000, 55799)


def _refuser(number: int) -> Callable[..., NoReturn]:
    def refuse(*args: object) -> NoReturn:
        raise DecodeError(f"CBOR tag {number} is not allowed")

    return refuse


_REFUSE_SEMANTIC_TAGS = {
    number: _refuser(number) for number in _CBOR2_NATIVE_TAGS + _CBOR2_NATIVE_TAGS_MORE
}


def encode(obj: Any) -> bytes:
    """Encode a value the codec admits. The caller vouches for the value (see `check_value`)."""
    try:
        return cbor2.dumps(obj)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as error:
        raise LocalProtocolError(f"cannot encode as CBOR: {error}") from None


def encode_canonical(obj: Any) -> bytes:
    """Deterministic encoding (RFC 8949 core deterministic rules) for bytes that are signed,
    MACed or hashed: the same value always gives the same bytes."""
    try:
        return cbor2.dumps(obj, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as error:
        raise LocalProtocolError(f"cannot encode as CBOR: {error}") from None


def _decoder(stream: io.BytesIO, max_depth: int) -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        stream,
        tag_hook=_refuse_tag,
        semantic_decoders=_REFUSE_SEMANTIC_TAGS,
        max_depth=max_depth,  # cbor2 allows exactly this many nested containers
        allow_indefinite=False,
        allow_duplicate_keys=False,
    )


def _decode_next(decoder: cbor2.CBORDecoder) -> Any:
    """The decoder's next item; DecodeError for anything malformed."""
    try:
        return decoder.decode()
    except DecodeError:
        raise
    except cbor2.CBORDecodeError as error:
        cause: BaseException | None = error
        while cause is not None:  # cbor2 wraps what our tag hook raised
            if isinstance(cause, DecodeError):
                raise DecodeError(cause.message) from None
            cause = cause.__cause__ or cause.__context__
        raise DecodeError(f"malformed CBOR: {error}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as error:
        raise DecodeError(f"malformed CBOR: {error}") from None


class _Decoders(threading.local):
    """One reusable decoder per thread for `decode`'s default depth. Building a CBORDecoder
    (keyword parsing, the tag table) cost about as much as decoding a small message; pointing
    an existing one at a new stream does not. Per thread, because a tag hook runs Python code,
    during which another thread could otherwise repoint a shared decoder."""

    def __init__(self) -> None:
        self.decoder = _decoder(io.BytesIO(), MAX_DEPTH)


_DECODERS = _Decoders()


def decode(data: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode one CBOR item that must fill `data` exactly. Raises `DecodeError`."""
    obj = decode_unwalked(data, max_depth=max_depth)
    if type(obj) not in _SCALARS:  # the common fast path: nothing to walk
        _check_decoded(obj)
    return obj


def decode_unwalked(data: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """`decode` without the walk that refuses undefined, simple values and arrays or maps as
    map keys: cbor2 has refused every tag, indefinite length, duplicate key, int over 64 bits
    and nesting deeper than `max_depth`, and the item fills `data` exactly. Only for a caller
    that checks the type of every value it keeps (wire.messages checks each field, and walks
    `Value` fields with `check_value`)."""
    stream = io.BytesIO(data)
    if max_depth == MAX_DEPTH:
        decoder = _DECODERS.decoder
        decoder.fp = stream
    else:
        decoder = _decoder(stream, max_depth)
    obj = _decode_next(decoder)
    if stream.tell() != len(data):
        raise DecodeError(f"{len(data) - stream.tell()} bytes follow the CBOR item")
    return obj


def check_each(items: Sequence[bytes], *, max_depth: int = MAX_DEPTH) -> None:
    """Raise `DecodeError` (naming the index) unless each of `items` is exactly one CBOR item
    `decode` would accept. One decoder reads them all as one stream, checking where each ends:
    a quarter of the cost of a `decode` per item, for pages of stored values (a reseed)."""
    stream = io.BytesIO(b"".join(items))
    decoder = _decoder(stream, max_depth)
    end = 0
    for index, item in enumerate(items):
        end += len(item)
        try:
            obj = _decode_next(decoder)
            if stream.tell() != end:
                raise DecodeError("not exactly one CBOR item")
            if type(obj) not in _SCALARS:
                _check_decoded(obj)
        except DecodeError as error:
            raise DecodeError(f"item {index}: {error.message}", detail={"index": index}) from None


def _check_decoded(obj: Any) -> None:
    """What is left to refuse once cbor2 has bounded the depth and refused every tag: undefined,
    simple values, and arrays or maps used as map keys. Recursion is safe: cbor2 refused
    anything nested deeper than `max_depth`. This is decode()'s hot path, hence not
    `check_value` (which must also guard values built in Python, of any depth)."""
    kind = type(obj)
    if kind is list:
        for item in obj:
            if type(item) not in _SCALARS:
                _check_decoded(item)
    elif kind is dict:
        for key, item in obj.items():
            if type(key) not in _KEY_TYPES:
                raise DecodeError(f"map key of type {type(key).__name__} not allowed")
            if type(item) not in _SCALARS:
                _check_decoded(item)
    else:
        raise DecodeError(f"values of type {kind.__name__} are not allowed")


def check_value(obj: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise `LocalProtocolError` unless `obj` is plain CBOR data within `max_depth`.

    Iterative, so a hostile value cannot exhaust the Python stack.
    """
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is int and not _INT_MIN <= item <= _INT_MAX:
            raise LocalProtocolError("integers must fit CBOR's 64-bit major types (no bignums)")
        if kind in _SCALARS:
            continue
        if depth >= max_depth:
            raise LocalProtocolError(f"value nested deeper than {max_depth} levels")
        if kind is list or kind is tuple:
            stack.extend((child, depth + 1) for child in item)
        elif kind is dict:
            for key, child in item.items():
                if type(key) not in _KEY_TYPES:
                    raise LocalProtocolError(f"map key of type {type(key).__name__} not allowed")
                stack.append((key, depth + 1))
                stack.append((child, depth + 1))
        else:
            raise LocalProtocolError(f"values of type {kind.__name__} are not allowed")
