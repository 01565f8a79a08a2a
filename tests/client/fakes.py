"""An in-process fake cluster for client tests: a commander and drones that answer with real
keyval messages over keyval.net connections on memory streams (PSK-authenticated channel).

The drones keep data in a dict and check ownership against the fake's slot assignment, so
MOVED is what a real drone would say. `inject(address, error, count)` makes a drone answer the
next `count` requests with an error, to drive the retry paths; `refused[canonical key]` fails
every get or get_many that reads that key (as a drone refuses a key outside a principal's
prefixes); `gates[address]` holds that drone's requests until the event is set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import trio
import trio.testing

from keyval import net
from keyval.client.links import Link
from keyval.keys import NUM_SLOTS, canonical_key, key_slot
from keyval.messages import (
    Committed,
    CompareAndSet,
    Delete,
    Get,
    GetMany,
    GetMap,
    Put,
    Scan,
    ScanPage,
    SlotMap,
    TxnCommit,
    ValueReply,
    ValuesReply,
    Written,
)
from wire.channel import PeerInfo, PskClientAuth, PskServerAuth
from wire.errors import BadRequest, Conflict, Moved, NotLeader, ServiceError, Unavailable
from wire.messages import Message

PSK = b"k" * 32
EPOCH = 1


@dataclasses.dataclass
class FakeDrone:
    name: str
    address: str
    data: dict[bytes, tuple[Any, Any, int]] = dataclasses.field(default_factory=dict)
    requests: list[Message] = dataclasses.field(default_factory=list)
    applied_ops: dict[bytes, Message] = dataclasses.field(default_factory=dict)


class FakeCluster:
    def __init__(self, drones: int = 2, commanders: int = 1) -> None:
        self.drones = {
            f"10.0.0.{i}:6240": FakeDrone(f"drone-{i}", f"10.0.0.{i}:6240")
            for i in range(1, drones + 1)
        }
        self.commanders = [f"10.0.1.{i}:6232" for i in range(1, commanders + 1)]
        self.leader = self.commanders[0]
        names = [d.name for d in self.drones.values()]
        # Even split of slots over drones, in ranges.
        self.owner: list[str | None] = [
            names[slot * len(names) // NUM_SLOTS] for slot in range(NUM_SLOTS)
        ]
        self.map_version = 1
        self.map_requests = 0
        self.injected: dict[str, list[ServiceError]] = {}
        self.lose_replies: dict[str, int] = {}  # address -> replies to drop after applying
        self.down: set[str] = set()
        self.version_counter = 0
        self.dials = 0
        self.renamed: dict[str, str] = {}
        self.refused: dict[bytes, ServiceError] = {}  # canonical key -> error for any read of it
        self.gates: dict[str, trio.Event] = {}  # address -> requests wait until it is set

    # ------------------------------------------------------------ test controls

    def drone_named(self, name: str) -> FakeDrone:
        return next(d for d in self.drones.values() if d.name == name)

    def move_slot(self, slot: int, name: str) -> None:
        """Move a slot's data and ownership to another drone (the client's map is now stale)."""
        old = self.owner[slot]
        self.owner[slot] = name
        self.map_version += 1
        if old is not None:
            source, target = self.drone_named(old), self.drone_named(name)
            for canonical in [c for c, (k, _, _) in source.data.items() if key_slot(k) == slot]:
                target.data[canonical] = source.data.pop(canonical)

    def inject(self, address: str, error: ServiceError, count: int = 1) -> None:
        self.injected.setdefault(address, []).extend([error] * count)

    def lose_reply(self, address: str, count: int = 1) -> None:
        """Apply the next `count` requests at `address` but answer UNAVAILABLE (a lost reply)."""
        self.lose_replies[address] = self.lose_replies.get(address, 0) + count

    def rebind(self, old: str, new: str) -> None:
        """Rename an address (after binding a real port); handlers made before follow it."""
        self.renamed[old] = new
        if old in self.drones:
            drone = self.drones.pop(old)
            drone.address = new
            self.drones[new] = drone
        else:
            index = self.commanders.index(old)
            self.commanders[index] = new
            if self.leader == old:
                self.leader = new

    # ------------------------------------------------------------ the wire

    def slot_map(self) -> SlotMap:
        ranges: list[tuple[int, int, str, int]] = []
        for slot, owner in enumerate(self.owner):
            if owner is None:
                continue
            if ranges and ranges[-1][2] == owner and ranges[-1][1] == slot - 1:
                first, _, _, epoch = ranges[-1]
                ranges[-1] = (first, slot, owner, epoch)
            else:
                ranges.append((slot, slot, owner, EPOCH + self.map_version))
        return SlotMap(
            term=1,
            version=self.map_version,
            ranges=ranges,
            drones={d.name: d.address for d in self.drones.values()},
            leader=self.leader,
        )

    def handler_for(self, original: str) -> net.Handler:
        async def handle(peer: PeerInfo, msg: Message) -> Message:
            address = self.renamed.get(original, original)
            gate = self.gates.get(address)
            if gate is not None:
                await gate.wait()
            queued = self.injected.get(address)
            if queued:
                raise queued.pop(0)
            if address in self.commanders:
                return self._commander(address, msg)
            reply = self._drone(self.drones[address], msg)
            if self.lose_replies.get(address, 0) > 0:
                self.lose_replies[address] -= 1
                raise Unavailable("reply lost")
            return reply

        return handle

    def _commander(self, address: str, msg: Message) -> Message:
        if not isinstance(msg, GetMap):
            raise BadRequest(f"commander got {msg.TYPE}")
        self.map_requests += 1
        if address != self.leader:
            raise NotLeader("not the leader", detail={"leader": self.leader})
        return self.slot_map()

    def _check_owner(self, drone: FakeDrone, key: Any) -> None:
        slot = key_slot(key)
        owner = self.owner[slot]
        if owner != drone.name:
            address = self.drone_named(owner).address if owner else ""
            raise Moved(
                f"slot {slot} is not here",
                detail={
                    "slot": slot,
                    "epoch": EPOCH + self.map_version,
                    "owner": owner or "",
                    "address": address,
                },
            )

    def _check_refused(self, key: Any) -> None:
        error = self.refused.get(canonical_key(key))
        if error is not None:
            raise error

    def _next_version(self) -> int:
        self.version_counter += 1
        return self.version_counter

    def _drone(self, drone: FakeDrone, msg: Message) -> Message:
        drone.requests.append(msg)
        op_id = getattr(msg, "op_id", None)
        if op_id is not None and op_id in drone.applied_ops:
            return drone.applied_ops[op_id]
        reply = self._drone_reply(drone, msg)
        if op_id is not None:
            drone.applied_ops[op_id] = reply
        return reply

    def _drone_reply(self, drone: FakeDrone, msg: Message) -> Message:
        if isinstance(msg, Get):
            self._check_owner(drone, msg.key)
            self._check_refused(msg.key)
            found = drone.data.get(canonical_key(msg.key))
            if found is None:
                return ValueReply(found=False)
            return ValueReply(found=True, value=found[1], version=found[2])
        if isinstance(msg, GetMany):
            items: list[tuple[bool, Any, int]] = []
            for key in msg.keys:
                self._check_owner(drone, key)
                self._check_refused(key)
                entry = drone.data.get(canonical_key(key))
                items.append((True, entry[1], entry[2]) if entry else (False, None, 0))
            return ValuesReply(items=items)
        if isinstance(msg, Put):
            self._check_owner(drone, msg.key)
            version = self._next_version()
            drone.data[canonical_key(msg.key)] = (msg.key, msg.value, version)
            return Written(version=version)
        if isinstance(msg, Delete):
            self._check_owner(drone, msg.key)
            existed = drone.data.pop(canonical_key(msg.key), None) is not None
            return Written(version=self._next_version() if existed else 0, existed=existed)
        if isinstance(msg, CompareAndSet):
            self._check_owner(drone, msg.key)
            entry = drone.data.get(canonical_key(msg.key))
            if (entry[2] if entry else 0) != msg.expected_version:
                raise Conflict("version changed", detail={"key": msg.key})
            version = self._next_version()
            drone.data[canonical_key(msg.key)] = (msg.key, msg.value, version)
            return Written(version=version)
        if isinstance(msg, TxnCommit):
            return self._commit(drone, msg)
        if isinstance(msg, Scan):
            return self._scan(drone, msg)
        raise BadRequest(f"drone got {msg.TYPE}")

    def _commit(self, drone: FakeDrone, msg: TxnCommit) -> Message:
        for key, _ in msg.reads:
            self._check_owner(drone, key)
        for key, _, _ in msg.writes:
            self._check_owner(drone, key)
        for key, version in msg.reads:
            entry = drone.data.get(canonical_key(key))
            if (entry[2] if entry else 0) != version:
                raise Conflict("read set changed", detail={"key": key})
        versions = []
        for key, op, value in msg.writes:
            version = self._next_version()
            if op == "put":
                drone.data[canonical_key(key)] = (key, value, version)
            else:
                drone.data.pop(canonical_key(key), None)
            versions.append(version)
        return Committed(versions=versions)

    def _scan(self, drone: FakeDrone, msg: Scan) -> Message:
        selected = []
        for canonical in sorted(drone.data):
            key, value, version = drone.data[canonical]
            if msg.slot is not None and key_slot(key) != msg.slot:
                continue
            if msg.after is not None and canonical <= msg.after:
                continue
            if msg.prefix is not None and not (
                type(key) is type(msg.prefix) and key.startswith(msg.prefix)  # type: ignore[union-attr,arg-type]
            ):
                continue
            if msg.start is not None and canonical < canonical_key(msg.start):
                continue
            if msg.end is not None and canonical >= canonical_key(msg.end):
                continue
            selected.append((key, value, version))
        page = selected[: msg.limit]
        more = len(selected) > msg.limit
        return ScanPage(items=page, after=canonical_key(page[-1][0]) if more else None)


class MemoryDialer:
    """Dial a FakeCluster address over memory streams: a real net.Connection to a real
    net.serve_stream, running in `nursery`."""

    def __init__(self, cluster: FakeCluster, nursery: trio.Nursery) -> None:
        self._cluster = cluster
        self._nursery = nursery

    async def __call__(self, address: str, service: str, *, timeout: float) -> Link:
        self._cluster.dials += 1
        if address in self._cluster.down or (
            address not in self._cluster.drones and address not in self._cluster.commanders
        ):
            raise Unavailable(f"cannot connect to {address}")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server_auth = PskServerAuth({"client": ("client", PSK)}, server_name=service)
        self._nursery.start_soon(
            net.serve_stream, server_stream, server_auth, self._cluster.handler_for(address)
        )
        auth = PskClientAuth("client", "client", PSK)
        return await net.Connection.from_stream(client_stream, auth, timeout=timeout)
