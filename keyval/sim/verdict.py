"""The verdict of a real-process fault run, computed from its recorded history alone.

`judge` takes the history, a final read of every written key (taken after the quiet phase),
the bank accounts and their total, the faults injected and the quiet phase's ok operations,
and checks: per-key linearizability of single-key operations, every snapshot of the bank sums
to the total, no acknowledged write lost (the final read shows it or a later write), no read of
an aborted write, and liveness (the quiet phase served operations). Errors the runner met
(a node that would not restart, a client exception that is not a typed keyval error) fail the
run too: a run that could not do what it meant to is not a pass.

A linearizability search that hits its step bound (UNKNOWN) fails the run as "undecided": a
history nobody checked proves nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keyval.sim.checks import (
    CheckResult,
    check_bank,
    check_no_aborted_reads,
    check_no_lost_writes,
)
from keyval.sim.history import EventType, History, HistoryError, Key, OpKind
from keyval.sim.linearizability import MAX_SEARCH_STEPS, Verdict, check_linearizable

# Detail kept per failed check in the report: enough to start debugging, not a whole history.
MAX_DETAIL_CHARS = 4000


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    name: str
    ok: bool
    checked: int
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "checked": self.checked, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the runner prints. `operations` counts by outcome: ok, fail, unknown."""

    passed: bool
    operations: Mapping[str, int]
    faults: Mapping[str, int]
    acknowledged_writes_verified: int
    lost_writes: int
    quiet_ok_operations: int
    checks: tuple[CheckOutcome, ...]
    errors: tuple[str, ...] = ()
    notes: Mapping[str, Any] = field(default_factory=dict)

    def verdict_line(self) -> str:
        ops = self.operations
        faults = " ".join(f"{kind}={count}" for kind, count in sorted(self.faults.items()))
        failed = [check.name for check in self.checks if not check.ok]
        reason = ""
        if not self.passed:
            reason = " failed: " + ", ".join(failed + (["errors"] if self.errors else []))
        return (
            f"{'PASS' if self.passed else 'FAIL'}{reason}; operations ok={ops['ok']} "
            f"fail={ops['fail']} unknown={ops['unknown']}; faults {faults or 'none'} "
            f"(total {sum(self.faults.values())}); acknowledged writes verified="
            f"{self.acknowledged_writes_verified} lost={self.lost_writes}; quiet phase ok "
            f"operations={self.quiet_ok_operations}"
        )

    def describe(self) -> str:
        lines = [self.verdict_line()]
        for check in self.checks:
            lines.append(f"  {check.name}: {'ok' if check.ok else 'FAILED'} ({check.checked})")
            if check.detail:
                lines.extend("    " + line for line in check.detail.splitlines())
        lines.extend(f"  error: {error}" for error in self.errors)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "PASS" if self.passed else "FAIL",
            "operations": dict(self.operations),
            "faults": dict(self.faults),
            "acknowledged_writes_verified": self.acknowledged_writes_verified,
            "lost_writes": self.lost_writes,
            "quiet_ok_operations": self.quiet_ok_operations,
            "checks": [check.to_json() for check in self.checks],
            "errors": list(self.errors),
            "notes": dict(self.notes),
        }


def count_outcomes(history: History) -> dict[str, int]:
    counts = {"ok": 0, "fail": 0, "unknown": 0}
    for operation in history.operations:
        if operation.outcome is EventType.OK:
            counts["ok"] += 1
        elif operation.outcome is EventType.FAIL:
            counts["fail"] += 1
        else:
            counts["unknown"] += 1
    return counts


def _clip(text: str) -> str:
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return text[:MAX_DETAIL_CHARS] + f"\n... ({len(text) - MAX_DETAIL_CHARS} more characters)"


def _outcome(result: CheckResult) -> CheckOutcome:
    detail = "" if result.ok else _clip(result.describe())
    return CheckOutcome(result.name, result.ok, result.checked, detail)


def _bank(history: History, accounts: Sequence[Key], total: int) -> CheckOutcome:
    outcome = _outcome(check_bank(history, accounts, total))
    if outcome.checked == 0:  # the runner records a final snapshot, so none means none worked
        return CheckOutcome(outcome.name, False, 0, "no snapshot of the accounts succeeded")
    return outcome


def _linearizable(history: History, max_steps: int) -> CheckOutcome:
    try:
        result = check_linearizable(history, max_steps=max_steps)
    except HistoryError as error:
        return CheckOutcome("linearizable", False, 0, f"history not checkable: {error}")
    checked = sum(key.operations for key in result.keys)
    if result.verdict is Verdict.OK:
        return CheckOutcome("linearizable", True, checked)
    detail = result.describe()
    if result.verdict is Verdict.UNKNOWN:
        detail = "undecided: the search hit its step bound\n" + detail
    return CheckOutcome("linearizable", False, checked, _clip(detail))


def _lost_writes(history: History, final: Mapping[Key, object]) -> tuple[CheckOutcome, int, int]:
    """The check, the acknowledged writes verified and the writes found lost.

    Single-key writes only: a transfer whose outcome is unknown was recorded with its reads
    alone (what it writes depends on what it read), so its possible writes are not in the
    history and the check would call the value it left "lost". The bank check covers the
    transactions: the final snapshot, after recovery, must still hold the total."""
    single_key = History.from_events(e for e in history.events if e.kind is not OpKind.TXN)
    try:
        result = check_no_lost_writes(single_key, final)
    except ValueError as error:  # the final read lacks a key with acknowledged writes
        return CheckOutcome("no lost writes", False, 0, str(error)), 0, 0
    lost = len(result.anomalies)
    return _outcome(result), result.checked - lost, lost


def judge(
    history: History,
    final: Mapping[Key, object],
    *,
    bank_accounts: Sequence[Key] = (),
    bank_total: int = 0,
    faults: Mapping[str, int] | None = None,
    quiet_ok_operations: int = 0,
    quiet_target_operations: int = 1,
    errors: Sequence[str] = (),
    notes: Mapping[str, Any] | None = None,
    max_search_steps: int = MAX_SEARCH_STEPS,
) -> Report:
    """Check `history` and `final` (key -> value read at the end, ABSENT for none)."""
    lost_check, verified, lost = _lost_writes(history, final)
    checks = [
        _linearizable(history, max_search_steps),
        lost_check,
        _outcome(check_no_aborted_reads(history)),
    ]
    if bank_accounts:
        checks.append(_bank(history, bank_accounts, bank_total))
    live = quiet_ok_operations >= quiet_target_operations
    detail = "" if live else f"{quiet_ok_operations} of {quiet_target_operations} ok operations"
    checks.append(CheckOutcome("liveness after faults", live, quiet_ok_operations, detail))
    passed = all(check.ok for check in checks) and not errors
    return Report(
        passed=passed,
        operations=count_outcomes(history),
        faults=dict(faults or {}),
        acknowledged_writes_verified=verified,
        lost_writes=lost,
        quiet_ok_operations=quiet_ok_operations,
        checks=tuple(checks),
        errors=tuple(errors),
        notes=dict(notes or {}),
    )
