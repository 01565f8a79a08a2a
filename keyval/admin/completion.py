"""Tab completion for the REPL: command names, actions, options, drone names and slots.

`Names` holds what the completer offers for DRONE and SLOT arguments; the REPL refreshes it
from the slot map. The completer itself does no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from keyval.admin.errors import UsageError
from keyval.admin.grammar import GROUPS, JSON_FLAG, SPECS, Kind, command_words, find_spec
from keyval.messages import SlotMap

# Slot numbers offered for a SLOT argument: range boundaries of the map, at most this many
# (16384 numbers would fill the screen and say nothing).
MAX_SLOT_COMPLETIONS = 64


@dataclasses.dataclass(slots=True)
class Names:
    drones: list[str] = dataclasses.field(default_factory=list)
    slots: list[int] = dataclasses.field(default_factory=list)

    def update(self, slot_map: SlotMap) -> None:
        self.drones = sorted(set(slot_map.drones) | {r[2] for r in slot_map.ranges})
        bounds = sorted({bound for first, last, _, _ in slot_map.ranges for bound in (first, last)})
        self.slots = bounds[:MAX_SLOT_COMPLETIONS]


class AdminCompleter(Completer):
    def __init__(self, names: Names) -> None:
        self.names = names

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        text = document.text_before_cursor
        words = text.split()
        current = "" if not words or text[-1:].isspace() else words.pop()
        for candidate in self.candidates(words, current):
            if candidate.startswith(current):
                yield Completion(candidate, start_position=-len(current))

    def candidates(self, before: list[str], current: str) -> Iterable[str]:
        """Words that may come after `before` (the complete words typed so far)."""
        if not before:
            return command_words()
        if len(before) == 1 and before[0].lower() in GROUPS:
            group = before[0].lower()
            return sorted(name.split()[1] for name in SPECS if name.startswith(group + " "))
        try:
            spec, rest = find_spec(before)
        except UsageError:
            return []
        options = {option.flag: option for option in spec.options}
        if rest and rest[-1] in options:  # the value of an option
            return options[rest[-1]].choices
        if current.startswith("-"):
            return [*options, JSON_FLAG]
        position = _positional_index(rest, options)
        if position >= len(spec.params):
            return []
        return self._for_kind(spec.params[position].kind)

    def _for_kind(self, kind: Kind) -> list[str]:
        if kind is Kind.DRONE:
            return self.names.drones
        if kind is Kind.SLOT:
            return [str(slot) for slot in self.names.slots]
        if kind is Kind.COMMAND:
            return sorted(SPECS)
        return []


def _positional_index(rest: list[str], options: Collection[str]) -> int:
    index = 0
    skip = False
    for word in rest:
        if skip:
            skip = False
        elif word in options:
            skip = True
        elif word != JSON_FLAG:
            index += 1
    return index
