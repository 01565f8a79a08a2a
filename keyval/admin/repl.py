"""The interactive loop: read a line (prompt_toolkit), run it (actions), show it (render).

Trio runs in the main thread; prompt_toolkit's prompt runs in a worker thread, so the
connections stay open between commands. The terminal is in raw mode while prompting, so
Ctrl-C there is a key (it clears the line) and Ctrl-D ends the REPL. While a command runs the
terminal is cooked, Ctrl-C is a SIGINT, and the loop cancels just that command.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from rich.console import Console

from auth.keys import KeyFileError
from keyval.admin.actions import execute
from keyval.admin.completion import AdminCompleter, Names
from keyval.admin.errors import AdminError, describe
from keyval.admin.grammar import Invocation, parse_line
from keyval.admin.remote import AdminRemote
from keyval.admin.render import render, render_json
from keyval.nodeconfig import ConfigError
from wire.errors import WireError

HISTORY_FILE = Path("~/.keyval_history")
PROMPT = "keyval> "
# Commands after which the completer's drone names and slots are refreshed from the map.
MAP_COMMANDS = frozenset({"slots", "nodes", "status", "move", "drain"})
# Errors a command may end with that the REPL reports and survives. Anything else is a bug
# and ends the REPL with its traceback.
COMMAND_ERRORS = (AdminError, WireError, OSError, KeyFileError, ConfigError, trio.TooSlowError)


def open_history() -> History:
    path = HISTORY_FILE.expanduser()
    try:
        path.touch(mode=0o600, exist_ok=True)
    except OSError:
        return InMemoryHistory()  # a read-only home: keep history for this session only
    return FileHistory(str(path))


class Repl:
    def __init__(
        self,
        remote: AdminRemote,
        console: Console,
        prompt: Callable[[], str],
        names: Names | None = None,
    ) -> None:
        self.remote = remote
        self.console = console
        self._prompt = prompt
        self._names = names
        self._running: trio.CancelScope | None = None

    async def run(self) -> None:
        self.console.print(
            "keyval admin: 'help' lists the commands; Ctrl-C cancels one, Ctrl-D quits.",
            highlight=False,
        )
        with trio.open_signal_receiver(signal.SIGINT) as interrupts:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_on_interrupt, interrupts)
                await self._loop()
                nursery.cancel_scope.cancel()

    async def _cancel_on_interrupt(self, interrupts: AsyncIterator[int]) -> None:
        async for _ in interrupts:
            if self._running is not None:
                self._running.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                line = await trio.to_thread.run_sync(self._prompt)
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt drops the line, like a shell
            except EOFError:
                return
            try:
                invocation = parse_line(line)
            except AdminError as error:
                self._error(error)
                continue
            if invocation is None:
                continue
            if invocation.command == "quit":
                return
            await self.run_command(invocation)

    async def run_command(self, invocation: Invocation) -> None:
        with trio.CancelScope() as scope:
            self._running = scope
            try:
                result = await execute(invocation, self.remote, self._progress)
            except COMMAND_ERRORS as error:
                self._error(error)
                return
            finally:
                self._running = None
            if invocation.json_output:
                self.console.print_json(render_json(result))
            else:
                render(result, self.console)
        if scope.cancelled_caught:
            self.console.print("cancelled", style="yellow")
        elif self._names is not None and invocation.command in MAP_COMMANDS:
            await refresh_names(self.remote, self._names)

    def _progress(self, text: str) -> None:
        self.console.print(f"  ... {text}", style="dim", markup=False, highlight=False)

    def _error(self, error: BaseException) -> None:
        if isinstance(error, trio.TooSlowError):
            error = AdminError("timed out waiting for the cluster")
        self.console.print(f"error: {describe(error)}", style="red", markup=False, highlight=False)


async def refresh_names(remote: AdminRemote, names: Names) -> None:
    """Drone names and slot boundaries for completion; best effort (the REPL starts anyway)."""
    try:
        names.update(await remote.get_map())
    except COMMAND_ERRORS:
        pass  # completion of names waits for the first map that loads


def run_repl(remote_factory: Callable[[], AdminRemote]) -> int:
    names = Names()
    session: PromptSession[str] = PromptSession(
        history=open_history(), completer=AdminCompleter(names), complete_while_typing=False
    )
    console = Console(highlight=False)

    async def main() -> None:
        remote = remote_factory()
        try:
            await refresh_names(remote, names)
            await Repl(remote, console, lambda: session.prompt(PROMPT), names).run()
        finally:
            await remote.aclose()

    trio.run(main)
    return 0
