"""SQL for the per-course reports, read through server-side cursors.

Each report runs in one read-only REPEATABLE READ transaction (one consistent snapshot)
and is fetched ``prefetch`` rows at a time, so a stream holds a bounded window of rows;
when the caller stops reading, the consumer stops pulling and the query waits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from lesson_progress.store.checks import ensure_course
from lesson_progress.store.database import Database, Record
from lesson_progress.store.lesson_stats import LESSON_STATS, LessonStatsSummaries
from lesson_progress.store.progress import LEARNER_AGGREGATES, outline_ctes, outline_walk

__all__ = ["COURSE_LEARNERS", "DIFFICULT_LESSONS", "LESSON_STATS", "AnalyticsStore"]

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
# already grouped and ordered by learner, so the aggregate streams without a sort; the
# outline and its pass marks are read once, and each learner's completed list is walked
# over the outline once (completed lessons and the next lesson in the same pass).
COURSE_LEARNERS = f"""
WITH {outline_ctes("$1::uuid")},
learners AS (
    SELECT user_id, {LEARNER_AGGREGATES}
    FROM lesson_progress
    WHERE course_id = $1::uuid
    GROUP BY user_id
)
SELECT l.user_id::text AS user_id, l.total_time_spent_seconds, l.started_at,
       l.last_accessed_at, l.last_lesson_id, l.last_lesson_bookmark, cp.completed_at,
       w.completed_lesson_ids, w.next_lesson_id,
       COALESCE(l.review_lesson_ids, '{{}}') AS review_lesson_ids,
       (SELECT count(*) FROM outline) AS total_lessons
FROM learners l
LEFT JOIN course_progress cp ON cp.user_id = l.user_id AND cp.course_id = $1::uuid
CROSS JOIN LATERAL ({outline_walk("cp.completed_lessons")}) w
ORDER BY l.user_id
"""


# Most rows a stream's cursor holds at once, whatever page size the caller asks for: what a
# reader that stops reading keeps in the server's memory.
MAX_PREFETCH = 1000


class AnalyticsStore:
    """Streams the per-course reports."""

    def __init__(self, database: Database, summaries: LessonStatsSummaries | None = None) -> None:
        self.database = database
        self.summaries = summaries or LessonStatsSummaries(database)

    async def _stream(
        self, query: str, course_id: str, *args: object, prefetch: int = 1000
    ) -> AsyncIterator[Record]:
        """Rows of ``query`` for a registered course, one snapshot, ``prefetch`` at a time."""
        async with self.database.read_snapshot() as connection:
            await ensure_course(connection, course_id)
            cursor = connection.cursor(
                query, course_id, *args, prefetch=min(prefetch, MAX_PREFETCH)
            )
            async for row in cursor:
                yield row

    async def lesson_stats(self, course_id: str) -> AsyncIterator[Record]:
        """One row per lesson of the outline, in outline order: from the summary for a
        large course (lesson_stats.py), else computed now. At most one row per lesson, so
        the rows are read whole before the first is sent."""
        rows, _ = await self.summaries.lesson_stats(course_id)
        for row in rows:
            yield row

    def difficult_lessons(self, course_id: str, min_completions: int) -> AsyncIterator[Record]:
        """Lessons with at least ``min_completions`` completions, hardest first."""
        return self._stream(DIFFICULT_LESSONS, course_id, min_completions, prefetch=100)

    def course_learners(self, course_id: str, prefetch: int) -> AsyncIterator[Record]:
        """One row per learner with progress in the course, in user_id order."""
        return self._stream(COURSE_LEARNERS, course_id, prefetch=prefetch)
