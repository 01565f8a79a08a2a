from __future__ import annotations

import random

import pytest

from keyval.client.policy import Attempts, RetryPolicy


def test_backoff_grows_exponentially_within_jitter_bounds() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=10.0, multiplier=2.0)
    rng = random.Random(1)
    for attempt in range(1, 6):
        step = 0.1 * 2 ** (attempt - 1)
        pause = policy.backoff_s(attempt, rng)
        assert step / 2 <= pause <= step


def test_backoff_is_capped_at_max_delay() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=0.5)
    rng = random.Random(2)
    assert all(policy.backoff_s(attempt, rng) <= 0.5 for attempt in range(1, 40))


def test_backoff_honours_server_retry_after_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay_s=0.01, max_delay_s=1.0)
    rng = random.Random(3)
    assert policy.backoff_s(1, rng, floor_s=0.3) >= 0.3
    assert policy.backoff_s(1, rng, floor_s=60.0) <= 1.0  # a hostile hint cannot stall us


def test_jitter_differs_between_clients() -> None:
    policy = RetryPolicy()
    pauses = {policy.backoff_s(3, random.Random(seed)) for seed in range(10)}
    assert len(pauses) > 1


def test_attempts_stop_before_the_deadline() -> None:
    policy = RetryPolicy(deadline_s=1.0, base_delay_s=0.2, max_delay_s=0.4)
    attempts = Attempts.start(policy, now=100.0)
    rng = random.Random(4)
    now = 100.0
    while (pause := attempts.next_pause_s(now, rng)) is not None:
        now += pause
        assert now < attempts.deadline
    assert attempts.count >= 2


def test_attempts_are_limited_in_number() -> None:
    policy = RetryPolicy(deadline_s=1000.0, max_attempts=3)
    attempts = Attempts.start(policy, now=0.0)
    rng = random.Random(5)
    assert attempts.next_pause_s(0.0, rng) is not None
    assert attempts.next_pause_s(0.0, rng) is not None
    assert attempts.next_pause_s(0.0, rng) is None


def test_request_timeout_shrinks_with_the_remaining_time() -> None:
    policy = RetryPolicy(deadline_s=10.0, request_timeout_s=5.0)
    attempts = Attempts.start(policy, now=0.0)
    assert attempts.request_timeout_s(0.0) == 5.0
    assert attempts.request_timeout_s(8.0) == pytest.approx(2.0)
    assert attempts.request_timeout_s(11.0) == 0.0


@pytest.mark.parametrize(
    "changes",
    [
        {"deadline_s": 0.0},
        {"base_delay_s": 0.0},
        {"base_delay_s": 2.0, "max_delay_s": 1.0},
        {"multiplier": 0.5},
        {"max_attempts": 0},
        {"request_timeout_s": -1.0},
    ],
)
def test_bad_policies_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**changes)  # type: ignore[arg-type]


def test_attempt_numbers_count_from_one() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().backoff_s(0, random.Random())
