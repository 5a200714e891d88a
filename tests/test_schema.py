"""The design note's 26 lesson_progress test cases, run against the real schema.

The seed's suites (schema validation, CRUD, time tracking, attempts and scoring,
constraints, queries and analytics) are rewritten for migrations/0001_initial_schema.sql,
whose deliberate differences are asserted rather than glossed over: the primary key is
the natural key (user_id, course_id, lesson_id), ``id`` is unindexed, (course_id,
lesson_id) references ``lessons``, there is no users table, only two indexes exist, and
``completed`` must agree with ``completed_at``.

Every test registers its own course through CatalogService (so the foreign key holds)
and uses fresh user ids, so tests share the session database without seeing each other.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from fractions import Fraction
from typing import Any

import asyncpg
import pytest

from lesson_progress.config import Config
from lesson_progress.store.heartbeats import LOCK_WAIT
from tests.conftest import CourseIds

MakeCourse = Callable[..., Awaitable[CourseIds]]

# The 13 columns of the design note, with the types information_schema reports for them.
SEED_COLUMNS = {
    "id": "uuid",
    "user_id": "uuid",
    "course_id": "uuid",
    "lesson_id": "character varying",
    "completed": "boolean",
    "time_spent_seconds": "integer",
    "attempts": "integer",
    "score": "integer",
    "first_started_at": "timestamp with time zone",
    "last_accessed_at": "timestamp with time zone",
    "completed_at": "timestamp with time zone",
    "created_at": "timestamp with time zone",
    "updated_at": "timestamp with time zone",
}
NULLABLE_COLUMNS = {"score", "completed_at"}


def uid() -> uuid.UUID:
    """A fresh learner id."""
    return uuid.uuid4()


async def insert(
    db: asyncpg.Pool, user_id: uuid.UUID, course_id: str, lesson_id: str, **values: Any
) -> asyncpg.Record:
    """Inserts one lesson_progress row with ``values`` and returns it."""
    columns = ["user_id", "course_id", "lesson_id", *values]
    params = [user_id, uuid.UUID(course_id), lesson_id, *values.values()]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(params)))
    row = await db.fetchrow(
        f"INSERT INTO lesson_progress ({', '.join(columns)}) VALUES ({placeholders}) RETURNING *",
        *params,
    )
    assert row is not None
    return row


async def fetch(
    db: asyncpg.Pool, user_id: uuid.UUID, course_id: str, lesson_id: str
) -> asyncpg.Record | None:
    """The lesson_progress row of one learner and lesson, or None."""
    return await db.fetchrow(
        "SELECT * FROM lesson_progress WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3",
        user_id,
        uuid.UUID(course_id),
        lesson_id,
    )


def round_half_up(value: Fraction) -> int:
    """Nearest integer, halves away from zero (what numeric::integer does), for value >= 0."""
    assert value >= 0
    return int(value + Fraction(1, 2))


# --- Suite 1: schema validation ----------------------------------------------------------


def _migration_statements(table: str) -> list[str]:
    """Every statement of the migrations that creates an index on, or alters, ``table``."""
    text = "\n".join(p.read_text() for p in sorted(Config().migrations_dir.glob("*.sql")))
    text = re.sub(r"--[^\n]*", "", text)  # comments may mention anything
    return [
        " ".join(statement.split())
        for statement in text.split(";")
        if re.search(rf"\b(ON|ON ONLY|ALTER TABLE)\s+{table}\b", statement, re.IGNORECASE)
    ]


def documented_indexes(table: str) -> dict[str, list[str]]:
    """Name -> columns of every CREATE INDEX on ``table`` in the migration files."""
    found = {}
    for statement in _migration_statements(table):
        match = re.match(
            rf"CREATE (?:UNIQUE )?INDEX (?:CONCURRENTLY )?(?:IF NOT EXISTS )?(\w+) "
            rf"ON (?:ONLY )?{table} (?:USING btree )?\(([^)]*)\)",
            statement,
            re.IGNORECASE,
        )
        if match:
            found[match.group(1)] = [c.strip() for c in match.group(2).split(",")]
    return found


def later_columns(table: str) -> set[str]:
    """Columns that later migrations add to ``table`` (ALTER TABLE ... ADD COLUMN)."""
    columns: set[str] = set()
    for statement in _migration_statements(table):
        if statement.upper().startswith("ALTER TABLE"):
            columns.update(
                re.findall(r"ADD (?:COLUMN )?(?:IF NOT EXISTS )?(\w+)", statement, re.IGNORECASE)
            )
    return columns - {"CONSTRAINT", "constraint"}


async def table_columns(db: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    rows = await db.fetch(
        """
        SELECT column_name, data_type, is_nullable, character_maximum_length, column_default
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name = 'lesson_progress'
        """
    )
    return {r["column_name"]: r for r in rows}


async def test_table_has_the_13_seed_columns(db: asyncpg.Pool) -> None:
    columns = await table_columns(db)
    assert len(SEED_COLUMNS) == 13
    assert set(SEED_COLUMNS) <= set(columns)
    # Nothing else, except what a later migration adds on purpose.
    assert set(columns) - set(SEED_COLUMNS) == later_columns("lesson_progress") - set(SEED_COLUMNS)


async def test_column_types_nullability_and_defaults(db: asyncpg.Pool) -> None:
    by_name = await table_columns(db)
    assert {name: by_name[name]["data_type"] for name in SEED_COLUMNS} == SEED_COLUMNS
    assert by_name["lesson_id"]["character_maximum_length"] == 255
    nullable = {name for name in SEED_COLUMNS if by_name[name]["is_nullable"] == "YES"}
    assert nullable == NULLABLE_COLUMNS
    assert by_name["completed"]["column_default"] == "false"
    assert by_name["time_spent_seconds"]["column_default"] == "0"
    assert by_name["attempts"]["column_default"] == "0"
    assert by_name["score"]["column_default"] is None
    assert by_name["completed_at"]["column_default"] is None
    assert by_name["id"]["column_default"] == "gen_random_uuid()"
    for column in ("first_started_at", "last_accessed_at", "created_at", "updated_at"):
        assert by_name[column]["column_default"] == "now()", column


async def test_unique_key_on_user_course_lesson(db: asyncpg.Pool) -> None:
    rows = await db.fetch(
        """
        SELECT c.contype::text AS contype, array_agg(a.attname::text ORDER BY k.ord) AS columns
        FROM pg_constraint c
        CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
        WHERE c.conrelid = 'lesson_progress'::regclass AND c.contype IN ('p', 'u')
        GROUP BY c.oid, c.contype
        """
    )
    # The natural key is the primary key; it is the only unique key (id is unindexed).
    assert [(r["contype"], list(r["columns"])) for r in rows] == [
        ("p", ["user_id", "course_id", "lesson_id"])
    ]


async def test_foreign_keys(db: asyncpg.Pool) -> None:
    rows = await db.fetch(
        """
        SELECT c.conrelid::regclass::text AS child, c.confrelid::regclass::text AS parent,
               c.confdeltype::text AS confdeltype,
               ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
                     ORDER BY k.o) AS columns,
               ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n
                     ORDER BY k.o) AS parent_columns
        FROM pg_constraint c
        WHERE c.contype = 'f'
          AND c.conrelid IN ('lesson_progress'::regclass, 'lessons'::regclass,
                             'lesson_attempts'::regclass, 'course_progress'::regclass)
        """
    )
    found = {
        (r["child"], tuple(r["columns"]), r["parent"], tuple(r["parent_columns"]), r["confdeltype"])
        for r in rows
    }
    assert found == {
        # The seed's course_id FK, widened to the lesson: course -> lessons -> progress.
        (
            "lesson_progress",
            ("course_id", "lesson_id"),
            "lessons",
            ("course_id", "lesson_id"),
            "c",
        ),
        ("lessons", ("course_id",), "courses", ("course_id",), "c"),
        (
            "lesson_attempts",
            ("user_id", "course_id", "lesson_id"),
            "lesson_progress",
            ("user_id", "course_id", "lesson_id"),
            "c",
        ),
        ("course_progress", ("course_id",), "courses", ("course_id",), "c"),
    }
    # The seed's user_id FK has no target: this service keeps no users table.
    assert await db.fetchval("SELECT to_regclass('public.users')") is None


async def test_heartbeat_function_names_its_courses_on_citus_only(db: asyncpg.Pool) -> None:
    """Migration 0009 (and 0012, which re-creates the function from each engine's own
    definition): on one PostgreSQL the heartbeat function runs without the conditions that
    route its statements to the courses' shards on Citus (PostgreSQL 18 answered them with
    a scan of every claim of the course per entry), and with generic plans; on Citus it
    keeps them, and custom plans (which it needs to route)."""
    definition = await db.fetchval("SELECT pg_get_functiondef('lp_record_heartbeats'::regproc)")
    on_citus = await db.fetchval("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')")
    assert definition.count("course_id = ANY (p_course_ids)") == (3 if on_citus else 0)
    settings = await db.fetchval(
        "SELECT proconfig FROM pg_proc WHERE proname = 'lp_record_heartbeats'"
    )
    assert ("plan_cache_mode=force_generic_plan" in (settings or [])) == (not on_citus)


async def test_heartbeat_writer_functions_bound_their_lock_waits(db: asyncpg.Pool) -> None:
    """Migration 0010: the functions of RecordTime's writer wait LOCK_WAIT for a row lock
    (their own setting, so that no transaction is needed to set it); BatchRecordTime's waits
    as long as its caller."""
    settings = {
        name: await db.fetchval("SELECT proconfig FROM pg_proc WHERE proname = $1", name)
        for name in ("lp_record_heartbeat", "lp_record_merged_heartbeats", "lp_record_heartbeats")
    }
    bound = f"lock_timeout={round(LOCK_WAIT * 1000)}ms"
    assert bound in settings["lp_record_heartbeat"]
    assert bound in settings["lp_record_merged_heartbeats"]
    assert not any(s.startswith("lock_timeout") for s in settings["lp_record_heartbeats"] or [])


async def test_indexes_are_exactly_the_documented_ones(db: asyncpg.Pool) -> None:
    rows = await db.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name, i.indisprimary, i.indisunique,
               ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                     ORDER BY k.o) AS columns,
               i.indpred IS NOT NULL OR i.indexprs IS NOT NULL AS partial_or_expression
        FROM pg_index i WHERE i.indrelid = 'lesson_progress'::regclass
        """
    )
    found = {
        r["name"]: (r["indisprimary"], r["indisunique"], list(r["columns"]))
        for r in rows
        if not r["partial_or_expression"]
    }
    assert len(found) == len(rows), "no partial or expression index is documented"
    documented = documented_indexes("lesson_progress")
    # The primary key plus the one secondary index the initial migration documents (it
    # replaced the seed's course_id and lesson_id indexes), nothing else.
    assert len(documented) == 1, documented
    assert found == {
        "lesson_progress_pkey": (True, True, ["user_id", "course_id", "lesson_id"]),
        **{name: (False, False, columns) for name, columns in documented.items()},
    }
    # The secondary index starts with course_id: it serves the cascade from lessons.
    (secondary,) = documented.values()
    assert secondary[0] == "course_id"
    assert set(secondary) <= {"course_id", "lesson_id", "user_id"}
    # None of the seed's indexes on columns that heartbeats and completions update survived:
    # they would turn HOT updates off.
    indexed = {column for _, _, columns in found.values() for column in columns}
    assert not indexed & {
        "completed",
        "completed_at",
        "last_accessed_at",
        "time_spent_seconds",
        "attempts",
        "score",
        "updated_at",
        "id",
    }


async def test_fillfactor_85(db: asyncpg.Pool) -> None:
    options = await db.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'lesson_progress'::regclass"
    )
    assert options is not None
    assert "fillfactor=85" in options


# --- Suite 2: CRUD -----------------------------------------------------------------------


async def test_insert_applies_seed_defaults(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(2)
    user = uid()
    async with db.acquire() as connection, connection.transaction():
        now = await connection.fetchval("SELECT now()")
        row = await connection.fetchrow(
            "INSERT INTO lesson_progress (user_id, course_id, lesson_id) VALUES ($1, $2, $3) "
            "RETURNING *",
            user,
            uuid.UUID(course.course_id),
            "l1",
        )
    assert row is not None
    assert isinstance(row["id"], uuid.UUID)
    assert (row["user_id"], str(row["course_id"]), row["lesson_id"]) == (
        user,
        course.course_id,
        "l1",
    )
    assert row["completed"] is False
    assert row["time_spent_seconds"] == 0
    assert row["attempts"] == 0
    assert row["score"] is None
    assert row["completed_at"] is None
    for column in ("first_started_at", "last_accessed_at", "created_at", "updated_at"):
        assert row[column] == now, column
    # Two rows get two different ids from gen_random_uuid().
    other = await insert(db, user, course.course_id, "l2")
    assert other["id"] != row["id"]


async def test_retrieve_by_user_and_course(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(3)
    other_course = await make_course(3)
    user, other_user = uid(), uid()
    for lesson_id in ("l1", "l3"):
        await insert(db, user, course.course_id, lesson_id, time_spent_seconds=7)
    await insert(db, other_user, course.course_id, "l2")
    await insert(db, user, other_course.course_id, "l2")

    rows = await db.fetch(
        "SELECT * FROM lesson_progress WHERE user_id = $1 AND course_id = $2 "
        "ORDER BY first_started_at, lesson_id",
        user,
        uuid.UUID(course.course_id),
    )
    assert [r["lesson_id"] for r in rows] == ["l1", "l3"]
    assert all(r["user_id"] == user for r in rows)
    assert all(r["time_spent_seconds"] == 7 for r in rows)


async def test_update_completion_time_and_score(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    user = uid()
    await insert(db, user, course.course_id, "l1", time_spent_seconds=40)
    async with db.acquire() as connection, connection.transaction():
        now = await connection.fetchval("SELECT now()")
        row = await connection.fetchrow(
            """
            UPDATE lesson_progress
            SET completed = true, completed_at = now(), score = $4,
                time_spent_seconds = time_spent_seconds + $5
            WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3
            RETURNING *
            """,
            user,
            uuid.UUID(course.course_id),
            "l1",
            88,
            20,
        )
    assert row is not None
    assert row["completed"] is True
    assert row["completed_at"] == now
    assert row["score"] == 88
    assert row["time_spent_seconds"] == 40 + 20
    stored = await fetch(db, user, course.course_id, "l1")
    assert stored is not None
    assert dict(stored) == dict(row)


async def test_delete(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(2)
    user = uid()
    await insert(db, user, course.course_id, "l1")
    await insert(db, user, course.course_id, "l2")
    status = await db.execute(
        "DELETE FROM lesson_progress WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3",
        user,
        uuid.UUID(course.course_id),
        "l1",
    )
    assert status == "DELETE 1"
    assert await fetch(db, user, course.course_id, "l1") is None
    assert await fetch(db, user, course.course_id, "l2") is not None


# --- Suite 3: time tracking --------------------------------------------------------------


async def test_time_spent_increments(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    user = uid()
    await insert(db, user, course.course_id, "l1")
    heartbeats = [30, 30, 12, 1, 300, 45]
    for seconds in heartbeats:
        await db.execute(
            """
            UPDATE lesson_progress
            SET time_spent_seconds = time_spent_seconds + $4, last_accessed_at = now()
            WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3
            """,
            user,
            uuid.UUID(course.course_id),
            "l1",
            seconds,
        )
    row = await fetch(db, user, course.course_id, "l1")
    assert row is not None
    assert row["time_spent_seconds"] == sum(heartbeats)


async def test_last_accessed_at_moves_on_activity(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(1)
    user = uid()
    long_ago = await db.fetchval("SELECT '2001-02-03 04:05:06+00'::timestamptz")
    await insert(
        db, user, course.course_id, "l1", first_started_at=long_ago, last_accessed_at=long_ago
    )
    async with db.acquire() as connection, connection.transaction():
        now = await connection.fetchval("SELECT now()")
        row = await connection.fetchrow(
            """
            UPDATE lesson_progress SET last_accessed_at = now()
            WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3 RETURNING *
            """,
            user,
            uuid.UUID(course.course_id),
            "l1",
        )
    assert row is not None
    assert row["last_accessed_at"] == now
    assert row["first_started_at"] == long_ago  # only the access time moves


async def test_completed_at_set_on_completion(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    user = uid()
    row = await insert(db, user, course.course_id, "l1")
    assert row["completed_at"] is None
    done_at = await db.fetchval("SELECT '2024-05-06 07:08:09.123456+00'::timestamptz")
    await db.execute(
        "UPDATE lesson_progress SET completed = true, completed_at = $4 "
        "WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3",
        user,
        uuid.UUID(course.course_id),
        "l1",
        done_at,
    )
    row = await fetch(db, user, course.course_id, "l1")
    assert row is not None
    assert (row["completed"], row["completed_at"]) == (True, done_at)


async def test_completed_must_agree_with_completed_at(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(2)
    user = uid()
    with pytest.raises(asyncpg.CheckViolationError):
        await insert(db, user, course.course_id, "l1", completed=True)
    done_at = await db.fetchval("SELECT now()")
    with pytest.raises(asyncpg.CheckViolationError):
        await insert(db, user, course.course_id, "l1", completed_at=done_at)
    await insert(db, user, course.course_id, "l2", completed=True, completed_at=done_at)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE lesson_progress SET completed_at = NULL "
            "WHERE user_id = $1 AND course_id = $2 AND lesson_id = 'l2'",
            user,
            uuid.UUID(course.course_id),
        )
    assert await fetch(db, user, course.course_id, "l1") is None


async def test_updated_at_trigger_moves_on_update(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(1)
    user = uid()
    long_ago = await db.fetchval("SELECT '2001-02-03 04:05:06+00'::timestamptz")
    row = await insert(db, user, course.course_id, "l1", created_at=long_ago, updated_at=long_ago)
    assert row["updated_at"] == long_ago
    async with db.acquire() as connection, connection.transaction():
        now = await connection.fetchval("SELECT now()")
        # Even an UPDATE that tries to keep the old value gets the trigger's now().
        row = await connection.fetchrow(
            """
            UPDATE lesson_progress SET attempts = attempts + 1, updated_at = $4
            WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3 RETURNING *
            """,
            user,
            uuid.UUID(course.course_id),
            "l1",
            long_ago,
        )
        after = await connection.fetchval("SELECT clock_timestamp()")
    assert row is not None
    # The trigger's now() is the start of the transaction that updates the row: this one on
    # one PostgreSQL; on Citus the worker's part of it, which begins when the UPDATE
    # reaches the worker.
    assert now <= row["updated_at"] <= after
    assert row["created_at"] == long_ago


# --- Suite 4: attempts and scoring -------------------------------------------------------


async def test_attempts_are_counted_and_best_score_kept(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(1, passing_score=80)
    user = uid()
    await insert(db, user, course.course_id, "l1")
    scores = [35, 72, 64, 91, 88]
    for score in scores:
        await db.execute(
            """
            UPDATE lesson_progress
            SET attempts = attempts + 1, score = GREATEST(score, $4), last_accessed_at = now()
            WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3
            """,
            user,
            uuid.UUID(course.course_id),
            "l1",
            score,
        )
    row = await fetch(db, user, course.course_id, "l1")
    assert row is not None
    assert row["attempts"] == len(scores)
    assert row["score"] == max(scores)


@pytest.mark.parametrize("score", [0, 1, 50, 99, 100])
async def test_score_in_range_is_stored(
    db: asyncpg.Pool, make_course: MakeCourse, score: int
) -> None:
    course = await make_course(1)
    user = uid()
    await insert(db, user, course.course_id, "l1", score=score)
    row = await fetch(db, user, course.course_id, "l1")
    assert row is not None
    assert row["score"] == score


@pytest.mark.parametrize("score", [101, -1])
async def test_score_outside_0_100_is_rejected(
    db: asyncpg.Pool, make_course: MakeCourse, score: int
) -> None:
    course = await make_course(1)
    user = uid()
    with pytest.raises(asyncpg.CheckViolationError):
        await insert(db, user, course.course_id, "l1", score=score)
    await insert(db, user, course.course_id, "l1", score=50)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE lesson_progress SET score = $3 WHERE user_id = $1 AND course_id = $2",
            user,
            uuid.UUID(course.course_id),
            score,
        )
    row = await fetch(db, user, course.course_id, "l1")
    assert row is not None
    assert row["score"] == 50


async def test_null_score_allowed(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    user = uid()
    done_at = await db.fetchval("SELECT now()")
    await insert(db, user, course.course_id, "l1", score=None, completed=True, completed_at=done_at)
    row = await fetch(db, user, course.course_id, "l1")
    assert row is not None
    assert row["score"] is None
    assert row["completed"] is True


# --- Suite 5: constraints ----------------------------------------------------------------


async def test_duplicate_progress_rejected(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    user = uid()
    await insert(db, user, course.course_id, "l1", time_spent_seconds=5)
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert(db, user, course.course_id, "l1", time_spent_seconds=9)
    count = await db.fetchval(
        "SELECT count(*) FROM lesson_progress WHERE user_id = $1 AND course_id = $2",
        user,
        uuid.UUID(course.course_id),
    )
    assert count == 1


async def test_same_lesson_for_different_users(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    users = [uid() for _ in range(3)]
    for i, user in enumerate(users):
        await insert(db, user, course.course_id, "l1", time_spent_seconds=i + 1)
    rows = await db.fetch(
        "SELECT user_id, time_spent_seconds FROM lesson_progress "
        "WHERE course_id = $1 AND lesson_id = 'l1'",
        uuid.UUID(course.course_id),
    )
    assert {r["user_id"]: r["time_spent_seconds"] for r in rows} == {
        user: i + 1 for i, user in enumerate(users)
    }


async def test_same_lesson_id_in_different_courses(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    first, second = await make_course(1), await make_course(1)
    user = uid()
    await insert(db, user, first.course_id, "l1")
    await insert(db, user, second.course_id, "l1")
    assert await fetch(db, user, first.course_id, "l1") is not None
    assert await fetch(db, user, second.course_id, "l1") is not None


async def test_negative_time_rejected(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    user = uid()
    with pytest.raises(asyncpg.CheckViolationError):
        await insert(db, user, course.course_id, "l1", time_spent_seconds=-1)
    await insert(db, user, course.course_id, "l1", time_spent_seconds=10)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE lesson_progress SET time_spent_seconds = time_spent_seconds - 11 "
            "WHERE user_id = $1 AND course_id = $2",
            user,
            uuid.UUID(course.course_id),
        )


async def test_negative_attempts_rejected(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(1)
    user = uid()
    with pytest.raises(asyncpg.CheckViolationError):
        await insert(db, user, course.course_id, "l1", attempts=-1)
    await insert(db, user, course.course_id, "l1")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE lesson_progress SET attempts = attempts - 1 "
            "WHERE user_id = $1 AND course_id = $2",
            user,
            uuid.UUID(course.course_id),
        )


async def test_lesson_outside_the_course_rejected(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(2)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await insert(db, uid(), course.course_id, "l3")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await insert(db, uid(), str(uuid.uuid4()), "l1")


async def test_lesson_id_longer_than_255_rejected(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(1)
    with pytest.raises(asyncpg.StringDataRightTruncationError):
        await insert(db, uid(), course.course_id, "x" * 256)


# --- Suite 6: queries and analytics ------------------------------------------------------


async def _populate(
    db: asyncpg.Pool, course: CourseIds, users: list[uuid.UUID], seed: int
) -> list[dict[str, Any]]:
    """Inserts random progress for ``users`` in every lesson; returns what was inserted."""
    rng = random.Random(seed)
    base = await db.fetchval("SELECT '2024-01-01 00:00:00+00'::timestamptz")
    # Distinct completion times, in an order unrelated to the insertion order.
    offsets = iter(rng.sample(range(10**6), len(users) * len(course.lesson_ids)))
    inserted: list[dict[str, Any]] = []
    for user in users:
        for lesson_id in course.lesson_ids:
            offset = next(offsets)
            completed = rng.random() < 0.6
            values: dict[str, Any] = {
                "user_id": user,
                "lesson_id": lesson_id,
                "time_spent_seconds": rng.randint(0, 5000),
                "attempts": rng.randint(0, 9),
                "score": rng.choice([None, *range(0, 101)]),
                "completed": completed,
                "completed_at": base + timedelta(seconds=offset) if completed else None,
            }
            await insert(
                db,
                user,
                course.course_id,
                lesson_id,
                **{k: v for k, v in values.items() if k not in ("user_id", "lesson_id")},
            )
            inserted.append(values)
    return inserted


async def test_completed_lessons_of_a_user(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(8)
    users = [uid(), uid()]
    data = await _populate(db, course, users, seed=1)
    user = users[0]
    rows = await db.fetch(
        """
        SELECT * FROM lesson_progress
        WHERE user_id = $1 AND course_id = $2 AND completed = true
        ORDER BY completed_at
        """,
        user,
        uuid.UUID(course.course_id),
    )
    expected = sorted(
        (d for d in data if d["user_id"] == user and d["completed"]),
        key=lambda d: d["completed_at"],
    )
    assert expected, "the seed should complete at least one lesson"
    assert [r["lesson_id"] for r in rows] == [d["lesson_id"] for d in expected]
    assert [r["completed_at"] for r in rows] == [d["completed_at"] for d in expected]


async def test_total_time_spent_on_course(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(6)
    users = [uid(), uid()]
    data = await _populate(db, course, users, seed=2)
    for user in users:
        total = await db.fetchval(
            "SELECT SUM(time_spent_seconds) AS total_time FROM lesson_progress "
            "WHERE user_id = $1 AND course_id = $2",
            user,
            uuid.UUID(course.course_id),
        )
        assert total == sum(d["time_spent_seconds"] for d in data if d["user_id"] == user)


async def test_average_score_of_completed_lessons(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(5)
    users = [uid() for _ in range(6)]
    data = await _populate(db, course, users, seed=3)
    rows = await db.fetch(
        """
        SELECT lesson_id, AVG(score) AS avg_score, AVG(score)::integer AS avg_score_int,
               MIN(score) AS min_score, MAX(score) AS max_score, COUNT(*) AS scored
        FROM lesson_progress
        WHERE course_id = $1 AND completed = true AND score IS NOT NULL
        GROUP BY lesson_id ORDER BY lesson_id
        """,
        uuid.UUID(course.course_id),
    )
    expected: dict[str, list[int]] = {}
    for d in data:
        if d["completed"] and d["score"] is not None:
            expected.setdefault(d["lesson_id"], []).append(d["score"])
    assert [r["lesson_id"] for r in rows] == sorted(expected)
    for row in rows:
        scores = expected[row["lesson_id"]]
        mean = Fraction(sum(scores), len(scores))
        assert abs(Fraction(row["avg_score"]) - mean) < Fraction(1, 10**12)
        assert row["avg_score_int"] == round_half_up(mean)
        assert (row["min_score"], row["max_score"], row["scored"]) == (
            min(scores),
            max(scores),
            len(scores),
        )


async def test_lessons_with_most_attempts(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    course = await make_course(5)
    users = [uid() for _ in range(12)]
    data = await _populate(db, course, users, seed=4)
    # The seed's "find difficult lessons", over completed rows, averages per lesson.
    rows = await db.fetch(
        """
        SELECT lesson_id, AVG(attempts) AS avg_attempts,
               AVG(time_spent_seconds) AS avg_time, COUNT(*) AS completion_count
        FROM lesson_progress
        WHERE course_id = $1 AND completed = true
        GROUP BY lesson_id
        HAVING COUNT(*) >= $2
        ORDER BY avg_attempts DESC, lesson_id
        """,
        uuid.UUID(course.course_id),
        3,
    )
    per_lesson: dict[str, list[dict[str, Any]]] = {}
    for d in data:
        if d["completed"]:
            per_lesson.setdefault(d["lesson_id"], []).append(d)
    expected = sorted(
        (
            (
                lesson_id,
                Fraction(sum(d["attempts"] for d in rows_), len(rows_)),
                Fraction(sum(d["time_spent_seconds"] for d in rows_), len(rows_)),
                len(rows_),
            )
            for lesson_id, rows_ in per_lesson.items()
            if len(rows_) >= 3
        ),
        key=lambda e: (-e[1], e[0]),
    )
    assert len(expected) >= 2, "the seed should give several lessons to rank"
    assert [r["lesson_id"] for r in rows] == [e[0] for e in expected]
    for row, (_, attempts, time_spent, count) in zip(rows, expected, strict=True):
        assert abs(Fraction(row["avg_attempts"]) - attempts) < Fraction(1, 10**12)
        assert abs(Fraction(row["avg_time"]) - time_spent) < Fraction(1, 10**12)
        assert row["completion_count"] == count

    # And the single learner's view: their lessons by attempts, most first.
    user = users[0]
    mine = await db.fetch(
        "SELECT lesson_id, attempts FROM lesson_progress WHERE user_id = $1 AND course_id = $2 "
        "ORDER BY attempts DESC, lesson_id LIMIT 3",
        user,
        uuid.UUID(course.course_id),
    )
    expected_mine = sorted(
        ((d["lesson_id"], d["attempts"]) for d in data if d["user_id"] == user),
        key=lambda e: (-e[1], e[0]),
    )[:3]
    assert [(r["lesson_id"], r["attempts"]) for r in mine] == expected_mine


# --- Cascades ----------------------------------------------------------------------------


async def test_deleting_a_course_cascades(db: asyncpg.Pool, make_course: MakeCourse) -> None:
    doomed, kept = await make_course(3), await make_course(3)
    user = uid()
    done_at = await db.fetchval("SELECT now()")
    for course in (doomed, kept):
        course_uuid = uuid.UUID(course.course_id)
        for lesson_id in course.lesson_ids:
            await insert(db, user, course.course_id, lesson_id, attempts=1, score=70)
            await db.execute(
                "INSERT INTO lesson_attempts (user_id, course_id, lesson_id, attempt_number, "
                "score) VALUES ($1, $2, $3, 1, 70)",
                user,
                course_uuid,
                lesson_id,
            )
        await db.execute(
            "INSERT INTO course_progress (user_id, course_id, completed_lessons, completed_at) "
            "VALUES ($1, $2, $3::jsonb, $4)",
            user,
            course_uuid,
            '["l1", "l2", "l3"]',
            done_at,
        )

    async def counts(course: CourseIds) -> dict[str, int]:
        course_uuid = uuid.UUID(course.course_id)
        result = {}
        for table in ("courses", "lessons", "lesson_progress", "lesson_attempts"):
            result[table] = await db.fetchval(
                f"SELECT count(*) FROM {table} WHERE course_id = $1", course_uuid
            )
        result["course_progress"] = await db.fetchval(
            "SELECT count(*) FROM course_progress WHERE course_id = $1", course_uuid
        )
        return result

    everything = {
        "courses": 1,
        "lessons": 3,
        "lesson_progress": 3,
        "lesson_attempts": 3,
        "course_progress": 1,
    }
    assert await counts(doomed) == everything
    status = await db.execute(
        "DELETE FROM courses WHERE course_id = $1", uuid.UUID(doomed.course_id)
    )
    assert status == "DELETE 1"
    assert await counts(doomed) == dict.fromkeys(everything, 0)
    assert await counts(kept) == everything


async def test_deleting_progress_cascades_to_attempts(
    db: asyncpg.Pool, make_course: MakeCourse
) -> None:
    course = await make_course(1)
    user = uid()
    await insert(db, user, course.course_id, "l1", attempts=2, score=40)
    for number, score in ((1, 20), (2, 40)):
        await db.execute(
            "INSERT INTO lesson_attempts (user_id, course_id, lesson_id, attempt_number, score) "
            "VALUES ($1, $2, 'l1', $3, $4)",
            user,
            uuid.UUID(course.course_id),
            number,
            score,
        )
    await db.execute("DELETE FROM lesson_progress WHERE user_id = $1", user)
    assert await db.fetchval("SELECT count(*) FROM lesson_attempts WHERE user_id = $1", user) == 0
