"""The benchmark harness's typed errors."""

from __future__ import annotations


class BenchError(Exception):
    """A benchmark could not run; the message says why and what to do."""


class BenchConfigError(BenchError):
    """A command-line option or option combination is invalid."""


class RespProtocolError(BenchError):
    """The Redis server sent bytes that are not a RESP reply we accept."""


class RespReplyError(BenchError):
    """The Redis server answered a command with an error reply (`-ERR ...`)."""


class LoadGeneratorError(BenchError):
    """A load-generator process failed, timed out or sent a malformed report."""


class ProcessGone(BenchError):
    """A server process named in nodes.json no longer exists."""


class ConnectionLost(BenchError):
    """A benchmark connection closed or failed while requests were outstanding."""


class HttpProtocolError(BenchError):
    """An HTTP server sent a response the bench's minimal HTTP/1.1 client does not accept."""


class HttpStatusError(BenchError):
    """An HTTP server answered with a status other than 200."""
