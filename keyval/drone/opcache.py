"""The drone's bounded memory of mutation results by op id.

A client retries a mutation with the same 16-byte op id; while the drone remembers the first
reply it answers with that reply and applies nothing. The cache is bounded (oldest entries go
first); past it, the db, which keeps op results for an hour, is the authority: a retried op
reaches the db, which answers with the first result and applies nothing.

An op still in flight is remembered too, so a retry that overtakes the first attempt waits for
its reply instead of applying the mutation a second time.

Memory: the cache is full after MAX_CACHED_OPS writes and stays so, which shows in the drone's
footprint per key (the 1M-key benchmark). So an entry is kept small: a plain dict from op id
to the reply, a deque of op ids for the eviction order (8 B each; an OrderedDict's links cost
~50 B), and the commonest reply, `Written`, kept as one int (`version << 1 | existed`) and
rebuilt on a hit: 155 B per entry traced (tests/drone/test_opcache.py) against 257 for an
OrderedDict of `Written` objects, whose 64 Ki entries took 24 MB of RSS.
"""

from __future__ import annotations

from collections import deque

import trio

from keyval.messages import Written
from wire.errors import BadRequest, Unavailable
from wire.messages import Message

# Remembered replies. One entry is ~150 B (op id, a compact reply, dict slot, deque slot): 64 Ki
# entries cost ~10 MiB and cover seconds to minutes of retries at high write rates; the db
# covers the rest.
MAX_CACHED_OPS = 64 * 1024

# Op ids are 16 random bytes (UUID-sized): collisions between clients are negligible.
OP_ID_BYTES = 16

# How long a retry waits for an identical op still in flight before answering UNAVAILABLE.
INFLIGHT_WAIT_MS = 5000

# What the waiting retry is told if the first attempt is still running.
INFLIGHT_RETRY_AFTER_MS = 100


def check_op_id(op_id: bytes) -> None:
    if len(op_id) != OP_ID_BYTES:
        raise BadRequest(f"op_id must be {OP_ID_BYTES} bytes, got {len(op_id)}")


# A remembered reply: a `Written` packed into an int (see _pack), any other reply as it is.
_Stored = Message | int


def _pack(reply: Message) -> _Stored:
    if type(reply) is Written:
        return reply.version << 1 | reply.existed
    return reply


def _unpack(stored: _Stored) -> Message:
    if isinstance(stored, int):
        return Written(version=stored >> 1, existed=bool(stored & 1))
    return stored


class OpCache:
    """op_id -> first reply, bounded; plus the ops still being applied."""

    def __init__(self, max_entries: int = MAX_CACHED_OPS) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self._max_entries = max_entries
        self._replies: dict[bytes, _Stored] = {}
        self._order: deque[bytes] = deque()  # the op ids of _replies, oldest first
        # Ops being applied; the event exists only once a retry waits for one (most never do).
        self._inflight: dict[bytes, trio.Event | None] = {}

    def __len__(self) -> int:
        return len(self._replies)

    def lookup(self, op_id: bytes) -> Message | None:
        stored = self._replies.get(op_id)
        return None if stored is None else _unpack(stored)

    async def begin(self, op_id: bytes) -> Message | None:
        """Claim `op_id` for a new attempt, or return the reply of an earlier one.

        If another attempt is in flight, wait (bounded) for it and return its reply; if it
        failed, this attempt claims the op. The caller must call `finish` after a claim."""
        while True:
            reply = self.lookup(op_id)
            if reply is not None:
                return reply
            if op_id not in self._inflight:
                self._inflight[op_id] = None
                return None
            running = self._inflight[op_id]
            if running is None:
                running = self._inflight[op_id] = trio.Event()
            with trio.move_on_after(INFLIGHT_WAIT_MS / 1000):
                await running.wait()
                continue
            raise Unavailable(
                "the same operation is still in flight",
                detail={"retry_after_ms": INFLIGHT_RETRY_AFTER_MS},
            )

    def claim_nowait(self, op_id: bytes) -> bool:
        """Claim `op_id` for a new attempt unless one is in flight (then `begin` waits for it).
        The caller has found no reply (`lookup`) and must call `finish` after a claim."""
        if op_id in self._inflight:
            return False
        self._inflight[op_id] = None
        return True

    def finish(self, op_id: bytes, reply: Message | None) -> None:
        """End the attempt that claimed `op_id`; remember `reply` (None: it failed, forget)."""
        if reply is not None:
            if op_id not in self._replies:
                self._order.append(op_id)
            self._replies[op_id] = _pack(reply)
            while len(self._order) > self._max_entries:
                del self._replies[self._order.popleft()]
        event = self._inflight.pop(op_id, None)
        if event is not None:
            event.set()

    def statistics(self) -> dict[str, int]:
        return {"cached": len(self._replies), "inflight": len(self._inflight)}
