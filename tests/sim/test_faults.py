"""The real-process fault runner: its verdict on recorded histories, its option and input
checks, and (slow) a tiny bounded run against real daemons."""

from __future__ import annotations

import io
import json
import os
import random
import signal
from pathlib import Path

import pytest
import trio

from keyval.sim import faults
from keyval.sim.faults import FaultOptions, run_faults
from keyval.sim.history import ABSENT, History, Key, OpKind, Step, read_jsonl, write_jsonl
from keyval.sim.injector import FaultKind, parse_faults
from keyval.sim.procs import NodeInfo, ProcessClusterError, open_process_cluster, read_nodes
from keyval.sim.verdict import Report, judge
from tests.sim.builders import Script

ACCOUNTS = ["{a}", "{b}"]


def _clean_history() -> History:
    """Two registers, a transfer and snapshots, everything consistent."""
    script = Script()
    script.write(0, "x", 1).ok(0)
    script.read(1, "x").ok(1, 1)
    script.cas(0, "x", 1, 2).fail(0)  # refused: did not happen
    script.write(2, "y", 7).info(2)  # unknown outcome
    script.txn(3, Step(OpKind.READ, "{a}"), Step(OpKind.READ, "{b}"))
    script.ok(3, steps=(Step(OpKind.READ, "{a}", 10), Step(OpKind.READ, "{b}", 0)))
    transfer = (
        Step(OpKind.READ, "{a}", 10),
        Step(OpKind.READ, "{b}", 0),
        Step(OpKind.WRITE, "{a}", 4),
        Step(OpKind.WRITE, "{b}", 6),
    )
    script.txn(3, *transfer[:2]).ok(3, steps=transfer)
    script.txn(3, Step(OpKind.READ, "{a}"), Step(OpKind.READ, "{b}"))
    script.ok(3, steps=(Step(OpKind.READ, "{a}", 4), Step(OpKind.READ, "{b}", 6)))
    return script.history()


CLEAN_FINAL: dict[Key, object] = {"x": 1, "y": ABSENT, "{a}": 4, "{b}": 6}


def _judge(history: History, final: dict[Key, object] | None = None, **extra: object) -> Report:
    options: dict[str, object] = {
        "bank_accounts": ACCOUNTS,
        "bank_total": 10,
        "faults": {"kill-drone": 2, "pause-db": 1},
        "quiet_ok_operations": 5,
        "quiet_target_operations": 5,
    }
    options.update(extra)
    return judge(history, CLEAN_FINAL if final is None else final, **options)  # type: ignore[arg-type]


def _failed(report: Report) -> list[str]:
    return [check.name for check in report.checks if not check.ok]


# ---- verdict ------------------------------------------------------------------------------


def test_a_consistent_history_passes_with_its_counts() -> None:
    report = _judge(_clean_history())
    assert report.passed, report.describe()
    assert report.operations == {"ok": 5, "fail": 1, "unknown": 1}
    assert report.faults == {"kill-drone": 2, "pause-db": 1}
    assert report.acknowledged_writes_verified == 1  # x=1; the bank check covers transfers
    assert report.lost_writes == 0
    line = report.verdict_line()
    assert line.startswith("PASS; operations ok=5 fail=1 unknown=1; ")
    assert "kill-drone=2 pause-db=1 (total 3)" in line
    assert "acknowledged writes verified=1 lost=0" in line


def test_a_stale_read_fails_linearizability() -> None:
    script = Script()
    script.write(0, "x", 1).ok(0)
    script.write(0, "x", 2).ok(0)
    script.read(1, "x").ok(1, 1)  # after the write of 2 completed
    report = _judge(script.history(), {"x": 2}, bank_accounts=())
    assert not report.passed
    assert _failed(report) == ["linearizable"]
    assert report.verdict_line().startswith("FAIL failed: linearizable;")


def test_an_undecided_linearizability_search_fails() -> None:
    script = Script()
    for process in range(6):
        script.write(process, "x", process)
    for process in range(6):
        script.ok(process)
    report = _judge(script.history(), {"x": 5}, bank_accounts=(), max_search_steps=2)
    assert _failed(report) == ["linearizable"]
    assert "undecided" in report.checks[0].detail


def test_a_lost_acknowledged_write_fails_and_is_counted() -> None:
    report = _judge(_clean_history(), {**CLEAN_FINAL, "x": ABSENT})
    assert _failed(report) == ["no lost writes"]
    assert report.lost_writes == 1
    assert report.acknowledged_writes_verified == 0


def test_a_transfer_of_unknown_outcome_is_not_a_lost_write() -> None:
    """Seen in a real run: a transfer timed out (recorded with its reads only, its writes
    unknown) but committed; the final value is its write, not the last acknowledged one."""
    history = _clean_history()
    script = Script()
    for event in history.events:
        script.recorder.append(event)
    script.now_s = history.events[-1].time_s
    script.txn(3, Step(OpKind.READ, "{a}"), Step(OpKind.READ, "{b}")).info(3)
    script.txn(3, Step(OpKind.READ, "{a}"), Step(OpKind.READ, "{b}"))
    script.ok(3, steps=(Step(OpKind.READ, "{a}", 1), Step(OpKind.READ, "{b}", 9)))
    report = _judge(script.history(), {**CLEAN_FINAL, "{a}": 1, "{b}": 9})
    assert report.passed, report.describe()
    assert report.acknowledged_writes_verified == 1  # x=1; the bank check covers transfers


def test_a_final_read_missing_an_acknowledged_key_fails() -> None:
    final = {key: value for key, value in CLEAN_FINAL.items() if key != "x"}
    report = _judge(_clean_history(), final)
    assert _failed(report) == ["no lost writes"]
    assert "lacks key 'x'" in report.checks[1].detail


def test_a_bank_snapshot_with_a_wrong_total_fails() -> None:
    report = _judge(_clean_history(), bank_total=11)
    assert _failed(report) == ["bank"]
    assert "not 11" in report.describe()


def test_a_bank_without_any_snapshot_fails() -> None:
    script = Script()
    script.write(0, "x", 1).ok(0)
    report = _judge(script.history(), {"x": 1})
    assert _failed(report) == ["bank"]


def test_reading_an_aborted_write_fails() -> None:
    script = Script()
    script.write(0, "x", 1).fail(0)
    script.read(1, "x").ok(1, 1)
    report = _judge(script.history(), {"x": 1}, bank_accounts=())
    assert "no aborted reads" in _failed(report)


def test_no_recovery_in_the_quiet_phase_fails_liveness() -> None:
    report = _judge(_clean_history(), quiet_ok_operations=4)
    assert _failed(report) == ["liveness after faults"]


def test_runner_errors_fail_the_run() -> None:
    report = _judge(_clean_history(), errors=["restart of drone-2 failed"])
    assert not report.passed
    assert _failed(report) == []
    assert "failed: errors" in report.verdict_line()
    assert "error: restart of drone-2 failed" in report.describe()


def test_the_verdict_is_the_same_on_a_history_replayed_from_json_lines() -> None:
    stream = io.StringIO()
    write_jsonl(_clean_history(), stream)
    stream.seek(0)
    replayed = read_jsonl(stream)
    assert _judge(replayed).to_json() == _judge(_clean_history()).to_json()


def test_the_json_report_has_the_counts() -> None:
    data = json.loads(json.dumps(_judge(_clean_history(), bank_total=11).to_json()))
    assert data["verdict"] == "FAIL"
    assert data["operations"] == {"ok": 5, "fail": 1, "unknown": 1}
    assert data["faults"] == {"kill-drone": 2, "pause-db": 1}
    assert data["acknowledged_writes_verified"] == 1
    assert [c["name"] for c in data["checks"] if not c["ok"]] == ["bank"]


# ---- options and inputs -------------------------------------------------------------------


def test_fault_kinds_parse_and_bad_ones_are_refused() -> None:
    assert parse_faults("kill-drone, pause-db,kill-drone") == (
        FaultKind.KILL_DRONE,
        FaultKind.PAUSE_DB,
    )
    assert FaultKind.PAUSE_COMMANDER.role == "commander"
    assert FaultKind.KILL_DB.kills and not FaultKind.PAUSE_DB.kills
    with pytest.raises(ValueError, match="unknown fault 'kill-auth'"):
        parse_faults("kill-auth")


@pytest.mark.parametrize(
    "bad",
    [
        {"seconds": 0},
        {"seconds": float("inf")},
        {"kill_every_s": -1},
        {"quiet_s": 0},
        {"drones": 0},
        {"commanders": 99},
        {"register_processes": -1},
        {"register_processes": 0, "bank_processes": 0, "ledger_processes": 0},
        {"faults": ("kill-drone",)},
    ],
)
def test_bad_options_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FaultOptions(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv",
    [["--seconds", "-5"], ["--faults", "nothing"], ["--drones", "0"], ["--kill-every", "0"]],
)
def test_the_command_line_refuses_bad_options_with_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert faults.main(argv) == faults.EXIT_USAGE
    assert "scripts/faults:" in capsys.readouterr().err


GOOD_NODE = {
    "role": "drone",
    "name": "drone-1",
    "address": "127.0.0.1:6240",
    "pid": 123,
    "argv": ["python", "-m", "keyval", "drone"],
}


def test_nodes_json_entries_are_read(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps([GOOD_NODE]))
    (node,) = read_nodes(path)
    argv = ("python", "-m", "keyval", "drone")
    assert node == NodeInfo("drone", "drone-1", "127.0.0.1:6240", 123, argv)


@pytest.mark.parametrize(
    "change",
    [
        {"role": "oracle"},
        {"name": ""},
        {"address": "nowhere"},
        {"pid": "123"},
        {"pid": 0},
        {"argv": []},
        {"argv": "python -m keyval"},
        {"argv": ["python", 3]},
    ],
)
def test_bad_nodes_json_entries_are_refused(change: dict[str, object], tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps([{**GOOD_NODE, **change}]))
    with pytest.raises(ProcessClusterError):
        read_nodes(path)


@pytest.mark.parametrize("text", ["{}", "not json", '["drone"]'])
def test_bad_nodes_json_files_are_refused(text: str, tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    path.write_text(text)
    with pytest.raises(ProcessClusterError):
        read_nodes(path)


# ---- real daemons (slow) ------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest.mark.slow
async def test_a_tiny_bounded_run_with_one_kill_passes(tmp_path: Path) -> None:
    options = FaultOptions(
        seconds=6.0, kill_every_s=3.0, quiet_s=3.0, seed=7, faults=(FaultKind.KILL_DRONE,)
    )
    history_file = tmp_path / "history.jsonl"
    logged: list[str] = []
    report = await run_faults(
        options, tmp_path / "cluster", log=logged.append, history_file=history_file
    )
    assert report.passed, report.describe() + "\n" + "\n".join(logged)
    assert report.faults == {"kill-drone": 1}
    assert report.acknowledged_writes_verified > 0
    assert report.operations["ok"] > 0
    assert any("serves again" in line for line in logged)
    with history_file.open() as stream:
        assert len(read_jsonl(stream)) > 0
    pids = [node["pid"] for node in json.loads((tmp_path / "cluster" / "nodes.json").read_text())]
    assert all(_gone(pid) for pid in pids)


@pytest.mark.slow
def test_ctrl_c_stops_every_daemon(tmp_path: Path) -> None:
    pids: list[int] = []

    async def body() -> None:
        async with open_process_cluster(tmp_path, drones=1) as cluster:
            (drone,) = cluster.names("drone")
            await cluster.kill(drone)
            await cluster.restart(drone)
            cluster.pause(drone)
            pids.extend(node.pid for node in cluster.nodes.values())
            pids.append(cluster.launcher.pid)
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, one node restarted and paused
            await trio.sleep(30)

    with pytest.raises(KeyboardInterrupt):
        trio.run(body)
    assert len(pids) == 5
    assert all(_gone(pid) for pid in pids)


def test_errors_inside_nested_exception_groups_are_found() -> None:
    inner = BaseExceptionGroup("inner", [KeyboardInterrupt(), ValueError("x")])
    outer = BaseExceptionGroup("outer", [inner, ProcessClusterError("y")])
    kinds = [type(leaf) for leaf in faults._leaves(outer)]
    assert kinds == [KeyboardInterrupt, ValueError, ProcessClusterError]
    assert faults._leaves(ValueError("z"))[0].args == ("z",)


class _CountingWorkload:
    """Steps that yield to other tasks mid-operation, as real ones do."""

    def __init__(self) -> None:
        self.steps = 0

    async def step(self, client: object, process: int, rng: random.Random) -> bool:
        await trio.sleep(0.001)
        self.steps += 1
        return True


async def test_concurrent_client_loops_count_every_ok_step(autojump_clock: object) -> None:
    workload = _CountingWorkload()
    tally = faults._Tally()
    with trio.move_on_after(1.0):
        async with trio.open_nursery() as nursery:
            for process in range(4):
                rng = random.Random(process)
                loop = faults._client_loop  # the counting workload never uses the client
                nursery.start_soon(loop, workload, None, process, rng, tally)  # type: ignore[arg-type]
    assert workload.steps > 100
    assert tally.ok == workload.steps
