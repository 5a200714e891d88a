"""What carrying the caller's deadline to PostgreSQL costs a RecordTime-shaped call.

Runs CALLS heartbeats one after another through ``Database.run`` on an embedded
PostgreSQL (a scratch data directory, synchronous_commit off so that round trips, not
fsync, dominate), each with a caller's deadline (the bounded path: BEGIN and the timeouts
in one round trip, the statement, COMMIT); for comparison the earlier shape of the bounded
path (BEGIN, SET LOCAL, statement, COMMIT: four round trips) and no deadline (one
autocommit statement). The three alternate in rounds of ROUND calls; prints the median
microseconds per call.

    ./dev python -m bench.deadline_round_trips [CALLS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from lesson_progress import embedded, migrate
from lesson_progress.config import DEFAULT_MIGRATIONS_DIR
from lesson_progress.store.database import Connection, Database, call_deadline
from lesson_progress.store.heartbeats import HEARTBEAT, heartbeat_arguments
from lesson_progress.values import Heartbeat

COURSE = "INSERT INTO courses (course_id, title) VALUES ($1, 'bench')"
ROUND = 250
LESSON = "INSERT INTO lessons (course_id, lesson_id, position) VALUES ($1, 'l1', 0)"


async def measure(url: str, calls: int) -> dict[str, float]:
    connection = await asyncpg.connect(url)
    try:
        await migrate.migrate(connection, DEFAULT_MIGRATIONS_DIR)
        course = str(uuid.uuid4())
        await connection.execute(COURSE, course)
        await connection.execute(LESSON, course)
        await connection.execute("ALTER SYSTEM SET synchronous_commit = off")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()
    database = await Database.connect(url, pool_size=1)
    user = str(uuid.uuid4())
    loop = asyncio.get_running_loop()

    async def heartbeat(connection: Connection) -> object:
        beat = Heartbeat(user, course, "l1", 1, str(uuid.uuid4()))
        return await connection.fetchrow(HEARTBEAT, *heartbeat_arguments(beat, 300))

    async def four_round_trips(connection: Connection) -> object:
        async with connection.transaction():
            await connection.execute("SET LOCAL statement_timeout = 10000;"
                                     " SET LOCAL lock_timeout = 200")  # fmt: skip
            return await heartbeat(connection)

    async def bounded() -> object:
        call_deadline.set(loop.time() + 10.0)
        return await database.run(heartbeat)

    async def earlier() -> object:
        call_deadline.set(None)
        return await database.run(four_round_trips)

    async def unbounded() -> object:
        call_deadline.set(None)
        return await database.run(heartbeat)

    shapes = {
        "with a deadline (Database.run)": bounded,
        "with a deadline, earlier shape (4 round trips)": earlier,
        "without a deadline (1 statement)": unbounded,
    }
    figures: dict[str, list[float]] = {what: [] for what in shapes}
    try:
        for call in shapes.values():  # warm up: plans, pool
            for _ in range(ROUND):
                await call()
        for _ in range(max(1, calls // ROUND)):
            for what, call in shapes.items():
                started = time.perf_counter()
                for _ in range(ROUND):
                    await call()
                figures[what].append((time.perf_counter() - started) / ROUND * 1e6)
    finally:
        await database.close()
    return {what: statistics.median(values) for what, values in figures.items()}


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as scratch:
        server = embedded.start(Path(scratch))
        try:
            figures = asyncio.run(measure(server.url, calls))
        finally:
            server.stop()
    for what, micros in figures.items():
        print(f"{calls} RecordTime calls {what}: {micros:.0f} µs per call (median)")


if __name__ == "__main__":
    main()
