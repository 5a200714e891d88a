"""SQL for the per-course reports, read through server-side cursors.

Each report runs in one read-only REPEATABLE READ transaction (one consistent snapshot)
and is fetched ``prefetch`` rows at a time, so a stream holds a bounded window of rows;
when the caller stops reading, the consumer stops pulling and the query waits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from lesson_progress.store.checks import ensure_course
from lesson_progress.store.database import Database, Record
from lesson_progress.store.progress import LEARNER_AGGREGATES

_BUCKETS = ",\n".join(
    f"        count(*) FILTER (WHERE score >= {low} AND score < {low + 10})"
    if low < 90
    else "        count(*) FILTER (WHERE score >= 90)"
    for low in range(0, 100, 10)
)

# All rows of one course come from lesson_progress_course_user_idx; lessons without any
# row stream zeros. Unscored rows are left out of the score figures (count/avg/min/max
# ignore NULL). Percentiles interpolate (percentile_cont) over the completers' times.
LESSON_STATS = f"""
WITH stats AS (
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
)
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

# The design note's "difficult lessons", over completed rows of the current outline, with
# an inclusive minimum; ties on the exact (numeric) average are broken by lesson_id.
DIFFICULT_LESSONS = """
SELECT p.lesson_id,
       avg(p.attempts)::float8 AS avg_attempts,
       avg(p.time_spent_seconds)::float8 AS avg_time_spent_seconds,
       count(*) AS completion_count
FROM lesson_progress p
JOIN lessons l ON l.course_id = p.course_id AND l.lesson_id = p.lesson_id
WHERE p.course_id = $1::uuid AND p.completed AND l.position IS NOT NULL
GROUP BY p.lesson_id
HAVING count(*) >= $2::integer
ORDER BY avg(p.attempts) DESC, p.lesson_id
"""

# One row per learner in user_id order. lesson_progress_course_user_idx delivers the rows
# already grouped and ordered by learner, so the aggregate streams without a sort, and the
# outline is read once per learner from a small CTE.
COURSE_LEARNERS = f"""
WITH outline AS MATERIALIZED (
    SELECT lesson_id, position FROM lessons
    WHERE course_id = $1::uuid AND position IS NOT NULL
),
learners AS (
    SELECT user_id, {LEARNER_AGGREGATES}
    FROM lesson_progress
    WHERE course_id = $1::uuid
    GROUP BY user_id
)
SELECT l.user_id::text AS user_id, l.total_time_spent_seconds, l.started_at,
       l.last_accessed_at, l.last_lesson_id, l.last_lesson_bookmark, cp.completed_at,
       ARRAY(
           SELECT o.lesson_id FROM outline o
           WHERE cp.completed_lessons ? o.lesson_id ORDER BY o.position
       ) AS completed_lesson_ids,
       (SELECT count(*) FROM outline) AS total_lessons
FROM learners l
LEFT JOIN course_progress cp ON cp.user_id = l.user_id AND cp.course_id = $1::uuid
ORDER BY l.user_id
"""


class AnalyticsStore:
    """Streams the per-course reports."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def _stream(
        self, query: str, course_id: str, *args: object, prefetch: int = 1000
    ) -> AsyncIterator[Record]:
        """Rows of ``query`` for a registered course, one snapshot, ``prefetch`` at a time."""
        async with self.database.read_snapshot() as connection:
            await ensure_course(connection, course_id)
            async for row in connection.cursor(query, course_id, *args, prefetch=prefetch):
                yield row

    def lesson_stats(self, course_id: str) -> AsyncIterator[Record]:
        """One row per lesson of the outline, in outline order."""
        return self._stream(LESSON_STATS, course_id, prefetch=100)

    def difficult_lessons(self, course_id: str, min_completions: int) -> AsyncIterator[Record]:
        """Lessons with at least ``min_completions`` completions, hardest first."""
        return self._stream(DIFFICULT_LESSONS, course_id, min_completions, prefetch=100)

    def course_learners(self, course_id: str, prefetch: int) -> AsyncIterator[Record]:
        """One row per learner with progress in the course, in user_id order."""
        return self._stream(COURSE_LEARNERS, course_id, prefetch=prefetch)
