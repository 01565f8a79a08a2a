"""Retry policy: bounded exponential backoff with jitter under an overall deadline.

Pure arithmetic, no I/O and no clock reads: the caller passes `now` (trio.current_time()) and
a `random.Random`, so tests can check every delay exactly.
"""

from __future__ import annotations

import dataclasses
import random

# The whole of one call (all its retries) must end within this: long enough to ride out a
# drone failover (lease 600 ms + detection + reseed), short enough that a caller is not stuck
# (Redis Cluster clients default to a few seconds; FoundationDB bounds transactions at 5 s).
DEFAULT_DEADLINE_S = 10.0

# First backoff step: about one heartbeat (100 ms) apart, so a retry sees a fresh map.
DEFAULT_BASE_DELAY_S = 0.05

# Largest single backoff step: a lease (600 ms) plus margin, so a retry after failover is soon.
DEFAULT_MAX_DELAY_S = 1.0

# Each step doubles: the usual exponential backoff factor.
DEFAULT_MULTIPLIER = 2.0

# Attempts per call whatever the deadline, so a server answering "retry" at once cannot make
# us spin: 10 s at >= 50 ms steps is at most ~200 attempts; 64 is plenty for a failover.
DEFAULT_MAX_ATTEMPTS = 64

# Timeout of one request on the wire, within the call's deadline.
DEFAULT_REQUEST_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    deadline_s: float = DEFAULT_DEADLINE_S
    base_delay_s: float = DEFAULT_BASE_DELAY_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    multiplier: float = DEFAULT_MULTIPLIER
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")
        if not 0 < self.base_delay_s <= self.max_delay_s:
            raise ValueError("need 0 < base_delay_s <= max_delay_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not self.request_timeout_s > 0:
            raise ValueError("request_timeout_s must be positive")

    def backoff_s(self, attempt: int, rng: random.Random, *, floor_s: float = 0.0) -> float:
        """The pause before retry number `attempt` (1 = first retry): "equal jitter", i.e. half
        the exponential step fixed and half random, so pauses grow but clients do not march
        in step. `floor_s` is a server's retry_after hint; the pause is at least that."""
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        step = min(self.max_delay_s, self.base_delay_s * self.multiplier ** (attempt - 1))
        pause = step / 2 + rng.uniform(0, step / 2)
        return max(pause, min(floor_s, self.max_delay_s))


@dataclasses.dataclass(slots=True)
class Attempts:
    """The retry state of one call: how many tries, and until when."""

    policy: RetryPolicy
    deadline: float  # absolute, on the trio clock
    count: int = 0

    @classmethod
    def start(cls, policy: RetryPolicy, now: float) -> Attempts:
        return cls(policy=policy, deadline=now + policy.deadline_s)

    def remaining_s(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def next_pause_s(self, now: float, rng: random.Random, *, floor_s: float = 0.0) -> float | None:
        """Count a failed try; the pause before the next, or None when no retry is allowed
        (attempts used up, or the pause would end past the deadline)."""
        self.count += 1
        if self.count >= self.policy.max_attempts:
            return None
        pause = self.policy.backoff_s(self.count, rng, floor_s=floor_s)
        if now + pause >= self.deadline:
            return None
        return pause

    def request_timeout_s(self, now: float) -> float:
        return min(self.policy.request_timeout_s, self.remaining_s(now))
