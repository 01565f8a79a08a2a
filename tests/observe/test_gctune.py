"""tune_gc: start-up objects frozen out of every collection, gen-0 collections less often."""

from __future__ import annotations

import gc

from keyval.observe.gctune import GEN0_THRESHOLD, tune_gc


def test_tune_gc_freezes_start_up_objects_and_raises_the_gen0_threshold() -> None:
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GEN0_THRESHOLD, *threshold[1:])
        assert gc.get_freeze_count() > 0  # the modules, classes and functions alive now
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # cycles made after start-up are still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
