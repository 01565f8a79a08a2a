"""Stopping child processes: SIGTERM all, wait out one shared grace period, SIGKILL the rest."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable


def stop_processes(processes: Iterable[subprocess.Popen[bytes]], grace_s: float) -> None:
    """Ask every process still running to stop, then kill whichever outlives `grace_s`."""
    children = list(processes)
    for process in children:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in children:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
