"""The client's settings, read from a client config file (client.toml).

Keys the client reads beyond the identity keys (name, key, authority, authority_key):

- `commanders`: a list of commander addresses, each "host:port" or "name@host:port". The name
  is the commander's principal name (the ticket's service name); a bare address gets the name
  from `commander_names` (a list in the same order) or else "commander-N" by position, the
  local cluster's naming.
- `ack`: "durable" (the default) or "memory", the default ack mode of writes.
- `deadline_s`: the overall deadline of one call, retries included (default 10 s).
- `autobatch`: true (the default) or false: whether concurrent gets of one client share
  GetMany requests (keyval.client.autobatch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from keyval.client.policy import DEFAULT_DEADLINE_S
from keyval.messages import ACK_DURABLE, ACK_MODES
from keyval.nodeconfig import (
    ConfigError,
    NodeOptions,
    client_config_path,
    load_client_config,
    split_address,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # principal name: the service a ticket is asked for
    address: str  # host:port


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSettings:
    commanders: tuple[Endpoint, ...]
    ack: str = ACK_DURABLE
    deadline_s: float = DEFAULT_DEADLINE_S
    autobatch: bool = True  # concurrent gets share GetMany requests
    identity: NodeOptions | None = None  # None when the dialer is built by the caller


def parse_commanders(entries: Any, names: Any = None) -> tuple[Endpoint, ...]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError("commanders must be a non-empty list of host:port")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != len(entries)
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise ConfigError("commander_names must be a list of names, one per commander")
    endpoints = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ConfigError(f"commander entry {entry!r} is not a string")
        name, sep, address = entry.rpartition("@")
        if not sep:
            name = names[index] if names else f"commander-{index + 1}"
        elif not name:
            raise ConfigError(f"commander entry {entry!r} has an empty name")
        split_address(address)  # raises ConfigError on a malformed address
        endpoints.append(Endpoint(name=name, address=address))
    return tuple(endpoints)


def check_ack(ack: Any) -> str:
    if ack not in ACK_MODES:
        raise ConfigError(f"ack must be one of {', '.join(ACK_MODES)}, not {ack!r}")
    return str(ack)


def settings_from_options(options: NodeOptions) -> ClientSettings:
    deadline_s = options.get("deadline_s", DEFAULT_DEADLINE_S)
    if type(deadline_s) not in (int, float) or not deadline_s > 0:
        raise ConfigError(f"deadline_s must be a positive number, not {deadline_s!r}")
    autobatch = options.get("autobatch", True)
    if type(autobatch) is not bool:
        raise ConfigError(f"autobatch must be true or false, not {autobatch!r}")
    return ClientSettings(
        commanders=parse_commanders(options.get("commanders"), options.get("commander_names")),
        ack=check_ack(options.get("ack", ACK_DURABLE)),
        deadline_s=float(deadline_s),
        autobatch=autobatch,
        identity=options,
    )


def load_settings(config: str | Path | None) -> ClientSettings:
    """Settings from the file `config`, else $KEYVAL_CONFIG. Raises ConfigError."""
    path = client_config_path(None if config is None else str(config))
    return settings_from_options(load_client_config(path))
