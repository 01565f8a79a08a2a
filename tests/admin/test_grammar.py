"""The command-line parser: every command's shape and every kind of bad input."""

from __future__ import annotations

import re

import pytest

from keyval.admin.errors import SlotOutOfRange, UnknownCommand, UsageError
from keyval.admin.grammar import COMMANDS, Invocation, parse_line, parse_words


@pytest.mark.parametrize(
    ("line", "command", "values"),
    [
        ("slots", "slots", {"drone": None}),
        ("slots drone-2", "slots", {"drone": "drone-2"}),
        ("SLOT 16383", "slot", {"slot": 16383}),
        ("keyslot '{user}:1'", "keyslot", {"key": "{user}:1"}),
        ("nodes", "nodes", {}),
        ("status", "status", {}),
        ("principals", "principals", {}),
        (
            "principal add ops --role admin --out /tmp/ops.key",
            "principal add",
            {"name": "ops", "role": "admin", "out": "/tmp/ops.key", "prefix": ()},
        ),
        (
            "principal add app --prefix a/ --role client --prefix b/",
            "principal add",
            {"name": "app", "role": "client", "out": None, "prefix": ("a/", "b/")},
        ),
        ("principal disable app", "principal disable", {"name": "app"}),
        ("principal enable app", "principal enable", {"name": "app"}),
        ("get k", "get", {"key": "k"}),
        ('put k "hello world"', "put", {"key": "k", "value": "hello world"}),
        ("del k", "del", {"key": "k"}),
        ("delete k", "del", {"key": "k"}),
        ("scan", "scan", {"prefix": None, "limit": 100}),
        ("scan user: --limit 5", "scan", {"prefix": "user:", "limit": 5}),
        ("move 42 drone-2", "move", {"slot": 42, "drone": "drone-2"}),
        ("drain drone-1", "drain", {"drone": "drone-1"}),
        ("rebalance", "rebalance", {}),
        ("help", "help", {"command": None}),
        ("help principal add", "help", {"command": "principal add"}),
        ("? move", "help", {"command": "move"}),
        ("exit", "quit", {}),
    ],
)
def test_each_command_parses(line: str, command: str, values: dict[str, object]) -> None:
    assert parse_line(line) == Invocation(command, values, False)


def test_json_flag_anywhere_sets_json_output() -> None:
    assert parse_words(["--json", "slot", "7"]) == Invocation("slot", {"slot": 7}, True)
    assert parse_words(["slots", "--json"]).json_output


def test_blank_lines_and_comments_are_nothing() -> None:
    assert parse_line("   ") is None
    assert parse_line("# a note") is None


def test_every_command_has_a_usage_and_summary() -> None:
    for spec in COMMANDS:
        assert spec.usage.startswith(spec.name) and spec.summary


@pytest.mark.parametrize(
    ("line", "suggestion"),
    [
        ("slts", "slots"),
        ("stauts", "status"),
        ("mvoe 1 d", "move"),
        ("principal ad x", "principal add"),
    ],
)
def test_unknown_command_suggests_the_close_one(line: str, suggestion: str) -> None:
    with pytest.raises(UnknownCommand) as caught:
        parse_line(line)
    assert suggestion in caught.value.suggestions
    assert f"did you mean {suggestion!r}" in caught.value.message


def test_unknown_command_without_a_close_one_points_at_help() -> None:
    with pytest.raises(UnknownCommand, match=r"unknown command 'xyzzy' \(type 'help'"):
        parse_line("xyzzy")


@pytest.mark.parametrize("word", ["16384", "-1", "99999999"])
def test_slot_out_of_range(word: str) -> None:
    with pytest.raises(SlotOutOfRange, match=r"out of range: slots are 0\.\.16383"):
        parse_words(["slot", word])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("slot x", "slot must be a whole number"),
        ("slot", "wrong number of arguments"),
        ("move 1", "usage: move SLOT DRONE"),
        ("move 1 a b", "wrong number of arguments"),
        ("principal", "principal needs an action: add, disable, enable"),
        ("principal add x", "--role is required"),
        ("principal add x --role wizard", "--role must be one of"),
        ("principal add x --role", "--role needs a value"),
        ("slots --verbose", "unknown option --verbose"),
        ("scan --limit 0", "limit must be a whole number 1..10000"),
        ("scan --limit lots", "limit must be a whole number"),
        ("drain ''", "drone must be a name of 1..128"),
        ("drain " + "d" * 129, "drone must be a name"),
        ("get 'unbalanced", "cannot split the line"),
        ("help frobnicate", "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_is_a_usage_error(line: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        invocation = parse_line(line)
        if invocation is not None and invocation.command == "help":  # help checks its name
            from keyval.admin.actions import help_result

            help_result(invocation.values["command"])
