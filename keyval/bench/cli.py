"""`scripts/bench` / `python -m keyval.bench`: run, print, and write JSON and BENCHMARKS.md."""

from __future__ import annotations

import logging
import sys

from keyval.bench.errors import BenchError
from keyval.bench.options import parse_options
from keyval.bench.report import print_results, update_markdown, write_json
from keyval.bench.runner import run_failover, run_memory, run_throughput


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        options = parse_options(argv)
        if options.failover:
            outcome = run_failover(options)
        elif options.memory_keys is not None:
            outcome = run_memory(options)
        else:
            outcome = run_throughput(options)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print_results(outcome.throughput, outcome.memory, outcome.notes, outcome.failover)
    if options.json_out is not None:
        write_json(
            options.json_out, outcome.throughput, outcome.memory, outcome.notes, outcome.failover
        )
    if options.markdown is not None:
        try:
            update_markdown(options.markdown, outcome.throughput, outcome.memory, outcome.failover)
        except BenchError as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
        print(f"updated {options.markdown}")
    return 0
