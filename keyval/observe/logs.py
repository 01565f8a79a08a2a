"""Structured logs: one line per event, with the node and the request or stimulus id.

`setup_logging(node, level, json=...)` installs one handler on the root logger (replacing one
it installed before). Text lines read

    2025-01-31T12:00:00.123Z INFO drone-1 c7.r12 keyval.drone: slot 5 reseeded

and JSON lines carry the same as fields: time, level, node, role, request, logger, message
(and exception). The node and request come from keyval.observe.context, so daemons sharing a
process keep their own names; `node` given here is used for records outside any daemon task.

Secrets: nothing in keyval logs key material on purpose, and as a second line of defence the
handler renders every `bytes` argument of a record as `<N bytes>` (keys, session keys and
tickets are bytes), so an accidental `log.debug("%s", ticket)` prints no secret.
"""

from __future__ import annotations

import json as jsonlib
import logging
import sys
import time
from typing import Any, TextIO

from keyval.nodeconfig import DEFAULT_LOG_LEVEL, LOG_LEVELS, ConfigError
from keyval.observe import context

LEVELS = {name: logging.getLevelNamesMapping()[name] for name in LOG_LEVELS}

_installed: logging.Handler | None = None


def parse_level(name: str) -> int:
    """`debug`, `INFO`, ... as a logging level; raises ConfigError for anything else."""
    level = LEVELS.get(name.upper()) if isinstance(name, str) else None
    if level is None:
        raise ConfigError(f"log level must be one of {', '.join(LEVELS)}, not {name!r}")
    return level


def _redact(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return value


class ContextFilter(logging.Filter):
    """Adds `node`, `role` and `request` to every record, and hides bytes arguments."""

    def __init__(self, default_node: str) -> None:
        super().__init__()
        self.default_node = default_node

    def filter(self, record: logging.LogRecord) -> bool:
        node = context.NODE.get()
        record.node = self.default_node if node == context.UNNAMED_NODE else node
        record.role = context.ROLE.get()
        record.request = context.REQUEST_ID.get()
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(argument) for argument in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redact(value) for key, value in record.args.items()}
        return True


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        request = getattr(record, "request", "") or "-"
        node = getattr(record, "node", context.UNNAMED_NODE)
        line = (
            f"{_timestamp(record)} {record.levelname} {node} {request} "
            f"{record.name}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "node": getattr(record, "node", context.UNNAMED_NODE),
            "role": getattr(record, "role", ""),
            "request": getattr(record, "request", ""),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return jsonlib.dumps(fields, ensure_ascii=False)


def remove_logging() -> None:
    """Take out the handler `setup_logging` installed (tests restore the root logger)."""
    global _installed
    if _installed is not None:
        logging.getLogger().removeHandler(_installed)
        _installed = None


def setup_logging(
    node: str, level: str = DEFAULT_LOG_LEVEL, *, json: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Log to `stream` (stderr) at `level` and above, as text or JSON lines. Returns the
    handler. Raises ConfigError for an unknown level."""
    global _installed
    numeric_level = parse_level(level)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(ContextFilter(node))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _installed = handler
    return handler
