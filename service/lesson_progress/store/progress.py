"""SQL for one learner's progress: lesson rows, course rows, attempts, request ids.

Each write is one statement: a writable CTE checks the lesson is in its course's current
outline, claims the request id (if any), upserts the lesson row and, on completion, the
course row and the outbox events, so that PostgreSQL sees one round trip and one commit
per RPC (fewer for heartbeats, which the HeartbeatWriter merges). Only when that statement
returns no row does a second query find out why (unknown lesson, replayed request,
nothing to change).

Updates stamp ``last_accessed_at`` with clock_timestamp(), read after the row lock is
taken, so that it never moves backwards when concurrent writes commit out of start order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lesson_progress import errors
from lesson_progress.store.database import Connection, Database, Record
from lesson_progress.store.events import (
    EVENT_COLUMNS,
    EVENT_LOCK_NAMESPACE,
    EventKind,
    EventNotifier,
)
from lesson_progress.store.heartbeats import HeartbeatWriter

PROGRESS_COLUMNS = """
    user_id, course_id, lesson_id, completed, time_spent_seconds, attempts, score,
    first_started_at, last_accessed_at, completed_at, created_at, updated_at, bookmark,
    bookmarked_at
"""

# The lesson, if it is in its course's current outline.
_LESSON_CTE = """
lesson AS (
    SELECT passing_score FROM lessons
    WHERE course_id = $2::uuid AND lesson_id = $3::varchar AND position IS NOT NULL
)"""

# Remembers the request id; yields a row only the first time it is seen for this learner.
# {method} is a constant of this module, never a value from a request.
_CLAIM_CTE = """
claimed AS (
    INSERT INTO processed_requests (user_id, request_id, method, course_id, lesson_id)
    SELECT $1::uuid, $5::uuid, '{method}', $2::uuid, $3::varchar FROM lesson
    WHERE $5::uuid IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING true
),
proceed AS (
    SELECT passing_score FROM lesson
    WHERE $5::uuid IS NULL OR EXISTS (SELECT FROM claimed)
)"""

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


def _events_cte(kinds: str) -> str:
    """CTEs that append events for the row of ``progress`` to the outbox, one per kind
    yielded by the SQL ``kinds`` (the caller then tells the EventNotifier).

    The per-course advisory lock is taken before event ids are drawn and held until commit,
    so that a course's events become visible in id order (see migration 0002). "Newly
    completed" is recognised by a completion time equal to this transaction's now().
    """
    return f"""
course_lock AS MATERIALIZED (
    SELECT pg_advisory_xact_lock({EVENT_LOCK_NAMESPACE}, hashtext(course_id::text))
    FROM progress
),
events AS (
    INSERT INTO progress_events ({EVENT_COLUMNS})
    SELECT p.course_id, p.user_id, k.kind, p.lesson_id, p.completed, p.time_spent_seconds,
           p.attempts, p.score, p.first_started_at, p.last_accessed_at, p.completed_at,
           p.created_at, p.updated_at, p.bookmark, p.bookmarked_at
    FROM progress p CROSS JOIN ({kinds}) AS k(kind)
    WHERE EXISTS (SELECT FROM course_lock)
    ORDER BY k.kind
)"""


# COMPLETED when this statement completed the lesson, COURSE_COMPLETED when it completed the
# course (both set their completion time to this transaction's now()).
_COMPLETION_KINDS = f"""
    SELECT {EventKind.COMPLETED} FROM progress WHERE completed_at = now()
    UNION ALL SELECT {EventKind.COURSE_COMPLETED} FROM course WHERE completed_at = now()
"""

START_LESSON = f"""
WITH {_LESSON_CTE},
progress AS (
    INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id)
    SELECT $1::uuid, $2::uuid, $3::varchar FROM lesson
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE SET last_accessed_at = clock_timestamp()
    RETURNING {PROGRESS_COLUMNS}
),
{_events_cte(f"VALUES ({EventKind.STARTED})")}
SELECT * FROM progress
"""

SAVE_BOOKMARK = f"""
WITH {_LESSON_CTE},
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
{_events_cte(f"VALUES ({EventKind.BOOKMARKED})")}
SELECT * FROM progress
"""

RECORD_TIME = f"""
WITH {_LESSON_CTE}, {_CLAIM_CTE.format(method="RecordTime")}
INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id, time_spent_seconds)
SELECT $1::uuid, $2::uuid, $3::varchar, $4::integer FROM proceed
ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
    last_accessed_at = clock_timestamp()
RETURNING {PROGRESS_COLUMNS}
"""

RECORD_ATTEMPT = f"""
WITH {_LESSON_CTE}, {_CLAIM_CTE.format(method="RecordAttempt")},
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
{_events_cte(f"SELECT {EventKind.ATTEMPTED} UNION ALL {_COMPLETION_KINDS}")}
SELECT progress.*, outcome.passed FROM progress, outcome
"""

# A repeated completion updates nothing (the WHERE of DO UPDATE), unless its score is better.
COMPLETE_LESSON = f"""
WITH {_LESSON_CTE}, {_CLAIM_CTE.format(method="CompleteLesson")},
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
{_events_cte(_COMPLETION_KINDS)}
SELECT * FROM progress
"""

# Heartbeats of a batch, summed per lesson, in one statement. Entries are numbered by
# their place in the request; a request id counts for its first entry only. Rows are
# upserted in key order so that concurrent batches lock them in the same order and cannot
# deadlock. {valid} decides what an entry naming a lesson outside its outline, or reusing
# a request id of another call, does to the others: all-or-nothing for BatchRecordTime,
# nothing for independent heartbeats merged by the HeartbeatWriter.
_HEARTBEATS = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::varchar[], $4::integer[], $5::uuid[])
        WITH ORDINALITY AS t(user_id, course_id, lesson_id, seconds, request_id, idx)
),
missing AS (
    SELECT i.idx FROM input i
    WHERE NOT EXISTS (
        SELECT FROM lessons l
        WHERE l.course_id = i.course_id AND l.lesson_id = i.lesson_id
          AND l.position IS NOT NULL
    )
),
reused AS (
    SELECT i.idx FROM input i
    JOIN processed_requests r ON r.user_id = i.user_id AND r.request_id = i.request_id
    WHERE (r.method, r.course_id, r.lesson_id)
          IS DISTINCT FROM ('RecordTime', i.course_id, i.lesson_id)
),
valid AS (
    SELECT i.* FROM input i WHERE {{valid}}
),
first_use AS (
    SELECT DISTINCT ON (user_id, request_id) idx, user_id, request_id, course_id, lesson_id
    FROM valid WHERE request_id IS NOT NULL
    ORDER BY user_id, request_id, idx
),
claimed AS (
    INSERT INTO processed_requests (user_id, request_id, method, course_id, lesson_id)
    SELECT user_id, request_id, 'RecordTime', course_id, lesson_id FROM first_use
    ORDER BY user_id, request_id
    ON CONFLICT DO NOTHING
    RETURNING user_id, request_id
),
accepted AS (
    SELECT v.user_id, v.course_id, v.lesson_id, v.seconds FROM valid v
    WHERE v.request_id IS NULL
       OR v.idx IN (SELECT f.idx FROM first_use f JOIN claimed c USING (user_id, request_id))
),
summed AS (
    SELECT user_id, course_id, lesson_id, sum(seconds) AS seconds FROM accepted
    GROUP BY user_id, course_id, lesson_id
),
upserted AS (
    INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id, time_spent_seconds)
    SELECT user_id, course_id, lesson_id, seconds FROM summed
    ORDER BY user_id, course_id, lesson_id
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
        last_accessed_at = clock_timestamp()
    RETURNING {PROGRESS_COLUMNS}
),
result AS (
    SELECT * FROM upserted
    UNION ALL
    SELECT {PROGRESS_COLUMNS} FROM lesson_progress p
    WHERE (p.user_id, p.course_id, p.lesson_id) IN (
        SELECT user_id, course_id, lesson_id FROM valid
        EXCEPT SELECT user_id, course_id, lesson_id FROM summed
    )
)
SELECT i.idx, i.idx IN (SELECT idx FROM missing) AS missing,
       i.idx IN (SELECT idx FROM reused) AS reused, r.*
FROM input i
LEFT JOIN result r USING (user_id, course_id, lesson_id)
ORDER BY i.idx
"""

BATCH_RECORD_TIME = _HEARTBEATS.format(
    valid="NOT EXISTS (SELECT FROM missing) AND NOT EXISTS (SELECT FROM reused)"
)
INDEPENDENT_HEARTBEATS = _HEARTBEATS.format(
    valid="i.idx NOT IN (SELECT idx FROM missing UNION ALL SELECT idx FROM reused)"
)

GET_LESSON_PROGRESS = f"""
SELECT {PROGRESS_COLUMNS} FROM lesson_progress
WHERE user_id = $1::uuid AND course_id = $2::uuid AND lesson_id = $3::varchar
  AND EXISTS (
      SELECT FROM lessons
      WHERE course_id = $2::uuid AND lesson_id = $3::varchar AND position IS NOT NULL
  )
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

LIST_ATTEMPTS = """
SELECT attempt_number, score, attempted_at, request_id FROM lesson_attempts
WHERE user_id = $1::uuid AND course_id = $2::uuid AND lesson_id = $3::varchar
  AND attempt_number > $4::integer
  AND EXISTS (
      SELECT FROM lessons
      WHERE course_id = $2::uuid AND lesson_id = $3::varchar AND position IS NOT NULL
  )
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

LOOKUP_LESSON = """
SELECT EXISTS (SELECT FROM courses WHERE course_id = $1::uuid) AS course_exists,
       EXISTS (SELECT FROM lessons
               WHERE course_id = $1::uuid AND lesson_id = $2::varchar
                 AND position IS NOT NULL) AS lesson_exists
"""

LOOKUP_REQUEST = """
SELECT method, course_id::text, lesson_id FROM processed_requests
WHERE user_id = $1::uuid AND request_id = $2::uuid
"""

COURSE_EXISTS = "SELECT EXISTS (SELECT FROM courses WHERE course_id = $1::uuid)"

# Deletes a bounded slice of expired request ids, so that no purge holds locks for long.
PURGE_REQUEST_IDS = """
WITH gone AS (
    DELETE FROM processed_requests
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM processed_requests
        WHERE created_at < now() - make_interval(secs => $1::double precision)
        LIMIT $2
    ))
    RETURNING 1
)
SELECT count(*) FROM gone
"""


_REUSED = "was already used for a different call; use a new request id for each call"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One entry of a batch of heartbeats (already validated)."""

    user_id: str
    course_id: str
    lesson_id: str
    seconds: int
    request_id: str | None


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where the next page of ListLessonProgress starts (exclusive)."""

    first_started_at: datetime
    lesson_id: str


async def ensure_lesson(connection: Connection, course_id: str, lesson_id: str) -> None:
    """Raises NotFound naming what is missing: the course, or the lesson in its outline."""
    row = await connection.fetchrow(LOOKUP_LESSON, course_id, lesson_id)
    assert row is not None
    if not row["course_exists"]:
        raise errors.NotFound.course(course_id)
    if not row["lesson_exists"]:
        raise errors.NotFound(
            f"lesson {lesson_id!r} is not in the outline of course {course_id}",
            reason="LESSON_NOT_FOUND",
        )


async def ensure_course(connection: Connection, course_id: str) -> None:
    """Raises NotFound if the course is not registered."""
    if not await connection.fetchval(COURSE_EXISTS, course_id):
        raise errors.NotFound.course(course_id)


class ProgressStore:
    """Reads and writes learners' progress."""

    def __init__(
        self, database: Database, notifier: EventNotifier, *, heartbeat_slots: int | None = None
    ) -> None:
        self.database = database
        self.notifier = notifier
        # Leave some connections for everything else while heartbeats are merged.
        slots = heartbeat_slots or max(1, database.pool.get_max_size() // 2)
        self.heartbeats = HeartbeatWriter(
            self._record_time_alone, self._record_time_together, slots=slots
        )

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
    ) -> Record:
        """Runs a single-statement write; explains an empty result with a second query."""
        params = (user_id, course_id, lesson_id, *args)
        if with_request_id:
            params = (*params, request_id)

        async def work(connection: Connection) -> Record:
            row = await connection.fetchrow(statement, *params)
            if row is not None:
                return row
            await ensure_lesson(connection, course_id, lesson_id)
            if request_id is not None:
                await _check_replay(connection, method, user_id, course_id, lesson_id, request_id)
            current = await connection.fetchrow(GET_LESSON_PROGRESS, user_id, course_id, lesson_id)
            if current is None:  # erased or deleted while the call ran
                raise errors.NotFound("the lesson progress no longer exists")
            return current

        return await self.database.run(work)

    async def start_lesson(self, user_id: str, course_id: str, lesson_id: str) -> Record:
        """Creates the lesson row or moves its last access time."""
        row = await self._write(
            START_LESSON, "StartLesson", user_id, course_id, lesson_id, with_request_id=False
        )
        self.notifier.changed(course_id)
        return row

    async def record_time(self, heartbeat: Heartbeat) -> Record:
        """Adds heartbeat seconds to a lesson (merged with concurrent heartbeats)."""
        return await self.heartbeats.write(heartbeat)

    async def _record_time_alone(self, h: Heartbeat) -> Record:
        return await self._write(
            RECORD_TIME, "RecordTime", h.user_id, h.course_id, h.lesson_id, h.seconds,
            request_id=h.request_id,
        )  # fmt: skip

    async def _record_time_together(
        self, heartbeats: list[Heartbeat]
    ) -> list[Record | errors.ServiceError]:
        """Independent heartbeats in one statement; per entry its row or its own error."""

        async def work(connection: Connection) -> list[Record | errors.ServiceError]:
            rows = await connection.fetch(INDEPENDENT_HEARTBEATS, *_columns(heartbeats))
            outcomes: list[Record | errors.ServiceError] = []
            for heartbeat, row in zip(heartbeats, rows, strict=True):
                if row["missing"]:
                    try:
                        await ensure_lesson(connection, heartbeat.course_id, heartbeat.lesson_id)
                        outcomes.append(errors.Aborted("the outline changed; retry the call"))
                    except errors.NotFound as exc:
                        outcomes.append(exc)
                elif row["reused"]:
                    outcomes.append(
                        errors.InvalidArgument.of("request_id", _REUSED, reason="REQUEST_ID_REUSED")
                    )
                elif row["user_id"] is None:  # a replay whose row was deleted meanwhile
                    outcomes.append(errors.NotFound("the lesson progress no longer exists"))
                else:
                    outcomes.append(row)
            return outcomes

        return await self.database.run(work)

    async def record_attempt(
        self, user_id: str, course_id: str, lesson_id: str, score: int, request_id: str | None
    ) -> tuple[Record, bool]:
        """Records a scored attempt; returns the lesson row and whether the attempt passed."""
        row = await self._write(
            RECORD_ATTEMPT, "RecordAttempt", user_id, course_id, lesson_id, score,
            request_id=request_id,
        )  # fmt: skip
        self.notifier.changed(course_id)
        if "passed" in row:
            return row, bool(row["passed"])
        # A replayed request: answer as the original call did.
        passed = await self.database.run(
            lambda c: c.fetchval(REPLAYED_ATTEMPT_PASSED, user_id, course_id, lesson_id, request_id)
        )
        return row, bool(passed)

    async def complete_lesson(
        self,
        user_id: str,
        course_id: str,
        lesson_id: str,
        score: int | None,
        request_id: str | None,
    ) -> tuple[Record, Record]:
        """Completes a lesson; returns the lesson row and the course progress after it."""
        lesson = await self._write(
            COMPLETE_LESSON, "CompleteLesson", user_id, course_id, lesson_id, score,
            request_id=request_id,
        )  # fmt: skip
        self.notifier.changed(course_id)
        course = await self.get_course_progress(user_id, course_id)
        return lesson, course

    async def batch_record_time(self, heartbeats: list[Heartbeat]) -> list[Record]:
        """Adds every heartbeat atomically; returns one row per entry, in order."""
        columns = _columns(heartbeats)

        async def work(connection: Connection) -> list[Record]:
            rows = await connection.fetch(BATCH_RECORD_TIME, *columns)
            missing = [row["idx"] - 1 for row in rows if row["missing"]]
            if missing:
                first = heartbeats[missing[0]]
                try:
                    await ensure_lesson(connection, first.course_id, first.lesson_id)
                except errors.NotFound as exc:
                    raise errors.NotFound(
                        f"requests[{missing[0]}]: {exc.message}", reason=exc.reason
                    ) from None
                raise errors.Aborted("the course outline changed during the call; retry it")
            reused = [row["idx"] - 1 for row in rows if row["reused"]]
            if reused:
                raise errors.InvalidArgument(
                    [errors.FieldViolation(f"requests[{i}].request_id", _REUSED) for i in reused],
                    reason="REQUEST_ID_REUSED",
                )
            return rows

        return await self.database.run(work)

    async def save_bookmark(
        self, user_id: str, course_id: str, lesson_id: str, position: str | None
    ) -> Record:
        """Saves (or, with None, clears) the lesson's bookmark."""
        row = await self._write(
            SAVE_BOOKMARK, "SaveBookmark", user_id, course_id, lesson_id, position,
            with_request_id=False,
        )  # fmt: skip
        self.notifier.changed(course_id)
        return row

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


def _columns(heartbeats: list[Heartbeat]) -> tuple[list[object], ...]:
    """The heartbeats as the five parallel arrays the batch statements take."""
    return (
        [h.user_id for h in heartbeats],
        [h.course_id for h in heartbeats],
        [h.lesson_id for h in heartbeats],
        [h.seconds for h in heartbeats],
        [h.request_id for h in heartbeats],
    )


async def _check_replay(
    connection: Connection,
    method: str,
    user_id: str,
    course_id: str,
    lesson_id: str,
    request_id: str,
) -> None:
    """Refuses a request id that was first used for a different call."""
    used = await connection.fetchrow(LOOKUP_REQUEST, user_id, request_id)
    if used is not None and (used["method"], used["course_id"], used["lesson_id"]) != (
        method,
        course_id,
        lesson_id,
    ):
        raise errors.InvalidArgument.of(
            "request_id",
            f"{_REUSED} (first used for {used['method']} on lesson {used['lesson_id']!r} "
            f"of course {used['course_id']})",
            reason="REQUEST_ID_REUSED",
        )
