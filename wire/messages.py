"""Typed messages and the one registry that decodes them.

A message is a frozen, slotted dataclass registered under a globally unique type name:

    @message("kv.get")
    class Get(Message):
        key: Key
        slot: int

Fields are checked against their annotations when a message is built (so a bug on our side
is a `LocalProtocolError`) and when one is decoded (so bad bytes from a peer are a
`DecodeError`). Supported annotations: int, float, str, bytes, bool, `Value` (any admitted
CBOR value), `Key` (str | bytes | int), `X | None`, `list[X]`, `tuple[X, ...]`,
`tuple[X, Y]`, `dict[K, V]` and other registered message classes (nested as maps).

On the wire a message is the CBOR array `[type_name, request_id, {field: value}]`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, Union

from wire import codec
from wire.errors import DecodeError, LocalProtocolError
from wire.limits import MAX_BATCH_ITEMS

Value = Any  # any value the codec admits; checked with codec.check_value
Key = str | bytes | int  # a user key; see keyval.keys for its canonical bytes

MAX_REQUEST_ID = 2**63 - 1  # request ids are unsigned 63-bit so every language has the type

M = TypeVar("M", bound="Message")
_Check = Callable[[Any], Any]  # validates and normalises one field value, or raises ValueError

_REGISTRY: dict[str, type[Message]] = {}

# Values that need neither conversion to wire form nor a walk to be admitted (ints do: the
# codec admits only 64-bit ones). Hot paths test for these first.
_PLAIN_SCALARS = frozenset({str, bytes, bool, float, type(None)})
_FLAT_SCALARS = _PLAIN_SCALARS | {int}  # what _to_wire returns as it is


class Message:
    """Base of all messages. Subclasses are made by `@message`."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""
    _checks: ClassVar[tuple[tuple[str, _Check], ...]] = ()

    def __post_init__(self) -> None:
        for name, check in self._checks:
            value = getattr(self, name)
            try:
                normal = check(value)
            except (ValueError, TypeError) as error:
                raise LocalProtocolError(
                    f"{self.TYPE}.{name}: {error}", detail={"type": self.TYPE, "field": name}
                ) from None
            if normal is not value:
                object.__setattr__(self, name, normal)

    def to_wire(self) -> dict[str, Any]:
        wire = {}
        for name, _ in self._checks:
            value = getattr(self, name)
            # most fields are scalars that go as they are: no call to _to_wire for them
            wire[name] = value if type(value) in _FLAT_SCALARS else _to_wire(value)
        return wire


def _to_wire(value: Any) -> Any:
    if type(value) in _PLAIN_SCALARS:  # most fields: nothing to convert
        return value
    if isinstance(value, Message):
        return value.to_wire()
    if type(value) is list and set(map(type, value)) <= _FLAT_SCALARS:
        return value  # a column of scalars (a reseed page's keys): one C-level type scan
    if type(value) is tuple or type(value) is list:
        return [_to_wire(item) for item in value]
    if type(value) is dict:
        return {key: _to_wire(item) for key, item in value.items()}
    return value


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def message(type_name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: make `cls` a frozen slotted dataclass and register it as `type_name`."""

    def register(cls: type[M]) -> type[M]:
        if type_name in _REGISTRY:
            raise LocalProtocolError(f"message type {type_name!r} is registered twice")
        made = dataclasses.dataclass(frozen=True, slots=True)(cls)
        made.TYPE = type_name
        hints = typing.get_type_hints(made)
        made._checks = tuple(
            (field.name, _checker(hints[field.name]))
            for field in dataclasses.fields(made)  # type: ignore[arg-type]
        )
        _REGISTRY[type_name] = made
        return made

    return register


def registered_types() -> dict[str, type[Message]]:
    """Every registered message type by name (for docs and round-trip tests)."""
    return dict(_REGISTRY)


def _exact(kind: type) -> _Check:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return check


def _check_float(value: Any) -> Any:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise TypeError(f"expected float, got {type(value).__name__}")


def _check_value(value: Any) -> Any:
    if type(value) not in _PLAIN_SCALARS:  # ints (range) and containers take the full walk
        codec.check_value(value)
    return value


def _check_key(value: Any) -> Any:
    if type(value) not in (str, bytes, int):
        raise TypeError(f"a key is str, bytes or int, not {type(value).__name__}")
    return value


def _checker(hint: Any) -> _Check:
    if hint is Any:
        return _check_value
    if hint is float:
        return _check_float
    if hint in (int, str, bytes, bool):
        return _exact(hint)
    if isinstance(hint, type) and issubclass(hint, Message):
        return _message_checker(hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        present = tuple(a for a in args if a is not type(None))
        inner: _Check
        if set(present) == {str, bytes, int}:
            inner = _check_key
        elif len(present) == 1:
            inner = _checker(present[0])
        else:
            raise LocalProtocolError(f"unsupported union annotation {hint!r}")
        if len(present) == len(args):
            return inner
        return lambda value: None if value is None else inner(value)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        kind = tuple if origin is tuple else list
        if args[0] in (int, str, bytes):
            return _exact_sequence_checker(args[0], kind)
        return _sequence_checker(_checker(args[0]), kind)
    if origin is tuple:
        return _fixed_tuple_checker(tuple(_checker(a) for a in args))
    if origin is dict:
        return _dict_checker(_checker(args[0]), _checker(args[1]))
    raise LocalProtocolError(f"unsupported field annotation {hint!r}")


def _exact_sequence_checker(item_kind: type, kind: type) -> _Check:
    """`_sequence_checker` of `_exact(item_kind)` with one C-level type scan first (columns of
    thousands of keys or versions); the item-by-item check names the offender."""
    slow = _sequence_checker(_exact(item_kind), kind)
    exact = frozenset({item_kind})

    def check(value: Any) -> Any:
        if type(value) in (list, tuple) and set(map(type, value)) <= exact:
            return kind(value)
        return slow(value)

    return check


def _sequence_checker(item: _Check, kind: type) -> _Check:
    def check(value: Any) -> Any:
        if type(value) not in (list, tuple):
            raise TypeError(f"expected an array, got {type(value).__name__}")
        return kind([item(v) for v in value])  # a list, not a generator: ~2x faster

    return check


def _fixed_tuple_checker(items: tuple[_Check, ...]) -> _Check:
    def check(value: Any) -> Any:
        if type(value) not in (list, tuple) or len(value) != len(items):
            raise TypeError(f"expected an array of {len(items)} items")
        return tuple([c(v) for c, v in zip(items, value, strict=True)])

    return check


def _dict_checker(key: _Check, item: _Check) -> _Check:
    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise TypeError(f"expected a map, got {type(value).__name__}")
        return {key(k): item(v) for k, v in value.items()}

    return check


def _message_checker(cls: type[Message]) -> _Check:
    def check(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if type(value) is dict:
            return _build(cls, value)
        raise TypeError(f"expected {cls.TYPE}, got {type(value).__name__}")

    return check


def _build(cls: type[M], fields: dict[Any, Any]) -> M:
    checks = cls._checks
    if len(fields) == len(checks) and cls.__post_init__ is Message.__post_init__:
        # Every field present (what encode_message sends): check each straight into a new
        # instance, as __init__ + __post_init__ would, without building keyword arguments.
        made = _new_instance(cls)
        try:
            for name, check in checks:
                _set_field(made, name, check(fields[name]))
        except KeyError:
            pass  # some name is not a field: cls(**fields) below names the problem
        except (ValueError, TypeError) as error:
            raise LocalProtocolError(
                f"{cls.TYPE}.{name}: {error}", detail={"type": cls.TYPE, "field": name}
            ) from None
        else:
            return made
    try:
        return cls(**fields)
    except TypeError as error:  # missing or unknown field names
        raise LocalProtocolError(f"{cls.TYPE}: {error}") from None


_new_instance = object.__new__
_set_field = object.__setattr__  # what a frozen dataclass's __init__ uses


def encode_message(request_id: int, msg: Message) -> bytes:
    """The CBOR bytes of one message envelope."""
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise LocalProtocolError(f"request id {request_id!r} out of range")
    return codec.encode([msg.TYPE, request_id, msg.to_wire()])


def decode_message(data: bytes) -> tuple[int, Message]:
    """Decode one envelope. Raises `DecodeError` for anything that is not a valid message."""
    # No second walk of the decoded item: every field goes through its checker, which admits
    # only its exact types and walks `Value` fields with codec.check_value.
    envelope = codec.decode_unwalked(data)
    if type(envelope) is not list or len(envelope) != 3:
        raise DecodeError("a message is a 3-item array [type, request_id, fields]")
    type_name, request_id, fields = envelope
    if type(type_name) is not str:
        raise DecodeError("message type must be a text string")
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise DecodeError(f"unknown message type {type_name!r}", detail={"type": type_name})
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise DecodeError(f"request id {request_id!r} out of range")
    if type(fields) is not dict or not all(type(k) is str for k in fields):
        raise DecodeError(f"{type_name}: fields must be a map with text keys")
    try:
        return request_id, _build(cls, fields)
    except LocalProtocolError as error:
        raise DecodeError(error.message, detail=error.detail) from None


# Messages every connection understands. Others live beside the code that handles them.


@message("error")
class Error(Message):
    """The reply to a request that failed. `code` is a `wire.errors.ErrorCode` value."""

    code: str
    message: str
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


@message("ok")
class Ok(Message):
    """A reply that carries nothing but success."""


@message("batch")
class Batch(Message):
    """Several envelopes in one frame: `items` are `[type, request_id, fields]` arrays.

    Lets a sender coalesce many small requests or replies into one sealed frame."""

    items: list[Any]

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if len(self.items) > MAX_BATCH_ITEMS:
            raise LocalProtocolError(f"a batch holds at most {MAX_BATCH_ITEMS} messages")


@message("ping")
class Ping(Message):
    """Liveness probe; answered with `Ok`."""
