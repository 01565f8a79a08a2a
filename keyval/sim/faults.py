"""The real-process fault runner: `scripts/faults` (`python -m keyval.sim.faults`).

It starts `keyval cluster up` (real daemons on loopback), runs the register, bank and ledger
workloads (`keyval.sim.faultload`) from several client tasks over a few client connections,
recording every operation, and every `--kill-every` seconds SIGKILLs (then restarts) or
SIGSTOPs (then resumes) a random drone, commander or the db (`keyval.sim.injector`). After
`--seconds` every node is brought back and a quiet phase runs the same workloads, which must
succeed again (liveness). Then it reads back every written key and judges the history
(`keyval.sim.verdict`): prints a PASS/FAIL line with counts, exit code 0 on PASS, 1 on FAIL.

Every wait is bounded, and the cluster and every daemon it restarted are stopped on the way
out, on Ctrl-C or SIGTERM too. Not built: cutting connections with a fault-injecting TCP proxy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from keyval.client import aconnect
from keyval.client.aio import AsyncClient
from keyval.client.config import load_settings
from keyval.sim.faultload import Ledger, RotatingRegisters, SpreadBank
from keyval.sim.history import ABSENT, Key, Recorder, write_jsonl
from keyval.sim.injector import ALL_FAULTS, FaultKind, Injector, parse_faults
from keyval.sim.procs import ProcessClusterError, open_process_cluster
from keyval.sim.verdict import Report, judge
from keyval.sim.workloads import WorkloadError
from wire.errors import WireError

# Client connections the tasks share (each its own login and links): more than one, so
# operations also race across connections; few, since the machine runs the daemons too.
CLIENT_CONNECTIONS = 3

# One call's overall deadline, retries included: short, so a fault turns an operation into an
# unknown outcome quickly instead of stalling its task; every step is also cut at
# STEP_DEADLINE_S (a cut operation is recorded as unknown).
CLIENT_DEADLINE_S = 3.0
STEP_DEADLINE_S = 8.0

# A pause between one task's operations, so faults land between operations as well as in them,
# and the runner leaves CPU to the daemons.
THINK_MAX_S = 0.02

# Register keys are replaced this often (see faultload.RotatingRegisters).
REGISTER_GENERATION_S = 10.0

# The quiet phase must complete this many ok operations: the cluster recovered.
QUIET_TARGET_OPERATIONS = 20

# The bank's set-up and the final reads retry for this long (the cluster may be settling).
SETUP_TIMEOUT_S = 30.0
FINAL_READ_TIMEOUT_S = 60.0
FINAL_READ_RETRY_S = 0.5
# Keys per final get_many: well below the frame limit for these small keys and values.
FINAL_READ_BATCH_KEYS = 256

# Bounds on the options: a run is for minutes, not days; more daemons than this is a load test.
MAX_SECONDS = 3600.0
MAX_DRONES = 16
MAX_COMMANDERS = 8
MAX_PROCESSES = 32

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class FaultRunError(RuntimeError):
    """The run could not be carried out (the cluster did not start, set-up failed)."""


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived; the cluster has been stopped."""


@dataclass(frozen=True, slots=True)
class FaultOptions:
    seconds: float = 60.0
    kill_every_s: float = 5.0
    quiet_s: float = 10.0
    drones: int = 3
    commanders: int = 1
    seed: int = 0
    faults: tuple[FaultKind, ...] = ALL_FAULTS
    register_processes: int = 4
    bank_processes: int = 2
    ledger_processes: int = 2

    def __post_init__(self) -> None:
        for name in ("seconds", "kill_every_s", "quiet_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
        if not 0 < self.seconds <= MAX_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}]")
        if not 0 < self.quiet_s <= MAX_SECONDS:
            raise ValueError(f"quiet seconds must be in (0, {MAX_SECONDS:g}]")
        if self.kill_every_s <= 0:
            raise ValueError("kill_every_s must be positive")
        if not 1 <= self.drones <= MAX_DRONES:
            raise ValueError(f"drones must be 1..{MAX_DRONES}")
        if not 1 <= self.commanders <= MAX_COMMANDERS:
            raise ValueError(f"commanders must be 1..{MAX_COMMANDERS}")
        processes = (self.register_processes, self.bank_processes, self.ledger_processes)
        if any(count < 0 for count in processes) or not 1 <= sum(processes) <= MAX_PROCESSES:
            raise ValueError(f"client processes: none negative, 1..{MAX_PROCESSES} in all")
        if not all(isinstance(kind, FaultKind) for kind in self.faults):
            raise ValueError("faults must be FaultKind values")


class _Stepper(Protocol):
    async def step(self, client: AsyncClient, process: int, rng: random.Random) -> bool: ...


@dataclass
class _Tally:
    ok: int = 0
    unexpected: list[str] = field(default_factory=list)


class _Workloads:
    def __init__(self, recorder: Recorder, prefix: str) -> None:
        self.recorder = recorder
        self.registers = RotatingRegisters(recorder, prefix)
        self.bank = SpreadBank(recorder, prefix)
        self.ledger = Ledger(recorder, prefix)

    def keys(self) -> list[Key]:
        return [*self.registers.keys, *self.bank.keys, *self.ledger.keys]

    def assign(self, options: FaultOptions) -> list[_Stepper]:
        """One workload per client process."""
        return (
            [self.registers] * options.register_processes
            + [self.bank] * options.bank_processes
            + [self.ledger] * options.ledger_processes
        )


async def _client_loop(
    workload: _Stepper, client: AsyncClient, process: int, rng: random.Random, tally: _Tally
) -> None:
    """Operations back to back until cancelled. The workloads record WireErrors as unknown
    outcomes; anything else is a client bug, recorded (unknown) and counted, and the loop
    goes on so the run still ends with a verdict."""
    while True:
        with trio.move_on_after(STEP_DEADLINE_S):
            try:
                ok = await workload.step(client, process, rng)
                tally.ok += ok  # not `tally.ok += await ...`: that reads before the await
            except Exception as error:  # reported in the verdict: see the docstring
                tally.unexpected.append(f"p{process}: {type(error).__name__}: {error}")
        await trio.sleep(rng.uniform(0, THINK_MAX_S))


async def _run_clients(
    workloads: _Workloads,
    clients: Sequence[AsyncClient],
    options: FaultOptions,
    rng: random.Random,
    until_s: float,
) -> _Tally:
    tally = _Tally()
    with trio.move_on_at(until_s):
        async with trio.open_nursery() as nursery:
            for process, workload in enumerate(workloads.assign(options)):
                client = clients[process % len(clients)]
                loop_rng = random.Random(rng.random())
                nursery.start_soon(_client_loop, workload, client, process, loop_rng, tally)
            while True:
                await trio.sleep(REGISTER_GENERATION_S)
                workloads.registers.rotate()
    return tally


async def _final_read(client: AsyncClient, keys: Sequence[Key]) -> dict[Key, object]:
    """Every key's value (ABSENT for none), retried until FINAL_READ_TIMEOUT_S."""
    final: dict[Key, object] = {}
    last: Exception | None = None
    with trio.move_on_after(FINAL_READ_TIMEOUT_S):
        for start in range(0, len(keys), FINAL_READ_BATCH_KEYS):
            batch = keys[start : start + FINAL_READ_BATCH_KEYS]
            while True:
                try:
                    entries = await client.get_many_entries(batch)
                    break
                except WireError as error:
                    last = error
                    await trio.sleep(FINAL_READ_RETRY_S)
            for key in batch:
                entry = entries[key]
                final[key] = entry.value if entry.version else ABSENT
        return final
    raise WorkloadError(f"final read not done in {FINAL_READ_TIMEOUT_S:g} s: {last}")


async def _setup_bank(bank: SpreadBank, client: AsyncClient) -> None:
    with trio.move_on_after(SETUP_TIMEOUT_S):
        await bank.setup(client)
        return
    raise FaultRunError(f"bank set-up did not finish in {SETUP_TIMEOUT_S:g} s")


async def run_faults(
    options: FaultOptions, root: Path, *, log: Callable[[str], None], history_file: Path | None
) -> Report:
    """One whole run under `root`; returns the report (never raises for a failed check)."""
    rng = random.Random(options.seed)
    recorder = Recorder()
    workloads = _Workloads(recorder, f"faults{options.seed}")
    errors: list[str] = []
    try:
        async with open_process_cluster(
            root, drones=options.drones, commanders=options.commanders
        ) as cluster:
            log(f"cluster up: {', '.join(cluster.nodes)}")
            settings = dataclasses.replace(
                load_settings(cluster.client_config), deadline_s=CLIENT_DEADLINE_S
            )
            async with AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(aconnect(settings))
                    for _ in range(CLIENT_CONNECTIONS)
                ]
                await _setup_bank(workloads.bank, clients[0])
                injector = Injector(cluster, rng, log)
                fault_end_s = trio.current_time() + options.seconds
                log(f"fault phase: {options.seconds:g} s, a fault every {options.kill_every_s:g} s")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        injector.run, options.faults, options.kill_every_s, fault_end_s
                    )
                    fault_tally = await _run_clients(workloads, clients, options, rng, fault_end_s)
                await injector.restore()
                log(f"quiet phase: {options.quiet_s:g} s, every node up")
                quiet_end_s = trio.current_time() + options.quiet_s
                quiet_tally = await _run_clients(workloads, clients, options, rng, quiet_end_s)
                injector.check_exits()
                final: dict[Key, object] = {}
                try:
                    await workloads.bank.final_snapshot(clients[0])
                    final = await _final_read(clients[0], workloads.keys())
                except WorkloadError as error:
                    errors.append(str(error))
                errors += injector.errors
                if injector.error_count > len(injector.errors):
                    errors.append(f"{injector.error_count - len(injector.errors)} more errors")
                for message in fault_tally.unexpected + quiet_tally.unexpected:
                    errors.append(f"client error that is not a keyval error: {message}")
    finally:
        if history_file is not None:
            with history_file.open("w") as stream:
                write_jsonl(recorder.history(), stream)
    return judge(
        recorder.history(),
        final,
        bank_accounts=workloads.bank.keys,
        bank_total=workloads.bank.total,
        faults=injector.counts,
        quiet_ok_operations=quiet_tally.ok,
        quiet_target_operations=QUIET_TARGET_OPERATIONS,
        errors=errors,
        notes={
            "seed": options.seed,
            "seconds": options.seconds,
            "kill_every_s": options.kill_every_s,
            "drones": options.drones,
            "commanders": options.commanders,
            "register_keys": len(workloads.registers.keys),
            "ledger_keys": len(workloads.ledger.keys),
            "fault_phase_ok_operations": fault_tally.ok,
        },
    )


async def _watch_signals(cancel_scope: trio.CancelScope, received: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            received.append(signum)
            cancel_scope.cancel()
            return


async def _main_async(
    options: FaultOptions, root: Path, log: Callable[[str], None], history_file: Path | None
) -> Report:
    received: list[int] = []
    report: Report | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, nursery.cancel_scope, received)
        report = await run_faults(options, root, log=log, history_file=history_file)
        nursery.cancel_scope.cancel()
    if received or report is None:
        raise Interrupted(f"stopped by signal {received[0] if received else '?'}")
    return report


# Errors that mean the run could not be done (reported, exit 1), not a bug of the runner.
RUN_NOT_CARRIED_OUT = (ProcessClusterError, FaultRunError, WireError, trio.TooSlowError)


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups that trio's nurseries raise."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/faults",
        description="Start a local keyval cluster of real daemons, run recorded workloads while "
        "killing and pausing drones, commanders and the db, then check the history.",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="fault phase (default 60)")
    parser.add_argument(
        "--kill-every", type=float, default=5.0, help="seconds between faults (default 5)"
    )
    parser.add_argument(
        "--quiet-seconds", type=float, default=10.0, help="quiet phase after faults (default 10)"
    )
    parser.add_argument("--drones", type=int, default=3)
    parser.add_argument("--commanders", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None, help="default: from the time")
    parser.add_argument(
        "--faults",
        default=",".join(kind.value for kind in ALL_FAULTS),
        help="comma-separated fault kinds (default: all of them)",
    )
    parser.add_argument("--dir", type=Path, help="cluster folder, kept (default: a temp folder)")
    parser.add_argument("--history", type=Path, help="write the JSON-lines history here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 2**31
    try:
        options = FaultOptions(
            seconds=args.seconds,
            kill_every_s=args.kill_every,
            quiet_s=args.quiet_seconds,
            drones=args.drones,
            commanders=args.commanders,
            seed=seed,
            faults=parse_faults(args.faults),
        )
    except ValueError as error:
        parser.print_usage(sys.stderr)
        print(f"scripts/faults: {error}", file=sys.stderr)
        return EXIT_USAGE
    root = args.dir or Path(tempfile.mkdtemp(prefix="keyval-faults-"))
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[faults {time.monotonic() - started:7.2f}s] {message}", file=sys.stderr, flush=True)

    log(f"seed {seed}; cluster in {root}")
    try:
        report = trio.run(_main_async, options, root, log, args.history)
    except BaseException as error:  # sorted below; anything else is re-raised
        leaves = _leaves(error)
        if any(isinstance(leaf, KeyboardInterrupt | Interrupted) for leaf in leaves):
            log(f"interrupted; cluster stopped; files in {root}")
            return EXIT_INTERRUPTED
        if all(isinstance(leaf, RUN_NOT_CARRIED_OUT) for leaf in leaves):
            reasons = "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves)
            log(f"run not carried out: {reasons}; files in {root}")
            return EXIT_FAIL
        raise
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.describe())
    if report.passed and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        log(f"cluster files and logs kept in {root}")
    return EXIT_PASS if report.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
