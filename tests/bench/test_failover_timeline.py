"""The failover bench's parts that need no cluster: the per-drone fill plan and the timeline
read back from the cluster's log lines."""

from __future__ import annotations

import calendar
import time
from pathlib import Path

from keyval.bench.failover import FILL_TXN_KEYS, fill_keys
from keyval.bench.timeline import parse_stamp, read_phases
from keyval.keys import NUM_SLOTS, key_slot

KILLED_AT = calendar.timegm(time.strptime("2026-11-22T02:24:37", "%Y-%m-%dT%H:%M:%S")) + 0.8


def test_fill_puts_exactly_as_many_keys_on_each_drone_in_one_drone_chunks() -> None:
    owners = {slot: f"drone-{slot * 3 // NUM_SLOTS + 1}" for slot in range(NUM_SLOTS)}
    chunks = list(fill_keys(owners, ["drone-1", "drone-2", "drone-3"], 1200))
    counts: dict[str, int] = {}
    for chunk in chunks:
        assert 0 < len(chunk) <= FILL_TXN_KEYS
        [drone] = {owners[key_slot(key)] for key in chunk}
        counts[drone] = counts.get(drone, 0) + len(chunk)
    assert counts == {"drone-1": 1200, "drone-2": 1200, "drone-3": 1200}
    all_keys = [key for chunk in chunks for key in chunk]
    assert len(set(all_keys)) == len(all_keys)


def test_phases_are_read_from_the_logs_after_the_kill(tmp_path: Path) -> None:
    (tmp_path / "commander-1.log").write_text(
        "2026-11-22T02:24:30.000Z WARNING commander-1 - keyval.commander: drone drone-2 failed:"
        " its lease expired\n"  # before the kill: another failure
        "2026-11-22T02:24:38.467Z WARNING commander-1 - keyval.commander: drone drone-2 failed:"
        " its lease expired\n"
        "2026-11-22T02:24:38.483Z INFO commander-1 - keyval.commander: map version 4 saved"
        " (4 ranges)\n"
    )
    (tmp_path / "drone-1.log").write_text(
        "2026-11-22T02:24:38.515Z INFO drone-1 - keyval.drone: reseeding 2730 slots in 3 runs\n"
        "2026-11-22T02:24:38.613Z INFO drone-1 - keyval.drone: reseeded 682 of slots"
        " 7510..8191 in 98 ms\n"
        "2026-11-22T02:24:38.937Z INFO drone-1 - keyval.drone: reseeded 1024 of slots"
        " 5462..6485 in 422 ms\n"
        "a line that is not a log line\n"
    )
    phases = read_phases(tmp_path, "drone-2", KILLED_AT)
    assert phases.failed_s is not None and abs(phases.failed_s - 0.667) < 1e-6
    assert phases.map_saved_s is not None and abs(phases.map_saved_s - 0.683) < 1e-6
    assert phases.reseed_started_s is not None and phases.reseed_done_s is not None
    assert abs(phases.reseed_started_s["drone-1"] - 0.715) < 1e-6
    assert abs(phases.reseed_done_s["drone-1"] - 1.137) < 1e-6
    assert phases.summary() == "declared failed 0.667 s, map saved 0.683, reseed 0.715-1.137"


def test_no_failure_in_the_logs_is_no_timeline(tmp_path: Path) -> None:
    (tmp_path / "drone-1.log").write_text(
        "2026-11-22T02:24:38.515Z INFO drone-1 - keyval.drone: reseeding 5 slots in 1 runs\n"
    )
    phases = read_phases(tmp_path, "drone-2", KILLED_AT)
    assert phases.failed_s is None and phases.reseed_started_s is None
    assert phases.summary() == ""


def test_log_stamps_are_utc() -> None:
    assert parse_stamp("1970-01-01T00:00:01", "250") == 1.25
