"""Show a result: rich tables for people (`render`), JSON for scripts (`render_json`)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from keyval.admin.results import (
    ClusterResult,
    DoneResult,
    HelpResult,
    PrincipalsResult,
    Result,
    ScanResult,
    SlotResult,
    SlotsResult,
    ValueResult,
    jsonable,
)
from keyval.keys import NUM_SLOTS

# Load fields a drone reports that `status` shows as columns, in this order (others are
# left to --json).
LOAD_COLUMNS = (("keys", "keys"), ("bytes", "memory"), ("ops_per_s", "ops/s"))


def render_json(result: Result) -> str:
    return json.dumps(result.to_json(), indent=2, sort_keys=True)


def render(result: Result, console: Console) -> None:
    if isinstance(result, SlotsResult):
        _slots(result, console)
    elif isinstance(result, SlotResult):
        _slot(result, console)
    elif isinstance(result, ClusterResult):
        _cluster(result, console)
    elif isinstance(result, PrincipalsResult):
        _principals(result, console)
    elif isinstance(result, ValueResult):
        _value(result, console)
    elif isinstance(result, ScanResult):
        _scan(result, console)
    elif isinstance(result, DoneResult):
        console.print(result.message, markup=False, highlight=False)
    elif isinstance(result, HelpResult):
        _help(result, console)
    else:  # a new result type without a renderer is a bug, not something to skip
        raise TypeError(f"no renderer for {type(result).__name__}")


def _add_row(table: Table, *cells: str) -> None:
    """Cells as plain text: names, keys and values are never read as rich markup."""
    table.add_row(*(Text(cell) for cell in cells))


def _slots(result: SlotsResult, console: Console) -> None:
    title = f"slot map v{result.version}, term {result.term}, leader {result.leader or '?'}"
    if result.drone is not None:
        title += f", drone {result.drone}"
    console.print(title, markup=False, highlight=False)  # a line, not a title: never wrapped
    table = Table()
    table.add_column("slots", justify="right")
    table.add_column("count", justify="right")
    table.add_column("drone")
    table.add_column("epoch", justify="right")
    for row in result.ranges:
        _add_row(table, f"{row.first}-{row.last}", str(row.count), row.drone, str(row.epoch))
    console.print(table)
    owned = sum(row.count for row in result.ranges)
    summary = f"{len(result.ranges)} ranges, {owned} slots"
    if result.drone is None:
        summary += f" of {NUM_SLOTS}" + (f", {result.unowned} UNOWNED" if result.unowned else "")
    console.print(summary, highlight=False)


def _slot(result: SlotResult, console: Console) -> None:
    head = (
        f"key {result.key!r} -> slot {result.slot}"
        if result.key is not None
        else (f"slot {result.slot}")
    )
    if not result.drone:
        console.print(f"{head}: no owner (term {result.term})", markup=False, highlight=False)
        return
    console.print(
        f"{head}: owner {result.drone} at {result.address or '?'}, epoch {result.epoch}, "
        f"term {result.term}",
        markup=False,
        highlight=False,
    )


def _cluster(result: ClusterResult, console: Console) -> None:
    head = f"term {result.term}, leader {result.leader or '?'}, map v{result.map_version}"
    if result.phase:
        head += f", {result.phase}"
    unowned = NUM_SLOTS - result.slots_owned
    head += f"; {result.slots_owned}/{NUM_SLOTS} slots owned"
    if unowned:
        head += f" ({unowned} UNOWNED)"
    console.print(head, markup=False, highlight=False)
    table = Table()
    for column in ("role", "name", "address", "health", "slots"):
        table.add_column(column, justify="right" if column == "slots" else "left")
    if result.view == "status":
        table.add_column("heartbeat", justify="right")
        for _, label in LOAD_COLUMNS:
            table.add_column(label, justify="right")
    for commander in result.commanders:
        health = "unreachable"
        if commander.reachable:
            health = "leader" if commander.leader else "follower"
            if commander.view:
                health += f" ({commander.view})"
        cells = ["commander", commander.name, commander.address, health, ""]
        _add_row(table, *cells, *([""] * (len(table.columns) - len(cells))))
    for drone in result.drones:
        cells = ["drone", drone.name, drone.address, drone.health, str(drone.slots)]
        if result.view == "status":
            ago = drone.last_heartbeat_ms_ago
            cells.append("" if ago is None else f"{ago} ms ago")
            cells.extend(_load_cell(drone.load.get(field)) for field, _ in LOAD_COLUMNS)
        _add_row(table, *cells)
    console.print(table)
    if not result.detailed:
        console.print(
            "(health and load: this commander does not answer cmd.status yet)", highlight=False
        )


def _load_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _principals(result: PrincipalsResult, console: Console) -> None:
    table = Table(title="principals", title_justify="left")
    for column in ("name", "role", "state", "public key", "prefixes"):
        table.add_column(column)
    for p in result.principals:
        state = "enabled" if p.enabled else "DISABLED"
        _add_row(table, p.name, p.role, state, p.public_key_hex[:16], ", ".join(p.prefixes))
    console.print(table)


def _value(result: ValueResult, console: Console) -> None:
    if not result.found:
        console.print(f"{result.key!r}: (absent)", markup=False, highlight=False)
        return
    shown = json.dumps(jsonable(result.value))
    console.print(
        f"{result.key!r} = {shown}  (version {result.version})", markup=False, highlight=False
    )


def _scan(result: ScanResult, console: Console) -> None:
    table = Table(title=f"scan {result.prefix or ''}".rstrip(), title_justify="left")
    table.add_column("key")
    table.add_column("value")
    table.add_column("version", justify="right")
    for key, value, version in result.items:
        _add_row(table, repr(key), json.dumps(jsonable(value)), str(version))
    console.print(table)
    more = " (more: raise --limit)" if result.truncated else ""
    console.print(f"{len(result.items)} keys{more}", highlight=False)


def _help(result: HelpResult, console: Console) -> None:
    for usage, summary in result.entries:  # two lines each: reads well at any width
        console.print(usage, style="bold", markup=False, highlight=False)
        console.print(f"    {summary}", markup=False, highlight=False)
    if result.details:
        console.print(result.details, markup=False, highlight=False)
    if len(result.entries) > 1:
        console.print(
            "Add --json to any command for JSON. Ctrl-C cancels a command, Ctrl-D quits.",
            highlight=False,
        )
