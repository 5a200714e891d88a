"""The heartbeat writer's contract with a failing write: each heartbeat is written once.

Store-level: the writer is driven through its two write callables, which count what they
are asked to write (the writer itself never touches the database)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from lesson_progress import errors
from lesson_progress.store.database import Record
from lesson_progress.store.heartbeats import HeartbeatWriter

pytestmark = pytest.mark.postgres_only("the fault suite controls its own PostgreSQL processes")


async def test_a_failing_heartbeat_is_written_once() -> None:
    written: Counter[str] = Counter()
    first_may_finish = asyncio.Event()

    async def write_one(heartbeat: str) -> Record:
        written[heartbeat] += 1
        if heartbeat == "first":
            await first_may_finish.wait()
        raise errors.Unavailable("the database is unavailable")

    async def write_many(heartbeats: list[str]) -> list[Record | errors.ServiceError]:
        raise AssertionError(f"no batch of several was formed: {heartbeats}")

    writer: HeartbeatWriter[str] = HeartbeatWriter(write_one, write_many, slots=1)
    first = asyncio.ensure_future(writer.write("first"))  # takes the only slot
    await asyncio.sleep(0)
    second = asyncio.ensure_future(writer.write("second"))  # queued: a batch of one
    await asyncio.sleep(0)
    first_may_finish.set()
    for call in (first, second):
        with pytest.raises(errors.Unavailable):
            await call
    assert written == {"first": 1, "second": 1}
