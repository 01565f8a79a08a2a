"""`keyval slots [--config F] [--json]`: print the slot map as ranges with owners and epochs.

Asks the commanders of the client config in turn (cmd.get_map). Text output is one line per
range, `FIRST-LAST  DRONE  ADDRESS  epoch N`, after a header with the map version and term;
`--json` prints the map as one JSON object. Exit 0, or 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from keyval.client.aio import ticket_dialer
from keyval.client.config import load_settings
from keyval.messages import GetMap, SlotMap
from keyval.nodeconfig import ConfigError
from wire.errors import Internal, Unavailable, WireError

EXIT_OK = 0
EXIT_FAILED = 1

# One commander's answer: it serves the map from memory, so seconds mean it is unreachable.
COMMANDER_TIMEOUT_S = 5.0


def register(subparsers: Any) -> None:
    slots = subparsers.add_parser(
        "slots",
        help="print the slot map (ranges, owners, epochs)",
        description="Print the commander's slot map as ranges with their owner and epoch.",
    )
    slots.add_argument("--config", default=None, help="client config (default $KEYVAL_CONFIG)")
    slots.add_argument("--json", action="store_true", help="print one JSON object")
    slots.set_defaults(func=main)


async def fetch_map(config: str | None) -> SlotMap:
    """The slot map from the first commander of `config` that answers."""
    settings = load_settings(config)
    dialer = ticket_dialer(settings)
    failures = []
    for endpoint in settings.commanders:
        try:
            link = await dialer(endpoint.address, endpoint.name, timeout=COMMANDER_TIMEOUT_S)
            try:
                reply = await link.request(GetMap(), timeout=COMMANDER_TIMEOUT_S)
            finally:
                await link.aclose()
        except (WireError, trio.TooSlowError) as error:
            failures.append(f"{endpoint.name} at {endpoint.address}: {error}")
            continue
        if not isinstance(reply, SlotMap):
            raise Internal(f"{endpoint.name} answered get_map with {reply.TYPE}")
        return reply
    raise Unavailable("no commander answered: " + "; ".join(failures))


def render_text(slot_map: SlotMap) -> str:
    owned = sum(last - first + 1 for first, last, _, _ in slot_map.ranges)
    lines = [
        f"map version {slot_map.version}, term {slot_map.term}, leader "
        f"{slot_map.leader or '?'}: {len(slot_map.ranges)} ranges, {owned} slots owned"
    ]
    for first, last, drone, epoch in slot_map.ranges:
        address = slot_map.drones.get(drone, "-")
        lines.append(f"{first:>5}-{last:<5}  {drone:<12} {address:<21} epoch {epoch}")
    return "\n".join(lines)


def render_json(slot_map: SlotMap) -> str:
    return json.dumps(
        {
            "version": slot_map.version,
            "term": slot_map.term,
            "leader": slot_map.leader,
            "ranges": [
                {"first": first, "last": last, "drone": drone, "epoch": epoch}
                for first, last, drone, epoch in slot_map.ranges
            ],
            "drones": slot_map.drones,
        }
    )


def main(args: argparse.Namespace) -> int:
    try:
        slot_map = trio.run(fetch_map, args.config)
    except (ConfigError, WireError) as error:
        print(f"keyval slots: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(render_json(slot_map) if args.json else render_text(slot_map))
    return EXIT_OK
