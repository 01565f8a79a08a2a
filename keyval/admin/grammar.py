"""The admin commands' grammar: what each command takes, and the parser of a command line.

`parse_line("move 42 drone-2")` and `parse_words(["move", "42", "drone-2"])` return an
`Invocation` (the command's name and its checked argument values) or raise a `UsageError`
subclass. Nothing here does I/O; `keyval.admin.actions` carries an Invocation out.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import shlex
from typing import Any

from auth.principals import Role
from keyval.admin.errors import SlotOutOfRange, UnknownCommand, UsageError
from keyval.keys import NUM_SLOTS

# A drone or principal name is a principal name: a short identifier (the commander caps drone
# names at the same length).
MAX_NAME_CHARS = 128
# `scan` prints what it finds; more than this many rows is not a "quick look" any more.
MAX_SCAN_LIMIT = 10_000
DEFAULT_SCAN_LIMIT = 100
# Suggestions for an unknown command: up to this many, at least this similar (difflib ratio).
MAX_SUGGESTIONS = 3
SUGGESTION_CUTOFF = 0.5
JSON_FLAG = "--json"


class Kind(enum.Enum):
    SLOT = "slot"  # 0..NUM_SLOTS-1
    DRONE = "drone"  # a drone's principal name
    NAME = "name"  # a principal name
    KEY = "key"  # a user key (str on the command line)
    TEXT = "text"  # free text (a value, a path)
    COUNT = "count"  # 1..MAX_SCAN_LIMIT
    COMMAND = "command"  # a command name (for help)


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: Kind
    optional: bool = False
    rest: bool = False  # takes every remaining word, joined by spaces (help's command name)


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    flag: str  # "--role"
    kind: Kind
    required: bool = False
    repeat: bool = False
    choices: tuple[str, ...] = ()
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


@dataclasses.dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str  # one word, or "group word" ("principal add")
    summary: str
    params: tuple[Param, ...] = ()
    options: tuple[Option, ...] = ()
    details: str = ""
    repl_only: bool = False

    @property
    def usage(self) -> str:
        parts = [self.name]
        for param in self.params:
            word = param.name.upper()
            parts.append(f"[{word}]" if param.optional else word)
        for option in self.options:
            word = f"{option.flag} {option.dest.upper()}"
            parts.append(word if option.required else f"[{word}]")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class Invocation:
    command: str
    values: dict[str, Any]
    json_output: bool = False


ROLES = tuple(role.value for role in Role)

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(
        "help",
        "list the commands, or explain one",
        (Param("command", Kind.COMMAND, True, rest=True),),
    ),
    CommandSpec(
        "slots",
        "the slot map: ranges -> drone, epoch (only DRONE's ranges if given)",
        (Param("drone", Kind.DRONE, True),),
    ),
    CommandSpec("slot", "the owner and epoch of one slot", (Param("slot", Kind.SLOT),)),
    CommandSpec("keyslot", "the slot a key hashes to and its owner", (Param("key", Kind.KEY),)),
    CommandSpec("nodes", "every drone and commander with its address and role"),
    CommandSpec(
        "status",
        "commander term and leader, and every drone's health and load",
        details="Health and load come from the commander's cmd.status; a commander that does "
        "not answer it yet gives the map's view only.",
    ),
    CommandSpec("principals", "the principals the ticket authority knows (admin role)"),
    CommandSpec(
        "principal add",
        "register a new principal; its private key is written to --out (default NAME.key)",
        (Param("name", Kind.NAME),),
        (
            Option("--role", Kind.TEXT, required=True, choices=ROLES),
            Option("--out", Kind.TEXT),
            Option("--prefix", Kind.TEXT, repeat=True, default=()),
        ),
    ),
    CommandSpec(
        "principal disable",
        "revoke a principal (its tickets stop working)",
        (Param("name", Kind.NAME),),
    ),
    CommandSpec("principal enable", "re-enable a disabled principal", (Param("name", Kind.NAME),)),
    CommandSpec("get", "read a key", (Param("key", Kind.KEY),)),
    CommandSpec("put", "write a string value", (Param("key", Kind.KEY), Param("value", Kind.TEXT))),
    CommandSpec("del", "delete a key", (Param("key", Kind.KEY),)),
    CommandSpec(
        "scan",
        "keys starting with PREFIX, in key order",
        (Param("prefix", Kind.KEY, True),),
        (Option("--limit", Kind.COUNT, default=DEFAULT_SCAN_LIMIT),),
    ),
    CommandSpec(
        "move",
        "give SLOT to DRONE (the old owner's lease ends first) and wait for it",
        (Param("slot", Kind.SLOT), Param("drone", Kind.DRONE)),
    ),
    CommandSpec(
        "drain", "move every slot off DRONE (maintenance) and wait", (Param("drone", Kind.DRONE),)
    ),
    CommandSpec("rebalance", "spread slots evenly over the live drones"),
    CommandSpec("quit", "leave the REPL (Ctrl-D does too)", repl_only=True),
)

SPECS: dict[str, CommandSpec] = {spec.name: spec for spec in COMMANDS}
ALIASES = {"exit": "quit", "delete": "del", "?": "help"}
GROUPS = frozenset(name.split()[0] for name in SPECS if " " in name)


def command_words() -> list[str]:
    """First words a line may start with (for completion and suggestions)."""
    return sorted({name.split()[0] for name in SPECS} | ALIASES.keys())


def find_spec(words: list[str]) -> tuple[CommandSpec, list[str]]:
    """The command `words` starts with, and the words after its name."""
    if not words:
        raise UsageError("empty command (type 'help' for the list)")
    first = ALIASES.get(words[0].lower(), words[0].lower())
    if first in GROUPS:
        if len(words) < 2:
            actions = sorted(name.split()[1] for name in SPECS if name.startswith(first + " "))
            raise UsageError(f"{first} needs an action: {', '.join(actions)}")
        name = f"{first} {words[1].lower()}"
        if name not in SPECS:
            raise UnknownCommand(name, _suggest(name, list(SPECS)))
        return SPECS[name], words[2:]
    if first not in SPECS:
        raise UnknownCommand(words[0], _suggest(first, command_words()))
    return SPECS[first], words[1:]


def _suggest(word: str, candidates: list[str]) -> list[str]:
    return difflib.get_close_matches(word, candidates, n=MAX_SUGGESTIONS, cutoff=SUGGESTION_CUTOFF)


def parse_line(line: str) -> Invocation | None:
    """Parse one REPL line; None for a blank line or a comment."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as error:  # an unbalanced quote
        raise UsageError(f"cannot split the line: {error}") from None
    return parse_words(words) if words else None


def parse_words(words: list[str]) -> Invocation:
    json_output = JSON_FLAG in words
    words = [word for word in words if word != JSON_FLAG]
    spec, rest = find_spec(words)
    values: dict[str, Any] = {opt.dest: opt.default for opt in spec.options}
    positionals: list[str] = []
    index = 0
    while index < len(rest):
        word = rest[index]
        option = _option(spec, word)
        if option is None:
            positionals.append(word)
            index += 1
            continue
        if index + 1 >= len(rest):
            raise UsageError(f"{spec.name}: {option.flag} needs a value (usage: {spec.usage})")
        value = _check_option(spec, option, rest[index + 1])
        values[option.dest] = (*values[option.dest], value) if option.repeat else value
        index += 2
    _bind_positionals(spec, positionals, values)
    for option in spec.options:
        if option.required and values[option.dest] is None:
            raise UsageError(f"{spec.name}: {option.flag} is required (usage: {spec.usage})")
    return Invocation(spec.name, values, json_output)


def _option(spec: CommandSpec, word: str) -> Option | None:
    if not word.startswith("--"):
        return None
    for option in spec.options:
        if option.flag == word:
            return option
    known = ", ".join(option.flag for option in spec.options) or "none"
    raise UsageError(f"{spec.name}: unknown option {word} (options: {known}; usage: {spec.usage})")


def _check_option(spec: CommandSpec, option: Option, word: str) -> Any:
    if option.choices and word not in option.choices:
        raise UsageError(
            f"{spec.name}: {option.flag} must be one of {', '.join(option.choices)}, not {word!r}"
        )
    return check_value(option.kind, word, option.dest)


def _bind_positionals(spec: CommandSpec, words: list[str], values: dict[str, Any]) -> None:
    if spec.params and spec.params[-1].rest and len(words) > len(spec.params):
        head = len(spec.params) - 1
        words = [*words[:head], " ".join(words[head:])]
    needed = [param for param in spec.params if not param.optional]
    if len(words) < len(needed) or len(words) > len(spec.params):
        raise UsageError(f"{spec.name}: wrong number of arguments (usage: {spec.usage})")
    for param in spec.params:
        values[param.name] = None
    for param, word in zip(spec.params, words, strict=False):
        values[param.name] = check_value(param.kind, word, param.name)


def check_value(kind: Kind, word: str, what: str) -> Any:
    """Convert and check one argument; raise UsageError (SlotOutOfRange for slots)."""
    if kind is Kind.SLOT:
        return check_slot(word)
    if kind is Kind.COUNT:
        if not word.isdigit() or not 1 <= int(word) <= MAX_SCAN_LIMIT:
            raise UsageError(f"{what} must be a whole number 1..{MAX_SCAN_LIMIT}, not {word!r}")
        return int(word)
    if kind in (Kind.DRONE, Kind.NAME):
        if not 1 <= len(word) <= MAX_NAME_CHARS or not word.isprintable() or " " in word:
            raise UsageError(f"{what} must be a name of 1..{MAX_NAME_CHARS} printable characters")
        return word
    if kind is Kind.COMMAND:
        return " ".join(word.split())
    return word


def check_slot(word: str) -> int:
    try:
        slot = int(word, 10)
    except ValueError:
        raise UsageError(f"slot must be a whole number 0..{NUM_SLOTS - 1}, not {word!r}") from None
    if not 0 <= slot < NUM_SLOTS:
        raise SlotOutOfRange(f"slot {slot} is out of range: slots are 0..{NUM_SLOTS - 1}")
    return slot
