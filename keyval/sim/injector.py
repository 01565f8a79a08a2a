"""Faults injected into a real-process cluster on a fixed beat: SIGKILL + restart, SIGSTOP +
SIGCONT, of a random drone, commander or the db. One fault at a time; each is undone (the node
restarted at its old address, or resumed) before the next beat, so the cluster always has a
chance to recover, and every fault is bounded in time.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Callable, Sequence

import trio

from keyval.sim.procs import ProcessCluster, ProcessClusterError

# How long a killed node stays down before its restart. Past the drones' 600 ms lease the
# commander reassigns a dead drone's slots; below it, the drone comes back to its own.
DOWN_MIN_S = 0.2
DOWN_MAX_S = 3.0

# How long a paused (SIGSTOP) node stays frozen. A drone frozen past its lease is the classic
# zombie: when it wakes it must not serve the slots it lost.
PAUSE_MIN_S = 0.1
PAUSE_MAX_S = 3.0

# Errors kept verbatim; past this the rest are only counted.
MAX_ERRORS_KEPT = 20


class FaultKind(enum.StrEnum):
    KILL_DRONE = "kill-drone"
    KILL_COMMANDER = "kill-commander"
    KILL_DB = "kill-db"
    PAUSE_DRONE = "pause-drone"
    PAUSE_COMMANDER = "pause-commander"
    PAUSE_DB = "pause-db"

    @property
    def role(self) -> str:
        return self.value.partition("-")[2]

    @property
    def kills(self) -> bool:
        return self.value.startswith("kill-")


ALL_FAULTS = tuple(FaultKind)


def parse_faults(text: str) -> tuple[FaultKind, ...]:
    """`kill-drone,pause-db` -> the kinds; raises ValueError naming the valid ones."""
    kinds = []
    for item in text.split(","):
        try:
            kinds.append(FaultKind(item.strip()))
        except ValueError:
            valid = ", ".join(kind.value for kind in FaultKind)
            raise ValueError(f"unknown fault {item.strip()!r}; choose from {valid}") from None
    if not kinds:
        raise ValueError("name at least one fault")
    return tuple(dict.fromkeys(kinds))


class Injector:
    """Injects faults from one seeded generator; `counts` by kind, `errors` it met."""

    def __init__(
        self, cluster: ProcessCluster, rng: random.Random, log: Callable[[str], None]
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.log = log
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.error_count = 0

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)
        self.log(f"error: {message}")

    async def run(self, kinds: Sequence[FaultKind], every_s: float, until_s: float) -> None:
        """A fault every `every_s` until `until_s`; a fault under way is finished, not cut."""
        if every_s <= 0:
            raise ValueError("every_s must be positive")
        next_s = trio.current_time() + every_s
        while kinds and next_s < until_s:
            await trio.sleep_until(next_s)
            kind = self.rng.choice(list(kinds))
            try:
                await self.inject(kind)
            except (ProcessClusterError, trio.TooSlowError, OSError) as error:
                self.error(f"{kind} failed: {type(error).__name__}: {error}")
            self.check_exits()
            next_s = max(next_s + every_s, trio.current_time())

    async def inject(self, kind: FaultKind) -> None:
        candidates = [
            name
            for name in self.cluster.names(kind.role)
            if self.cluster.is_running(name) and not self.cluster.is_paused(name)
        ]
        if not candidates:
            self.log(f"skip {kind}: no running {kind.role}")
            return
        name = self.rng.choice(candidates)
        if kind.kills:
            down_s = self.rng.uniform(DOWN_MIN_S, DOWN_MAX_S)
            self.log(f"SIGKILL {name}, restart after {down_s:.2f} s")
            await self.cluster.kill(name)
            self.counts[kind] += 1
            await trio.sleep(down_s)
            await self._restart(name)
        else:
            pause_s = self.rng.uniform(PAUSE_MIN_S, PAUSE_MAX_S)
            self.log(f"SIGSTOP {name} for {pause_s:.2f} s")
            self.cluster.pause(name)
            self.counts[kind] += 1
            await trio.sleep(pause_s)
            self.cluster.resume(name)

    async def _restart(self, name: str) -> None:
        try:
            await self.cluster.restart(name)
        except ProcessClusterError as error:
            self.error(f"restart of {name} failed: {error}")
        else:
            self.log(f"{name} serves again")

    def check_exits(self) -> None:
        """A node that died without our SIGKILL is a crash: an error of the run."""
        for name in self.cluster.exited():
            self.error(f"{name} exited without being killed; see logs/{name}.log")
            self.cluster.mark_dead(name)

    async def restore(self) -> None:
        """Before the quiet phase: every node running and not paused."""
        self.check_exits()
        for name in list(self.cluster.nodes):
            if self.cluster.is_paused(name):
                self.cluster.resume(name)
            if not self.cluster.is_running(name):
                await self._restart(name)
