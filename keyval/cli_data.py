"""`keyval get KEY | put KEY VALUE | del KEY | scan PREFIX`: one-shot data commands.

Keys on the command line are strings. Values are printed as JSON; what JSON cannot say is
marked: bytes become {"$bytes": "<base64>"}, and a map key that is not a string becomes the
JSON text of that key. Exit status 0 on success, 1 on any failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

from keyval.client.blocking import connect
from keyval.nodeconfig import ConfigError
from wire.errors import WireError

BYTES_MARKER = "$bytes"

EXIT_OK = 0
EXIT_FAILED = 1

VALUE_HELP = (
    'values are printed as JSON; bytes print as {"$bytes": "<base64>"} and a map key that '
    "is not a string prints as the JSON text of that key"
)


def to_json(value: Any) -> Any:
    """A JSON-able form of a stored value (see the module docstring)."""
    if isinstance(value, bytes):
        return {BYTES_MARKER: base64.b64encode(value).decode("ascii")}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {
            key if isinstance(key, str) else json.dumps(to_json(key)): to_json(item)
            for key, item in value.items()
        }
    return value


def from_json(value: Any) -> Any:
    """The inverse for values typed on the command line: {"$bytes": b64} becomes bytes."""
    if isinstance(value, dict):
        if set(value) == {BYTES_MARKER} and isinstance(value[BYTES_MARKER], str):
            try:
                return base64.b64decode(value[BYTES_MARKER], validate=True)
            except ValueError:
                return value
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def parse_value(text: str) -> Any:
    """JSON if `text` parses as JSON, else the string itself."""
    try:
        return from_json(json.loads(text))
    except ValueError:
        return text


def dumps(value: Any) -> str:
    return json.dumps(to_json(value), ensure_ascii=False, allow_nan=True)


def _get(kv: Any, args: argparse.Namespace) -> int:
    entry = kv.get_entry(args.key)
    if entry.version == 0:
        print(f"keyval: {args.key!r} not found", file=sys.stderr)
        return EXIT_FAILED
    print(dumps(entry.value))
    return EXIT_OK


def _put(kv: Any, args: argparse.Namespace) -> int:
    version = kv.put(args.key, parse_value(args.value), ack=args.ack)
    print(json.dumps({"version": version}))
    return EXIT_OK


def _delete(kv: Any, args: argparse.Namespace) -> int:
    existed = kv.delete(args.key, ack=args.ack)
    print(json.dumps({"deleted": existed}))
    return EXIT_OK


def _scan(kv: Any, args: argparse.Namespace) -> int:
    for key, value, version in kv.scan(args.prefix or None, limit=args.limit):
        print(json.dumps({"key": to_json(key), "value": to_json(value), "version": version}))
    return EXIT_OK


def _runner(action: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            with connect(args.config) as kv:
                code: int = action(kv, args)
                return code
        except ConfigError as error:
            print(f"keyval: {error}", file=sys.stderr)
        except WireError as error:
            print(f"keyval: {error.code}: {error.message}", file=sys.stderr)
        except OSError as error:
            print(f"keyval: {error}", file=sys.stderr)
        return EXIT_FAILED

    return run


def register(subparsers: Any) -> None:
    epilog = (
        f"Needs a client config: --config F (before the command) or $KEYVAL_CONFIG. {VALUE_HELP}."
    )
    get = subparsers.add_parser("get", help="print the value of KEY as JSON", description=epilog)
    get.add_argument("key", metavar="KEY", help="the key (a string)")
    get.set_defaults(func=_runner(_get))

    put = subparsers.add_parser("put", help="store VALUE under KEY", description=epilog)
    put.add_argument("key", metavar="KEY", help="the key (a string)")
    put.add_argument(
        "value",
        metavar="VALUE",
        help="parsed as JSON if it is valid JSON (so 12 is a number, '\"12\"' a string, "
        '{"$bytes": "<base64>"} bytes), else taken as a string',
    )
    put.add_argument(
        "--ack", choices=("durable", "memory"), help="ack mode (default: the config's ack)"
    )
    put.set_defaults(func=_runner(_put))

    delete = subparsers.add_parser("del", help="delete KEY", description=epilog)
    delete.add_argument("key", metavar="KEY", help="the key (a string)")
    delete.add_argument("--ack", choices=("durable", "memory"), help="ack mode")
    delete.set_defaults(func=_runner(_delete))

    scan = subparsers.add_parser(
        "scan",
        help="print keys starting with PREFIX as JSON lines {key, value, version}",
        description=epilog,
    )
    scan.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="key prefix")
    scan.add_argument("--limit", type=int, default=None, help="print at most this many")
    scan.set_defaults(func=_runner(_scan))
