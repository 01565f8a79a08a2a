"""Tab completion of commands, actions, options, drone names and slots."""

from __future__ import annotations

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from keyval.admin.completion import AdminCompleter, Names
from keyval.messages import SlotMap

MAP = SlotMap(
    term=2,
    version=5,
    ranges=[(0, 8191, "drone-1", 1), (8192, 16383, "drone-2", 3)],
    drones={"drone-1": "127.0.0.1:1", "drone-2": "127.0.0.1:2", "drone-3": "127.0.0.1:3"},
    leader="commander-1",
)


def complete(text: str) -> list[str]:
    names = Names()
    names.update(MAP)
    completer = AdminCompleter(names)
    found = completer.get_completions(Document(text), CompleteEvent(completion_requested=True))
    return [completion.text for completion in found]


def test_command_names() -> None:
    assert complete("sl") == ["slot", "slots"]
    assert "principal" in complete("")


def test_group_actions() -> None:
    assert complete("principal ") == ["add", "disable", "enable"]
    assert complete("principal d") == ["disable"]


def test_drone_names_from_the_map() -> None:
    assert complete("drain ") == ["drone-1", "drone-2", "drone-3"]
    assert complete("move 5 drone-") == ["drone-1", "drone-2", "drone-3"]
    assert complete("slots drone-3") == ["drone-3"]


def test_slots_are_the_range_boundaries() -> None:
    assert complete("slot ") == ["0", "8191", "8192", "16383"]
    assert complete("move 81") == ["8191", "8192"]


def test_options_and_their_choices() -> None:
    assert complete("principal add x --") == ["--role", "--out", "--prefix", "--json"]
    assert complete("principal add x --role a") == ["admin"]
    assert complete("scan p --limit ") == []


def test_nothing_after_the_last_argument_or_an_unknown_command() -> None:
    assert complete("slot 5 ") == []
    assert complete("bogus ") == []
