"""The harness's parts on their own: fast, no servers (the smoke test runs the whole bench)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import trio

from keyval.bench import histogram as hist
from keyval.bench.errors import (
    BenchConfigError,
    BenchError,
    LoadGeneratorError,
    ProcessGone,
    RespProtocolError,
)
from keyval.bench.fanout import share
from keyval.bench.options import parse_options
from keyval.bench.proc import cpu_seconds, load_nodes, rss_bytes
from keyval.bench.profile import summarize
from keyval.bench.redisserver import parse_redis_benchmark_csv
from keyval.bench.report import render_markdown, update_markdown
from keyval.bench.resp import NEED_DATA, RespError, RespParser, encode_command
from keyval.bench.respclient import RespConnection
from keyval.bench.runner import batching

# ------------------------------------------------------------------ histogram


def test_bucket_bounds_contain_their_values_and_are_tight() -> None:
    for value in [0, 1, 255, 256, 257, 1000, 123_456, 10**9, 2**40 + 12345]:
        low, high = hist.bucket_bounds(hist.bucket_index(value))
        assert low <= value <= high
        assert high - low <= max(1, value >> hist.SUB_BUCKET_BITS)


def test_bucket_index_is_monotonic() -> None:
    indexes = [hist.bucket_index(value) for value in range(0, 70_000, 7)]
    assert indexes == sorted(indexes)


def test_percentiles_of_a_uniform_sample() -> None:
    histogram = hist.Histogram()
    for value_us in range(1, 10_001):
        histogram.record(value_us * 1000)
    assert histogram.count == 10_000
    assert histogram.percentile_ns(0.5) == pytest.approx(5_000_000, rel=0.01)
    assert histogram.percentile_ns(0.99) == pytest.approx(9_900_000, rel=0.01)
    assert histogram.percentile_ns(1.0) == 10_000_000
    assert histogram.mean_ns() == pytest.approx(5_000_500)


def test_merge_equals_recording_everything_in_one() -> None:
    one, two, both = hist.Histogram(), hist.Histogram(), hist.Histogram()
    for value in range(1, 5000, 3):
        (one if value % 2 else two).record(value * 977)
        both.record(value * 977)
    one.merge(two)
    assert one.to_json() == both.to_json()
    assert hist.Histogram.from_json(json.loads(json.dumps(one.to_json()))).to_json() == (
        both.to_json()
    )


def test_empty_histogram_and_bad_fraction() -> None:
    empty = hist.Histogram()
    assert empty.percentile_ns(0.99) == 0
    with pytest.raises(ValueError):
        empty.percentile_ns(0.0)
    with pytest.raises(ValueError):
        empty.percentile_ns(1.5)


@pytest.mark.parametrize(
    "report",
    [
        None,
        {"counts": "x"},
        {"counts": [[1, -2]], "total_ns": 0, "min_ns": 0, "max_ns": 0},
        {"counts": [[1]], "total_ns": 0, "min_ns": 0, "max_ns": 0},
        {"counts": [[1, True]], "total_ns": 0, "min_ns": 0, "max_ns": 0},
        {"counts": [], "total_ns": -1, "min_ns": 0, "max_ns": 0},
        {"counts": []},
    ],
)
def test_malformed_histogram_report_is_refused(report: object) -> None:
    with pytest.raises(LoadGeneratorError):
        hist.Histogram.from_json(report)


# ------------------------------------------------------------------ RESP


def test_encode_command() -> None:
    assert encode_command("SET", b"k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    with pytest.raises(ValueError):
        encode_command()
    with pytest.raises(TypeError):
        encode_command("SET", 1.5)  # type: ignore[arg-type]


def test_parser_reads_every_reply_type_split_anywhere() -> None:
    stream = (
        b"+OK\r\n-ERR wrong\r\n:-42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n*-1\r\n"
    )
    expected = ["OK", RespError("ERR wrong"), -42, b"hello", None, [b"a", [1]], None]
    for split in range(len(stream)):
        parser = RespParser()
        replies = []
        for part in (stream[:split], stream[split:]):
            parser.receive_data(part)
            while (reply := parser.next_reply()) is not NEED_DATA:
                replies.append(reply)
        assert replies == expected


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",  # unknown type byte
        b"\r\n",  # empty line
        b":12x\r\n",  # not an integer
        b":99999999999999999999\r\n",  # beyond 64 bits
        b"$-2\r\n",  # negative length
        b"$999999999999\r\n",  # over MAX_BULK_BYTES
        b"$3\r\nabcXY",  # bulk not followed by CRLF
        b"*" * 70_000,  # no line end within the limit
        b"*1\r\n" * 20 + b":1\r\n",  # nested deeper than MAX_DEPTH
    ],
)
def test_parser_refuses_bad_input_and_stays_broken(data: bytes) -> None:
    parser = RespParser()
    parser.receive_data(data)
    with pytest.raises(RespProtocolError):
        parser.next_reply()
    parser.receive_data(b"+OK\r\n")
    with pytest.raises(RespProtocolError):
        parser.next_reply()


async def _fake_redis(stream: trio.abc.Stream, replies: dict[bytes, bytes]) -> None:
    """Answers each command by its name, in order, over an in-memory stream."""
    parser = RespParser()
    while data := await stream.receive_some(65536):
        parser.receive_data(data)
        while isinstance(command := parser.next_reply(), list):
            assert isinstance(command[0], bytes)
            await stream.send_all(replies[command[0]])


async def test_pipelined_connection_matches_replies_in_order() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    connection = RespConnection(client_stream)
    replies = {b"PING": b"+PONG\r\n", b"GET": b"$1\r\nv\r\n", b"BAD": b"-ERR no\r\n"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_redis, server_stream, replies)
        await nursery.start(connection._run)
        results: list[object] = []

        async def ask(name: str) -> None:
            results.append((name, await connection.request_raw(name)))

        async with trio.open_nursery() as askers:
            for name in ["PING", "GET"] * 20:
                askers.start_soon(ask, name)
        assert sorted(set(results), key=str) == [("GET", b"v"), ("PING", "PONG")]
        with pytest.raises(BenchError, match="ERR no"):
            await connection.request("BAD")
        assert await connection.pipeline([("PING",), ("GET", "k")]) == ["PONG", b"v"]
        nursery.cancel_scope.cancel()


async def test_connection_lost_fails_waiting_and_later_requests() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    connection = RespConnection(client_stream)
    async with trio.open_nursery() as nursery:
        await nursery.start(connection._run)
        await server_stream.aclose()
        with pytest.raises(BenchError, match="failed"):
            await connection.request("PING")
        with pytest.raises(BenchError, match="failed"):
            await connection.request("PING")


# ------------------------------------------------------------------ redis-benchmark output

REDIS_BENCHMARK_CSV = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
    '"p99_latency_ms","max_latency_ms"\n'
    '"GET","55555.56","0.054","0.008","0.023","0.039","0.095","8.727"\n'
)


def test_parse_redis_benchmark_csv() -> None:
    figure = parse_redis_benchmark_csv(REDIS_BENCHMARK_CSV, "get")
    assert (figure.ops_per_s, figure.p50_ms, figure.p99_ms) == (55555.56, 0.023, 0.095)
    with pytest.raises(BenchError, match="no 'set' row"):
        parse_redis_benchmark_csv(REDIS_BENCHMARK_CSV, "set")
    with pytest.raises(BenchError, match="malformed"):
        parse_redis_benchmark_csv(REDIS_BENCHMARK_CSV.replace("55555.56", "fast"), "get")


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--connections", "0"], "--connections"),
        (["--pipeline", "5000"], "--pipeline"),
        (["--seconds", "0"], "--seconds"),
        (["--warmup", "-1"], "--warmup"),
        (["--value-bytes", "0"], "--value-bytes"),
        (["--keys", "0"], "--keys"),
        (["--drones", "0"], "--drones"),
        (["--processes", "3", "--connections", "2"], "must not exceed"),
        (["--memory-keys", "0"], "--memory-keys"),
        (["--memory-keys", "10", "--attach", "."], "drop --attach"),
        (["--attach", "/nonexistent-cluster-dir"], "no nodes.json"),
    ],
)
def test_bad_options_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(BenchConfigError, match=message):
        parse_options(argv)


def test_default_options() -> None:
    options = parse_options(["--vs", "redis", "--vs", "redis", "--markdown"])
    assert (options.workload, options.connections, options.pipeline) == ("get", 32, 1)
    assert options.versus == ("redis",)
    assert options.markdown == Path("BENCHMARKS.md")
    assert options.autobatch is True
    assert parse_options(["--no-autobatch"]).autobatch is False


def test_pipelined_rows_say_whether_keyval_auto_batched() -> None:
    pipelined = parse_options(["--pipeline", "64", "--connections", "8"])
    assert batching(pipelined, "keyval") == "auto-batched"
    assert batching(pipelined, "redis") == "pipelined"
    assert batching(pipelined, "redis-benchmark") == "pipelined"
    plain = parse_options(["--pipeline", "64", "--connections", "8", "--no-autobatch"])
    assert batching(plain, "keyval") == "pipelined"
    puts = parse_options(["--pipeline", "64", "--connections", "8", "--workload", "put"])
    assert batching(puts, "keyval") == "pipelined"  # only gets are auto-batched
    assert batching(parse_options([]), "keyval") == ""  # one in flight: nothing to say


def test_share_splits_evenly_and_covers_everything() -> None:
    for total in (0, 1, 7, 32, 1001):
        for parts in (1, 2, 3, 8):
            ranges = [share(total, parts, index) for index in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [stop - first for first, stop in ranges]
            assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------ /proc


def test_own_process_cpu_and_rss() -> None:
    assert cpu_seconds(os.getpid()) > 0
    assert rss_bytes(os.getpid()) > 1_000_000


def test_gone_process_is_a_typed_error() -> None:
    with pytest.raises(ProcessGone):
        cpu_seconds(2**22 + 1)  # above the default pid_max: never a live process
    with pytest.raises(ProcessGone):
        rss_bytes(2**22 + 1)


@pytest.mark.parametrize(
    "content",
    [None, "not json", '{"role": "drone"}', '[{"role": "drone", "name": "d", "pid": 0}]'],
)
def test_bad_nodes_json_is_refused(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "nodes.json").write_text(content)
    with pytest.raises(BenchError):
        load_nodes(tmp_path)


def test_nodes_json_is_read(tmp_path: Path) -> None:
    nodes = [{"role": "drone", "name": "drone-1", "address": "127.0.0.1:1", "pid": 1}]
    (tmp_path / "nodes.json").write_text(json.dumps(nodes))
    [process] = load_nodes(tmp_path)
    assert (process.role, process.name, process.pid) == ("drone", "drone-1", 1)


# ------------------------------------------------------------------ BENCHMARKS.md


def _row(system: str, rate: float) -> dict[str, object]:
    return {
        "system": system,
        "workload": "get",
        "connections": 32,
        "pipeline": 1,
        "keys": 10,
        "value_bytes": 32,
        "drones": 3,
        "ops_per_s": rate,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "p999_ms": 3.0,
        "errors": {},
    }


def test_markdown_rows_are_replaced_by_shape_and_analysis_kept(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    update_markdown(path, [_row("keyval", 1000.0), _row("redis", 4000.0)], [])
    text = path.read_text().replace("(Not written yet", "Drones spend it in the codec. (x")
    path.write_text(text)
    update_markdown(path, [_row("keyval", 2000.0)], [])
    text = path.read_text()
    assert "2,000" in text and "1,000" not in text and "4,000" in text
    assert "Drones spend it in the codec." in text
    assert "nproc" in text


def test_markdown_depth_says_how_requests_travelled(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    legacy = {**_row("keyval", 1000.0), "pipeline": 64}  # written before rows said how
    update_markdown(path, [legacy], [])
    assert "| 32 x 64 pipelined | 1,000 |" in path.read_text()
    batched = {**_row("keyval", 5000.0), "pipeline": 64, "batching": "auto-batched"}
    update_markdown(path, [batched], [])
    text = path.read_text()  # another shape: both rows stay
    assert "| 32 x 64 pipelined | 1,000 |" in text and "| 32 x 64 auto-batched | 5,000 |" in text
    update_markdown(path, [{**legacy, "ops_per_s": 2000.0, "batching": "pipelined"}], [])
    text = path.read_text()  # the same shape as the legacy row: replaced
    assert "1,000" not in text and "| 32 x 64 pipelined | 2,000 |" in text
    assert "| 32 x 1 | 1,000 |" not in text


def test_markdown_with_a_broken_data_block_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("<!-- bench-data\n{not json\n-->\n")
    with pytest.raises(BenchError, match="not JSON"):
        update_markdown(path, [_row("keyval", 1.0)], [])
    assert path.read_text() == "<!-- bench-data\n{not json\n-->\n"


def test_data_block_survives_a_comment_end_in_a_string() -> None:
    row = _row("keyval", 1.0)
    row["errors"] = {"Odd-->Name": 1}
    text = render_markdown({"throughput": [row], "memory": []}, "analysis")
    block = text[text.index("<!-- bench-data") + len("<!-- bench-data") :]
    data = json.loads(block[: block.index("-->")])
    assert data["throughput"][0]["errors"] == {"Odd-->Name": 1}


# ------------------------------------------------------------------ py-spy output


def test_profile_summary_of_collapsed_stacks() -> None:
    raw = (
        "main (keyval/cli.py:1);serve (keyval/net.py:5);decode (wire/codec.py:9) 30\n"
        "main (keyval/cli.py:1);serve (keyval/net.py:5);send (trio/_socket.py:3) 10\n"
        "main (keyval/cli.py:1);wait (trio/_io.py:7) 50\n"
        "main (keyval/cli.py:1);wait (trio/_io.py:8) 10\n"  # one function, another line
        "\n"
        " 5\n"  # a sample without Python frames: main is on 100 of 105 stacks, still trunk
    )
    summary = summarize(raw, top=2)
    assert summary.samples == 105
    assert summary.self_top == [
        ("wait (trio/_io.py)", pytest.approx(100 * 60 / 105)),
        ("decode (wire/codec.py)", pytest.approx(100 * 30 / 105)),
    ]
    assert summary.self_by_file[0] == ("trio/_io.py", pytest.approx(100 * 60 / 105))
    # main is on every stack (the trunk); trio frames are not keyval's own
    assert summary.total_top == [
        ("serve (keyval/net.py)", pytest.approx(100 * 40 / 105)),
        ("decode (wire/codec.py)", pytest.approx(100 * 30 / 105)),
    ]
    assert summarize(" 5").self_top == [("(no Python frame)", 100.0)]
    assert summary.lines()[0] == "105 samples; self time by source file:"
    assert summarize("").samples == 0


@pytest.mark.parametrize("raw", ["main;serve", "main;serve x", "main 1.5"])
def test_malformed_profile_output_is_refused(raw: str) -> None:
    with pytest.raises(BenchError, match="py-spy output"):
        summarize(raw)
