"""The renderers directly: rich text for people, JSON for scripts."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from keyval.admin.render import render, render_json
from keyval.admin.results import (
    ClusterResult,
    CommanderRow,
    DoneResult,
    DroneRow,
    RangeRow,
    ScanResult,
    SlotResult,
    SlotsResult,
    ValueResult,
    jsonable,
)


def shown(result: object) -> str:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    render(result, console)  # type: ignore[arg-type]
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(output, str)
    return output


SLOTS = SlotsResult(
    3, 9, "commander-2", (RangeRow(0, 99, "drone-1", 4), RangeRow(100, 199, "[b]x", 1))
)


def test_slots_table_counts_and_unowned() -> None:
    text = shown(SLOTS)
    assert "slot map v9, term 3, leader commander-2" in text
    assert "0-99" in text and "100" in text and "drone-1" in text
    assert "[b]x" in text  # names are never read as rich markup
    assert "2 ranges, 200 slots of 16384, 16184 UNOWNED" in text
    data = json.loads(render_json(SLOTS))
    assert data["unowned"] == 16184 and data["slots"] == 200
    assert data["ranges"][1] == {"first": 100, "last": 199, "drone": "[b]x", "epoch": 1}


def test_slot_with_and_without_owner() -> None:
    assert "slot 5: owner drone-1 at h:1, epoch 2, term 3" in shown(
        SlotResult(5, "drone-1", "h:1", 2, 3)
    )
    assert "slot 5: no owner (term 3)" in shown(SlotResult(5, "", "", 0, 3))
    keyed = SlotResult(12182, "drone-3", "h:3", 1, 1, key="foo")
    assert "key 'foo' -> slot 12182: owner drone-3" in shown(keyed)
    assert json.loads(render_json(SlotResult(5, "", "", 0, 3)))["drone"] is None


def cluster(view: str, detailed: bool) -> ClusterResult:
    drones = (
        DroneRow("drone-1", "h:1", 8192, "ok", 40, {"keys": 12, "bytes": 4096, "ops_per_s": 2.25}),
        DroneRow("drone-2", "h:2", 8192, "late", 900, {}),
    )
    return ClusterResult(
        view,
        4,
        "commander-1",
        7,
        "running" if detailed else "",
        (
            CommanderRow("commander-1", "h:9", True, True),
            CommanderRow("commander-2", "h:8", False, False),
        ),
        drones,
        16384,
        detailed,
    )


def test_status_shows_health_heartbeat_and_load() -> None:
    text = shown(cluster("status", True))
    assert "term 4, leader commander-1, map v7, running; 16384/16384 slots owned" in text
    assert "unreachable" in text and "leader" in text
    assert "40 ms ago" in text and "4096" in text and "2.2" in text and "late" in text
    assert "does not answer cmd.status" not in text


def test_nodes_without_cmd_status_says_so() -> None:
    text = shown(cluster("nodes", False))
    assert "heartbeat" not in text
    assert "(health and load: this commander does not answer cmd.status yet)" in text
    data = json.loads(render_json(cluster("nodes", False)))
    assert data["phase"] is None and data["commanders"][1]["reachable"] is False
    assert data["drones"][0]["load"]["keys"] == 12


def test_values_scans_and_bytes_in_json() -> None:
    assert "'k' = {\"a\": [1, 2]}  (version 7)" in shown(ValueResult("k", True, {"a": [1, 2]}, 7))
    assert "'k': (absent)" in shown(ValueResult("k", False, None, 0))
    scan = ScanResult("p", (("p1", b"\x00\xff", 3),), truncated=True)
    assert "1 keys (more: raise --limit)" in shown(scan)
    assert json.loads(render_json(scan))["items"][0]["value"] == {"bytes_hex": "00ff"}
    assert jsonable({1: (b"a", None)}) == {"1": [{"bytes_hex": "61"}, None]}


def test_done_prints_its_message_and_json_adds_ok() -> None:
    done = DoneResult("drone-1 drained", {"drone": "drone-1"})
    assert shown(done).strip() == "drone-1 drained"
    assert json.loads(render_json(done)) == {
        "ok": True,
        "message": "drone-1 drained",
        "drone": "drone-1",
    }


def test_an_unknown_result_type_is_a_bug() -> None:
    with pytest.raises(TypeError, match="no renderer for str"):
        shown("not a result")
