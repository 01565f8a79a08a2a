from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from auth import keys
from keyval import cli_data


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="keyval")
    root.add_argument("--config")
    cli_data.register(root.add_subparsers(dest="command"))
    return root


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


def test_values_on_the_command_line_are_json_else_strings() -> None:
    assert cli_data.parse_value("12") == 12
    assert cli_data.parse_value('"12"') == "12"
    assert cli_data.parse_value('{"a": [1, null]}') == {"a": [1, None]}
    assert cli_data.parse_value("hello world") == "hello world"
    assert cli_data.parse_value('{"$bytes": "AAE="}') == b"\x00\x01"


def test_values_print_as_json_with_bytes_marked() -> None:
    assert cli_data.dumps({"b": b"\x00\x01", 1: [True]}) == '{"b": {"$bytes": "AAE="}, "1": [true]}'


def test_no_config_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KEYVAL_CONFIG", raising=False)
    assert run(["get", "k"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KEYVAL_CONFIG" in err


def test_missing_config_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--config", str(tmp_path / "nope.toml"), "put", "k", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_unreachable_cluster_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = tmp_path / "client.key"
    keys.save_private_key(key_path, keys.generate_private_key())
    authority = keys.public_key_bytes(keys.generate_private_key()).hex()
    config = tmp_path / "client.toml"
    config.write_text(
        'name = "client"\nkey = "client.key"\nauthority = "127.0.0.1:9"\n'
        f'authority_key = "{authority}"\ncommanders = ["127.0.0.1:9"]\ndeadline_s = 0.3\n'
    )
    assert run(["--config", str(config), "scan", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("keyval: ")
