"""Long runs stay out of the default suite: tests marked `slow` (long end-to-end, benchmark
and fault runs) or `sim` (the seeded simulation sweep) run only when `-m` selects them,
e.g. `scripts/test -m sim` or `scripts/test -m slow`. Their short forms are in the default run."""

from __future__ import annotations

import pytest

OPT_IN_MARKERS = ("slow", "sim")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expression = config.getoption("markexpr", "") or ""
    for marker in OPT_IN_MARKERS:
        if marker in expression:
            continue
        skip = pytest.mark.skip(reason=f"long run: select it with -m {marker}")
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)
