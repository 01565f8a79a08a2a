"""Run the long `sim` sweep only when asked for (`pytest -m sim`); the default run skips it."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "sim" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="seeded simulation sweep: run with -m sim")
    for item in items:
        if item.get_closest_marker("sim") is not None:
            item.add_marker(skip)
