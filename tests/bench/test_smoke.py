"""The whole bench, briefly: a real 3-drone cluster (and Redis when installed) for ~2 s, then
memory mode with 10k keys on a 1-drone cluster. Marked slow: each starts a cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BENCH_TIMEOUT_S = 300  # cluster start-up (up to a minute on a busy machine) plus the runs
HAVE_REDIS = all(shutil.which(tool) for tool in ("redis-server", "redis-benchmark"))
HAVE_ETCD = shutil.which("etcd") is not None


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    argv = [sys.executable, "-m", "keyval.bench", "--dir", str(tmp_path / "work")]
    argv += ["--json", str(out), "--markdown", str(tmp_path / "BENCHMARKS.md"), *args]
    if HAVE_REDIS:
        argv += ["--vs", "redis"]
    finished = subprocess.run(
        argv, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    assert "nproc" in (tmp_path / "BENCHMARKS.md").read_text()
    return result


def test_mixed_workload_against_a_cluster_and_redis(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "--workload", "mixed", "--connections", "4", "--processes", "2",
        "--keys", "200", "--seconds", "2", "--warmup", "0.5", "--vs", "etcd",
    )  # fmt: skip
    rows = {row["system"]: row for row in result["throughput"]}
    keyval = rows["keyval"]
    assert keyval["ops"] > 0 and keyval["errors"] == {}
    assert 0 < keyval["p50_ms"] <= keyval["p99_ms"] <= keyval["p999_ms"] <= keyval["max_ms"]
    assert keyval["server_cpu_by_role"]["drone"] > 0
    assert keyval["server_cpu_us_per_op"] > 0
    if HAVE_ETCD:
        etcd = rows["etcd"]
        assert etcd["ops"] > 0 and etcd["errors"] == {}
        assert keyval["vs_etcd"] == pytest.approx(keyval["ops_per_s"] / etcd["ops_per_s"])
    else:
        assert "install etcd-server" in rows["etcd"]["skipped"]
    if HAVE_REDIS:
        redis = rows["redis"]
        assert redis["ops"] > 0 and redis["errors"] == {} and redis["redis_durable"] is True
        assert keyval["vs_redis"] == pytest.approx(keyval["ops_per_s"] / redis["ops_per_s"])


def test_memory_mode_with_10k_keys(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--memory-keys", "10000", "--connections", "8")
    rows = {row["system"]: row for row in result["memory"]}
    assert rows["keyval"]["keys"] == 10_000
    assert 0 < rows["keyval"]["bytes_per_key"] < 10_000
    if HAVE_REDIS:
        assert rows["redis"]["bytes_per_key"] > 48  # at least the 16 + 32 bytes of data
