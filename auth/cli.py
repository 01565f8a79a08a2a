"""`keyval auth` (the authority daemon) and `keyval principal ...` (principal management).

Principal commands work offline with `--data DIR` (the authority's directory, daemon stopped;
the cluster launcher uses this) or online through the daemon, authenticated as an admin
principal given by --name/--key/--authority/--authority-key or the TOML file named by
`keyval --config F` / $KEYVAL_CONFIG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from auth import bootstrap, keys
from auth.authority import (
    DEFAULT_KEY_ROTATION_S,
    DEFAULT_SKEW_S,
    DEFAULT_TGT_LIFETIME_S,
    DEFAULT_TICKET_LIFETIME_S,
    AuthorityConfig,
)
from auth.client import Credentials
from auth.daemon import AUTHORITY_NODE_NAME, run_authority
from auth.datadir import AuthorityDirError, ensure_authority_dir
from auth.messages import (
    PrincipalAdd,
    PrincipalList,
    PrincipalListReply,
    PrincipalRotate,
    PrincipalSetEnabled,
)
from auth.principals import PrincipalError, Role
from keyval.nodeconfig import (
    ConfigError,
    add_observe_arguments,
    observe_options,
    read_toml,
    write_ready_file,
)
from keyval.observe import setup_logging
from wire.errors import WireError
from wire.messages import Message

DEFAULT_LISTEN = "127.0.0.1:6230"
ADMIN_IDENTITY_KEYS = ("name", "key", "authority", "authority_key")


def register(subparsers: Any) -> None:
    _register_daemon(subparsers)
    _register_principal(subparsers)


def _register_daemon(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "auth",
        help="run the ticket authority",
        description="Run the ticket authority. Its keys and principal registry live in --data "
        "(created on first start, files 0600) and survive restarts.",
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="the authority's directory")
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help=f"default {DEFAULT_LISTEN}"
    )
    parser.add_argument("--ready-file", metavar="F", help="write the bound host:port here")
    parser.add_argument("--skew-s", type=float, default=DEFAULT_SKEW_S, help="allowed clock skew")
    parser.add_argument("--tgt-lifetime-s", type=float, default=DEFAULT_TGT_LIFETIME_S)
    parser.add_argument("--ticket-lifetime-s", type=float, default=DEFAULT_TICKET_LIFETIME_S)
    parser.add_argument("--key-rotation-s", type=float, default=DEFAULT_KEY_ROTATION_S)
    add_observe_arguments(parser)
    parser.set_defaults(func=_run_daemon)


def _run_daemon(args: argparse.Namespace) -> int:
    data = Path(args.data)
    try:
        config = AuthorityConfig(
            skew_s=args.skew_s,
            tgt_lifetime_s=args.tgt_lifetime_s,
            ticket_lifetime_s=args.ticket_lifetime_s,
            key_rotation_s=args.key_rotation_s,
        )
        info = ensure_authority_dir(data).info
        metrics, log_level, log_json = observe_options(vars(args))
    except (ValueError, AuthorityDirError, ConfigError) as error:
        print(f"keyval auth: {error}", file=sys.stderr)
        return 2
    setup_logging(AUTHORITY_NODE_NAME, log_level, json=log_json)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                lambda task_status: run_authority(
                    data,
                    args.listen,
                    config=config,
                    metrics_address=metrics,
                    task_status=task_status,
                )
            )
            print(f"authority {info.id} public key {info.public_key_hex} on {address}", flush=True)
            write_ready_file(Path(args.ready_file) if args.ready_file else None, address)

    try:
        trio.run(main)
    except AuthorityDirError as error:
        print(f"keyval auth: {error}", file=sys.stderr)
        return 1
    return 0


def _register_principal(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "principal",
        help="add, list, disable, enable or rotate principals",
        description="Manage principals. Offline with --data DIR (the authority is stopped), "
        "otherwise through the running authority as an admin principal.",
    )
    commands = parser.add_subparsers(dest="principal_command", metavar="ACTION", required=True)
    add = commands.add_parser("add", help="generate a key pair and register its public key")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument(
        "--out", metavar="KEYFILE", help="private key file to write (default NAME.key)"
    )
    add.add_argument("--prefix", action="append", default=[], help="client key prefix (repeat)")
    add.set_defaults(func=_add)
    listing = commands.add_parser("list", help="list principals")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_list)
    disable = commands.add_parser("disable", help="disable (revoke) a principal")
    disable.add_argument("name")
    disable.set_defaults(func=_disable, enabled=False)
    enable = commands.add_parser("enable", help="re-enable a disabled principal")
    enable.add_argument("name")
    enable.set_defaults(func=_disable, enabled=True)
    rotate = commands.add_parser("rotate", help="give a principal a new key pair")
    rotate.add_argument("name")
    rotate.add_argument("--out", metavar="KEYFILE", help="new private key file (default NAME.key)")
    rotate.set_defaults(func=_rotate)
    for sub in (add, listing, disable, enable, rotate):
        sub.add_argument("--data", metavar="DIR", help="work offline on this authority directory")
        group = sub.add_argument_group("online: the admin identity (else from --config)")
        group.add_argument("--name", dest="admin_name", metavar="ADMIN", help="admin principal")
        group.add_argument("--key", dest="admin_key", metavar="F", help="its private key file")
        group.add_argument("--authority", metavar="HOST:PORT", help="the authority's address")
        group.add_argument("--authority-key", metavar="HEX", help="the authority's public key")


def _fail(error: Exception) -> int:
    print(f"keyval principal: {getattr(error, 'message', None) or error}", file=sys.stderr)
    return 1


def _admin_credentials(args: argparse.Namespace) -> Credentials:
    values: dict[str, Any] = {}
    config = getattr(args, "config", None) or os.environ.get("KEYVAL_CONFIG")
    if config:
        values.update(read_toml(Path(config)))
    flags = {
        "name": args.admin_name,
        "key": args.admin_key,
        "authority": args.authority,
        "authority_key": args.authority_key,
    }
    values.update({key: value for key, value in flags.items() if value})
    missing = [key for key in ADMIN_IDENTITY_KEYS if not values.get(key)]
    if missing:
        raise ConfigError(
            f"online mode needs the admin identity ({', '.join(missing)} missing): pass "
            "--name/--key/--authority/--authority-key or --config, or use --data DIR offline"
        )
    return Credentials(
        str(values["name"]),
        Path(values["key"]),
        str(values["authority"]),
        str(values["authority_key"]),
    )


def _online(args: argparse.Namespace, request: Message) -> Message:
    credentials = _admin_credentials(args)

    async def main() -> Message:
        connection = await credentials.authority_connection()
        async with connection:
            return await connection.request(request)

    return trio.run(main)


def _run(action: Callable[[], int]) -> int:
    try:
        return action()
    except (WireError, PrincipalError, AuthorityDirError, ConfigError, keys.KeyFileError) as error:
        return _fail(error)


def _add(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{args.name}.key")

    def offline() -> int:
        bootstrap.add_principal(Path(args.data), args.name, args.role, out, args.prefix)
        return 0

    def online() -> int:
        if out.exists():
            raise PrincipalError(f"{out} exists; refusing to overwrite a key file")
        private_key = keys.generate_private_key()
        request = PrincipalAdd(
            name=args.name,
            role=args.role,
            public_key=keys.public_key_bytes(private_key),
            prefixes=list(args.prefix),
        )
        _online(args, request)
        keys.save_private_key(out, private_key)
        return 0

    code = _run(offline if args.data else online)
    if code == 0:
        print(f"added {args.role} {args.name}; private key in {out} (keep it secret)")
    return code


def _list(args: argparse.Namespace) -> int:
    def action() -> int:
        rows: list[dict[str, Any]]
        if args.data:
            rows = [p.to_json() for p in bootstrap.list_principals(Path(args.data))]
        else:
            reply = _online(args, PrincipalList())
            if not isinstance(reply, PrincipalListReply):
                raise PrincipalError(f"unexpected reply {reply.TYPE}")
            rows = [
                {
                    "name": p.name,
                    "role": p.role,
                    "public_key": p.public_key.hex(),
                    "enabled": p.enabled,
                    "prefixes": list(p.prefixes),
                }
                for p in reply.principals
            ]
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in rows if not args.json else []:
            state = "enabled" if row["enabled"] else "DISABLED"
            prefixes = " prefixes=" + ",".join(row["prefixes"]) if row["prefixes"] else ""
            print(
                f"{row['name']:<24} {row['role']:<10} {state:<8} {row['public_key'][:16]}{prefixes}"
            )
        return 0

    return _run(action)


def _disable(args: argparse.Namespace) -> int:
    def action() -> int:
        if args.data:
            bootstrap.set_enabled(Path(args.data), args.name, args.enabled)
        else:
            _online(args, PrincipalSetEnabled(name=args.name, enabled=args.enabled))
        print(f"{args.name} {'enabled' if args.enabled else 'disabled'}")
        return 0

    return _run(action)


def _rotate(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{args.name}.key")

    def action() -> int:
        if args.data:
            bootstrap.rotate_principal(Path(args.data), args.name, out)
        else:
            private_key = keys.generate_private_key()
            staged = out.with_name(out.name + ".new")
            keys.save_private_key(staged, private_key)
            _online(
                args, PrincipalRotate(name=args.name, public_key=keys.public_key_bytes(private_key))
            )
            staged.replace(out)
        print(f"{args.name} has a new key in {out}; its old key no longer logs in")
        return 0

    return _run(action)
