"""CPU seconds and resident memory of processes, read from /proc (Linux).

CPU is utime + stime from /proc/PID/stat (fields 14 and 15, in clock ticks); RSS is the
second field of /proc/PID/statm (pages). Both are read for a set of pids at once so a
benchmark can take a snapshot before and after its measured window.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from keyval.bench.errors import BenchError, ProcessGone

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# /proc/PID/stat after the ")" that closes the command name: field 3 (state) is index 0,
# so utime (field 14) is index 11 and stime (field 15) index 12.
_UTIME_INDEX = 11
_STIME_INDEX = 12
PROC_ROOT = Path("/proc")


@dataclass(frozen=True, slots=True)
class ServerProcess:
    role: str
    name: str
    pid: int


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` so far; raises ProcessGone if it has exited."""
    try:
        text = (PROC_ROOT / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError) as error:
        raise ProcessGone(f"process {pid} is gone") from error
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[_UTIME_INDEX]) + int(fields[_STIME_INDEX])) / CLOCK_TICKS_PER_S


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid`; raises ProcessGone if it has exited."""
    try:
        text = (PROC_ROOT / str(pid) / "statm").read_text()
    except (FileNotFoundError, ProcessLookupError) as error:
        raise ProcessGone(f"process {pid} is gone") from error
    return int(text.split()[1]) * PAGE_BYTES


def cpu_snapshot(processes: list[ServerProcess]) -> dict[str, float]:
    """name -> CPU seconds so far, for every process."""
    return {process.name: cpu_seconds(process.pid) for process in processes}


def cpu_delta_by_role(
    processes: list[ServerProcess], before: dict[str, float], after: dict[str, float]
) -> dict[str, float]:
    """role -> CPU seconds spent between two snapshots (summed over that role's processes)."""
    totals: dict[str, float] = {}
    for process in processes:
        spent = after[process.name] - before[process.name]
        totals[process.role] = totals.get(process.role, 0.0) + spent
    return totals


def load_nodes(cluster_dir: Path) -> list[ServerProcess]:
    """Every process of a local cluster, from DIR/nodes.json (see keyval.cluster)."""
    path = cluster_dir / "nodes.json"
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise BenchError(f"{path} does not exist: no cluster in {cluster_dir}?") from error
    except json.JSONDecodeError as error:
        raise BenchError(f"{path} is not JSON: {error}") from error
    if not isinstance(entries, list):
        raise BenchError(f"{path} is not a JSON list")
    processes = []
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("role"), str)
            or not isinstance(entry.get("name"), str)
            or type(entry.get("pid")) is not int
            or entry["pid"] <= 0
        ):
            raise BenchError(f"{path}: entry {entry!r} lacks role, name or a positive pid")
        processes.append(ServerProcess(entry["role"], entry["name"], entry["pid"]))
    return processes
