"""The Backend contract, run against SQLite always and PostgreSQL when configured."""

from __future__ import annotations

from collections.abc import Callable

from keyval.db.backend import Backend
from keyval.db.records import (
    MapRecord,
    PreparedOp,
    SlotFence,
    StoredWrite,
    TermRecord,
)
from keyval.keys import canonical_key, key_slot
from wire import codec


def put(key: str, value: object, version: int, op_id: bytes) -> PreparedOp:
    write = StoredWrite(key_slot(key), canonical_key(key), codec.encode(value), False, version)
    return PreparedOp(op_id, (write,), (version,))


def delete(key: str, version: int, op_id: bytes) -> PreparedOp:
    write = StoredWrite(key_slot(key), canonical_key(key), b"", True, version)
    return PreparedOp(op_id, (write,), (version,))


def values_of(backend: Backend, slot: int) -> dict[bytes, tuple[object, int]]:
    items, done = backend.read_slot(slot, None, 1000, 1 << 20)
    assert done
    return {item.key: (codec.decode(item.value), item.version) for item in items}


def test_grant_key_is_created_once_and_kept(make_backend: Callable[[], Backend]) -> None:
    first = make_backend()
    first.open()
    key = first.ensure_grant_key(b"k" * 32)
    assert first.ensure_grant_key(b"x" * 32) == key == b"k" * 32
    first.close()
    second = make_backend()
    second.open()
    assert second.ensure_grant_key(b"y" * 32) == b"k" * 32
    second.close()


def test_term_only_moves_forward(backend: Backend) -> None:
    assert backend.load_term() == TermRecord(0, "")
    assert backend.register_term("commander-1", 3) == TermRecord(3, "commander-1")
    assert backend.register_term("commander-2", 3) == TermRecord(3, "commander-1")
    assert backend.register_term("commander-2", 2) == TermRecord(3, "commander-1")
    assert backend.register_term("commander-2", 4) == TermRecord(4, "commander-2")
    assert backend.load_term() == TermRecord(4, "commander-2")


def test_map_saved_only_under_the_registered_term(backend: Backend) -> None:
    backend.register_term("commander-1", 2)
    ranges = ((0, 99, "drone-1", 1), (100, 16383, "drone-2", 1))
    record = MapRecord(2, 5, ranges)
    fences = [SlotFence(0, 2, 1)]
    assert backend.save_map("commander-1", record, fences).saved
    assert backend.load_map() == record
    assert backend.load_fences() == fences
    # Another commander, an old term, or an older version of this term: refused.
    assert not backend.save_map("commander-2", MapRecord(2, 6, ranges), []).saved
    assert not backend.save_map("commander-1", MapRecord(1, 6, ranges), []).saved
    outcome = backend.save_map("commander-1", MapRecord(2, 4, ranges), [])
    assert not outcome.saved
    assert outcome.stored_version == 5
    assert backend.load_map() == record
    # A newer term may start its versions anywhere.
    backend.register_term("commander-2", 3)
    assert backend.save_map("commander-2", MapRecord(3, 1, ranges), []).saved


def test_commit_applies_and_answers_retries_with_the_first_result(backend: Backend) -> None:
    first = put("a", "one", 7, b"1" * 16)
    assert backend.commit_batch([first], [], 1000) == [("ok", [7])]
    retry = put("a", "changed", 9, b"1" * 16)  # same op id, other content: not applied
    again = put("b", "bee", 8, b"2" * 16)
    assert backend.commit_batch([retry, again, again], [], 2000) == [
        ("ok", [7]),
        ("ok", [8]),
        ("ok", [8]),
    ]
    assert values_of(backend, key_slot("a"))[canonical_key("a")] == ("one", 7)
    assert values_of(backend, key_slot("b"))[canonical_key("b")] == ("bee", 8)


def test_a_batch_with_a_retry_stores_its_new_ops_and_fences_once(backend: Backend) -> None:
    """A retried op id sends the batch down the lookup path (after the first attempt rolled
    back): the new ops and the fences are stored exactly once, the retry applies nothing."""
    backend.commit_batch([put("a", "one", 1, b"1" * 16)], [], 1000)
    fence = SlotFence(7, 2, 3)
    results = backend.commit_batch(
        [put("b", "new", 4, b"2" * 16), put("a", "again", 5, b"1" * 16)], [fence], 2000
    )
    assert results == [("ok", [4]), ("ok", [1])]
    assert values_of(backend, key_slot("a"))[canonical_key("a")] == ("one", 1)
    assert values_of(backend, key_slot("b"))[canonical_key("b")] == ("new", 4)
    assert fence in backend.load_fences()
    assert backend.purge_op_results(3000) == 2  # one stored result per op id


def test_versions_never_go_back(backend: Backend) -> None:
    slot = key_slot("k")
    backend.commit_batch([put("k", "new", 10, b"a" * 16), put("k", "old", 5, b"b" * 16)], [], 1)
    assert values_of(backend, slot) == {canonical_key("k"): ("new", 10)}
    backend.commit_batch([delete("k", 11, b"c" * 16)], [], 1)
    assert values_of(backend, slot) == {}
    backend.commit_batch([put("k", "stale", 10, b"d" * 16)], [], 1)  # older than the delete
    assert values_of(backend, slot) == {}
    backend.commit_batch([put("k", "back", 12, b"e" * 16)], [], 1)
    assert values_of(backend, slot) == {canonical_key("k"): ("back", 12)}


def test_read_slot_pages_in_key_order(backend: Backend) -> None:
    keys = [f"{{t}}{index:03}" for index in range(25)]
    ops = [put(key, index, index + 1, index.to_bytes(16, "big")) for index, key in enumerate(keys)]
    backend.commit_batch(ops, [], 1)
    slot = key_slot("t")
    seen: list[bytes] = []
    after: bytes | None = None
    pages = 0
    while True:
        items, done = backend.read_slot(slot, after, 10, 1 << 20)
        seen.extend(item.key for item in items)
        pages += 1
        if done:
            break
        after = items[-1].key
    assert seen == sorted(canonical_key(key) for key in keys)
    assert pages == 3
    # The byte budget cuts a page short but always lets one item through.
    items, done = backend.read_slot(slot, None, 100, 1)
    assert len(items) == 1
    assert not done
    assert backend.read_slot(slot + 1, None, 10, 1 << 20) == ([], True)


def test_op_results_expire(backend: Backend) -> None:
    backend.commit_batch([put("x", 1, 1, b"o" * 16)], [], 1000)
    assert backend.purge_op_results(500) == 0
    assert backend.purge_op_results(1001) == 1
    # Forgotten: the same op id applies again (the retention bound is the contract).
    assert backend.commit_batch([put("x", 2, 2, b"o" * 16)], [], 2000) == [("ok", [2])]


def test_decisions_first_one_wins(backend: Backend) -> None:
    assert backend.decide(b"t1", "commit", 1) == "commit"
    assert backend.decide(b"t1", "abort", 2) == "commit"
    assert backend.decide(b"t2", "abort", 3) == "abort"
    assert backend.decide(b"t2", "commit", 3) == "abort"


def test_everything_survives_reopen(make_backend: Callable[[], Backend]) -> None:
    first = make_backend()
    first.open()
    first.register_term("commander-1", 1)
    first.save_map("commander-1", MapRecord(1, 1, ((0, 16383, "drone-1", 1),)), [])
    first.save_fences([SlotFence(9, 1, 4)])
    first.commit_batch([put("kept", [1, 2], 3, b"k" * 16)], [], 1)
    first.close()
    second = make_backend()
    second.open()
    assert second.load_term() == TermRecord(1, "commander-1")
    assert second.load_map() == MapRecord(1, 1, ((0, 16383, "drone-1", 1),))
    assert second.load_fences() == [SlotFence(9, 1, 4)]
    assert values_of(second, key_slot("kept")) == {canonical_key("kept"): ([1, 2], 3)}
    assert second.commit_batch([put("kept", 0, 9, b"k" * 16)], [], 2) == [("ok", [3])]
    second.close()
