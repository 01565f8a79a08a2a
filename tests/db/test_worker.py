"""The db's backend thread: calls run in one thread of their own, in order; a queued call
always finishes; a thread that is not running fails calls with StorageError."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import trio

from keyval.db.backend import StorageError
from keyval.db.service import Database
from keyval.db.sqlite import SqliteBackend
from keyval.db.worker import BackendThread, inline_calls
from keyval.messages import DbLoadMap, DbMap
from tests.db.conftest import COMMANDER
from wire.errors import Unavailable


@pytest.fixture
def worker() -> Iterator[BackendThread]:
    worker = BackendThread("test-backend")
    worker.start()
    yield worker
    worker.stop()


async def test_calls_run_in_one_other_thread_in_order(worker: BackendThread) -> None:
    seen: list[tuple[int, int]] = []

    def record(number: int) -> int:
        seen.append((number, threading.get_ident()))
        return number * 10

    results: dict[int, int] = {}

    async def call(number: int) -> None:
        results[number] = await worker.call(lambda: record(number))

    async with trio.open_nursery() as nursery:
        for number in range(20):
            nursery.start_soon(call, number)
            await trio.sleep(0)  # queued in this order
    assert [number for number, _ in seen] == list(range(20))
    assert {ident for _, ident in seen} != {threading.get_ident()}
    assert len({ident for _, ident in seen}) == 1
    assert results == {number: number * 10 for number in range(20)}


async def test_exceptions_reach_the_caller(worker: BackendThread) -> None:
    def fail() -> None:
        raise StorageError("disk full")

    with pytest.raises(StorageError, match="disk full"):
        await worker.call(fail)
    assert await worker.call(lambda: "still serving") == "still serving"


async def test_a_cancelled_caller_still_gets_its_call_finished(worker: BackendThread) -> None:
    release, finished = threading.Event(), threading.Event()
    outcome: list[str] = []

    def slow() -> str:
        release.wait(5)
        finished.set()
        return "committed"

    async def caller() -> None:
        outcome.append(await worker.call(slow))
        await trio.sleep(0)  # the cancellation lands here, after the result

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.sleep(0.01)
            scope.cancel()
            release.set()  # the call finishes after its caller was cancelled
    assert finished.is_set()
    assert outcome == ["committed"]


async def test_a_thread_not_running_fails_calls() -> None:
    worker = BackendThread("test-backend")
    with pytest.raises(StorageError, match="not running"):
        await worker.call(lambda: 1)
    worker.start()
    assert await worker.call(lambda: 2) == 2
    worker.stop()
    with pytest.raises(StorageError, match="not running"):
        await worker.call(lambda: 3)


async def test_calls_queued_behind_a_crash_fail_with_storage_error(worker: BackendThread) -> None:
    release = threading.Event()
    results: dict[str, object] = {}

    async def call(name: str, function: Callable[[], object]) -> None:
        try:
            results[name] = await worker.call(function)
        except StorageError as error:
            results[name] = error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "first", lambda: release.wait(5) and "done")
        await trio.sleep(0.01)
        worker._jobs.put("not a job")  # type: ignore[arg-type]  # the thread fails on it
        nursery.start_soon(call, "second", lambda: "never")
        await trio.sleep(0.01)
        release.set()
    assert results["first"] == "done"
    assert isinstance(results["second"], StorageError)
    assert not worker.running
    with pytest.raises(StorageError):
        await worker.call(lambda: 1)


async def test_inline_calls_run_on_the_trio_thread(worker: BackendThread) -> None:
    with inline_calls():
        assert await worker.call(threading.get_ident) == threading.get_ident()
    assert await worker.call(threading.get_ident) != threading.get_ident()


async def test_database_thread_lives_from_open_to_aclose(tmp_path: object) -> None:
    database = Database(SqliteBackend(tmp_path / "keyval.sqlite3"))  # type: ignore[operator]
    await database.open()
    assert isinstance(await database.handle(COMMANDER, DbLoadMap()), DbMap)
    await database.aclose()
    await database.aclose()  # closing twice is harmless
    with pytest.raises(Unavailable, match="not running"):  # a typed error, not a hang
        await database.handle(COMMANDER, DbLoadMap())
