"""SQL for one learner's progress: starts, attempts, completions, bookmarks, reads, erasure.
(Heartbeats have their own module, ``heartbeats.py``.)

Each write is one statement: a writable CTE checks the lesson is in its course's current
outline, claims the request id (if any), upserts the lesson row and, on completion, the
course row and the outbox events, so that PostgreSQL sees one round trip and one commit
per RPC. Only when that statement returns no row does a second query find out why
(unknown lesson, replayed request, nothing to change: ``checks.explain_empty_write``).

Updates stamp ``last_accessed_at`` with clock_timestamp(), read after the row lock is
taken, so that it never moves backwards when concurrent writes commit out of start order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lesson_progress import errors
from lesson_progress.store.checks import (
    GET_LESSON_PROGRESS,
    LESSON_CTE,
    PROGRESS_COLUMNS,
    PURGE_REQUEST_IDS,
    claim_cte,
    ensure_course,
    ensure_lesson,
    explain_empty_write,
    in_outline,
)
from lesson_progress.store.database import Connection, Database, Record
from lesson_progress.store.events import EventKind, EventNotifier, outbox_ctes

# Adds a newly completed lesson to the learner's course row, in the same statement as the
# lesson row. The `?` guard keeps the list free of duplicates however many completions race
# (ON CONFLICT DO UPDATE locks the row and re-evaluates against its latest version), and the
# course's completion time is set when the list first covers the whole outline.
_SYNC_COURSE_CTE = """
course AS (
    INSERT INTO course_progress AS cp (user_id, course_id, completed_lessons, completed_at)
    SELECT p.user_id, p.course_id, jsonb_build_array(p.lesson_id),
           CASE WHEN NOT EXISTS (
               SELECT FROM lessons l
               WHERE l.course_id = p.course_id AND l.position IS NOT NULL
                 AND l.lesson_id <> p.lesson_id
           ) THEN now() END
    FROM progress p WHERE p.completed
    ON CONFLICT (user_id, course_id) DO UPDATE
    SET completed_lessons = cp.completed_lessons || EXCLUDED.completed_lessons,
        completed_at = COALESCE(cp.completed_at, CASE WHEN NOT EXISTS (
            SELECT FROM lessons l
            WHERE l.course_id = cp.course_id AND l.position IS NOT NULL
              AND NOT (cp.completed_lessons || EXCLUDED.completed_lessons) ? l.lesson_id
        ) THEN now() END)
    WHERE NOT cp.completed_lessons ? $3::varchar
    RETURNING cp.completed_at
)"""


# COMPLETED when this statement completed the lesson, COURSE_COMPLETED when it completed the
# course (both set their completion time to this transaction's now()).
_COMPLETION_KINDS = f"""
    SELECT {EventKind.COMPLETED} FROM progress WHERE completed_at = now()
    UNION ALL SELECT {EventKind.COURSE_COMPLETED} FROM course WHERE completed_at = now()
"""

START_LESSON = f"""
WITH {LESSON_CTE},
progress AS (
    INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id)
    SELECT $1::uuid, $2::uuid, $3::varchar FROM lesson
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE SET last_accessed_at = clock_timestamp()
    RETURNING {PROGRESS_COLUMNS}
),
{outbox_ctes("progress", f"VALUES ({EventKind.STARTED})")}
SELECT * FROM progress
"""

SAVE_BOOKMARK = f"""
WITH {LESSON_CTE},
progress AS (
    INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id, bookmark, bookmarked_at)
    SELECT $1::uuid, $2::uuid, $3::varchar, $4::text,
           CASE WHEN $4::text IS NOT NULL THEN now() END
    FROM lesson
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET bookmark = EXCLUDED.bookmark, bookmarked_at = EXCLUDED.bookmarked_at,
        last_accessed_at = clock_timestamp()
    RETURNING {PROGRESS_COLUMNS}
),
{outbox_ctes("progress", f"VALUES ({EventKind.BOOKMARKED})")}
SELECT * FROM progress
"""

RECORD_ATTEMPT = f"""
WITH {LESSON_CTE}, {claim_cte("RecordAttempt")},
outcome AS (
    SELECT COALESCE($4::integer >= passing_score, false) AS passed FROM proceed
),
progress AS (
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, attempts, score, completed, completed_at)
    SELECT $1::uuid, $2::uuid, $3::varchar, 1, $4::integer, passed,
           CASE WHEN passed THEN now() END
    FROM outcome
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET attempts = lp.attempts + 1,
        score = GREATEST(lp.score, EXCLUDED.score),
        completed = lp.completed OR EXCLUDED.completed,
        completed_at = COALESCE(lp.completed_at, EXCLUDED.completed_at),
        last_accessed_at = clock_timestamp()
    RETURNING {PROGRESS_COLUMNS}
),
-- clock_timestamp(), not now(): taken after the row lock, so attempt times follow attempt
-- numbers even when concurrent attempts started in another order.
history AS (
    INSERT INTO lesson_attempts
        (user_id, course_id, lesson_id, attempt_number, score, request_id, attempted_at)
    SELECT user_id, course_id, lesson_id, attempts, $4::integer, $5::uuid, clock_timestamp()
    FROM progress
),
{_SYNC_COURSE_CTE},
{outbox_ctes("progress", f"SELECT {EventKind.ATTEMPTED} UNION ALL {_COMPLETION_KINDS}")}
SELECT progress.*, outcome.passed FROM progress, outcome
"""

# A repeated completion updates nothing (the WHERE of DO UPDATE), unless its score is better.
COMPLETE_LESSON = f"""
WITH {LESSON_CTE}, {claim_cte("CompleteLesson")},
progress AS (
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, completed, completed_at, score)
    SELECT $1::uuid, $2::uuid, $3::varchar, true, now(), $4::integer FROM proceed
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET completed = true,
        completed_at = COALESCE(lp.completed_at, now()),
        score = GREATEST(lp.score, EXCLUDED.score),
        last_accessed_at = clock_timestamp()
    WHERE NOT lp.completed OR GREATEST(lp.score, EXCLUDED.score) IS DISTINCT FROM lp.score
    RETURNING {PROGRESS_COLUMNS}
),
{_SYNC_COURSE_CTE},
{outbox_ctes("progress", _COMPLETION_KINDS)}
SELECT * FROM progress
"""

# Keyset paging over (first_started_at, lesson_id); the primary key's (user_id, course_id)
# prefix finds the learner's rows, at most one per lesson of the course.
LIST_LESSON_PROGRESS = """
SELECT p.user_id, p.course_id, p.lesson_id, p.completed, p.time_spent_seconds, p.attempts,
       p.score, p.first_started_at, p.last_accessed_at, p.completed_at, p.created_at,
       p.updated_at, p.bookmark, p.bookmarked_at
FROM lesson_progress p
JOIN lessons l ON l.course_id = p.course_id AND l.lesson_id = p.lesson_id
WHERE p.user_id = $1::uuid AND p.course_id = $2::uuid AND l.position IS NOT NULL
  AND (NOT $3::boolean OR p.completed)
  AND ($4::timestamptz IS NULL OR (p.first_started_at, p.lesson_id) > ($4, $5::varchar))
ORDER BY p.first_started_at, p.lesson_id
LIMIT $6
"""

# One learner's figures over their lesson rows of a course (GetCourseProgress, and per
# learner in StreamCourseLearners). The resume point is the most recently touched lesson.
LEARNER_AGGREGATES = """
    sum(time_spent_seconds) AS total_time_spent_seconds,
    min(first_started_at) AS started_at,
    max(last_accessed_at) AS last_accessed_at,
    (array_agg(lesson_id ORDER BY last_accessed_at DESC, lesson_id))[1] AS last_lesson_id,
    (array_agg(bookmark ORDER BY last_accessed_at DESC, lesson_id))[1] AS last_lesson_bookmark
"""

# Course progress against the current outline. Time, start and last access come from the
# lesson rows (at most one per lesson), so heartbeats never have to touch the course row.
GET_COURSE_PROGRESS = f"""
WITH outline AS (
    SELECT lesson_id, position FROM lessons
    WHERE course_id = $2::uuid AND position IS NOT NULL
),
course_row AS (
    SELECT completed_lessons, completed_at FROM course_progress
    WHERE user_id = $1::uuid AND course_id = $2::uuid
),
lesson_rows AS (
    SELECT {LEARNER_AGGREGATES}
    FROM lesson_progress WHERE user_id = $1::uuid AND course_id = $2::uuid
),
done AS (
    SELECT array_agg(o.lesson_id ORDER BY o.position) AS ids
    FROM outline o, course_row c WHERE c.completed_lessons ? o.lesson_id
)
SELECT EXISTS (SELECT FROM courses WHERE course_id = $2::uuid) AS course_exists,
       COALESCE(done.ids, '{{}}') AS completed_lesson_ids,
       (SELECT count(*) FROM outline) AS total_lessons,
       COALESCE(lesson_rows.total_time_spent_seconds, 0) AS total_time_spent_seconds,
       lesson_rows.started_at, lesson_rows.last_accessed_at, lesson_rows.last_lesson_id,
       lesson_rows.last_lesson_bookmark,
       (SELECT completed_at FROM course_row) AS completed_at
FROM lesson_rows, done
"""

# Everything held about a learner; attempts go with their lesson rows (ON DELETE CASCADE).
DELETE_USER_PROGRESS = """
WITH courses_gone AS (DELETE FROM course_progress WHERE user_id = $1::uuid),
     requests_gone AS (DELETE FROM processed_requests WHERE user_id = $1::uuid),
     events_gone AS (DELETE FROM progress_events WHERE user_id = $1::uuid),
     lessons_gone AS (DELETE FROM lesson_progress WHERE user_id = $1::uuid RETURNING 1)
SELECT count(*) FROM lessons_gone
"""

LIST_ATTEMPTS = f"""
SELECT attempt_number, score, attempted_at, request_id FROM lesson_attempts
WHERE user_id = $1::uuid AND course_id = $2::uuid AND lesson_id = $3::varchar
  AND attempt_number > $4::integer
  AND {in_outline("$2::uuid", "$3::varchar")}
ORDER BY attempt_number
LIMIT $5
"""

# Whether the attempt recorded under a request id reached the lesson's passing score.
REPLAYED_ATTEMPT_PASSED = """
SELECT COALESCE(a.score >= l.passing_score, false)
FROM lesson_attempts a JOIN lessons l USING (course_id, lesson_id)
WHERE a.user_id = $1::uuid AND a.course_id = $2::uuid AND a.lesson_id = $3::varchar
  AND a.request_id = $4::uuid
"""


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where the next page of ListLessonProgress starts (exclusive)."""

    first_started_at: datetime
    lesson_id: str


@dataclass(frozen=True, slots=True)
class Written:
    """What a single-statement write gave: the lesson row, and whether the statement itself
    wrote it (False: a replayed request id or nothing to change; ``row`` is then the
    current row, without the statement's extra columns)."""

    row: Record
    fresh: bool


class ProgressStore:
    """Reads and writes learners' progress."""

    def __init__(self, database: Database, notifier: EventNotifier) -> None:
        self.database = database
        self.notifier = notifier

    async def _write(
        self,
        statement: str,
        method: str,
        user_id: str,
        course_id: str,
        lesson_id: str,
        *args: object,
        request_id: str | None = None,
        with_request_id: bool = True,
    ) -> Written:
        """Runs a single-statement write; explains an empty result with a second query."""
        params = (user_id, course_id, lesson_id, *args)
        if with_request_id:
            params = (*params, request_id)

        async def work(connection: Connection) -> Written:
            row = await connection.fetchrow(statement, *params)
            if row is not None:
                return Written(row, fresh=True)
            current = await explain_empty_write(
                connection, method, user_id, course_id, lesson_id, request_id
            )
            return Written(current, fresh=False)

        written = await self.database.run(work)
        self.notifier.changed(course_id)
        return written

    async def start_lesson(self, user_id: str, course_id: str, lesson_id: str) -> Record:
        """Creates the lesson row or moves its last access time."""
        written = await self._write(
            START_LESSON, "StartLesson", user_id, course_id, lesson_id, with_request_id=False
        )
        return written.row

    async def record_attempt(
        self, user_id: str, course_id: str, lesson_id: str, score: int, request_id: str | None
    ) -> tuple[Record, bool]:
        """Records a scored attempt; returns the lesson row and whether the attempt passed."""
        written = await self._write(
            RECORD_ATTEMPT, "RecordAttempt", user_id, course_id, lesson_id, score,
            request_id=request_id,
        )  # fmt: skip
        if written.fresh:
            return written.row, bool(written.row["passed"])
        # A replayed request: answer as the original call did.
        passed = await self.database.run(
            lambda c: c.fetchval(REPLAYED_ATTEMPT_PASSED, user_id, course_id, lesson_id, request_id)
        )
        return written.row, bool(passed)

    async def complete_lesson(
        self,
        user_id: str,
        course_id: str,
        lesson_id: str,
        score: int | None,
        request_id: str | None,
    ) -> tuple[Record, Record]:
        """Completes a lesson; returns the lesson row and the course progress after it."""
        written = await self._write(
            COMPLETE_LESSON, "CompleteLesson", user_id, course_id, lesson_id, score,
            request_id=request_id,
        )  # fmt: skip
        course = await self.get_course_progress(user_id, course_id)
        return written.row, course

    async def save_bookmark(
        self, user_id: str, course_id: str, lesson_id: str, position: str | None
    ) -> Record:
        """Saves (or, with None, clears) the lesson's bookmark."""
        written = await self._write(
            SAVE_BOOKMARK, "SaveBookmark", user_id, course_id, lesson_id, position,
            with_request_id=False,
        )  # fmt: skip
        return written.row

    async def list_attempts(
        self, user_id: str, course_id: str, lesson_id: str, *, after: int, limit: int
    ) -> list[Record]:
        """Up to ``limit`` attempts numbered above ``after``, oldest first."""

        async def work(connection: Connection) -> list[Record]:
            rows = await connection.fetch(
                LIST_ATTEMPTS, user_id, course_id, lesson_id, after, limit
            )
            if not rows:
                await ensure_lesson(connection, course_id, lesson_id)
            return rows

        return await self.database.run(work)

    async def get_lesson_progress(self, user_id: str, course_id: str, lesson_id: str) -> Record:
        """One lesson row of the current outline."""

        async def work(connection: Connection) -> Record:
            row = await connection.fetchrow(GET_LESSON_PROGRESS, user_id, course_id, lesson_id)
            if row is not None:
                return row
            await ensure_lesson(connection, course_id, lesson_id)
            raise errors.NotFound(
                f"user {user_id} has no progress in lesson {lesson_id!r} of course {course_id}",
                reason="PROGRESS_NOT_FOUND",
            )

        return await self.database.run(work)

    async def list_lesson_progress(
        self,
        user_id: str,
        course_id: str,
        *,
        completed_only: bool,
        after: PageCursor | None,
        limit: int,
    ) -> list[Record]:
        """Up to ``limit`` lesson rows after ``after``, in (first_started_at, lesson_id) order."""

        async def work(connection: Connection) -> list[Record]:
            rows = await connection.fetch(
                LIST_LESSON_PROGRESS,
                user_id,
                course_id,
                completed_only,
                after.first_started_at if after else None,
                after.lesson_id if after else None,
                limit,
            )
            if not rows:
                await ensure_course(connection, course_id)
            return rows

        return await self.database.run(work)

    async def get_course_progress(self, user_id: str, course_id: str) -> Record:
        """The learner's progress in a course, against its current outline."""

        async def work(connection: Connection) -> Record:
            row = await connection.fetchrow(GET_COURSE_PROGRESS, user_id, course_id)
            assert row is not None
            if not row["course_exists"]:
                raise errors.NotFound.course(course_id)
            return row

        return await self.database.run(work)

    async def delete_user_progress(self, user_id: str) -> int:
        """Erases everything held about a learner; returns the lesson rows deleted."""

        async def work(connection: Connection) -> int:
            return int(await connection.fetchval(DELETE_USER_PROGRESS, user_id))

        return await self.database.run(work)

    async def purge_request_ids(self, older_than_seconds: float, *, batch: int = 10_000) -> int:
        """Forgets request ids older than the retention window; returns how many."""
        return await self.database.delete_in_slices(
            PURGE_REQUEST_IDS, older_than_seconds, batch=batch
        )
