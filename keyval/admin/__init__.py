"""keyval admin: the operator's REPL and its one-shot commands.

Modules: `grammar` (commands and the line parser), `actions` (carry a command out),
`results` (what a command returns), `render` (rich tables and JSON), `remote` (links to the
commanders, the authority and the data), `completion` and `repl` (the interactive loop),
`cli` (`keyval admin`).
"""

from __future__ import annotations

from keyval.admin.cli import register

__all__ = ["register"]
