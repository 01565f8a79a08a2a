"""The commander: slot map, drone membership and heartbeats, failure detection, grants.

`register(subparsers)` adds `keyval commander`; `run_commander(options, *, task_status)` is the
trio main the launcher and tests run in-process. The node logic is `state.CommanderState`
(sans-I/O); `daemon` is the trio shell around it.
"""

from __future__ import annotations

from keyval.commander.cli import register
from keyval.commander.daemon import run_commander

__all__ = ["register", "run_commander"]
