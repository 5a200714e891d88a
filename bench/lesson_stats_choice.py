"""Per-lesson statistics: an index scan of the course's rows, or a write-time rollup?

Seeds a 1M-row lesson_progress (one 100K-row course among 900 of 1K rows), then times
StreamLessonStats' query through the per-course index, a read of a per-lesson rollup, and
what maintaining that rollup in every heartbeat's transaction costs writers of one course.
The figures and the decision are in docs/lesson-stats.md.

    ./dev python -m bench.lesson_stats_choice postgresql://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import asyncio
import datetime
import random
import statistics
import sys
import time
import uuid

import asyncpg

from lesson_progress import migrate
from lesson_progress.config import DEFAULT_MIGRATIONS_DIR
from lesson_progress.store.analytics import LESSON_STATS

LESSONS = 20
HEARTBEAT = """
UPDATE lesson_progress SET time_spent_seconds = time_spent_seconds + 5
WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3
"""
ROLLUP_UPDATE = "UPDATE lesson_rollup SET time = time + 5 WHERE course_id = $1 AND lesson_id = $2"


async def seed(connection: asyncpg.Connection, rng: random.Random) -> list[uuid.UUID]:
    """Courses (the first one large) and their 1M progress rows; returns the course ids."""
    courses = [uuid.uuid4() for _ in range(901)]
    await connection.copy_records_to_table(
        "courses", records=[(c, "") for c in courses], columns=["course_id", "title"]
    )
    await connection.copy_records_to_table(
        "lessons",
        records=[(c, f"l{i}", i) for c in courses for i in range(LESSONS)],
        columns=["course_id", "lesson_id", "position"],
    )
    now = datetime.datetime.now(datetime.UTC)
    records = []
    for index, course in enumerate(courses):
        for _ in range(5000 if index == 0 else 50):
            user = uuid.uuid4()
            for lesson in range(LESSONS):
                done = rng.random() < 0.5
                score = rng.randint(0, 100) if rng.random() < 0.6 else None
                records.append(
                    (user, course, f"l{lesson}", done, rng.randint(0, 4000), rng.randint(0, 5),
                     score, now if done else None)
                )  # fmt: skip
    await connection.copy_records_to_table(
        "lesson_progress",
        records=records,
        columns=[
            "user_id", "course_id", "lesson_id", "completed", "time_spent_seconds",
            "attempts", "score", "completed_at",
        ],
    )  # fmt: skip
    await connection.execute("VACUUM ANALYZE lesson_progress")
    return courses


async def median_ms(connection: asyncpg.Connection, query: str, *args: object) -> float:
    """Median of 15 runs of ``query``, in milliseconds."""
    times = []
    for _ in range(15):
        started = time.perf_counter()
        await connection.fetch(query, *args)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def heartbeat_rate(
    pool: asyncpg.Pool, course: uuid.UUID, users: list[uuid.UUID], *, rollup: bool
) -> float:
    """Heartbeats per second from 16 writers on one course, for 5 seconds."""
    rng = random.Random(2)
    count = 0
    stop = time.perf_counter() + 5.0

    async def writer() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            lesson = f"l{rng.randrange(LESSONS)}"
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute(HEARTBEAT, rng.choice(users), course, lesson)
                if rollup:
                    await connection.execute(ROLLUP_UPDATE, course, lesson)
            count += 1

    await asyncio.gather(*(writer() for _ in range(16)))
    return count / 5.0


async def main(server_url: str) -> None:
    """Runs the comparison in a scratch database of the server at ``server_url``."""
    name = f"lesson_stats_choice_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0] + "/" + name
    try:
        connection = await asyncpg.connect(url)
        await migrate.migrate(connection, DEFAULT_MIGRATIONS_DIR)
        courses = await seed(connection, random.Random(1))
        big, typical = courses[0], courses[5]
        print(f"index, 100K-row course: {await median_ms(connection, LESSON_STATS, big):.1f} ms")
        print(f"index, 1K-row course: {await median_ms(connection, LESSON_STATS, typical):.1f} ms")
        await connection.execute(
            "CREATE TABLE lesson_rollup AS SELECT course_id, lesson_id, count(*) AS started, "
            "sum(time_spent_seconds) AS time FROM lesson_progress GROUP BY 1, 2"
        )
        await connection.execute("ALTER TABLE lesson_rollup ADD PRIMARY KEY (course_id, lesson_id)")
        rollup_ms = await median_ms(
            connection, "SELECT * FROM lesson_rollup WHERE course_id = $1", big
        )
        print(f"rollup read, 100K-row course: {rollup_ms:.2f} ms (no percentiles)")
        users = [
            r["user_id"]
            for r in await connection.fetch(
                "SELECT DISTINCT user_id FROM lesson_progress WHERE course_id = $1", big
            )
        ]
        await connection.close()
        async with asyncpg.create_pool(url, min_size=16, max_size=16) as pool:
            plain = await heartbeat_rate(pool, big, users, rollup=False)
            rolled = await heartbeat_rate(pool, big, users, rollup=True)
        print(f"heartbeats/s, one course, 16 writers: {plain:.0f} without rollup, "
              f"{rolled:.0f} with it ({rolled / plain:.2f})")  # fmt: skip
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
