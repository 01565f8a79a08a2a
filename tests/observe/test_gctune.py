"""tune_gc: start-up objects frozen out of every collection; new cycles still collected."""

from __future__ import annotations

import gc

from keyval.observe.gctune import tune_gc


def test_tune_gc_freezes_start_up_objects_and_still_collects_new_cycles() -> None:
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0  # the modules, classes and functions alive now
        assert gc.get_threshold() == threshold
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # cycles made after start-up are still collected
    finally:
        gc.unfreeze()
