"""Seeded entropy for a simulation, so a run replays from its seed.

The daemons draw randomness the way production code should: `os.urandom` for nonces, op ids
and transaction ids (auth, client), and an unseeded `random.Random()` where a caller passes
none (the commander's election jitter). Inside a simulation both would make two runs of one
seed differ: the election's timing changes who leads when, and ids that are compared or
hashed change the order things happen in.

`seeded_entropy(seed)` replaces, for the duration of one simulation, `os.urandom` with bytes
from one seeded generator and `random.Random` with a subclass whose unseeded instances are
seeded from that generator (an explicit seed is kept). Only callers that look the names up at
call time (`os.urandom(n)`, `random.Random()`) are affected; keys made by `cryptography` come
from OpenSSL and stay random: they have fixed lengths, so they change bytes on the simulated
wire but not the order of events. Both are restored on exit; one simulation per process at a
time. Never use this outside a simulation: the bytes are predictable by design.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

# Bits of the seed handed to each unseeded `random.Random()` (Python's own default seeding
# uses 2496 bytes of OS entropy; 64 bits from a seeded generator are plenty to keep instances
# apart in a replayable run).
INSTANCE_SEED_BITS = 64


@contextlib.contextmanager
def seeded_entropy(seed: int) -> Iterator[random.Random]:
    """Make `os.urandom` and unseeded `random.Random()` deterministic; yields the source."""
    source = random.Random(seed)
    original_urandom = os.urandom
    original_random = random.Random

    def urandom(size: int) -> bytes:
        if size < 0:
            raise ValueError("negative argument not allowed")
        return source.randbytes(size)

    class SeededRandom(original_random):  # type: ignore[valid-type,misc]
        def __init__(self, x: Any = None) -> None:
            super().__init__(source.getrandbits(INSTANCE_SEED_BITS) if x is None else x)

    os.urandom = urandom
    random.Random = SeededRandom  # type: ignore[misc]
    try:
        yield source
    finally:
        os.urandom = original_urandom
        random.Random = original_random  # type: ignore[misc]
