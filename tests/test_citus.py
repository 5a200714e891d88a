"""What only Citus has: where a course's rows live, and moving them while writes go on.

Run by ``./dev test-citus``. ``./dev test`` leaves these tests out; named explicitly on plain
PostgreSQL they fail (the ``citus_url`` fixture says why) rather than skip.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from lesson_progress import migrate
from lesson_progress.config import Config
from lesson_progress.store import analytics
from lessonprogress.v1 import progress_service_pb2 as ps
from tests import postgres

pytestmark = pytest.mark.citus_only

# Every table the migrations distribute by course_id, in one co-location group.
PROGRESS_TABLES = (
    "lesson_progress",
    "course_progress",
    "lesson_attempts",
    "processed_requests",
    "progress_events",
    "progress_event_purges",
    "lesson_stats_courses",
    "lesson_stats_summary",
)


@pytest.fixture(scope="session")
async def citus_url(postgres_url: str) -> str:
    """The session's server, which must be a Citus coordinator with workers."""
    admin = await asyncpg.connect(postgres_url)
    try:
        has_citus = await admin.fetchval(
            "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"
        )
    finally:
        await admin.close()
    if postgres.engine() != "citus" or not has_citus:
        pytest.fail("these tests need a Citus coordinator: run them with ./dev test-citus")
    return postgres_url


async def placement(connection: asyncpg.Connection, table: str, course_id: str) -> tuple[int, str]:
    """(shard id, "host:port" of the worker holding it) for a course's rows of ``table``."""
    row = await connection.fetchrow(
        """
        SELECT s.shardid, s.nodename || ':' || s.nodeport AS node
        FROM citus_shards s
        WHERE s.shardid = get_shard_id_for_distribution_column($1::regclass, $2::uuid)
        """,
        table,
        course_id,
    )
    assert row is not None
    return int(row["shardid"]), str(row["node"])


async def rows_on_worker(
    coordinator_url: str, node: str, table: str, shard_id: int, course_id: str
) -> int:
    """Rows of ``course_id`` physically in shard ``shard_id`` on the worker ``node``."""
    host, port = node.rsplit(":", 1)
    worker = await asyncpg.connect(postgres.with_host(coordinator_url, host, int(port)))
    try:
        exists = await worker.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{table}_{shard_id}")
        if not exists:
            return 0
        return int(
            await worker.fetchval(
                f"SELECT count(*) FROM {table}_{shard_id} WHERE course_id = $1::uuid", course_id
            )
        )
    finally:
        await worker.close()


async def workers_of(connection: asyncpg.Connection) -> list[str]:
    rows = await connection.fetch(
        "SELECT nodename || ':' || nodeport AS node FROM pg_dist_node"
        " WHERE groupid <> 0 AND noderole = 'primary' ORDER BY nodeid"
    )
    return [str(r["node"]) for r in rows]


async def test_migrations_distribute_progress_by_course_and_replicate_the_catalog(
    citus_url: str, database_url: str
) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT table_name::text AS name, citus_table_type AS kind,"
            " distribution_column AS column, colocation_id FROM citus_tables"
        )
    finally:
        await connection.close()
    tables = {r["name"]: r for r in rows}
    for name in ("courses", "lessons", "service_secrets"):
        assert tables[name]["kind"] == "reference", name
    for name in PROGRESS_TABLES:
        assert (tables[name]["kind"], tables[name]["column"]) == ("distributed", "course_id")
    assert len({tables[name]["colocation_id"] for name in PROGRESS_TABLES}) == 1


async def test_rows_of_different_courses_land_on_different_workers(
    citus_url: str, database_url: str, make_course, progress
) -> None:
    user = str(uuid.uuid4())
    courses = [await make_course(1) for _ in range(12)]
    connection = await asyncpg.connect(database_url)
    try:
        # Rows written as the service writes them, one per course.
        for course in courses:
            await connection.execute(
                "INSERT INTO lesson_progress (user_id, course_id, lesson_id)"
                " VALUES ($1::uuid, $2::uuid, 'l1')",
                user,
                course.course_id,
            )
        workers = await workers_of(connection)
        where = {c.course_id: await placement(connection, "lesson_progress", c.course_id)
                 for c in courses}  # fmt: skip
    finally:
        await connection.close()
    assert len(workers) >= 2
    # 12 courses hashed over 32 shards on 2 workers all on one worker: 2 * 2**-12.
    assert {node for _, node in where.values()} == set(workers)
    for course_id, (shard_id, node) in where.items():
        for worker in workers:
            found = await rows_on_worker(
                database_url, worker, "lesson_progress", shard_id, course_id
            )
            assert found == (1 if worker == node else 0), (course_id, worker)


async def test_a_courses_writes_touch_one_worker(
    citus_url: str, database_url: str, make_course, progress
) -> None:
    course = await make_course(2, passing_score=50)
    users = [str(uuid.uuid4()) for _ in range(5)]
    for user in users:
        key = {"user_id": user, "course_id": course.course_id}
        await progress.StartLesson(ps.StartLessonRequest(**key, lesson_id="l1"))
        await progress.RecordTime(
            ps.RecordTimeRequest(**key, lesson_id="l1", seconds=30, request_id=str(uuid.uuid4()))
        )
        await progress.RecordAttempt(ps.RecordAttemptRequest(**key, lesson_id="l2", score=80))
        await progress.CompleteLesson(ps.CompleteLessonRequest(**key, lesson_id="l1"))
    connection = await asyncpg.connect(database_url)
    try:
        workers = await workers_of(connection)
        placements = {t: await placement(connection, t, course.course_id) for t in PROGRESS_TABLES}
    finally:
        await connection.close()
    assert len({node for _, node in placements.values()}) == 1
    expected = {
        "lesson_progress": 2 * len(users),
        "course_progress": len(users),
        "lesson_attempts": len(users),
        "processed_requests": len(users),
    }
    for table, count in expected.items():
        shard_id, node = placements[table]
        for worker in workers:
            found = await rows_on_worker(database_url, worker, table, shard_id, course.course_id)
            assert found == (count if worker == node else 0), (table, worker)


# --- adding a worker under load -------------------------------------------------------------

# The heartbeat statement's shape: one upsert that adds seconds to a lesson row.
_ADD_SECONDS = """
INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id, time_spent_seconds)
VALUES ($1::uuid, $2::uuid, 'l1', $3::integer)
ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds
"""


@pytest.fixture
async def one_worker_database(citus_url: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A migrated database whose cluster metadata holds only the first worker.

    Yields its URL and the workers not yet added ("host:port"). Citus keeps the node list
    per database, so adding a worker here changes no other database of the cluster.
    """
    admin = await asyncpg.connect(citus_url)
    try:
        all_workers = await workers_of(admin)
    finally:
        await admin.close()
    if len(all_workers) < 2:
        pytest.fail("the rebalancing test needs a cluster with at least 2 workers")
    name = postgres.fresh_database_name()
    url = await postgres.create_database(citus_url, name, workers=1)
    try:
        connection = await asyncpg.connect(url)
        try:
            await migrate.migrate(connection, Path(Config().migrations_dir))
        finally:
            await connection.close()
        yield url, all_workers[1:]
    finally:
        await postgres.drop_database(citus_url, name)


async def test_adding_a_worker_and_rebalancing_under_writes_loses_nothing(
    one_worker_database: tuple[str, list[str]],
) -> None:
    url, spare = one_worker_database
    setup = await asyncpg.connect(url)
    courses = [str(uuid.uuid4()) for _ in range(8)]
    users = [str(uuid.uuid4()) for _ in range(4)]
    for course_id in courses:
        await setup.execute("INSERT INTO courses (course_id) VALUES ($1::uuid)", course_id)
        await setup.execute(
            "INSERT INTO lessons (course_id, lesson_id, position) VALUES ($1::uuid, 'l1', 0)",
            course_id,
        )
    before = await workers_of(setup)
    assert len(before) == 1

    acknowledged: dict[tuple[str, str], int] = {}
    failures: list[str] = []
    stop = asyncio.Event()

    async def writer(seed: int) -> None:
        chooser = random.Random(seed)
        connection = await asyncpg.connect(url)
        try:
            while not stop.is_set():
                key = (chooser.choice(users), chooser.choice(courses))
                seconds = chooser.randint(1, 30)
                try:
                    await connection.execute(_ADD_SECONDS, *key, seconds)
                except asyncpg.PostgresError as exc:  # refused: not applied, not counted
                    failures.append(str(exc))
                    continue
                acknowledged[key] = acknowledged.get(key, 0) + seconds
                await asyncio.sleep(0.005)  # a bounded load: about 200 writes/s per writer
        finally:
            await connection.close()

    writers = [asyncio.create_task(writer(seed)) for seed in range(3)]
    try:
        await asyncio.sleep(0.5)
        host, port = spare[0].rsplit(":", 1)
        await setup.execute("SELECT citus_add_node($1, $2::integer)", host, int(port))
        await setup.execute("SELECT citus_rebalance_start()")
        await setup.execute("SELECT citus_rebalance_wait()")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*writers)

    try:
        after = await setup.fetch(
            "SELECT DISTINCT nodename || ':' || nodeport AS node FROM citus_shards"
            " WHERE table_name = 'lesson_progress'::regclass"
        )
        stored = await setup.fetch(
            "SELECT user_id::text, course_id::text, time_spent_seconds FROM lesson_progress"
        )
    finally:
        await setup.close()
    # The shards are now spread over both workers.
    assert {r["node"] for r in after} == {before[0], spare[0]}
    # Every acknowledged write is there exactly once, and nothing else.
    assert {(r["user_id"], r["course_id"]): r["time_spent_seconds"] for r in stored} == (
        acknowledged
    )
    assert sum(acknowledged.values()) > 0


async def test_each_report_is_a_router_plan_on_one_shard(
    citus_url: str, database_url: str, make_course
) -> None:
    # A report reads one course: one shard (plus the local replicas of the catalog), so its
    # REPEATABLE READ snapshot is one worker's, consistent as on one PostgreSQL.
    course = await make_course(3)
    connection = await asyncpg.connect(database_url)
    try:
        reports = {
            "LESSON_STATS": (analytics.LESSON_STATS, (course.course_id,)),
            "DIFFICULT_LESSONS": (analytics.DIFFICULT_LESSONS, (course.course_id, 1)),
            "COURSE_LEARNERS": (analytics.COURSE_LEARNERS, (course.course_id,)),
        }
        for name, (query, args) in reports.items():
            plan = "\n".join(
                r[0] for r in await connection.fetch(f"EXPLAIN (COSTS OFF) {query}", *args)
            )
            counts = re.findall(r"Task Count: (\d+)", plan)
            assert counts == ["1"], (name, plan)
    finally:
        await connection.close()
