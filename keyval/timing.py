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
receive; so it ends before receive + L, and the commander waits exactly that: receive + L.
Every delay on the commander's side only makes it safer: reading the clock late in the
handler stamps the receive later, and a late failure check declares the failure later. (Until
Nov 2026 the commander also waited L*d + 50 ms more, "for a commander clock that runs fast" and
"for its own scheduling delay"; neither is a case the argument leaves open, and the 80 ms were
8 % of the 1 s failover target.)
"""

from __future__ import annotations

# Under CPU load (measured, docs/design.md "Under CPU load"): on the shared 2-core machine, 2 to
# 12 busy processes next to a 3-commander, 3-drone cluster (load average 10-15) caused no lease
# expiry and no step-down at all in 45 s runs: CFS serves mostly-sleeping daemons promptly.
# What did cause flapping was a stalled event loop (a process descheduled or paused for a few
# hundred ms; py-spy sampling at 200 Hz does exactly that). With injected stalls of 0.1-0.9 s
# on a random node every 0.3-0.9 s, two 45 s runs (seed 1 / seed 2):
#
#   code, drone leader timeout   drone failed   step-downs   leader silent   reseed runs
#   before (c5ad61b), 300 ms        14 / 16        5 / 3        22 / 17        181 / 137
#   now, 300 ms (chosen)            11 / 5         3 / 2        24 / 12        139 / 68
#   now, 450 ms                        - / 8          - / 4        - / 13          - / 105
#   now, 600 ms                     10 / 8         0 / 3         3 / 9         119 / 105
#
# The code fixes (no 16384-slot scan per commander tick, no failure verdict right after the
# commander's own stall, cached per-heartbeat work on the drone, no reseed on a new term) cut
# failures and reseeds; longer timeouts did not help beyond run-to-run noise, and a stall longer
# than a lease is a real failure the 1 s (drone) and 2 s (leader) targets must report. So the
# defaults stay: heartbeat 100 ms, lease 600 ms, leader timeout 300 ms, leader lease 1 s.

# Drones heartbeat this often. Six heartbeats fit in one lease, so five in a row may be lost or
# late (a GC pause, a busy event loop) before a healthy drone's lease lapses.
HEARTBEAT_MS = 100

# How long one grant lets a drone serve. Failure detection takes the lease after the last
# heartbeat plus a failure-check tick, so 600 ms leaves room for "detect + reseed" under the 1 s
# failover target, well below Redis
# Cluster's default cluster-node-timeout of 15 s.
LEASE_MS = 600

# Bound on the rate difference of two monotonic clocks. Quartz oscillators are specified to
# ~100 ppm (0.0001); 5 % is 500 times that, room for VMs whose clocks stall and catch up.
MAX_CLOCK_DRIFT = 0.05

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
    over on the drone: the drone's `drone_lease_ms` already allows for its clock running slow,
    and the heartbeat was sent before it was received (the module docstring has the proof)."""
    return float(lease_ms)


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
