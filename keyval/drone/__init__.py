"""The drone: holds granted slots in memory, serves kv.* requests, writes through to the db.

`register(subparsers)` adds `keyval drone`; `run_drone(options, *, task_status)` is its trio
main for tests and the cluster launcher.
"""

from __future__ import annotations

from keyval.drone.cli import register
from keyval.drone.daemon import run_drone

__all__ = ["register", "run_drone"]
