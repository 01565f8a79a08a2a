"""A drone failover's phases, read back from the cluster's own log lines.

The daemons of a local cluster log text lines to DIR/logs/NAME.log (keyval.observe.logs):

    2026-11-22T02:24:38.467Z WARNING commander-1 - keyval.commander: drone drone-2 failed: ...

Their time stamps are wall-clock milliseconds, so the bench notes the wall-clock time of its
SIGKILL and measures every phase from it: the commander declares the drone failed, saves the
map without it, each surviving drone receives its grant (its reseed starts) and installs the
last slot (its reseed ends). Lines before the kill are ignored; a phase not found is None.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from pathlib import Path

# A log line's time stamp, node and message (keyval.observe.logs.TextFormatter).
_LINE = re.compile(
    r"^(?P<date>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(?P<ms>\d{3})Z \S+ (?P<node>\S+) \S+ (?P<text>.*)$"
)
_FAILED = re.compile(r"keyval\.commander: drone (?P<drone>\S+) failed")
_SAVED = re.compile(r"keyval\.commander: map version \d+ saved")
# keyval.drone.reseed: one line when a grant hands over slots, one per finished run.
_RESEED_START = re.compile(r"keyval\.drone: reseeding \d+ slots")
_RESEEDED = re.compile(r"keyval\.drone: reseeded (?P<slots>\d+) of slots \d+\.\.\d+ in")

# A line stamped up to this long before the kill still belongs to it: the kill's own stamp is
# read in the bench process, the log's in the daemon (both the same wall clock, ms rounding).
CLOCK_SLACK_S = 0.002


@dataclass(frozen=True, slots=True)
class Phases:
    """Seconds from the kill (None: not seen in the logs)."""

    failed_s: float | None = None  # the commander declared the drone failed
    map_saved_s: float | None = None  # the first map saved after that
    reseed_started_s: dict[str, float] | None = None  # surviving drone -> first grant's reseed
    reseed_done_s: dict[str, float] | None = None  # surviving drone -> its last run finished

    def as_row(self) -> dict[str, object]:
        return {
            "failed_s": self.failed_s,
            "map_saved_s": self.map_saved_s,
            "reseed_started_s": self.reseed_started_s,
            "reseed_done_s": self.reseed_done_s,
        }

    def summary(self) -> str:
        """`failed 0.634 s, map saved 0.650, reseed 0.66-0.91` (the parts that were seen)."""
        parts = []
        if self.failed_s is not None:
            parts.append(f"declared failed {self.failed_s:.3f} s")
        if self.map_saved_s is not None:
            parts.append(f"map saved {self.map_saved_s:.3f}")
        if self.reseed_started_s and self.reseed_done_s:
            parts.append(
                f"reseed {min(self.reseed_started_s.values()):.3f}-"
                f"{max(self.reseed_done_s.values()):.3f}"
            )
        return ", ".join(parts)


def parse_stamp(date: str, milliseconds: str) -> float:
    """A log time stamp (UTC) as Unix seconds."""
    return calendar.timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%S")) + int(milliseconds) / 1000


def read_phases(logs: Path, victim: str, killed_at_unix_s: float) -> Phases:
    """The phases of `victim`'s failover in the *.log files of `logs`."""
    failed: float | None = None
    saved: float | None = None
    started: dict[str, float] = {}
    done: dict[str, float] = {}
    events: list[tuple[float, str, str]] = []
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            match = _LINE.match(line)
            if match is None:
                continue
            at = parse_stamp(match["date"], match["ms"]) - killed_at_unix_s
            if at >= -CLOCK_SLACK_S:
                events.append((max(at, 0.0), match["node"], match["text"]))
    for at, node, text in sorted(events):
        if failed is None:
            found = _FAILED.search(text)
            if found is not None and found["drone"] == victim:
                failed = at
            continue
        if saved is None and _SAVED.search(text):
            saved = at
        if node == victim:
            continue
        if _RESEED_START.search(text):
            started.setdefault(node, at)
        elif _RESEEDED.search(text):
            done[node] = at
    return Phases(failed, saved, started or None, done or None)
