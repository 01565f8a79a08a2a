"""The workloads of a real-process fault run, built on `keyval.sim.workloads`.

- `RotatingRegisters`: the register workload on a fresh set of keys every few seconds
  (Jepsen's independent keys): the checker's search grows fast with the operations of unknown
  outcome on one key, which kills produce, so each key sees only a bounded stretch of the run.
- `SpreadBank`: the bank workload with every account under its own `{tag}`, so transfers and
  snapshots span drones (cross-drone transactions, two-phase commit).
- `Ledger`: writes of fresh keys, each once, spread over all slots; the final read-back of every
  acknowledged key is the "no acknowledged durable write lost" check across every drone.
"""

from __future__ import annotations

import itertools
import random

from keyval.client.aio import AsyncClient
from keyval.sim.history import Recorder
from keyval.sim.workloads import BANK_ACCOUNTS, Bank, Register, recorded_put


class RotatingRegisters:
    name = "register"

    def __init__(self, recorder: Recorder, prefix: str) -> None:
        self.recorder = recorder
        self.prefix = prefix
        self.generations = [Register(recorder, f"{prefix}-g0")]

    def rotate(self) -> None:
        """Later operations use new keys; the old keys keep their history for the checker."""
        self.generations.append(Register(self.recorder, f"{self.prefix}-g{len(self.generations)}"))

    @property
    def keys(self) -> list[str]:
        return [key for generation in self.generations for key in generation.keys]

    async def step(self, client: AsyncClient, process: int, rng: random.Random) -> bool:
        return await self.generations[-1].step(client, process, rng)


class SpreadBank(Bank):
    """Bank accounts on different slots, hence (with several drones) on different drones."""

    def __init__(self, recorder: Recorder, prefix: str) -> None:
        super().__init__(recorder, prefix)
        self.keys = [f"{{{prefix}-bank-{index}}}" for index in range(BANK_ACCOUNTS)]


class Ledger:
    """Each operation writes a new key once with a unique value."""

    name = "ledger"

    def __init__(self, recorder: Recorder, prefix: str) -> None:
        self.recorder = recorder
        self.prefix = prefix
        self.keys: list[str] = []
        self._numbers = itertools.count(1)

    async def step(self, client: AsyncClient, process: int, rng: random.Random) -> bool:
        number = next(self._numbers)
        key = f"{self.prefix}-ledger-{number}"
        self.keys.append(key)
        return await recorded_put(self.recorder, client, process, key, number)
