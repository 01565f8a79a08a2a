"""Seeded simulation runs: boot a cluster, then for each run a fault phase, a quiet phase, checks.

A run is (seed, workload). Its seed drives its fault schedule, its clients' choices and the
network's delays. Booting a cluster reseeds all 16384 slots from the db (in bulk, still a
fraction of a second), so a *batch* boots once and then performs several runs in turn on
disjoint keys; before each run every node is running and the network healed. A batch is named
by its seed and its list of runs: `replay_command` prints it. A batch replays exactly: the fault
schedule, every seeded choice (os.urandom and unseeded random.Random() are seeded during a
batch) and the interleaving (trio's scheduler is seeded too, and disk calls run inline), so two
runs of one batch record the same history with the same virtual times. Each result carries its
history as JSON lines.

Fault phase (`fault_s` virtual seconds): clients run the workload while the fault task kills
and restarts drones, the db and the commander, partitions and heals, pauses and resumes, and
moves slots. Quiet phase: everything is restarted, resumed and healed; the cluster must
complete `quiet_target_ops` ok operations within `quiet_s` (liveness). Then the workload's
checks run over the history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from keyval import net
from keyval.client import aconnect
from keyval.client.aio import AsyncClient
from keyval.keys import NUM_SLOTS
from keyval.messages import MoveSlot
from keyval.sim.clock import inline_thread_calls, sim_clock
from keyval.sim.cluster import ADMIN, CLIENT, DB, SimCluster, SimTransport
from keyval.sim.entropy import seeded_entropy
from keyval.sim.history import Recorder, write_jsonl
from keyval.sim.network import Network
from keyval.sim.workloads import WORKLOADS, Finding, WorkloadError, make_workload
from wire.errors import WireError

logger = logging.getLogger(__name__)

# Client processes per run: enough to overlap operations on every key.
CLIENT_PROCESSES = 6

# A client call gives up (and is recorded as unknown) after this much virtual time, so a
# fault phase is not one long wait.
CLIENT_DEADLINE_S = 3.0

# Network delay per send, in virtual seconds: a LAN's tens to hundreds of microseconds, with a
# tail.
DELAY_MIN_S = 0.0001
DELAY_MAX_S = 0.002

# A simulated disk needs no fsync (a killed node loses its memory, not the host its page
# cache), so scratch files go to this memory file system when there is one: SQLite's
# synchronous=FULL commits then cost no disk wait, which on a shared, busy disk was most of a
# run's wall time.
MEMORY_FILESYSTEM = Path("/dev/shm")

# Pause between one process's operations, so faults land between as well as inside them.
THINK_MAX_S = 0.02

# A fault lasts this long before it is undone (virtual seconds); kills of drones outlive the
# lease (600 ms) so the commander reassigns, and short partitions or pauses do not.
FAULT_HOLD_MIN_S = 0.1
FAULT_HOLD_MAX_S = 2.0
FAULT_GAP_MAX_S = 1.0


class Fault(enum.StrEnum):
    KILL_DRONE = "kill-drone"
    KILL_DB = "kill-db"
    KILL_COMMANDER = "kill-commander"
    PARTITION = "partition"
    PAUSE = "pause"
    MOVE = "move"


ALL_FAULTS = tuple(Fault)


@dataclass(frozen=True, slots=True)
class RunSpec:
    seed: int
    workload: str
    faults: tuple[Fault, ...] = ALL_FAULTS  # plain strings are converted
    fault_s: float = 5.0
    quiet_s: float = 10.0
    quiet_target_ops: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", tuple(Fault(fault) for fault in self.faults))
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}")
        if self.fault_s < 0 or self.quiet_s <= 0 or self.quiet_target_ops < 1:
            raise ValueError("phases need fault_s >= 0, quiet_s > 0 and a positive target")


@dataclass(slots=True)
class RunResult:
    spec: RunSpec
    operations: int = 0
    ok_operations: int = 0
    faults: list[str] = field(default_factory=list)
    quiet_ok_operations: int = 0
    quiet_recovered_s: float | None = None
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    history_jsonl: str = ""  # the recorded client history, for the checker or a bug report

    @property
    def fingerprint(self) -> str:
        """A digest of what the run did (history with times, faults, counts): two runs of one
        seed replay exactly when their fingerprints agree."""
        digest = hashlib.sha256(self.history_jsonl.encode())
        for line in [*self.faults, *self.errors, str(self.operations), str(self.ok_operations)]:
            digest.update(b"\n" + line.encode())
        return digest.hexdigest()

    @property
    def ok(self) -> bool:
        return not self.errors and all(finding.ok for finding in self.findings)

    def describe(self) -> str:
        spec = self.spec
        lines = [
            f"run seed={spec.seed} workload={spec.workload}: {'ok' if self.ok else 'FAILED'} "
            f"({self.operations} ops, {self.ok_operations} ok, {len(self.faults)} faults, "
            f"quiet phase {self.quiet_ok_operations} ok ops)"
        ]
        lines += [f"  error: {error}" for error in self.errors]
        lines += [f"  {f.name}: {f.detail}" for f in self.findings if not f.ok]
        return "\n".join(lines)


class SimulationFailed(AssertionError):
    """A run broke an invariant or did not recover; the message has the replay command."""


def replay_command(batch_seed: int, specs: Sequence[RunSpec]) -> str:
    """The exact call that replays a batch (each spec with its phases and faults)."""
    listed = ", ".join(
        f"RunSpec({spec.seed}, {spec.workload!r}, faults={tuple(str(f) for f in spec.faults)!r}, "
        f"fault_s={spec.fault_s!r}, quiet_s={spec.quiet_s!r}, "
        f"quiet_target_ops={spec.quiet_target_ops!r})"
        for spec in specs
    )
    return f"keyval.sim.runner.run_batch({batch_seed}, [{listed}])"


class _Faults:
    """Injects faults from one seeded generator and undoes them all at the end."""

    def __init__(self, cluster: SimCluster, admin: AsyncClient, rng: random.Random) -> None:
        self.cluster = cluster
        self.admin = admin
        self.rng = rng
        self.log: list[str] = []

    async def run(self, faults: Sequence[Fault], until_s: float) -> None:
        while trio.current_time() < until_s and faults:
            await trio.sleep(self.rng.uniform(0, FAULT_GAP_MAX_S))
            fault = self.rng.choice(list(faults))
            hold_s = self.rng.uniform(FAULT_HOLD_MIN_S, FAULT_HOLD_MAX_S)
            await self.inject(fault, hold_s)

    async def inject(self, fault: Fault, hold_s: float) -> None:
        cluster = self.cluster
        now = f"{trio.current_time():.3f}"
        if fault is Fault.KILL_DRONE:
            name = self.rng.choice(cluster.drone_names)
            self.log.append(f"{now} kill {name} for {hold_s:.2f}s")
            cluster.kill(name)
            await trio.sleep(hold_s)
            await cluster.start(name)
        elif fault is Fault.KILL_DB:
            self.log.append(f"{now} kill db for {hold_s:.2f}s")
            cluster.kill(DB)
            await trio.sleep(hold_s)
            await cluster.start(DB)
        elif fault is Fault.KILL_COMMANDER:
            name = self.rng.choice(cluster.commander_names)
            self.log.append(f"{now} kill {name} for {hold_s:.2f}s")
            cluster.kill(name)
            await trio.sleep(hold_s)
            await cluster.start(name)
        elif fault is Fault.PARTITION:
            nodes = sorted(cluster.network.nodes)
            node = self.rng.choice(nodes)
            one_way = self.rng.random() < 0.3
            self.log.append(f"{now} isolate {node} one_way={one_way} for {hold_s:.2f}s")
            others = set(nodes) - {node}
            cluster.network.partition([node], others, one_way=one_way)
            await trio.sleep(hold_s)
            cluster.network.heal()
        elif fault is Fault.PAUSE:
            name = self.rng.choice([*cluster.drone_names, DB, *cluster.commander_names])
            self.log.append(f"{now} pause {name} for {hold_s:.2f}s")
            cluster.pause(name)
            await trio.sleep(hold_s)
            cluster.resume(name)
        elif fault is Fault.MOVE:
            slot = self.rng.randrange(NUM_SLOTS)
            drone = self.rng.choice(cluster.drone_names)
            self.log.append(f"{now} move slot {slot} to {drone}")
            await self.move(slot, drone)

    async def move(self, slot: int, drone: str) -> None:
        name = self.cluster.commander_names[0]
        address = self.cluster.commander_addresses[0]
        try:
            with trio.move_on_after(CLIENT_DEADLINE_S):
                link = await self.admin.router.pool.get(address, name, timeout=1.0)
                await link.request(MoveSlot(slot=slot, drone=drone), timeout=1.0)
        except WireError as error:
            self.log.append(f"  move refused: {error}")

    async def heal_all(self) -> None:
        cluster = self.cluster
        cluster.network.heal()
        for name, node in cluster.nodes.items():
            cluster.network.resume(name)
            if not node.running:
                await cluster.start(name)


async def _client_loop(
    workload: object, client: AsyncClient, process: int, rng: random.Random, result: RunResult
) -> None:
    """One process: operations back to back with a short think time, until cancelled."""
    while True:
        ok = await workload.step(client, process, rng)  # type: ignore[attr-defined]
        result.operations += 1
        result.ok_operations += ok
        await trio.sleep(rng.uniform(0, THINK_MAX_S))


async def _quiet_phase(
    workload: object, client: AsyncClient, spec: RunSpec, rng: random.Random, result: RunResult
) -> None:
    """Everything is back: the cluster must serve `quiet_target_ops` ok operations in time."""
    started_s = trio.current_time()
    done = trio.Event()
    before = result.ok_operations

    async def loop(process: int, process_rng: random.Random) -> None:
        while result.ok_operations - before < spec.quiet_target_ops:
            ok = await workload.step(client, process, process_rng)  # type: ignore[attr-defined]
            result.operations += 1
            result.ok_operations += ok
            if not ok:
                await trio.sleep(process_rng.uniform(0, THINK_MAX_S))
        done.set()

    with trio.move_on_after(spec.quiet_s):
        async with trio.open_nursery() as nursery:
            for process in range(CLIENT_PROCESSES):
                nursery.start_soon(loop, process, random.Random(rng.random()))
            await done.wait()
            nursery.cancel_scope.cancel()
    result.quiet_ok_operations = result.ok_operations - before
    if result.quiet_ok_operations >= spec.quiet_target_ops:
        result.quiet_recovered_s = trio.current_time() - started_s
    else:
        result.errors.append(
            f"liveness: {result.quiet_ok_operations} of {spec.quiet_target_ops} ok operations "
            f"in the {spec.quiet_s:g} s quiet phase"
        )


async def _one_run(
    cluster: SimCluster, client: AsyncClient, admin: AsyncClient, spec: RunSpec, index: int
) -> RunResult:
    rng = random.Random(spec.seed)
    cluster.network.rng.seed(rng.random())
    result = RunResult(spec)
    recorder = Recorder()
    workload = make_workload(spec.workload, recorder, f"r{index}")
    try:
        await workload.setup(client)
        faults = _Faults(cluster, admin, rng)
        fault_end_s = trio.current_time() + spec.fault_s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(faults.run, spec.faults, fault_end_s)
            with trio.move_on_at(fault_end_s):
                async with trio.open_nursery() as clients:
                    for process in range(CLIENT_PROCESSES):
                        loop_rng = random.Random(rng.random())
                        clients.start_soon(
                            _client_loop, workload, client, process, loop_rng, result
                        )
        result.faults = faults.log
        await faults.heal_all()
        await _quiet_phase(workload, client, spec, rng, result)
        result.findings = await workload.check(client)
    except WorkloadError as error:
        result.errors.append(str(error))
    text = io.StringIO()
    write_jsonl(recorder.history(), text)
    result.history_jsonl = text.getvalue()
    crashes = cluster.crashes()
    if crashes:
        result.errors.append(f"daemons exited: {crashes}")
        for node in cluster.nodes.values():
            node.crashes.clear()
    return result


async def _batch(
    root: Path, batch_seed: int, specs: Sequence[RunSpec], drones: int
) -> list[RunResult]:
    import trio.lowlevel

    network = Network(random.Random(batch_seed), delay_min_s=DELAY_MIN_S, delay_max_s=DELAY_MAX_S)
    results = []
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(root, network, nursery, drones=drones)
        await cluster.start_all()
        net.TRANSPORT.set(SimTransport(network, CLIENT))
        client_settings = dataclasses.replace(
            cluster.client_settings(), deadline_s=CLIENT_DEADLINE_S
        )
        admin_settings = dataclasses.replace(
            cluster.client_settings(ADMIN), deadline_s=CLIENT_DEADLINE_S
        )
        client_rng = random.Random(batch_seed + 1)
        async with aconnect(client_settings, rng=client_rng) as client:
            async with aconnect(admin_settings, rng=random.Random(batch_seed + 2)) as admin:
                for index, spec in enumerate(specs):
                    results.append(await _one_run(cluster, client, admin, spec, index))
        nursery.cancel_scope.cancel()
    return results


@contextlib.contextmanager
def _deterministic_scheduler(seed: int) -> Iterator[None]:
    """Make trio's order of ready tasks a function of `seed`.

    trio reverses each batch of ready tasks at random from its own generator, and a batch's
    order before that follows the iteration order of sets of tasks (a cancelled scope wakes its
    tasks from a set, ordered by memory address), which differs between runs. trio's own switch
    for Hypothesis (`_ALLOW_DETERMINISTIC_SCHEDULING`, set by pytest-trio) sorts each batch by
    task creation order and shuffles it with that generator; seeding the generator makes the
    order replay. Private attributes: if trio renames them, replay is best effort."""
    from trio._core import _run

    generator = getattr(_run, "_r", None)
    if isinstance(generator, random.Random):
        generator.seed(seed)
    previous = getattr(_run, "_ALLOW_DETERMINISTIC_SCHEDULING", False)
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    try:
        yield
    finally:
        _run._ALLOW_DETERMINISTIC_SCHEDULING = previous  # type: ignore[misc]


def run_batch(
    batch_seed: int, specs: Sequence[RunSpec], *, drones: int = 3, root: Path | None = None
) -> list[RunResult]:
    """Boot a simulated cluster and perform `specs` in turn. Deterministic for given inputs."""
    if not specs:
        raise ValueError("a batch needs at least one run")
    clock = sim_clock()
    parent = MEMORY_FILESYSTEM if os.access(MEMORY_FILESYSTEM, os.W_OK) else None
    scratch_dir = tempfile.TemporaryDirectory(prefix="keyval-sim-", dir=parent)
    # The scheduler first: inside `seeded_entropy`, `random.Random` names its seeded subclass,
    # which trio's own generator is no instance of, so it would be left unseeded.
    with _deterministic_scheduler(batch_seed), scratch_dir as scratch, inline_thread_calls():
        with seeded_entropy(batch_seed):
            return trio.run(_batch, root or Path(scratch), batch_seed, specs, drones, clock=clock)


def check_batch(batch_seed: int, specs: Sequence[RunSpec], **options: object) -> list[RunResult]:
    """`run_batch`, raising SimulationFailed with every failed run and the replay command."""
    results = run_batch(batch_seed, specs, **options)  # type: ignore[arg-type]
    failed = [result for result in results if not result.ok]
    if failed:
        report = "\n".join(result.describe() for result in failed)
        raise SimulationFailed(f"{report}\nreplay: {replay_command(batch_seed, specs)}")
    return results
