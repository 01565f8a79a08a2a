"""Heartbeat, lease and clock-drift defaults shared by the commander and the drones.

The safety argument (docs/design.md, "Ownership, leases, fencing") needs no clock sync, only a
bound on how fast two monotonic clocks can drift apart:

- A drone counts its lease from the moment it SENT the heartbeat a grant answers, for
  `drone_lease_ms(lease_ms)` on its own clock: it stops serving early rather than late.
- The commander counts the same lease from the moment it RECEIVED that heartbeat (which is
  later than the send), for `commander_expiry_ms(lease_ms)` on its clock: it gives a slot to
  another drone only after that, i.e. surely after the drone stopped.

If the drone's clock runs at most a fraction d slower than the commander's, the drone's
L*(1-d) lasts at most L*(1-d)/(1-d) = L of commander time, from a send that came before the
receive; so it ends before receive + L. The commander waits receive + L*(1+d) + margin: the
factor (1+d) is a second layer for a commander clock that itself runs fast.
"""

from __future__ import annotations

# Drones heartbeat this often. Six heartbeats fit in one lease, so five in a row may be lost or
# late (a GC pause, a busy event loop) before a healthy drone's lease lapses.
HEARTBEAT_MS = 100

# How long one grant lets a drone serve. Failure detection takes about lease * (1 + drift) +
# margin, so 600 ms keeps "detect + reseed" under the 1 s failover target, well below Redis
# Cluster's default cluster-node-timeout of 15 s.
LEASE_MS = 600

# Bound on the rate difference of two monotonic clocks. Quartz oscillators are specified to
# ~100 ppm (0.0001); 5 % is 500 times that, room for VMs whose clocks stall and catch up.
MAX_CLOCK_DRIFT = 0.05

# Added on the commander's side for its own scheduling delay: the time between a heartbeat
# arriving on the socket and the handler reading the clock, plus the failure-check tick.
EXPIRY_MARGIN_MS = 50

# How often the commander checks for expired leases; also bounds how late a failure is seen.
FAILURE_CHECK_MS = 20

# A restarted commander waits this long for the drones of its persisted map to re-register
# before it treats the missing ones as failed: a few heartbeat periods past one full expiry,
# so a drone that is merely reconnecting is not stripped of its slots.
RESUME_GRACE_MS = 1000

# Bounds on operator-set values: a lease must span several heartbeats, and both must be
# positive and small enough that failure detection stays useful.
MIN_HEARTBEAT_MS = 10
MAX_LEASE_MS = 60_000
MIN_HEARTBEATS_PER_LEASE = 3


def drone_lease_ms(lease_ms: int) -> float:
    """How long a drone may serve after sending a heartbeat whose reply granted it slots."""
    return lease_ms * (1 - MAX_CLOCK_DRIFT)


def commander_expiry_ms(lease_ms: int) -> float:
    """How long after receiving a heartbeat the commander must wait before the lease is surely
    over on the drone (that heartbeat was sent earlier, and the drone's clock may run slow)."""
    return lease_ms * (1 + MAX_CLOCK_DRIFT) + EXPIRY_MARGIN_MS


def check_timing(heartbeat_ms: int, lease_ms: int) -> None:
    """Raise ValueError unless the heartbeat period and lease length can work together."""
    if heartbeat_ms < MIN_HEARTBEAT_MS:
        raise ValueError(f"heartbeat must be at least {MIN_HEARTBEAT_MS} ms")
    if lease_ms > MAX_LEASE_MS:
        raise ValueError(f"lease must be at most {MAX_LEASE_MS} ms")
    if lease_ms < heartbeat_ms * MIN_HEARTBEATS_PER_LEASE:
        raise ValueError(
            f"lease ({lease_ms} ms) must span at least {MIN_HEARTBEATS_PER_LEASE} heartbeats "
            f"({heartbeat_ms} ms each)"
        )
