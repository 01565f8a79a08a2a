"""A bounded replay cache: remembers keys until their expiry time (`now` passed in)."""

from __future__ import annotations

import heapq
from collections.abc import Hashable


class ReplayCacheFull(Exception):
    """More live entries than the cache may hold; the caller should refuse for now."""


class ReplayCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries <= 0:
            raise ValueError("a replay cache holds at least one entry")
        self._max_entries = max_entries
        self._expiry_by_key: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Hashable]] = []  # (expiry, tiebreak, key)
        self._counter = 0

    def __len__(self) -> int:
        return len(self._expiry_by_key)

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, _, key = heapq.heappop(self._heap)
            if self._expiry_by_key.get(key) == expiry:
                del self._expiry_by_key[key]

    def seen_before(self, key: Hashable, expires_at: float, now: float) -> bool:
        """True if `key` is live in the cache; otherwise remember it until `expires_at`."""
        self._purge(now)
        if key in self._expiry_by_key:
            return True
        if len(self._expiry_by_key) >= self._max_entries:
            raise ReplayCacheFull(f"replay cache holds {self._max_entries} live entries")
        self._expiry_by_key[key] = expires_at
        self._counter += 1
        heapq.heappush(self._heap, (expires_at, self._counter, key))
        return False
