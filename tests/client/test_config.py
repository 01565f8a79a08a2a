from __future__ import annotations

from pathlib import Path

import pytest

from keyval.client.config import Endpoint, load_settings, parse_commanders
from keyval.nodeconfig import ConfigError

IDENTITY = 'name = "client"\nkey = "c.key"\nauthority = "127.0.0.1:6230"\nauthority_key = "ab"\n'


def test_commanders_bare_named_and_by_list() -> None:
    assert parse_commanders(["h:1", "leader@h:2"]) == (
        Endpoint("commander-1", "h:1"),
        Endpoint("leader", "h:2"),
    )
    assert parse_commanders(["h:1"], ["c-a"]) == (Endpoint("c-a", "h:1"),)


@pytest.mark.parametrize(
    ("entries", "names"),
    [
        ([], None),
        ("h:1", None),
        ([5], None),
        (["@h:1"], None),
        (["nohost"], None),
        (["h:1"], ["a", "b"]),
        (["h:1"], [""]),
    ],
)
def test_bad_commander_lists(entries: object, names: object) -> None:
    with pytest.raises(ConfigError):
        parse_commanders(entries, names)


def test_load_settings_reads_ack_and_deadline(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text(IDENTITY + 'commanders = ["h:1"]\nack = "memory"\ndeadline_s = 2\n')
    settings = load_settings(path)
    assert settings.ack == "memory" and settings.deadline_s == 2.0
    assert settings.autobatch is True  # auto-batching of concurrent gets is on by default
    path.write_text(IDENTITY + 'commanders = ["h:1"]\nautobatch = false\n')
    assert load_settings(path).autobatch is False
    assert settings.identity is not None and settings.identity.key == tmp_path / "c.key"


def test_ack_defaults_to_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "client.toml"
    path.write_text(IDENTITY + 'commanders = ["h:1"]\n')
    monkeypatch.setenv("KEYVAL_CONFIG", str(path))
    assert load_settings(None).ack == "durable"


@pytest.mark.parametrize(
    "extra", ['ack = "fast"\n', "deadline_s = 0\n", 'deadline_s = "x"\n', 'autobatch = "no"\n']
)
def test_bad_settings_are_refused(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "client.toml"
    path.write_text(IDENTITY + 'commanders = ["h:1"]\n' + extra)
    with pytest.raises(ConfigError):
        load_settings(path)
