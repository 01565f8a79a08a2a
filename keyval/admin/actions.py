"""Carry out a parsed command against the cluster and return a result object.

`await execute(invocation, remote, progress)`; `progress(text)` is called while `move` and
`drain` wait for the commander to finish (the REPL shows it; one-shots with --json pass a
no-op). Errors: keyval.admin.errors for what the tool refuses, wire.errors for what the
cluster refuses (Unauthorized for a non-admin principal, NotFound for a dead drone, ...).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from auth import keys
from auth.messages import PrincipalAdd, PrincipalList, PrincipalListReply, PrincipalSetEnabled
from keyval import messages
from keyval.admin.errors import AdminError, UsageError
from keyval.admin.grammar import COMMANDS, SPECS, Invocation, find_spec
from keyval.admin.remote import AdminRemote
from keyval.admin.results import (
    ClusterResult,
    CommanderRow,
    DoneResult,
    DroneRow,
    HelpResult,
    PrincipalRow,
    PrincipalsResult,
    RangeRow,
    Result,
    ScanResult,
    SlotResult,
    SlotsResult,
    ValueResult,
)
from keyval.keys import key_slot
from keyval.messages import ClusterStatus, MapChange, SlotMap
from keyval.timing import LEASE_MS
from wire.errors import Internal, NotFound

Progress = Callable[[str], None]
Handler = Callable[[Invocation, AdminRemote, Progress], Awaitable[Result]]

# How long `move` / `drain` wait for the saved map to show the change. A move waits for the old
# owner's lease (600 ms by default) and one map save; a drain of a big drone a few of those.
CHANGE_WAIT_S = 30.0
# Map polls while waiting: often enough to feel live, rare enough not to load the commander.
CHANGE_POLL_S = 0.2
# A drone whose last heartbeat is older than this is shown as "late" (the lease is gone then).
LATE_HEARTBEAT_MS = LEASE_MS
# Names of the messages a rebalance would need; keyval.messages has none yet.


async def execute(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    spec = SPECS[invocation.command]
    if spec.repl_only:
        raise UsageError(f"{spec.name} only makes sense in the REPL")
    return await HANDLERS[invocation.command](invocation, remote, progress)


def local_result(invocation: Invocation) -> Result | None:
    """The result of a command that needs no cluster (help), else None."""
    if invocation.command != "help":
        return None
    return help_result(invocation.values.get("command"))


# ---------------------------------------------------------------- help


async def _help(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    return help_result(invocation.values.get("command"))


def help_result(name: str | None) -> HelpResult:
    if not name:
        return HelpResult(tuple((spec.usage, spec.summary) for spec in COMMANDS))
    spec, rest = find_spec(name.split())
    if rest:
        raise UsageError(f"help takes a command name, not {name!r}")
    return HelpResult(((spec.usage, spec.summary),), spec.details)


# ---------------------------------------------------------------- the slot map


def _rows(slot_map: SlotMap) -> tuple[RangeRow, ...]:
    return tuple(
        RangeRow(first, last, drone, epoch) for first, last, drone, epoch in slot_map.ranges
    )


async def _slots(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    slot_map = await remote.get_map()
    drone = invocation.values.get("drone")
    rows = _rows(slot_map)
    if drone is not None:
        if drone not in slot_map.drones and not any(row.drone == drone for row in rows):
            raise NotFound(f"the commander knows no drone named {drone!r}{_known(slot_map)}")
        rows = tuple(row for row in rows if row.drone == drone)
    return SlotsResult(slot_map.term, slot_map.version, slot_map.leader, rows, drone)


def _known(slot_map: SlotMap) -> str:
    return f" (drones: {', '.join(sorted(slot_map.drones))})" if slot_map.drones else ""


def owner_of(slot_map: SlotMap, slot: int) -> tuple[str, int]:
    """(drone, epoch) owning `slot` in the map; ("", 0) when no drone owns it."""
    for first, last, drone, epoch in slot_map.ranges:
        if first <= slot <= last:
            return drone, epoch
    return "", 0


async def _slot_result(remote: AdminRemote, slot: int, key: str | None) -> SlotResult:
    slot_map = await remote.get_map()
    drone, epoch = owner_of(slot_map, slot)
    address = slot_map.drones.get(drone, "")
    return SlotResult(slot, drone, address, epoch, slot_map.term, key)


async def _slot(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    return await _slot_result(remote, invocation.values["slot"], None)


async def _keyslot(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    key = invocation.values["key"]
    return await _slot_result(remote, key_slot(key), key)


# ---------------------------------------------------------------- nodes and status


async def _cluster(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    slot_map = await remote.get_map()
    status = await remote.status()
    views = await remote.views()
    reachable = remote.reachable
    commanders = tuple(
        CommanderRow(
            endpoint.name,
            endpoint.address,
            reachable.get(endpoint.name, False) or endpoint.name in views,
            endpoint.name == slot_map.leader,
            views.get(endpoint.name, ""),
        )
        for endpoint in remote.settings.commanders
    )
    slot_counts: dict[str, int] = {}
    for row in _rows(slot_map):
        slot_counts[row.drone] = slot_counts.get(row.drone, 0) + row.count
    drones = _drone_rows(slot_map, status, slot_counts)
    return ClusterResult(
        view=invocation.command,
        term=slot_map.term,
        leader=slot_map.leader,
        map_version=slot_map.version,
        phase=status.phase if status else "",
        commanders=commanders,
        drones=drones,
        slots_owned=sum(slot_counts.values()),
        detailed=status is not None,
    )


def _drone_rows(
    slot_map: SlotMap, status: ClusterStatus | None, slot_counts: dict[str, int]
) -> tuple[DroneRow, ...]:
    if status is None:
        names = sorted(set(slot_map.drones) | set(slot_counts))
        return tuple(
            DroneRow(name, slot_map.drones.get(name, ""), slot_counts.get(name, 0), "unknown")
            for name in names
        )
    rows = []
    for drone in sorted(status.drones, key=lambda d: d.name):
        rows.append(
            DroneRow(
                drone.name,
                drone.address,
                drone.slots,
                _health(drone),
                drone.last_heartbeat_ms_ago,
                dict(drone.load),
            )
        )
    reported = {drone.name for drone in status.drones}
    for name in sorted(set(slot_counts) - reported):  # owns slots but is not registered
        rows.append(DroneRow(name, "", slot_counts[name], "no heartbeat"))
    return tuple(rows)


def _health(drone: messages.DroneStatus) -> str:
    if drone.draining:
        return "draining"
    if drone.last_heartbeat_ms_ago > LATE_HEARTBEAT_MS:
        return "late"
    return "ok"


# ---------------------------------------------------------------- principals


async def _principals(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    reply = await remote.authority_request(PrincipalList())
    if not isinstance(reply, PrincipalListReply):
        raise Internal(f"unexpected reply {reply.TYPE}")
    rows = tuple(
        PrincipalRow(p.name, p.role, p.enabled, p.public_key.hex(), tuple(p.prefixes))
        for p in sorted(reply.principals, key=lambda p: p.name)
    )
    return PrincipalsResult(rows)


async def _principal_add(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    name, role = invocation.values["name"], invocation.values["role"]
    out = Path(invocation.values["out"] or f"{name}.key")
    if out.exists():
        raise AdminError(f"{out} exists; refusing to overwrite a key file (pass --out)")
    private_key = keys.generate_private_key()
    prefixes = list(invocation.values["prefix"])
    request = PrincipalAdd(
        name=name, role=role, public_key=keys.public_key_bytes(private_key), prefixes=prefixes
    )
    await remote.authority_request(request)
    keys.save_private_key(out, private_key)  # only once the authority took the public key
    return DoneResult(
        f"added {role} {name}; private key in {out} (keep it secret)",
        {"name": name, "role": role, "key_file": str(out), "prefixes": prefixes},
    )


async def _principal_enabled(
    invocation: Invocation, remote: AdminRemote, progress: Progress
) -> Result:
    name = invocation.values["name"]
    enabled = invocation.command == "principal enable"
    await remote.authority_request(PrincipalSetEnabled(name=name, enabled=enabled))
    state = "enabled" if enabled else "disabled"
    return DoneResult(f"{name} {state}", {"name": name, "enabled": enabled})


# ---------------------------------------------------------------- data


async def _get(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    key = invocation.values["key"]
    entry = await (await remote.data_client()).get_entry(key)
    return ValueResult(key, entry.version != 0, entry.value, entry.version)


async def _put(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    key, value = invocation.values["key"], invocation.values["value"]
    version = await (await remote.data_client()).put(key, value)
    return DoneResult(f"stored {key!r} (version {version})", {"key": key, "version": version})


async def _delete(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    key = invocation.values["key"]
    existed = await (await remote.data_client()).delete(key)
    message = f"deleted {key!r}" if existed else f"{key!r} did not exist"
    return DoneResult(message, {"key": key, "existed": existed})


async def _scan(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    prefix, limit = invocation.values["prefix"], invocation.values["limit"]
    client = await remote.data_client()
    items = []
    async for key, value, version in client.scan(prefix, limit=limit + 1):
        items.append((key, value, version))
    return ScanResult(prefix, tuple(items[:limit]), len(items) > limit)


# ---------------------------------------------------------------- changes


async def _move(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    slot, drone = invocation.values["slot"], invocation.values["drone"]
    before = await remote.get_map()
    old_owner, old_epoch = owner_of(before, slot)
    if old_owner == drone:
        return DoneResult(
            f"slot {slot} already belongs to {drone} (epoch {old_epoch})",
            {"slot": slot, "drone": drone, "epoch": old_epoch, "moved": False},
        )
    change = await remote.commander_request(messages.MoveSlot(slot=slot, drone=drone))
    version = _map_change(change).version
    progress(f"move of slot {slot} {old_owner or '(no owner)'} -> {drone}: map version {version}")

    def moved(slot_map: SlotMap) -> str | None:
        owner, _ = owner_of(slot_map, slot)
        return None if owner == drone else f"slot {slot} still with {owner or '(no owner)'}"

    after = await _wait_for(remote, version, moved, progress)
    _, epoch = owner_of(after, slot)
    return DoneResult(
        f"slot {slot} moved {old_owner or '(no owner)'} -> {drone} (epoch {epoch}, "
        f"map version {after.version})",
        {
            "slot": slot,
            "drone": drone,
            "from": old_owner,
            "epoch": epoch,
            "moved": True,
            "map_version": after.version,
        },
    )


async def _drain(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    drone = invocation.values["drone"]
    before = await remote.get_map()
    owned = _owned(before, drone)
    change = await remote.commander_request(messages.Drain(drone=drone))
    version = _map_change(change).version
    progress(f"draining {drone}: {owned} slots to move (map version {version})")

    def drained(slot_map: SlotMap) -> str | None:
        left = _owned(slot_map, drone)
        return f"{drone} still owns {left} of {owned} slots" if left else None

    after = await _wait_for(remote, version, drained, progress)
    return DoneResult(
        f"{drone} drained: {owned} slots moved (map version {after.version})",
        {"drone": drone, "slots_moved": owned, "map_version": after.version},
    )


async def _rebalance(invocation: Invocation, remote: AdminRemote, progress: Progress) -> Result:
    before = await remote.get_map()
    change = await remote.commander_request(messages.Rebalance())
    version = _map_change(change).version
    progress(f"rebalancing: map version {version}")
    after = await _wait_for(remote, version, lambda slot_map: None, progress)
    old_owners = _owners(before)
    moved = sum(1 for slot, owner in _owners(after).items() if old_owners.get(slot) != owner)
    shares = {row.drone: 0 for row in _rows(after)}
    for row in _rows(after):
        shares[row.drone] += row.count
    return DoneResult(
        f"rebalanced: {moved} slots moved (map version {after.version}); "
        + ", ".join(f"{drone} {count}" for drone, count in sorted(shares.items())),
        {"slots_moved": moved, "map_version": after.version, "slots_per_drone": shares},
    )


def _owners(slot_map: SlotMap) -> dict[int, str]:
    owners: dict[int, str] = {}
    for first, last, drone, _epoch in slot_map.ranges:
        for slot in range(first, last + 1):
            owners[slot] = drone
    return owners


def _owned(slot_map: SlotMap, drone: str) -> int:
    return sum(row.count for row in _rows(slot_map) if row.drone == drone)


def _map_change(reply: object) -> MapChange:
    if not isinstance(reply, MapChange):
        raise Internal(f"unexpected reply {getattr(reply, 'TYPE', reply)!r}")
    return reply


async def _wait_for(
    remote: AdminRemote,
    version: int,
    pending: Callable[[SlotMap], str | None],
    progress: Progress,
) -> SlotMap:
    """Poll the map until it is at least `version` and `pending(map)` says nothing is left.

    Raises AdminError after CHANGE_WAIT_S: the change is asked for but not done yet."""
    last = ""
    with trio.move_on_after(CHANGE_WAIT_S):
        while True:
            slot_map = await remote.get_map()
            left = pending(slot_map) if slot_map.version >= version else "map not saved yet"
            if left is None:
                return slot_map
            if left != last:
                progress(left)
                last = left
            await trio.sleep(CHANGE_POLL_S)
    raise AdminError(
        f"the commander accepted the change (map version {version}) but it is not done after "
        f"{CHANGE_WAIT_S:.0f} s: {last}; check again with 'slots'"
    )


HANDLERS: dict[str, Handler] = {
    "help": _help,
    "slots": _slots,
    "slot": _slot,
    "keyslot": _keyslot,
    "nodes": _cluster,
    "status": _cluster,
    "principals": _principals,
    "principal add": _principal_add,
    "principal disable": _principal_enabled,
    "principal enable": _principal_enabled,
    "get": _get,
    "put": _put,
    "del": _delete,
    "scan": _scan,
    "move": _move,
    "drain": _drain,
    "rebalance": _rebalance,
}

if set(HANDLERS) != {spec.name for spec in COMMANDS if not spec.repl_only}:
    raise RuntimeError("invariant: every command has exactly one handler")

__all__ = ["HANDLERS", "execute", "help_result", "local_result", "owner_of"]
