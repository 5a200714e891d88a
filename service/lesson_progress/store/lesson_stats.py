"""Per-lesson statistics of large courses: a summary recomputed off the write path.

Aggregating every row of a course costs time in proportion to the course (1.3 s for a
course of 1.2M learner-lessons). A course with at least ``min_rows`` rows is therefore
served from ``lesson_stats_summary`` (migration 0006) while that summary is at most
``max_age`` seconds old, and computed from its rows otherwise. A background task
(``refresh_forever``, one per server) recomputes a large course's summary once it is
``refresh_after`` seconds old if the course was asked for since that summary was computed:
a course is kept fresh while it is being asked for, and costs nothing once it is not. A
lease row (``refreshing_until``) keeps two replicas from recomputing the same course at
once.

What a caller gets is therefore never older than ``max_age`` seconds, and every figure
(counts, means, percentiles, histogram) is exact for the snapshot it was computed from:
a recomputation is the live statement run in one REPEATABLE READ snapshot. Heartbeats
never touch the summary tables. Correctness needs no lock: a summary is written with the
transaction start time of its snapshot and never replaces a newer one, and readers take
the rows of the computation their course row names, in one snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from lesson_progress.store.checks import ensure_course
from lesson_progress.store.database import Connection, Database, Record, atomically

log = logging.getLogger(__name__)

_BUCKETS = ",\n".join(
    f"        count(*) FILTER (WHERE score >= {low} AND score < {low + 10})"
    if low < 90
    else "        count(*) FILTER (WHERE score >= 90)"
    for low in range(0, 100, 10)
)

# The figures of every lesson of one course with any row, read through
# lesson_progress_course_user_idx. Unscored rows are left out of the score figures
# (count/avg/min/max ignore NULL). Percentiles interpolate (percentile_cont) over the
# completers' times. Its cost grows with the course: lesson_stats.py keeps the result for
# large courses.
LESSON_AGGREGATES = f"""
SELECT lesson_id,
    count(*) AS started_count,
    count(*) FILTER (WHERE completed) AS completed_count,
    avg(attempts)::float8 AS avg_attempts,
    avg(time_spent_seconds)::float8 AS avg_time_spent_seconds,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY time_spent_seconds)
        FILTER (WHERE completed) AS p50_time_spent_seconds,
    percentile_cont(0.9) WITHIN GROUP (ORDER BY time_spent_seconds)
        FILTER (WHERE completed) AS p90_time_spent_seconds,
    count(score) AS scored_count,
    avg(score)::float8 AS avg_score,
    min(score) AS min_score,
    max(score) AS max_score,
    ARRAY[
{_BUCKETS}
    ] AS score_histogram
FROM lesson_progress
WHERE course_id = $1::uuid
GROUP BY lesson_id
"""


def lesson_stats_of(stats: str) -> str:
    """One row per lesson of the current outline, in outline order, from ``stats`` (a
    query over course $1 with LESSON_AGGREGATES' columns); lessons without a row: zeros."""
    return f"""
WITH stats AS ({stats})
SELECT l.lesson_id,
       COALESCE(s.started_count, 0) AS started_count,
       COALESCE(s.completed_count, 0) AS completed_count,
       COALESCE(s.avg_attempts, 0) AS avg_attempts,
       COALESCE(s.avg_time_spent_seconds, 0) AS avg_time_spent_seconds,
       COALESCE(s.p50_time_spent_seconds, 0) AS p50_time_spent_seconds,
       COALESCE(s.p90_time_spent_seconds, 0) AS p90_time_spent_seconds,
       COALESCE(s.scored_count, 0) AS scored_count,
       COALESCE(s.avg_score, 0) AS avg_score,
       COALESCE(s.min_score, 0) AS min_score,
       COALESCE(s.max_score, 0) AS max_score,
       COALESCE(s.score_histogram, '{{0,0,0,0,0,0,0,0,0,0}}') AS score_histogram
FROM lessons l
LEFT JOIN stats s USING (lesson_id)
WHERE l.course_id = $1::uuid AND l.position IS NOT NULL
ORDER BY l.position
"""


# Computed from the course's rows, now.
LESSON_STATS = lesson_stats_of(LESSON_AGGREGATES)


# The course row of a summary, with whether it is fresh enough to serve ($2: max age) and
# whether this is the first request since it was computed (to be recorded: the refresher
# recomputes only courses asked for since their summary).
SUMMARY_HEADER = """
SELECT computed_at, row_count,
       computed_at >= now() - make_interval(secs => $2::float8) AS fresh,
       requested_at <= computed_at AS renew_demand
FROM lesson_stats_courses WHERE course_id = $1::uuid
"""

# The outline's figures from the summary computed at $2.
SUMMARY_STATS = lesson_stats_of("""
    SELECT * FROM lesson_stats_summary
    WHERE course_id = $1::uuid AND computed_at = $2::timestamptz
""")

# A large course was asked for (the first time since its summary was computed, or with no
# summary fresh enough): the refresher recomputes it once it is due. A new course row has
# no summary yet ('-infinity'); its row count is the live result's.
REGISTER_DEMAND = """
INSERT INTO lesson_stats_courses AS c (course_id, computed_at, row_count, requested_at)
VALUES ($1::uuid, '-infinity', $2::bigint, now())
ON CONFLICT (course_id) DO UPDATE
SET requested_at = EXCLUDED.requested_at,
    row_count = GREATEST(c.row_count, EXCLUDED.row_count)
"""

# Courses whose summary should be recomputed: asked for since it was computed, older than
# $1 s, still large ($2 rows), and not leased to another replica.
DUE_COURSES = """
SELECT course_id::text FROM lesson_stats_courses
WHERE requested_at > computed_at
  AND computed_at < now() - make_interval(secs => $1::float8)
  AND row_count >= $2::bigint
  AND (refreshing_until IS NULL OR refreshing_until < now())
ORDER BY computed_at
LIMIT 16
"""

# Takes the lease on one course for $2 seconds, unless another replica holds it or has
# just recomputed it ($3: the age below which there is nothing to do).
CLAIM = """
UPDATE lesson_stats_courses
SET refreshing_until = now() + make_interval(secs => $2::float8)
WHERE course_id = $1::uuid
  AND (refreshing_until IS NULL OR refreshing_until < now())
  AND computed_at < now() - make_interval(secs => $3::float8)
RETURNING course_id
"""

SNAPSHOT_TIME = "SELECT now()"

# One lesson's figures ($3 on) of the computation at $2, unless a newer computation is stored.
SAVE_LESSON = """
INSERT INTO lesson_stats_summary AS s (
    course_id, lesson_id, computed_at, started_count, completed_count, avg_attempts,
    avg_time_spent_seconds, p50_time_spent_seconds, p90_time_spent_seconds, scored_count,
    avg_score, min_score, max_score, score_histogram)
VALUES ($1::uuid, $3, $2, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
ON CONFLICT (course_id, lesson_id) DO UPDATE
SET computed_at = EXCLUDED.computed_at,
    started_count = EXCLUDED.started_count,
    completed_count = EXCLUDED.completed_count,
    avg_attempts = EXCLUDED.avg_attempts,
    avg_time_spent_seconds = EXCLUDED.avg_time_spent_seconds,
    p50_time_spent_seconds = EXCLUDED.p50_time_spent_seconds,
    p90_time_spent_seconds = EXCLUDED.p90_time_spent_seconds,
    scored_count = EXCLUDED.scored_count,
    avg_score = EXCLUDED.avg_score,
    min_score = EXCLUDED.min_score,
    max_score = EXCLUDED.max_score,
    score_histogram = EXCLUDED.score_histogram
WHERE s.computed_at < EXCLUDED.computed_at
"""

# The course row of the computation at $2 (releasing the lease), unless a newer one is
# stored; then the lessons the computation found no row for.
SAVE_COURSE = """
INSERT INTO lesson_stats_courses AS c (course_id, computed_at, row_count, requested_at)
VALUES ($1::uuid, $2, $3, $2)
ON CONFLICT (course_id) DO UPDATE
SET computed_at = EXCLUDED.computed_at,
    row_count = EXCLUDED.row_count,
    refreshing_until = NULL
WHERE c.computed_at < EXCLUDED.computed_at
"""
DROP_OLDER_LESSONS = """
DELETE FROM lesson_stats_summary WHERE course_id = $1::uuid AND computed_at < $2
"""

_SAVED_COLUMNS = (
    "lesson_id", "started_count", "completed_count", "avg_attempts",
    "avg_time_spent_seconds", "p50_time_spent_seconds", "p90_time_spent_seconds",
    "scored_count", "avg_score", "min_score", "max_score", "score_histogram",
)  # fmt: skip


@dataclass(frozen=True)
class SummaryPolicy:
    """Which courses are summarised, and how fresh their summaries are kept."""

    min_rows: int = 50_000
    """Courses with at least this many learner-lessons are served from a summary (a
    course of 50,000 rows is computed live in about 40 ms on a small machine)."""
    max_age: float = 30.0
    """Seconds: a summary older than this is never served (the live figures are)."""
    refresh_after: float = 15.0
    """Seconds: the refresher recomputes a summary once it is this old, if the course
    was asked for since it was computed."""
    poll_seconds: float = 1.0
    """How often the refresher looks for due summaries."""
    lease_seconds: float = 120.0
    """How long one replica's claim on a recomputation keeps the others off it."""


class LessonStatsSummaries:
    """Serves StreamLessonStats from the summary when it may; keeps the summaries fresh."""

    def __init__(self, database: Database, policy: SummaryPolicy | None = None) -> None:
        self.database = database
        self.policy = policy or SummaryPolicy()
        self.recomputed = 0
        """Recomputations this instance made (for tests and logs)."""

    async def lesson_stats(self, course_id: str) -> tuple[list[Record], bool]:
        """The outline's figures, and whether they came from the summary."""
        policy = self.policy
        async with self.database.read_snapshot() as connection:
            await ensure_course(connection, course_id)
            header = await connection.fetchrow(SUMMARY_HEADER, course_id, policy.max_age)
            if header is not None and header["fresh"] and header["row_count"] >= policy.min_rows:
                rows = await connection.fetch(SUMMARY_STATS, course_id, header["computed_at"])
                summarised, register = True, bool(header["renew_demand"])
            else:
                rows = await connection.fetch(LESSON_STATS, course_id)
                count = sum(int(row["started_count"]) for row in rows)
                summarised, register = False, count >= policy.min_rows
        if register:
            count = sum(int(row["started_count"]) for row in rows)
            await self.database.run(lambda c: c.execute(REGISTER_DEMAND, course_id, count))
        return rows, summarised

    async def refresh_due(self) -> int:
        """Recomputes the summaries that are due and not leased elsewhere; returns how many."""
        policy = self.policy
        args = (policy.refresh_after, policy.min_rows)
        due: Sequence[Record] = await self.database.run(lambda c: c.fetch(DUE_COURSES, *args))
        done = 0
        for row in due:
            course_id = row["course_id"]
            if await self._claim(course_id):
                await self.recompute(course_id)
                done += 1
        return done

    async def _claim(self, course_id: str) -> bool:
        """Takes the lease on recomputing ``course_id``, if nobody holds it."""
        policy = self.policy

        async def claim(connection: Connection) -> object:
            return await connection.fetchval(
                CLAIM, course_id, policy.lease_seconds, policy.refresh_after
            )

        return await self.database.run(claim) is not None

    async def recompute(self, course_id: str) -> None:
        """Computes the course's figures in one snapshot and stores them."""
        async with self.database.read_snapshot() as connection:
            computed_at = await connection.fetchval(SNAPSHOT_TIME)
            rows = await connection.fetch(LESSON_AGGREGATES, course_id)
        count = sum(int(row["started_count"]) for row in rows)

        async def save(connection: Connection) -> None:
            async with atomically(connection):
                await connection.executemany(
                    SAVE_LESSON,
                    [(course_id, computed_at, *(row[c] for c in _SAVED_COLUMNS)) for row in rows],
                )
                await connection.execute(SAVE_COURSE, course_id, computed_at, count)
                await connection.execute(DROP_OLDER_LESSONS, course_id, computed_at)

        await self.database.run(save)
        self.recomputed += 1

    async def refresh_forever(self) -> None:
        """The server's background task: recomputes due summaries every ``poll_seconds``."""
        while True:
            try:
                await self.refresh_due()
            except Exception:
                log.exception("refreshing lesson statistics failed; will try again")
            await asyncio.sleep(self.policy.poll_seconds)
