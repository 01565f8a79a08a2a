"""Structured logs: JSON lines with node and request ids from a real daemon, text lines, level
filtering, option checking; and no secret or ticket in any record of a DEBUG run."""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from auth import keys
from auth.datadir import MASTER_KEY_FILE, SIGNING_KEY_FILE
from keyval import observe
from keyval.grants import Grant, sign_grant
from keyval.keys import canonical_key, key_slot
from keyval.messages import DbGrantKey, DbGrantKeyReply, DbRegisterTerm, DbWriteBatch, pack_op
from keyval.nodeconfig import ConfigError, add_identity_arguments, resolve
from keyval.observe.context import bind_node, set_request, stimulus
from tests.observe.conftest import DB_NAME, WAIT_S, Cluster
from wire import codec
from wire.errors import Unauthorized

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("keyval.test")


@pytest.fixture
def restore_root() -> Iterator[None]:
    level = logging.getLogger().level
    try:
        yield
    finally:
        observe.remove_logging()
        logging.getLogger().setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def exercise(cluster: Cluster) -> dict[str, bytes]:
    """Log in, make requests (one refused); return the secrets that were in play."""
    commander_auth = await cluster.credentials("commander-1").client_auth(DB_NAME)
    secrets = {
        "ticket": commander_auth.hello()["ticket"],
        "session key": commander_auth.secret(),
    }
    with trio.fail_after(WAIT_S):
        async with await cluster.connect("commander-1") as commander:
            await commander.request(DbRegisterTerm("commander-1", 1))
            reply = await commander.request(DbGrantKey())
            assert isinstance(reply, DbGrantKeyReply)
        secrets["grant key"] = reply.key
        async with await cluster.connect("drone-1") as drone:
            with pytest.raises(Unauthorized):
                await drone.request(DbGrantKey())
            grant = sign_grant(Grant("drone-1", 1, ((0, 16383, 1),), 0), reply.key)
            write = (key_slot("k"), canonical_key("k"), 1, codec.encode("v"))
            await drone.request(DbWriteBatch.of([grant], [pack_op(b"o" * 16, [write])]))
    return secrets


def private_secrets(cluster: Cluster) -> dict[str, bytes]:
    found = {}
    for name in (DB_NAME, "commander-1", "drone-1"):
        key = keys.load_private_key(cluster.key_path(name))
        found[f"{name} private key"] = key.private_bytes_raw()
        found[f"{name} key file"] = cluster.key_path(name).read_bytes()
    authority_dir = cluster.tmp_path / "auth"
    found["authority signing key"] = keys.load_private_key(
        authority_dir / SIGNING_KEY_FILE
    ).private_bytes_raw()
    found["ticket master key"] = keys.read_private_file(authority_dir / MASTER_KEY_FILE)
    return found


def encodings(secret: bytes) -> list[str]:
    forms = [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
        secret.decode("latin-1"),
    ]
    if secret.isascii():
        forms.append(secret.decode("ascii"))
    return forms


async def test_no_secret_or_ticket_is_logged_at_debug(
    captured_logs: io.StringIO, cluster: Cluster
) -> None:
    secrets = await exercise(cluster)
    secrets.update(private_secrets(cluster))
    text = captured_logs.getvalue()
    records = json_lines(captured_logs)
    assert len(records) >= 10  # the run did log: connections, requests, commits
    assert any(record["level"] == "DEBUG" for record in records)
    for what, secret in secrets.items():
        assert len(secret) >= 16, what
        for form in encodings(secret):
            # any 16-character window of the secret would already be a leak
            for start in range(0, max(len(form) - 16, 0) + 1, 8):
                assert form[start : start + 16] not in text, f"{what} appears in the logs"


async def test_json_lines_carry_node_and_request_id(
    captured_logs: io.StringIO, cluster: Cluster
) -> None:
    await exercise(cluster)
    records = json_lines(captured_logs)
    for record in records:
        assert set(record) >= {"time", "level", "node", "role", "request", "logger", "message"}
    served = [r for r in records if r["message"].startswith("db.register_term from commander-1")]
    assert len(served) == 1
    assert served[0]["node"] == DB_NAME
    assert served[0]["role"] == "db"
    assert re.fullmatch(r"c\d+\.r1", served[0]["request"])
    refused = [r for r in records if r["message"].startswith("db.grant_key from drone-1")]
    assert len(refused) == 1 and "UNAUTHORIZED" in refused[0]["message"]
    authority_lines = [r for r in records if r["logger"] == "auth.daemon"]
    assert authority_lines and all(r["node"] == "authority" for r in authority_lines)


async def test_text_lines_and_stimulus_ids(restore_root: None) -> None:
    stream = io.StringIO()
    observe.setup_logging("fallback", "INFO", stream=stream)
    log.info("outside any node")
    bind_node("drone-7", "drone")
    set_request("c3.r9")
    log.info("serving %s", "a request")
    set_request("")
    with stimulus("heartbeat") as stimulus_id:
        log.warning("late")
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"\S+Z INFO fallback - keyval\.test: outside any node", lines[0])
    assert re.fullmatch(r"\S+Z INFO drone-7 c3\.r9 keyval\.test: serving a request", lines[1])
    assert re.fullmatch(rf"\S+Z WARNING drone-7 {stimulus_id} keyval\.test: late", lines[2])
    assert re.fullmatch(r"heartbeat-\d+", stimulus_id)


def test_bytes_arguments_are_never_rendered(restore_root: None) -> None:
    stream = io.StringIO()
    observe.setup_logging("n", "INFO", json=True, stream=stream)
    log.info("got ticket %s", b"\x01secret-ticket-bytes")
    log.info("key %(key)r", {"key": bytearray(b"k" * 32)})
    messages = [record["message"] for record in json_lines(stream)]
    assert messages == ["got ticket <20 bytes>", "key '<32 bytes>'"]


def test_level_filters_lower_records(restore_root: None) -> None:
    stream = io.StringIO()
    observe.setup_logging("n", "warning", json=True, stream=stream)
    log.debug("debug")
    log.info("info")
    log.warning("warning")
    log.error("error")
    assert [record["level"] for record in json_lines(stream)] == ["WARNING", "ERROR"]
    # setting up again replaces the handler: no line is written twice
    second = io.StringIO()
    observe.setup_logging("n", "DEBUG", stream=second)
    log.debug("once")
    assert stream.getvalue().count("once") == 0
    assert second.getvalue().count("once") == 1


def test_unknown_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="log level"):
        observe.setup_logging("n", "LOUD")


def parse(argv: list[str], tmp_path: Path, toml: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_identity_arguments(parser, listen_default="127.0.0.1:0")
    identity = ["--name", "n", "--key", "k", "--authority", "a:1", "--authority-key", "00"]
    if toml:
        (tmp_path / "node.toml").write_text(toml)
        identity += ["--config", str(tmp_path / "node.toml")]
    return parser.parse_args(identity + argv)


def test_flags_and_file_give_the_observe_options(tmp_path: Path) -> None:
    options = resolve(parse(["--metrics", "127.0.0.1:9100", "--log-level", "debug"], tmp_path))
    assert (options.metrics, options.log_level, options.log_json) == (
        "127.0.0.1:9100",
        "DEBUG",
        False,
    )
    from_file = resolve(parse([], tmp_path, 'log_level = "error"\nlog_json = true\n'))
    assert (from_file.metrics, from_file.log_level, from_file.log_json) == (None, "ERROR", True)
    assert "log_json" not in from_file.extra
    flag_wins = resolve(parse(["--log-level", "INFO"], tmp_path, 'log_level = "error"\n'))
    assert flag_wins.log_level == "INFO"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('metrics = "no-port"\n', "HOST:PORT"),
        ("metrics = 9100\n", "metrics"),
        ('log_level = "loud"\n', "log-level"),
        ('log_json = "yes"\n', "log-json"),
    ],
)
def test_bad_observe_options_in_a_file_are_config_errors(
    tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(parse([], tmp_path, toml))


def test_bad_level_flag_is_refused_by_the_parser(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse(["--log-level", "loud"], tmp_path)


@pytest.mark.parametrize("role", ["db", "auth"])
def test_daemon_with_a_bad_metrics_address_exits_2_with_one_line(tmp_path: Path, role: str) -> None:
    if role == "auth":
        args = ["auth", "--data", str(tmp_path / "auth"), "--metrics", "nowhere"]
    else:
        identity = ["--name", "db", "--key", "k", "--authority", "127.0.0.1:1"]
        args = ["db", *identity, "--authority-key", "00", "--metrics", "nowhere"]
    done = subprocess.run(
        [sys.executable, "-m", "keyval", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0], done.stderr
