"""Generates a realistic progress data set and loads it with COPY.

Shape (for ``rows`` lesson rows): 1,000 courses of 20 lessons (lessons 5, 10, 15 and 20
end in a quiz with passing score 70); learners whose number of courses is Pareto-skewed
(most take one, a few take many); course popularity Zipf-skewed (the top course holds
about an eighth of all enrollments); in each enrollment the learner went through the
first lessons in order, finishing all of them in 15% of enrollments. Quizzes carry
attempts and scores; other lessons are unscored. Every enrollment has its
``course_progress`` row with the JSONB list of its completed lessons.

The same code seeds one PostgreSQL and a Citus coordinator: COPY into a distributed table
goes through the coordinator to each row's shard, DROP/CREATE INDEX and VACUUM are
propagated to the shards, and on Citus the workers are checkpointed too. (On Citus
``session_replication_role`` stays on the coordinator, so the workers check foreign keys.)

Rows are generated in primary-key order (learners by user_id, their courses by course_id,
lessons by lesson_id), so the primary keys grow at their right edge; the secondary
indexes are dropped during the load and rebuilt from their own definitions afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.dataset import (
    ASSESSED_LESSONS,
    LESSON_IDS,
    LESSONS_PER_COURSE,
    PASSING_SCORE,
    Dataset,
    Enrollment,
)
from bench.postgres import is_citus

log = logging.getLogger(__name__)

COURSES = 1000
ZIPF_EXPONENT = 1.0
FINISHED_SHARE = 0.15
# Pareto shape of the number of courses per learner: mean about 1.7 courses.
ACTIVITY_SHAPE = 2.2
MAX_COURSES_PER_LEARNER = 40
# Enrollments handed to the load generators (split between service and baselines).
SAMPLE_SIZE = 150_000
CHUNK_ROWS = 50_000
YEAR_SECONDS = 365 * 86400

LESSON_COLUMNS = (
    "user_id", "course_id", "lesson_id", "completed", "time_spent_seconds", "attempts",
    "score", "first_started_at", "last_accessed_at", "completed_at", "created_at",
    "updated_at", "bookmark", "bookmarked_at",
)  # fmt: skip
COURSE_COLUMNS = (
    "user_id",
    "course_id",
    "completed_lessons",
    "completed_at",
    "created_at",
    "updated_at",
)

_SECONDARY_INDEXES = """
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i
WHERE i.indrelid IN ('lesson_progress'::regclass, 'course_progress'::regclass)
  AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid)
"""

LessonRow = tuple[object, ...]


@dataclass(frozen=True)
class SeedReport:
    """What the load took."""

    dataset: Dataset
    seconds: float
    replication_role_used: bool


def _random_uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


class Generator:
    """Deterministic generator of enrollments and their rows (same seed, same data)."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows = rows
        self.rng = random.Random(seed)
        self.now = datetime.now(UTC).replace(microsecond=0)
        self.course_ids = sorted(str(_random_uuid(self.rng)) for _ in range(COURSES))
        ranks = list(range(COURSES))
        self.rng.shuffle(ranks)  # popularity independent of id order
        weights = [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in ranks]
        self._cum_weights = [sum(weights[: i + 1]) for i in range(COURSES)]
        self.course_rows = [0] * COURSES
        self.learners = 0
        self.enrollments = 0

    def _courses_of_learner(self) -> list[int]:
        wanted = min(int(self.rng.paretovariate(ACTIVITY_SHAPE)), MAX_COURSES_PER_LEARNER)
        chosen: set[int] = set()
        while len(chosen) < wanted:
            chosen.update(self.rng.choices(range(COURSES), cum_weights=self._cum_weights, k=wanted))
        return sorted(chosen)[:wanted]  # indexes sort like the ids they point to

    def enrollments_in_key_order(self) -> Iterator[Enrollment]:
        """Enrollments by (user_id, course_id) until ``rows`` lesson rows are planned."""
        expected_rows_per_learner = 1.5 * (
            FINISHED_SHARE * LESSONS_PER_COURSE + (1 - FINISHED_SHARE) * 10.5
        )
        pool = int(self.rows / expected_rows_per_learner * 1.5) + 1000
        user_ids = sorted(_random_uuid(self.rng) for _ in range(pool))
        remaining = self.rows
        for user in user_ids:
            self.learners += 1
            for course in self._courses_of_learner():
                finished = self.rng.random() < FINISHED_SHARE
                started = LESSONS_PER_COURSE if finished else self.rng.randint(1, 20)
                if started >= remaining:
                    started, finished = remaining, finished and started == remaining
                remaining -= started
                self.enrollments += 1
                self.course_rows[course] += started
                yield Enrollment(str(user), course, started, finished)
                if remaining == 0:
                    return
        raise AssertionError("the learner pool was too small for the requested rows")

    def rows_of(self, enrollment: Enrollment) -> tuple[list[LessonRow], LessonRow]:
        """The lesson rows and the course_progress row of one enrollment."""
        rng = self.rng
        course_id = self.course_ids[enrollment.course]
        age = rng.uniform(3600, YEAR_SECONDS)
        step = age / (enrollment.started + 1)
        start = self.now - timedelta(seconds=age)
        lessons: list[LessonRow] = []
        completed_ids: list[str] = []
        last_completion: datetime | None = None
        for index in range(enrollment.started):
            done = index < enrollment.completed
            assessed = index in ASSESSED_LESSONS
            spent = int(rng.lognormvariate(6.3, 0.6)) if done else rng.randint(0, 600)
            first = start + timedelta(seconds=index * step + rng.uniform(0, step / 2))
            last = min(first + timedelta(seconds=spent * 1.5 + 1), self.now)
            if assessed and done:
                attempts = 1 + (rng.random() < 0.4) + (rng.random() < 0.2)
                score: int | None = rng.randint(PASSING_SCORE, 100)
            elif assessed:
                attempts = rng.randint(0, 2)
                score = rng.randint(20, PASSING_SCORE - 1) if attempts else None
            else:
                attempts, score = 0, None
            bookmark = None if done else f"t={rng.randint(0, 3600)}"
            completed_at = last if done else None
            if done:
                completed_ids.append(LESSON_IDS[index])
                last_completion = last
            lessons.append(
                (
                    enrollment.user_id, course_id, LESSON_IDS[index], done, spent, attempts,
                    score, first, last, completed_at, first, last, bookmark,
                    None if bookmark is None else last,
                )
            )  # fmt: skip
        finished_at = last_completion if enrollment.finished else None
        updated = lessons[-1][8]
        course_row = (
            enrollment.user_id, course_id, json.dumps(completed_ids), finished_at, start,
            updated,
        )  # fmt: skip
        return lessons, course_row


def _lesson(course_id: str, index: int) -> LessonRow:
    """A ``lessons`` row: quizzes carry the passing score."""
    assessed = index in ASSESSED_LESSONS
    score = PASSING_SCORE if assessed else None
    return (course_id, LESSON_IDS[index], index, f"Lesson {index + 1}", assessed, score)


async def _copy_catalog(connection: asyncpg.Connection, generator: Generator) -> None:
    await connection.copy_records_to_table(
        "courses",
        records=[(cid, f"Course {i + 1}") for i, cid in enumerate(generator.course_ids)],
        columns=("course_id", "title"),
    )
    await connection.copy_records_to_table(
        "lessons",
        records=[
            _lesson(cid, i) for cid in generator.course_ids for i in range(LESSONS_PER_COURSE)
        ],
        columns=("course_id", "lesson_id", "position", "title", "assessed", "passing_score"),
    )


async def _use_replica_role(connection: asyncpg.Connection) -> bool:
    """Skips foreign-key triggers during the load (the rows are consistent by design).

    Needs superuser; without it the load simply checks every key.
    """
    try:
        await connection.execute("SET session_replication_role = replica")
    except asyncpg.InsufficientPrivilegeError:
        return False
    return True


async def seed(connection: asyncpg.Connection, rows: int, *, seed_value: int = 1) -> SeedReport:
    """Loads ``rows`` lesson rows (plus courses, lessons, course rows); then VACUUM ANALYZE."""
    started_at = time.monotonic()
    generator = Generator(rows, seed_value)
    replica = await _use_replica_role(connection)
    await connection.execute("SET maintenance_work_mem = '256MB'")
    indexes = await connection.fetch(_SECONDARY_INDEXES)
    for index in indexes:
        await connection.execute(f"DROP INDEX {index['name']}")
    await _copy_catalog(connection, generator)

    expected_enrollments = rows / (FINISHED_SHARE * 20 + (1 - FINISHED_SHARE) * 10.5)
    keep = min(1.0, SAMPLE_SIZE / max(expected_enrollments, 1))
    sampler = random.Random(seed_value + 1)
    sample: list[Enrollment] = []
    lesson_chunk: list[LessonRow] = []
    course_chunk: list[LessonRow] = []
    for enrollment in generator.enrollments_in_key_order():
        if sampler.random() < keep:
            sample.append(enrollment)
        lessons, course_row = generator.rows_of(enrollment)
        lesson_chunk.extend(lessons)
        course_chunk.append(course_row)
        if len(lesson_chunk) >= CHUNK_ROWS:
            await _flush(connection, lesson_chunk, course_chunk)
            lesson_chunk, course_chunk = [], []
    await _flush(connection, lesson_chunk, course_chunk)
    log.info("copied %d rows in %.1fs; rebuilding indexes", rows, time.monotonic() - started_at)

    for index in indexes:
        await connection.execute(index["definition"])
    if replica:
        await connection.execute("RESET session_replication_role")
    await connection.execute("VACUUM (ANALYZE) courses, lessons, lesson_progress, course_progress")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await connection.execute("CHECKPOINT")  # keep the load's writes out of the runs
        if await is_citus(connection):  # the shards' writes went to the workers
            await connection.execute("SELECT run_command_on_workers('CHECKPOINT')")
    dataset = Dataset(
        rows=rows,
        learners=generator.learners,
        enrollments=generator.enrollments,
        course_ids=tuple(generator.course_ids),
        course_rows=tuple(generator.course_rows),
        sample=tuple(sample),
    )
    return SeedReport(dataset, time.monotonic() - started_at, replica)


async def _flush(
    connection: asyncpg.Connection, lessons: list[LessonRow], courses: list[LessonRow]
) -> None:
    if lessons:
        await connection.copy_records_to_table(
            "lesson_progress", records=lessons, columns=LESSON_COLUMNS
        )
    if courses:
        await connection.copy_records_to_table(
            "course_progress", records=courses, columns=COURSE_COLUMNS
        )
