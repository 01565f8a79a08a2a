"""`python -m keyval.bench`: see keyval.bench.cli."""

from __future__ import annotations

import sys

from keyval.bench.cli import main

if __name__ == "__main__":  # spawned load generators import this module as __mp_main__
    sys.exit(main())
