"""The admin tool's own errors. Errors from the cluster arrive as wire.errors.WireError.

`UsageError` is a bad command line (exit code 2 in one-shot form); `AdminError` is a command
that was well formed but could not be done (exit code 1). Both carry a short code, like the
wire errors, so `--json` callers and tests can match on it.
"""

from __future__ import annotations

from wire.errors import ErrorCode, WireError


class AdminError(Exception):
    """A command could not be carried out; the message says why and what to do."""

    code = "ADMIN_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotSupported(AdminError):
    """The commander this tool talks to has no message for the operation yet."""

    code = "NOT_SUPPORTED"


class UsageError(AdminError):
    """The command line is malformed: wrong arguments, bad values."""

    code = "USAGE"


class UnknownCommand(UsageError):
    code = "UNKNOWN_COMMAND"

    def __init__(self, word: str, suggestions: list[str]) -> None:
        hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(f"unknown command {word!r}{hint} (type 'help' for the list)")
        self.word = word
        self.suggestions = suggestions


class SlotOutOfRange(UsageError):
    code = "SLOT_OUT_OF_RANGE"


ADMIN_HINT = (
    "keyval admin needs a principal with role admin: pass --config with the cluster's "
    "admin.toml (keyval cluster up writes one)"
)


def describe(error: BaseException) -> str:
    """One line for an operator: the stable code, what went wrong, and for UNAUTHORIZED what
    to do about it."""
    if isinstance(error, UsageError):
        return error.message
    if isinstance(error, AdminError):
        return f"{error.code}: {error.message}"
    if isinstance(error, WireError):
        line = f"{error.code.value}: {error.message}"
        if error.code is ErrorCode.UNAUTHORIZED:
            line += f" ({ADMIN_HINT})"
        return line
    return str(error) or type(error).__name__
