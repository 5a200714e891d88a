"""Lesson statistics served from the summary: exact for their snapshot, never too old.

Rows are written straight into lesson_progress from a seeded random.Random; the expected
figures are computed here from what was written (tests.test_analytics.percentile is
PostgreSQL's percentile_cont), independently of the SQL under test. A threshold of one
row makes every course with progress a "large" course.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from lesson_progress.store.database import Database
from lesson_progress.store.lesson_stats import LessonStatsSummaries, SummaryPolicy
from tests.conftest import new_id
from tests.test_analytics import percentile

LESSONS = 4


@dataclass
class Row:
    lesson_id: str
    time: int
    attempts: int
    score: int | None
    completed: bool


@pytest.fixture
async def database(database_url: str) -> Any:
    opened = await Database.connect(database_url, pool_size=6)
    yield opened
    await opened.close()


def expected(rows: dict[tuple[str, str], Row], lesson_ids: list[str]) -> list[dict[str, Any]]:
    """The figures StreamLessonStats must give, computed from the rows written."""
    figures = []
    for lesson_id in lesson_ids:
        mine = [r for r in rows.values() if r.lesson_id == lesson_id]
        done = [r.time for r in mine if r.completed]
        scores = [r.score for r in mine if r.score is not None]
        histogram = [0] * 10
        for score in scores:
            histogram[min(score // 10, 9)] += 1
        figures.append(
            {
                "lesson_id": lesson_id,
                "started_count": len(mine),
                "completed_count": len(done),
                "avg_attempts": sum(r.attempts for r in mine) / len(mine) if mine else 0,
                "avg_time_spent_seconds": sum(r.time for r in mine) / len(mine) if mine else 0,
                "p50_time_spent_seconds": percentile(done, 0.5) if done else 0,
                "p90_time_spent_seconds": percentile(done, 0.9) if done else 0,
                "scored_count": len(scores),
                "avg_score": sum(scores) / len(scores) if scores else 0,
                "min_score": min(scores, default=0),
                "max_score": max(scores, default=0),
                "score_histogram": histogram,
            }
        )
    return figures


def assert_figures(got: list[Any], want: list[dict[str, Any]]) -> None:
    assert [r["lesson_id"] for r in got] == [w["lesson_id"] for w in want]
    for row, figures in zip(got, want, strict=True):
        for name, value in figures.items():
            if isinstance(value, float):
                assert row[name] == pytest.approx(value, rel=1e-12, abs=1e-9), (name, row)
            else:
                assert (list(row[name]) if name == "score_histogram" else row[name]) == value, (
                    name,
                    row,
                )


async def make_course(db: asyncpg.Pool) -> tuple[str, list[str]]:
    course_id = new_id()
    lesson_ids = [f"l{i + 1}" for i in range(LESSONS)]
    async with db.acquire() as connection, connection.transaction():
        await connection.execute("INSERT INTO courses (course_id) VALUES ($1)", course_id)
        await connection.executemany(
            "INSERT INTO lessons (course_id, lesson_id, position) VALUES ($1, $2, $3)",
            [(course_id, lesson_id, i) for i, lesson_id in enumerate(lesson_ids)],
        )
    return course_id, lesson_ids


async def write(
    db: asyncpg.Pool, course_id: str, rows: dict[tuple[str, str], Row], rng: random.Random,
    learners: list[str], lesson_ids: list[str], count: int,
) -> None:  # fmt: skip
    """Upserts ``count`` random rows (new ones and changes to earlier ones)."""
    for _ in range(count):
        key = (rng.choice(learners), rng.choice(lesson_ids))
        completed = rng.random() < 0.5
        row = Row(key[1], rng.randrange(0, 5000), rng.randrange(0, 6),
                  rng.choice([None, rng.randrange(0, 101)]), completed)  # fmt: skip
        rows[key] = row
        await db.execute(
            """
            INSERT INTO lesson_progress (user_id, course_id, lesson_id, time_spent_seconds,
                                         attempts, score, completed, completed_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7 THEN now() END)
            ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
            SET time_spent_seconds = EXCLUDED.time_spent_seconds,
                attempts = EXCLUDED.attempts, score = EXCLUDED.score,
                completed = EXCLUDED.completed, completed_at = EXCLUDED.completed_at
            """,
            key[0], course_id, key[1], row.time, row.attempts, row.score, row.completed,
        )  # fmt: skip


async def test_summary_is_exact_after_writes_and_served_once_refreshed(
    db: asyncpg.Pool, database: Database
) -> None:
    rng = random.Random(12)
    course_id, lesson_ids = await make_course(db)
    learners = [new_id() for _ in range(30)]
    rows: dict[tuple[str, str], Row] = {}
    await write(db, course_id, rows, rng, learners, lesson_ids[:3], 80)
    summaries = LessonStatsSummaries(database, SummaryPolicy(min_rows=1, refresh_after=0))

    live, summarised = await summaries.lesson_stats(course_id)
    assert not summarised  # no summary yet: computed now, and the course is now in demand
    assert_figures(live, expected(rows, lesson_ids))
    assert await summaries.refresh_due() >= 1

    served, summarised = await summaries.lesson_stats(course_id)
    assert summarised
    assert_figures(served, expected(rows, lesson_ids))

    # More writes (changes, new rows, a lesson seen for the first time), a recomputation.
    await write(db, course_id, rows, rng, learners, lesson_ids, 120)
    await summaries.recompute(course_id)
    served, summarised = await summaries.lesson_stats(course_id)
    assert summarised
    assert_figures(served, expected(rows, lesson_ids))

    # A lesson whose rows all went since the last computation shows zeros after the next.
    await db.execute(
        "DELETE FROM lesson_progress WHERE course_id = $1 AND lesson_id = 'l1'", course_id
    )
    rows = {key: row for key, row in rows.items() if row.lesson_id != "l1"}
    await summaries.recompute(course_id)
    served, summarised = await summaries.lesson_stats(course_id)
    assert summarised
    assert_figures(served, expected(rows, lesson_ids))


async def test_a_summary_older_than_the_bound_is_never_served(
    db: asyncpg.Pool, database: Database
) -> None:
    rng = random.Random(7)
    course_id, lesson_ids = await make_course(db)
    learners = [new_id() for _ in range(10)]
    rows: dict[tuple[str, str], Row] = {}
    await write(db, course_id, rows, rng, learners, lesson_ids, 30)
    max_age = 1.0
    summaries = LessonStatsSummaries(database, SummaryPolicy(min_rows=1, max_age=max_age))
    await summaries.recompute(course_id)
    computed = time.monotonic()
    before = expected(rows, lesson_ids)
    await write(db, course_id, rows, rng, learners, lesson_ids, 30)
    after = expected(rows, lesson_ids)
    assert before != after

    served, summarised = await summaries.lesson_stats(course_id)
    if time.monotonic() - computed < max_age:  # within the bound: the summary's snapshot
        assert summarised
        assert_figures(served, before)
    await asyncio.sleep(max_age + 0.2)
    served, summarised = await summaries.lesson_stats(course_id)
    assert not summarised  # past the bound: the figures of now
    assert_figures(served, after)


async def test_concurrent_writers_and_refreshers_end_exact(
    db: asyncpg.Pool, database: Database
) -> None:
    rng = random.Random(3)
    course_id, lesson_ids = await make_course(db)
    learners = [new_id() for _ in range(40)]
    rows: dict[tuple[str, str], Row] = {}
    await write(db, course_id, rows, rng, learners, lesson_ids, 40)
    policy = SummaryPolicy(min_rows=1, refresh_after=0)
    replicas = [LessonStatsSummaries(database, policy) for _ in range(3)]
    await replicas[0].lesson_stats(course_id)  # registers the demand

    async def refresh_often() -> None:
        for _ in range(15):
            await asyncio.gather(*(replica.refresh_due() for replica in replicas))

    async def writes() -> None:
        for _ in range(4):
            await write(db, course_id, rows, rng, learners, lesson_ids, 15)

    await asyncio.gather(refresh_often(), writes())
    assert sum(replica.recomputed for replica in replicas) >= 1
    # One computation after the last write: whoever makes it, the stored figures are exact.
    await replicas[1].recompute(course_id)
    served, summarised = await replicas[2].lesson_stats(course_id)
    assert summarised
    assert_figures(served, expected(rows, lesson_ids))
    # An older computation saved late never replaces a newer one.
    stored = await db.fetchval(
        "SELECT computed_at FROM lesson_stats_courses WHERE course_id = $1", course_id
    )
    assert await db.fetchval(
        "SELECT count(*) FROM lesson_stats_summary WHERE course_id = $1 AND computed_at <> $2",
        course_id, stored,
    ) == 0  # fmt: skip


async def test_small_courses_are_computed_live_and_never_summarised(
    db: asyncpg.Pool, database: Database
) -> None:
    rng = random.Random(5)
    course_id, lesson_ids = await make_course(db)
    rows: dict[tuple[str, str], Row] = {}
    await write(db, course_id, rows, rng, [new_id() for _ in range(5)], lesson_ids, 10)
    summaries = LessonStatsSummaries(database, SummaryPolicy(min_rows=len(rows) + 1))
    served, summarised = await summaries.lesson_stats(course_id)
    assert not summarised
    assert_figures(served, expected(rows, lesson_ids))
    assert await db.fetchval(
        "SELECT count(*) FROM lesson_stats_courses WHERE course_id = $1", course_id
    ) == 0  # fmt: skip


def test_the_protos_state_the_policy_the_server_applies() -> None:
    proto = Path(__file__).parent.parent / "protos/lessonprogress/v1/analytics_service.proto"
    text = " ".join(line.strip().lstrip("/ ") for line in proto.read_text().splitlines())
    policy = SummaryPolicy()
    assert f"at most {policy.max_age:g} seconds before the call" in text
    assert f"fewer than {policy.min_rows:,} learner-lessons" in text


async def test_only_courses_asked_for_since_their_summary_are_recomputed(
    db: asyncpg.Pool, database: Database
) -> None:
    """The refresher keeps a course fresh while it is being asked for and leaves it alone
    once it is not (a burst of requests for many large courses once costs one
    recomputation each, not one every refresh_after for minutes)."""
    rng = random.Random(9)
    course_id, lesson_ids = await make_course(db)
    rows: dict[tuple[str, str], Row] = {}
    await write(db, course_id, rows, rng, [new_id() for _ in range(5)], lesson_ids, 10)
    summaries = LessonStatsSummaries(database, SummaryPolicy(min_rows=1, refresh_after=0))
    await summaries.lesson_stats(course_id)  # live, and now asked for
    first = await computed_at(db, course_id)
    await summaries.refresh_due()
    second = await computed_at(db, course_id)
    assert second != first  # the first summary
    await summaries.refresh_due()  # nobody asked since: nothing to do
    assert await computed_at(db, course_id) == second
    served, summarised = await summaries.lesson_stats(course_id)  # asked again
    assert summarised
    assert_figures(served, expected(rows, lesson_ids))
    await summaries.refresh_due()
    third = await computed_at(db, course_id)
    assert third > second
    await summaries.refresh_due()
    assert await computed_at(db, course_id) == third


async def test_a_summary_computed_before_any_request_is_renewed_once_asked_for(
    db: asyncpg.Pool, database: Database
) -> None:
    """A course row created by a computation no request led to (its request time is its
    computation time) counts the first request after it as demand, like any other."""
    rng = random.Random(10)
    course_id, lesson_ids = await make_course(db)
    rows: dict[tuple[str, str], Row] = {}
    await write(db, course_id, rows, rng, [new_id() for _ in range(5)], lesson_ids, 10)
    summaries = LessonStatsSummaries(database, SummaryPolicy(min_rows=1, refresh_after=0))
    await summaries.recompute(course_id)
    first = await computed_at(db, course_id)
    served, summarised = await summaries.lesson_stats(course_id)
    assert summarised
    assert_figures(served, expected(rows, lesson_ids))
    assert await summaries.refresh_due() == 1
    assert await computed_at(db, course_id) > first


async def computed_at(db: asyncpg.Pool, course_id: str) -> Any:
    """When the course's stored summary was computed."""
    return await db.fetchval(
        "SELECT computed_at FROM lesson_stats_courses WHERE course_id = $1", course_id
    )
