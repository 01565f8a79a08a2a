"""Run a simulation batch with default phases: `python -m keyval.sim --batch-seed N --runs
SEED:WORKLOAD,...` (a failing test prints the exact `run_batch` call to replay it)."""

from __future__ import annotations

import argparse
import sys

from keyval.sim.runner import RunSpec, run_batch


def _specs(text: str) -> list[RunSpec]:
    specs = []
    for item in text.split(","):
        seed, separator, workload = item.partition(":")
        if not separator or not seed.isdigit():
            raise argparse.ArgumentTypeError(f"a run is SEED:WORKLOAD, not {item!r}")
        specs.append(RunSpec(int(seed), workload))
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyval.sim", description=__doc__)
    parser.add_argument("--batch-seed", type=int, required=True)
    parser.add_argument("--runs", type=_specs, required=True, help="SEED:WORKLOAD,...")
    parser.add_argument("--drones", type=int, default=3)
    args = parser.parse_args(argv)
    results = run_batch(args.batch_seed, args.runs, drones=args.drones)
    for result in results:
        print(result.describe())
        for fault in result.faults:
            print(f"  fault {fault}")
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
