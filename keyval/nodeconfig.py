"""Identity and listening options shared by every daemon, and the client config file.

A daemon takes its options from flags and, with `--config FILE`, from a TOML file whose keys
are the long flag names with `_` for `-` (`authority_key = "..."`). Flags win over the file.
Relative paths in a file are relative to the file's folder. The client config (`client.toml`)
uses the same identity keys plus `commanders` and `ack`.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IDENTITY_KEYS = ("name", "key", "authority", "authority_key")
PATH_KEYS = frozenset({"key", "data", "ready_file"})
OBSERVE_KEYS = ("metrics", "log_level", "log_json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "INFO"


class ConfigError(Exception):
    """A config file or option that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class NodeOptions:
    name: str
    key: Path  # this principal's Ed25519 private key file
    authority: str  # host:port of the ticket authority
    authority_key: str  # hex of the authority's Ed25519 public key, pinned
    listen: str = ""
    ready_file: Path | None = None
    data: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # role-specific keys (db, commanders, ...)
    metrics: str | None = None  # host:port of the Prometheus endpoint, None for none
    log_level: str = DEFAULT_LOG_LEVEL  # one of LOG_LEVELS
    log_json: bool = False  # JSON lines instead of text

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)


def add_identity_arguments(parser: argparse.ArgumentParser, *, listen_default: str) -> None:
    group = parser.add_argument_group("identity and network")
    group.add_argument(
        "--config", dest="node_config", metavar="FILE", help="TOML file with these options"
    )
    group.add_argument("--name", help="this node's principal name (e.g. drone-1)")
    group.add_argument("--key", help="this principal's private key file")
    group.add_argument("--authority", metavar="HOST:PORT", help="the ticket authority")
    group.add_argument("--authority-key", metavar="HEX", help="the authority's public key")
    group.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to serve on (default {listen_default}; port 0 picks a free port)",
    )
    group.add_argument(
        "--ready-file", metavar="F", help="write the bound host:port here once serving"
    )
    add_observe_arguments(parser)
    parser.set_defaults(listen_default=listen_default)


def add_observe_arguments(parser: argparse.ArgumentParser) -> None:
    """`--metrics`, `--log-level`, `--log-json`: every daemon's (the authority adds them too)."""
    group = parser.add_argument_group("metrics and logs")
    group.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: not served)",
    )
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"log this level and above (default {DEFAULT_LOG_LEVEL})",
    )
    group.add_argument(
        "--log-json", action="store_true", default=None, help="log JSON lines instead of text"
    )


def observe_options(values: dict[str, Any]) -> tuple[str | None, str, bool]:
    """(metrics, log_level, log_json) from merged flags and file; raises ConfigError."""
    metrics = values.get("metrics") or None
    if metrics is not None:
        if not isinstance(metrics, str):
            raise ConfigError("metrics must be a HOST:PORT string")
        split_address(metrics)
    level = values.get("log_level") or DEFAULT_LOG_LEVEL
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log-level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    log_json = values.get("log_json") or False
    if not isinstance(log_json, bool):
        raise ConfigError(f"log-json must be true or false, not {log_json!r}")
    return metrics, level.upper(), log_json


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    base = path.resolve().parent
    for key in PATH_KEYS & raw.keys():
        raw[key] = base / raw[key]
    return raw


def resolve(args: argparse.Namespace, *, role_keys: tuple[str, ...] = ()) -> NodeOptions:
    """Merge flags over the TOML file named by `--config`; raise ConfigError if one is missing.

    `role_keys` are the attribute names of role-specific flags to carry in `extra`."""
    file_values: dict[str, Any] = {}
    if getattr(args, "node_config", None):
        file_values = read_toml(Path(args.node_config))
    merged = dict(file_values)
    for key in (*IDENTITY_KEYS, "listen", "ready_file", "data", *OBSERVE_KEYS, *role_keys):
        value = getattr(args, key, None)
        if value is not None:
            merged[key] = Path(value) if key in PATH_KEYS else value
    missing = [key for key in IDENTITY_KEYS if not merged.get(key)]
    if missing:
        flags = ", ".join("--" + key.replace("_", "-") for key in missing)
        raise ConfigError(f"missing {flags} (give them as flags or in --config FILE)")
    metrics, log_level, log_json = observe_options(merged)
    for key in OBSERVE_KEYS:
        merged.pop(key, None)
    return NodeOptions(
        name=str(merged.pop("name")),
        key=Path(merged.pop("key")),
        authority=str(merged.pop("authority")),
        authority_key=str(merged.pop("authority_key")),
        listen=str(merged.pop("listen", None) or getattr(args, "listen_default", "")),
        ready_file=merged.pop("ready_file", None),
        data=merged.pop("data", None),
        extra=merged,
        metrics=metrics,
        log_level=log_level,
        log_json=log_json,
    )


def client_config_path(explicit: str | None) -> Path:
    """The client config to use: `--config`, else $KEYVAL_CONFIG."""
    chosen = explicit or os.environ.get("KEYVAL_CONFIG")
    if not chosen:
        raise ConfigError("no client config: pass --config FILE or set KEYVAL_CONFIG")
    return Path(chosen)


def load_client_config(path: Path) -> NodeOptions:
    """Read a client.toml; it must name the identity keys and `commanders`."""
    values = read_toml(path)
    missing = [key for key in (*IDENTITY_KEYS, "commanders") if not values.get(key)]
    if missing:
        raise ConfigError(f"client config {path} lacks {', '.join(missing)}")
    if not isinstance(values["commanders"], list):
        raise ConfigError(f"client config {path}: commanders must be a list of host:port")
    return NodeOptions(
        name=str(values.pop("name")),
        key=Path(values.pop("key")),
        authority=str(values.pop("authority")),
        authority_key=str(values.pop("authority_key")),
        extra=values,
    )


def write_ready_file(path: Path | None, address: str) -> None:
    """Atomically write `address` to `path` (the launcher polls for it)."""
    if path is None:
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(address + "\n")
    temporary.replace(path)


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); IPv6 hosts in brackets. Raises ConfigError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"bad address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
