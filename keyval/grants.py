"""Slot grants: the commander's authenticated statement that a drone may serve some slots.

A grant names the drone, the commander term, and slot ranges each with its epoch. Its MAC is
HMAC-SHA256 under the grant key, which the db creates and hands only to commanders, so a drone
can carry a grant to the db but cannot make or alter one. Leases are not in the grant: the
drone counts its lease from when it sent the heartbeat that the grant answered, on its own
monotonic clock, so no two clocks need to agree.
"""

from __future__ import annotations

import hashlib
import hmac

from wire.codec import encode_canonical
from wire.errors import BadRequest, Fenced, Unauthorized
from wire.messages import Message, message

NUM_SLOTS = 16384
GRANT_KEY_BYTES = 32

# Distinct grants a GrantVerifier remembers as verified. A drone carries its one current grant
# on every request until the map changes, so a cluster needs a few per drone; past this bound
# the oldest is forgotten (and verified again with its HMAC when it comes back).
MAX_VERIFIED_GRANTS = 256


@message("grant")
class Grant(Message):
    """The commander's statement that a drone may serve these slot ranges under this term; HMAC-
    SHA256 under the grant key only commanders and the db hold.
    """

    drone: str
    term: int
    ranges: tuple[tuple[int, int, int], ...]  # (first_slot, last_slot, epoch), sorted, disjoint
    issued_ms: int  # the commander's clock when issued; informative only
    mac: bytes = b""

    def signed_bytes(self) -> bytes:
        return encode_canonical(
            [
                "keyval-grant-v1",
                self.drone,
                self.term,
                [list(r) for r in self.ranges],
                self.issued_ms,
            ]
        )

    def epoch_of(self, slot: int) -> int | None:
        """The epoch this grant gives `slot`, or None when it does not cover it."""
        low, high = 0, len(self.ranges)
        while low < high:
            middle = (low + high) // 2
            first, last, epoch = self.ranges[middle]
            if slot < first:
                high = middle
            elif slot > last:
                low = middle + 1
            else:
                return epoch
        return None

    def slots(self) -> int:
        return sum(last - first + 1 for first, last, _ in self.ranges)


def check_ranges(ranges: tuple[tuple[int, int, int], ...]) -> None:
    """Raise BadRequest unless ranges are sorted, disjoint and inside 0..NUM_SLOTS-1."""
    previous_last = -1
    for first, last, epoch in ranges:
        if not (previous_last < first <= last < NUM_SLOTS) or epoch < 0:
            raise BadRequest(f"bad slot range ({first}, {last}, {epoch})")
        previous_last = last


def sign_grant(grant: Grant, key: bytes) -> Grant:
    check_ranges(grant.ranges)
    mac = hmac.new(key, grant.signed_bytes(), hashlib.sha256).digest()
    return Grant(grant.drone, grant.term, grant.ranges, grant.issued_ms, mac)


def verify_grant(grant: Grant, key: bytes, *, drone: str) -> None:
    """Raise Unauthorized unless `grant` was made with `key` and names `drone`."""
    expected = hmac.new(key, grant.signed_bytes(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, grant.mac):
        raise Unauthorized("grant MAC does not verify: forged or altered grant")
    check_grant_drone(grant, drone)


def check_grant_drone(grant: Grant, drone: str) -> None:
    """Raise Unauthorized unless `grant` names `drone` (the peer presenting it)."""
    if grant.drone != drone:
        raise Unauthorized(f"grant is for drone {grant.drone!r}, presented by {drone!r}")


class GrantVerifier:
    """`verify_grant` under one key, remembering the grants that verified.

    A drone sends the same grant bytes with every batch until the slot map changes; the HMAC
    over its canonical encoding is computed once per distinct grant, not once per batch. A
    grant counts as verified only if it equals, field by field (MAC included), one that passed
    `verify_grant` under the current key; the drone it names is checked on every call. A new
    key (`set_key`) forgets every grant. Only the MAC is cached: fencing (term and epoch
    against the slot's fence) stays the caller's, on every request.
    """

    def __init__(self, key: bytes = b"") -> None:
        self._key = key
        self._verified: dict[bytes, Grant] = {}  # MAC -> the grant it verified, oldest first

    @property
    def key(self) -> bytes:
        return self._key

    def set_key(self, key: bytes) -> None:
        """Verify under `key` from now on; grants verified under another key are forgotten."""
        if key != self._key:
            self._verified.clear()
        self._key = key

    def verify(self, grant: Grant, *, drone: str) -> None:
        """Raise Unauthorized unless `grant` was made with the key and names `drone`."""
        known = self._verified.get(grant.mac)
        if known is None or known != grant:
            verify_grant(grant, self._key, drone=drone)
            if len(self._verified) >= MAX_VERIFIED_GRANTS:
                del self._verified[next(iter(self._verified))]
            self._verified[grant.mac] = grant
        else:
            check_grant_drone(grant, drone)

    def __len__(self) -> int:
        return len(self._verified)


def check_fence(grant: Grant, slot: int, fence_term: int, fence_epoch: int) -> int:
    """The grant's epoch for `slot`, or raise Fenced if it is older than the fence."""
    epoch = grant.epoch_of(slot)
    if epoch is None:
        raise Fenced(f"grant does not cover slot {slot}", detail={"slot": slot})
    if grant.term < fence_term or epoch < fence_epoch:
        raise Fenced(
            f"stale grant for slot {slot}: term {grant.term} epoch {epoch}, "
            f"newest seen term {fence_term} epoch {fence_epoch}",
            detail={"slot": slot, "term": fence_term, "epoch": fence_epoch},
        )
    return epoch
