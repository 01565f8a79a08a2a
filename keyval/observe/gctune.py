"""Garbage-collector settings for long-running keyval processes.

CPython starts a generation-0 collection after every 700 net container allocations. A daemon
allocates a handful of short-lived containers per message (envelopes, field maps, events) and
few of them form cycles, so at tens of thousands of messages a second those collections, and
the older generations they promote into, walk the same long-lived objects over and over
(perf showed gc_collect_main and the visit_* functions at ~5% of a drone's CPU).

`tune_gc` is called once a process has imported its code: `gc.freeze()` moves everything
alive then (modules, classes, functions, constants) into the permanent generation, which no
collection visits again, and the generation-0 threshold is raised so collections run less
often. Cycles are still collected; they just wait for the larger threshold.
"""

from __future__ import annotations

import gc

# Net container allocations between generation-0 collections (CPython's default is 700).
# 20,000 grew a drone holding 200k keys by ~12 B/key (`bench --memory-keys 200000`: 174 B/key
# before, 176-197 after, three runs): garbage cycles waited longer amid the keys' memory.
GEN0_THRESHOLD = 5_000


def tune_gc() -> None:
    """Freeze what is alive now into the permanent generation and collect less often."""
    gc.collect()  # start-up garbage is freed, not frozen
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
