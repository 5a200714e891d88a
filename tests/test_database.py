"""The store's one policy for running work: retries after lost races, errors by kind."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from lesson_progress import errors
from lesson_progress.store import Database, ProgressStore
from lesson_progress.store.database import MAX_ATTEMPTS
from lesson_progress.store.events import EventNotifier
from lessonprogress.v1 import progress_service_pb2 as pb
from tests.conftest import new_id


@pytest.fixture
async def database(database_url: str):
    database = await Database.connect(database_url, pool_size=4)
    yield database
    await database.close()


async def test_a_real_deadlock_is_retried_until_both_writes_succeed(
    database: Database, db: asyncpg.Pool
) -> None:
    table = f"deadlock_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL)")
    await db.execute(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    both_hold_one = asyncio.Barrier(2)
    tries = {"forward": 0, "backward": 0}

    def transfer(name: str, first: int, second: int):
        async def work(connection) -> None:
            tries[name] += 1
            async with connection.transaction():
                await connection.execute(f"UPDATE {table} SET n = n + 1 WHERE id = $1", first)
                if tries[name] == 1:  # only the first try meets the other half-way
                    await both_hold_one.wait()
                await connection.execute(f"UPDATE {table} SET n = n + 1 WHERE id = $1", second)

        return work

    await asyncio.gather(
        database.run(transfer("forward", 1, 2)), database.run(transfer("backward", 2, 1))
    )
    # PostgreSQL broke the deadlock by failing one transaction; the store ran it again.
    assert sorted(tries.values()) == [1, 2]
    rows = await db.fetch(f"SELECT n FROM {table} ORDER BY id")
    assert [r["n"] for r in rows] == [2, 2]  # each transfer applied exactly once
    await db.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("lost_race", [asyncpg.SerializationError, asyncpg.DeadlockDetectedError])
async def test_a_race_lost_every_time_is_aborted(database: Database, lost_race) -> None:
    calls = 0

    async def work(connection) -> None:
        nonlocal calls
        calls += 1
        await connection.execute("SELECT 1")
        raise lost_race("lost the race")

    with pytest.raises(errors.Aborted):
        await database.run(work)
    assert calls == MAX_ATTEMPTS


async def test_unreachable_database_is_unavailable() -> None:
    with pytest.raises(errors.Unavailable):
        await Database.connect("postgresql://postgres@127.0.0.1:1/none", pool_size=1)


async def test_retention_forgets_request_ids_so_a_late_retry_counts_again(
    database: Database, db: asyncpg.Pool, progress, make_course
) -> None:
    course = await make_course(1)
    user = new_id()
    request = pb.RecordTimeRequest(
        user_id=user, course_id=course.course_id, lesson_id="l1", seconds=10, request_id=new_id()
    )
    await progress.RecordTime(request)
    await progress.RecordTime(request)  # within the window: counted once
    await db.execute(
        "UPDATE processed_requests SET created_at = now() - interval '2 days' WHERE user_id = $1",
        uuid.UUID(user),
    )
    store = ProgressStore(database, EventNotifier(database))
    assert await store.purge_request_ids(24 * 3600) >= 1
    assert not await db.fetchval(
        "SELECT count(*) FROM processed_requests WHERE user_id = $1", uuid.UUID(user)
    )
    response = await progress.RecordTime(request)  # forgotten: applied again
    assert response.lesson.time_spent_seconds == 20


async def test_new_connections_do_not_introspect_built_in_types_again(database_url: str) -> None:
    database = await Database.connect(database_url, pool_size=4)
    try:
        introspections: list[str] = []

        def watch(record: object) -> None:
            query = getattr(record, "query", "")
            if "typeinfo_tree" in query:
                introspections.append(query)

        # Every connection of the pool at once, so that most are new ones.
        async def use(connection) -> None:
            connection.add_query_logger(watch)
            await asyncio.sleep(0.05)  # hold it, so that the others take other connections
            rows = await connection.fetch(
                "SELECT $1::uuid[] AS ids, $2::varchar[] AS lessons, $3::timestamptz[] AS at",
                [uuid.uuid4()],
                ["l1"],
                [None],
            )
            assert rows[0]["lessons"] == ["l1"]

        await asyncio.gather(*(database.run(use) for _ in range(4)))
        assert database.stats().size == 4
        assert introspections == []
    finally:
        await database.close()
