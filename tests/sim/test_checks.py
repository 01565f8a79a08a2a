"""Transaction invariants on good and bad histories."""

from __future__ import annotations

import random

import pytest

from keyval.sim.checks import (
    check_bank,
    check_cycle,
    check_no_aborted_reads,
    check_no_lost_writes,
)
from keyval.sim.history import ABSENT, History, OpKind, Step
from tests.sim.builders import Script

ACCOUNTS = ("a", "b", "c")


def read_all(keys: tuple[object, ...], values: tuple[object, ...]) -> tuple[Step, ...]:
    return tuple(Step(OpKind.READ, key, value) for key, value in zip(keys, values, strict=True))  # type: ignore[arg-type]


def bank_history(balances: list[tuple[int, int, int]]) -> History:
    script = Script()
    for process, seen in enumerate(balances):
        request = tuple(Step(OpKind.READ, key) for key in ACCOUNTS)
        script.txn(process, *request).ok(process, steps=read_all(ACCOUNTS, seen))
    return script.history()


def test_bank_snapshots_with_a_constant_total_pass() -> None:
    result = check_bank(bank_history([(10, 0, 0), (4, 6, 0), (1, 2, 7)]), ACCOUNTS, 10)
    assert result.ok and result.checked == 3


def test_bank_snapshot_with_a_wrong_total_is_caught() -> None:
    result = check_bank(bank_history([(10, 0, 0), (4, 0, 0)]), ACCOUNTS, 10)
    assert not result.ok
    (anomaly,) = result.anomalies
    assert "sum to 4, not 10" in anomaly.message
    assert "bank: 1 anomalies" in result.describe()


def test_bank_counts_missing_accounts_as_zero_and_refuses_non_integers() -> None:
    script = Script()
    request = tuple(Step(OpKind.READ, key) for key in ACCOUNTS)
    script.txn(0, *request).ok(0, steps=read_all(ACCOUNTS, (ABSENT, 10, ABSENT)))
    script.txn(0, *request).ok(0, steps=read_all(ACCOUNTS, ("10", 0, 0)))
    result = check_bank(script.history(), ACCOUNTS, 10)
    assert [a.message for a in result.anomalies] == ["balance of 'a' is not an integer: '10'"]


def test_bank_ignores_partial_reads_and_failed_or_unknown_transactions() -> None:
    script = Script()
    request = tuple(Step(OpKind.READ, key) for key in ACCOUNTS)
    script.txn(0, *request[:2]).ok(0, steps=read_all(ACCOUNTS[:2], (99, 99)))
    script.txn(0, *request).fail(0)
    script.txn(0, *request).info(0)
    assert check_bank(script.history(), ACCOUNTS, 10).checked == 0


def test_bank_and_cycle_refuse_bad_key_lists() -> None:
    history = bank_history([])
    with pytest.raises(ValueError, match="distinct"):
        check_bank(history, (), 10)
    with pytest.raises(ValueError, match="distinct"):
        check_cycle(history, ("a", "a"))


NODES = (0, 1, 2, 3)


def cycle_history(*rings: tuple[object, ...]) -> History:
    script = Script()
    request = tuple(Step(OpKind.READ, node) for node in NODES)
    for ring in rings:
        script.txn(0, *request).ok(0, steps=read_all(NODES, ring))
    return script.history()


def rotate(links: dict[int, int], rng: random.Random) -> None:
    """One cycle-workload transaction: a -> b -> c -> d becomes a -> c -> b -> d."""
    a = rng.choice(NODES)
    b = links[a]
    c = links[b]
    d = links[c]
    links[a], links[c], links[b] = c, b, d


def test_cycle_intact_rings_pass() -> None:
    rng = random.Random(7)
    links = {node: (node + 1) % len(NODES) for node in NODES}
    rings = []
    for _ in range(20):
        rotate(links, rng)
        rings.append(tuple(links[node] for node in NODES))
    result = check_cycle(cycle_history(*rings), NODES)
    assert result.ok and result.checked == 20


@pytest.mark.parametrize(
    ("ring", "message"),
    [
        ((1, 0, 3, 2), "has 2 of 4 nodes"),  # two rings
        ((1, 2, 1, 0), "reached twice"),  # 3 is not reached; 1 twice
        ((1, 2, 3, 9), "outside the ring"),
        ((1, 2, 3, ABSENT), "outside the ring"),  # a lost node
        ((0, 2, 3, 1), "has 1 of 4 nodes"),  # the start points at itself
    ],
)
def test_cycle_broken_rings_are_caught(ring: tuple[object, ...], message: str) -> None:
    result = check_cycle(cycle_history((1, 2, 3, 0), ring), NODES)
    (anomaly,) = result.anomalies
    assert message in anomaly.message


def test_no_lost_writes_accepts_the_last_acknowledged_write() -> None:
    history = Script().write(0, "x", 1).ok(0).write(0, "x", 2).ok(0).history()
    result = check_no_lost_writes(history, {"x": 2})
    assert result.ok and result.checked == 2


def test_no_lost_writes_accepts_either_of_concurrent_writes_or_an_unknown_one() -> None:
    concurrent = Script().write(0, "x", 1).write(1, "x", 2).ok(1).ok(0).history()
    assert check_no_lost_writes(concurrent, {"x": 1}).ok
    assert check_no_lost_writes(concurrent, {"x": 2}).ok
    unknown_later = Script().write(0, "x", 1).ok(0).write(1, "x", 3).info(1).history()
    assert check_no_lost_writes(unknown_later, {"x": 3}).ok
    assert check_no_lost_writes(unknown_later, {"x": 1}).ok


def test_lost_acknowledged_write_is_caught() -> None:
    history = Script().write(0, "x", 1).ok(0).write(0, "x", 2).ok(0).history()
    for final in (1, ABSENT, 5):
        result = check_no_lost_writes(history, {"x": final})
        (anomaly,) = result.anomalies
        assert anomaly.operation.value == 2, final
        assert "lost" in anomaly.message


def test_lost_transaction_write_and_cas_are_caught() -> None:
    history = (
        Script()
        .txn(0, Step(OpKind.WRITE, "a", 1), Step(OpKind.WRITE, "b", 1))
        .ok(0)
        .cas(1, "c", ABSENT, 4)
        .ok(1)
        .history()
    )
    assert check_no_lost_writes(history, {"a": 1, "b": 1, "c": 4}).ok
    result = check_no_lost_writes(history, {"a": 1, "b": ABSENT, "c": ABSENT})
    assert sorted(a.message for a in result.anomalies) == [
        "acknowledged write to 'b' lost: final value is ABSENT",
        "acknowledged write to 'c' lost: final value is ABSENT",
    ]


def test_a_delete_is_a_write_of_absent() -> None:
    history = Script().write(0, "x", 1).ok(0).write(0, "x", ABSENT).ok(0).history()
    assert check_no_lost_writes(history, {"x": ABSENT}).ok
    assert not check_no_lost_writes(history, {"x": 1}).ok


def test_failed_writes_need_no_final_value_but_acknowledged_ones_do() -> None:
    history = Script().write(0, "x", 1).fail(0).write(0, "y", 1).ok(0).history()
    assert check_no_lost_writes(history, {"y": 1}).checked == 1
    with pytest.raises(ValueError, match="lacks key 'y'"):
        check_no_lost_writes(history, {"x": 1})


def test_reads_of_values_from_aborted_writes_are_caught() -> None:
    history = (
        Script()
        .write(0, "x", 1)
        .fail(0)
        .txn(1, Step(OpKind.WRITE, "y", 7))
        .fail(1)
        .read(0, "x")
        .ok(0, 1)
        .txn(2, Step(OpKind.READ, "y"))
        .ok(2, steps=(Step(OpKind.READ, "y", 7),))
        .cas(3, "x", 1, 2)
        .ok(3)
        .history()
    )
    result = check_no_aborted_reads(history)
    assert result.checked == 3
    assert [a.operation.kind for a in result.anomalies] == [OpKind.READ, OpKind.TXN, OpKind.CAS]


def test_reads_of_values_a_successful_or_unknown_write_also_wrote_pass() -> None:
    history = (
        Script()
        .write(0, "x", 1)
        .fail(0)
        .write(1, "x", 1)
        .info(1)
        .read(0, "x")
        .ok(0, 1)
        .read(0, "z")
        .fail(0)
        .history()
    )
    result = check_no_aborted_reads(history)
    assert result.ok and result.checked == 1
