"""docs/protocol.md's message catalogue is generated from the registry: keep them equal."""

from __future__ import annotations

from pathlib import Path

from wire import catalogue

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_protocol_doc_lists_every_message_as_the_code_defines_it() -> None:
    document = DOC.read_text()
    expected = catalogue.rewrite(document, catalogue.render())
    assert document == expected, "run: python -m wire.catalogue --write docs/protocol.md"


def test_type_names_read_as_cbor_types() -> None:
    assert catalogue.type_text(int) == "int"
    assert catalogue.type_text(list[tuple[int, bytes]]) == "[[int, bytes]]"
    assert catalogue.type_text(str | bytes | int | None) == "key or null"
    assert catalogue.type_text(dict[str, int]) == "map text → int"
