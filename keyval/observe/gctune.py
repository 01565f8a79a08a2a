"""Garbage-collector settings for long-running keyval processes.

A daemon allocates a handful of short-lived containers per message (envelopes, field maps,
events), so its generation-0 collections run often, and the older generations they promote
into walk the same long-lived objects over and over (perf showed gc_collect_main and the
visit_* functions at ~5% of a drone's CPU).

`tune_gc` is called once a process has imported its code: `gc.freeze()` moves everything
alive then (modules, classes, functions, constants) into the permanent generation, which no
collection visits again. The generation-0 threshold stays CPython's: raising it to 20,000
(and to 5,000) grew a drone holding 200k keys by 8-22 B/key over four runs of
`bench --memory-keys 200000` (174 B/key with the default), as garbage cycles waited longer
amid the keys' memory.
"""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Free start-up garbage, then freeze what is alive into the permanent generation."""
    gc.collect()  # start-up garbage is freed, not frozen
    gc.freeze()
