"""The client's cached slot map: which drone (name, address) owns each slot.

Built from a commander's `cmd.map` reply. A MOVED answer can patch one slot ahead of the next
full refresh (the redirect names the owner the drone knows of); the patch is kept only if its
epoch is newer than what the map says, so a stale redirect cannot undo a newer map.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keyval.keys import NUM_SLOTS, hash_tag_part, key_slot
from keyval.messages import SlotMap
from wire.errors import BadRequest
from wire.messages import Key


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    drone: str  # principal name: the service name to ask a ticket for
    address: str  # host:port
    epoch: int


class SlotTable:
    """Slot -> Route. Slots with no owner map to None."""

    def __init__(self) -> None:
        self.version = 0
        self.term = 0
        self._routes: list[Route | None] = [None] * NUM_SLOTS

    @classmethod
    def from_map(cls, reply: SlotMap) -> SlotTable:
        table = cls()
        table.version = reply.version
        table.term = reply.term
        for first, last, drone, epoch in reply.ranges:
            if not 0 <= first <= last < NUM_SLOTS:
                raise BadRequest(f"slot map range {first}..{last} outside 0..{NUM_SLOTS - 1}")
            address = reply.drones.get(drone, "")
            route = Route(drone=drone, address=address, epoch=epoch) if address else None
            table._routes[first : last + 1] = [route] * (last - first + 1)
        return table

    def route(self, slot: int) -> Route | None:
        return self._routes[slot]

    def drones(self) -> dict[str, str]:
        """Every drone that owns at least one slot: name -> address."""
        return {r.drone: r.address for r in set(self._routes) if r is not None}

    def apply_moved(self, detail: dict[str, Any]) -> bool:
        """Patch one slot from a MOVED detail; True if the patch was taken."""
        slot, epoch = detail.get("slot"), detail.get("epoch")
        owner, address = detail.get("owner"), detail.get("address")
        if type(slot) is not int or not 0 <= slot < NUM_SLOTS or type(epoch) is not int:
            return False
        if not isinstance(owner, str) or not isinstance(address, str) or not owner or not address:
            return False
        current = self._routes[slot]
        if current is not None and current.epoch >= epoch:
            return False
        self._routes[slot] = Route(drone=owner, address=address, epoch=epoch)
        return True


def prefix_slot(prefix: Key) -> int | None:
    """The one slot every key starting with `prefix` hashes to, or None if they may spread.

    True when the prefix holds a whole non-empty `{tag}`: the tag rule looks at the first `{`
    and the first `}` after it, both inside the prefix, so every longer key has the same tag."""
    if isinstance(prefix, str):
        data = prefix.encode("utf-8", errors="surrogatepass")
    elif isinstance(prefix, bytes):
        data = prefix
    else:
        return None  # an int key's slot depends on all its digits
    if hash_tag_part(data) == data:
        return None
    return key_slot(prefix)
