"""The checks every progress path shares: is the lesson in its course's current outline,
is the course registered, was this request id already used (and for what).

A write statement checks the outline and claims its request id itself (``LESSON_CTE`` and
``claim_cte``), so that the common case is one round trip. Only when it returns no row does
``explain_empty_write`` find out why: an unknown course or lesson (NOT_FOUND), a request id
first used for a different call (INVALID_ARGUMENT), or a replay (the current row).
"""

from __future__ import annotations

from lesson_progress import errors
from lesson_progress.store.database import Connection, Record


def in_outline(course_id: str, lesson_id: str) -> str:
    """SQL that is true when the lesson is in the course's current outline (both SQL
    expressions). A lesson left out of an outline keeps its row with a NULL position."""
    return (
        f"EXISTS (SELECT FROM lessons WHERE course_id = {course_id} "
        f"AND lesson_id = {lesson_id} AND position IS NOT NULL)"
    )


PROGRESS_COLUMNS = """
    user_id, course_id, lesson_id, completed, time_spent_seconds, attempts, score,
    first_started_at, last_accessed_at, completed_at, created_at, updated_at, bookmark,
    bookmarked_at
"""

# The lesson ($3) of course $2, if it is in the current outline.
LESSON_CTE = """
lesson AS (
    SELECT passing_score FROM lessons
    WHERE course_id = $2::uuid AND lesson_id = $3::varchar AND position IS NOT NULL
)"""


def claim_cte(method: str) -> str:
    """CTEs that remember request id $5 of learner $1 for ``method`` on the ``lesson``;
    ``proceed`` yields the lesson only if there is no request id or it is seen for the first
    time. ``method`` is a constant of the calling module, never a value from a request."""
    return f"""
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


COURSE_EXISTS = "SELECT EXISTS (SELECT FROM courses WHERE course_id = $1::uuid)"

LOOKUP_LESSON = f"""
SELECT EXISTS (SELECT FROM courses WHERE course_id = $1::uuid) AS course_exists,
       {in_outline("$1::uuid", "$2::varchar")} AS lesson_exists
"""

LOOKUP_REQUEST = """
SELECT method, course_id::text, lesson_id FROM processed_requests
WHERE user_id = $1::uuid AND request_id = $2::uuid
"""

# One lesson row of the current outline.
GET_LESSON_PROGRESS = f"""
SELECT {PROGRESS_COLUMNS} FROM lesson_progress
WHERE user_id = $1::uuid AND course_id = $2::uuid AND lesson_id = $3::varchar
  AND {in_outline("$2::uuid", "$3::varchar")}
"""

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


async def ensure_course(connection: Connection, course_id: str) -> None:
    """Raises NotFound if the course is not registered."""
    if not await connection.fetchval(COURSE_EXISTS, course_id):
        raise errors.NotFound.course(course_id)


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


async def ensure_request_id_fits(
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
        raise errors.InvalidArgument.request_id_reused(
            [errors.RequestIdUse("request_id", *used.values())]
        )


async def explain_empty_write(
    connection: Connection,
    method: str,
    user_id: str,
    course_id: str,
    lesson_id: str,
    request_id: str | None,
) -> Record:
    """Why a write statement returned no row: raises NotFound or InvalidArgument, or
    returns the current lesson row (a replayed request, or nothing left to change)."""
    await ensure_lesson(connection, course_id, lesson_id)
    if request_id is not None:
        await ensure_request_id_fits(connection, method, user_id, course_id, lesson_id, request_id)
    current = await connection.fetchrow(GET_LESSON_PROGRESS, user_id, course_id, lesson_id)
    if current is None:  # erased or deleted while the call ran
        raise errors.NotFound("the lesson progress no longer exists")
    return current
