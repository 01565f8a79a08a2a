"""Start `keyval cluster up` as a real process tree on loopback for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

READY_LINE = "keyval cluster ready"
START_TIMEOUT_S = 120.0


class LocalCluster:
    def __init__(
        self, root: Path, *, drones: int = 3, commanders: int = 1, backend: str | None = None
    ) -> None:
        self.root = root
        self.drones = drones
        self.commanders = commanders
        self.backend = backend
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    @property
    def client_config(self) -> str:
        return str(self.root / "client.toml")

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "keyval",
            "cluster",
            "up",
            "--dir",
            str(self.root),
            "--drones",
            str(self.drones),
            "--commanders",
            str(self.commanders),
            "--base-port",
            "0",
        ]
        if self.backend:
            argv += ["--backend", self.backend]
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_output, args=(ready,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready.wait(0.1):
                return
            if self.process.poll() is not None:
                self._reader.join(5)
                output = "".join(self.output)
                self.stop()
                raise RuntimeError(f"cluster exited early:\n{output}\n{self.logs()}")
        output = "".join(self.output)
        self.stop()
        raise RuntimeError(f"cluster not ready in {START_TIMEOUT_S} s:\n{output}\n{self.logs()}")

    def _read_output(self, ready: threading.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if READY_LINE in line:
                ready.set()

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = json.loads((self.root / "nodes.json").read_text())
        return nodes

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.nodes() if n["name"] == name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.node(name)["pid"], sig)

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        code = self.process.returncode
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        return code


@contextlib.contextmanager
def running_cluster(root: Path, **options: Any) -> Iterator[LocalCluster]:
    """A started LocalCluster, stopped at exit whatever happens."""
    cluster = LocalCluster(root, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
