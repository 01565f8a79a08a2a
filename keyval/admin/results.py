"""What a command returns: plain frozen dataclasses, rendered by keyval.admin.render.

Each result has `to_json()`, the stable `--json` form scripts rely on (extend it; don't rename
keys). Values read from the cluster may be bytes, which JSON lacks: they become
{"bytes_hex": "..."} (see `jsonable`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keyval.keys import NUM_SLOTS


def jsonable(value: Any) -> Any:
    """A CBOR value as JSON: bytes become {"bytes_hex": ...}; map keys become strings."""
    if isinstance(value, bytes):
        return {"bytes_hex": value.hex()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(jsonable(key)): jsonable(item) for key, item in value.items()}
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class RangeRow:
    first: int
    last: int
    drone: str
    epoch: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclasses.dataclass(frozen=True, slots=True)
class SlotsResult:
    term: int
    version: int
    leader: str
    ranges: tuple[RangeRow, ...]
    drone: str | None = None  # the filter `slots DRONE` asked for

    @property
    def unowned(self) -> int:
        return NUM_SLOTS - sum(row.count for row in self.ranges) if self.drone is None else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "term": self.term,
            "version": self.version,
            "leader": self.leader,
            "drone": self.drone,
            "ranges": [
                {"first": r.first, "last": r.last, "drone": r.drone, "epoch": r.epoch}
                for r in self.ranges
            ],
            "slots": sum(row.count for row in self.ranges),
            "unowned": self.unowned,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class SlotResult:
    slot: int
    drone: str  # "" when no drone owns it
    address: str
    epoch: int
    term: int
    key: str | None = None  # set by `keyslot`

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "slot": self.slot,
            "drone": self.drone or None,
            "address": self.address or None,
            "epoch": self.epoch,
            "term": self.term,
        }
        if self.key is not None:
            data["key"] = self.key
        return data


@dataclasses.dataclass(frozen=True, slots=True)
class DroneRow:
    name: str
    address: str
    slots: int
    health: str  # "ok", "draining", "late", "no heartbeat", or "unknown" (map only)
    last_heartbeat_ms_ago: int | None = None
    load: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": "drone",
            "address": self.address,
            "slots": self.slots,
            "health": self.health,
            "last_heartbeat_ms_ago": self.last_heartbeat_ms_ago,
            "load": jsonable(self.load),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class CommanderRow:
    name: str
    address: str
    reachable: bool
    leader: bool
    view: str = ""  # its own election view: "follower term 7, leader commander-2"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": "commander",
            "address": self.address,
            "reachable": self.reachable,
            "leader": self.leader,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterResult:
    """`nodes` and `status`: the cluster as the leading commander sees it."""

    view: str  # "nodes" or "status"
    term: int
    leader: str
    map_version: int
    phase: str  # "" when the commander does not report it
    commanders: tuple[CommanderRow, ...]
    drones: tuple[DroneRow, ...]
    slots_owned: int
    detailed: bool  # health and load came from cmd.status

    def to_json(self) -> dict[str, Any]:
        return {
            "term": self.term,
            "leader": self.leader,
            "map_version": self.map_version,
            "phase": self.phase or None,
            "slots_owned": self.slots_owned,
            "slots_unowned": NUM_SLOTS - self.slots_owned,
            "detailed": self.detailed,
            "commanders": [row.to_json() for row in self.commanders],
            "drones": [row.to_json() for row in self.drones],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PrincipalRow:
    name: str
    role: str
    enabled: bool
    public_key_hex: str
    prefixes: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PrincipalsResult:
    principals: tuple[PrincipalRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "principals": [
                {
                    "name": p.name,
                    "role": p.role,
                    "enabled": p.enabled,
                    "public_key": p.public_key_hex,
                    "prefixes": list(p.prefixes),
                }
                for p in self.principals
            ]
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ValueResult:
    key: str
    found: bool
    value: Any
    version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "found": self.found,
            "value": jsonable(self.value),
            "version": self.version,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ScanResult:
    prefix: str | None
    items: tuple[tuple[Any, Any, int], ...]  # (key, value, version)
    truncated: bool  # the limit cut the scan short

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "items": [
                {"key": jsonable(key), "value": jsonable(value), "version": version}
                for key, value, version in self.items
            ],
            "truncated": self.truncated,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class DoneResult:
    """A change made: a sentence for people, `data` for scripts."""

    message: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "message": self.message, **jsonable(self.data)}


@dataclasses.dataclass(frozen=True, slots=True)
class HelpResult:
    entries: tuple[tuple[str, str], ...]  # (usage, summary)
    details: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "commands": [{"usage": usage, "summary": summary} for usage, summary in self.entries],
            "details": self.details or None,
        }


Result = (
    SlotsResult
    | SlotResult
    | ClusterResult
    | PrincipalsResult
    | ValueResult
    | ScanResult
    | DoneResult
    | HelpResult
)
