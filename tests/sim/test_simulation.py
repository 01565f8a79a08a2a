"""Whole-cluster simulation: real daemons over the simulated network under faults.

The default run boots one cluster and performs a fixed run of each workload; `pytest -m sim`
sweeps many seeds. A failure names the seeds and prints the replay command.
"""

from __future__ import annotations

import os

import pytest

from keyval.drone import writes
from keyval.sim.runner import Fault, RunSpec, SimulationFailed, check_batch, run_batch

# Faults that do not reseed a third of the slots (each reseed is one db request per slot,
# seconds of real time), so the default set stays fast; the sweep adds drone kills.
CHEAP_FAULTS = (Fault.KILL_DB, Fault.KILL_COMMANDER, Fault.PAUSE, Fault.MOVE, Fault.PARTITION)

# The sweep: batches of runs, each batch booting one cluster. KEYVAL_SIM_RUNS overrides.
SWEEP_RUNS = int(os.environ.get("KEYVAL_SIM_RUNS", "201"))
SWEEP_BATCH = 67


def test_fixed_runs_of_every_workload_pass() -> None:
    specs = [
        RunSpec(11, "register", faults=CHEAP_FAULTS, fault_s=3.0),
        RunSpec(12, "bank", faults=CHEAP_FAULTS, fault_s=3.0),
        RunSpec(13, "cycle", faults=CHEAP_FAULTS, fault_s=3.0),
    ]
    results = check_batch(7, specs)
    for result in results:
        assert result.operations > 0 and result.ok_operations > 0
        assert result.quiet_ok_operations >= result.spec.quiet_target_ops
        assert result.findings and all(finding.checked > 0 for finding in result.findings)


def test_injected_bug_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """With commit-time validation skipped, concurrent transfers lose updates: the bank
    check must fail (and the failure must name the replay command)."""
    monkeypatch.setattr(writes, "_INJECT_BUG_SKIP_TXN_VALIDATION", True)
    specs = [RunSpec(21, "bank", faults=(), fault_s=3.0)]
    replay = r"replay: keyval\.sim\.runner\.run_batch\(5, \[RunSpec\(21, 'bank'"
    with pytest.raises(SimulationFailed, match=replay):
        check_batch(5, specs)


def test_run_spec_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        RunSpec(1, "nope")
    with pytest.raises(ValueError, match="phases"):
        RunSpec(1, "bank", quiet_s=0)
    with pytest.raises(ValueError, match="at least one run"):
        run_batch(1, [])


@pytest.mark.sim
@pytest.mark.parametrize("batch", range(max(1, -(-SWEEP_RUNS // SWEEP_BATCH))))
def test_seed_sweep(batch: int) -> None:
    workloads = ("register", "bank", "cycle")
    first = batch * SWEEP_BATCH
    specs = [
        RunSpec(1000 + seed, workloads[seed % 3], fault_s=2.0, quiet_target_ops=10)
        for seed in range(first, min(first + SWEEP_BATCH, SWEEP_RUNS))
    ]
    check_batch(90_000 + batch, specs)
