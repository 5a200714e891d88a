"""SQL for lesson notes: a learner's private notes on the lessons of a course.

Each write is one statement that checks the outline, claims the request id (if any) and
writes the note, like the progress writes; only an empty result is explained by a second
query. In the request-id memory a note write is recorded as ``CreateNote`` on its lesson,
or ``UpdateNote``/``DeleteNote`` on its note (the note id takes the lesson id's place), so
that reusing an id for another note is recognised.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lesson_progress import errors
from lesson_progress.store.checks import (
    LOOKUP_REQUEST,
    ensure_course,
    ensure_lesson,
    ensure_request_id_fits,
)
from lesson_progress.store.database import Connection, Database, Record

NOTE_COLUMNS = """
    n.note_id, n.user_id, n.course_id, n.lesson_id, n.anchor, n.body, n.created_at,
    n.updated_at
"""

# $1 user, $2 course, $3 lesson, $4 anchor, $5 request id, $6 body. Every step names course
# $2, so on Citus the whole statement runs on the course's worker.
CREATE_NOTE = f"""
WITH lesson AS (
    SELECT lesson_id FROM lessons
    WHERE course_id = $2::uuid AND lesson_id = $3::varchar AND position IS NOT NULL
),
claimed AS (
    INSERT INTO processed_requests (user_id, request_id, method, course_id, lesson_id)
    SELECT $1::uuid, $5::uuid, 'CreateNote', $2::uuid, $3::varchar FROM lesson
    WHERE $5::uuid IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING true
),
proceed AS (
    SELECT lesson_id FROM lesson WHERE $5::uuid IS NULL OR EXISTS (SELECT FROM claimed)
),
note AS (
    INSERT INTO lesson_notes AS n
        (course_id, user_id, note_id, lesson_id, anchor, body, request_id)
    SELECT $2::uuid, $1::uuid, gen_random_uuid(), $3::varchar, $4::text, $6::text, $5::uuid
    FROM proceed
    RETURNING {NOTE_COLUMNS}
)
SELECT * FROM note
"""

# The note CreateNote made under request id $3 (a retry's answer).
NOTE_OF_REQUEST = f"""
SELECT {NOTE_COLUMNS} FROM lesson_notes n
WHERE n.user_id = $1::uuid AND n.course_id = $2::uuid AND n.request_id = $3::uuid
"""


def _target_ctes(method: str, request_id: str) -> str:
    """CTEs that find note $3 of learner $1 in course $2 if its lesson is in the current
    outline (``target``), and claim request id ``request_id`` (an SQL parameter) for
    ``method`` on that note (``proceed``: the note, unless the id was already claimed).
    ``method`` is a constant of this module, never a value from a request."""
    return f"""
target AS (
    SELECT n.note_id FROM lesson_notes n
    JOIN lessons l ON l.course_id = n.course_id AND l.lesson_id = n.lesson_id
    WHERE n.course_id = $2::uuid AND n.user_id = $1::uuid AND n.note_id = $3::uuid
      AND l.position IS NOT NULL
),
claimed AS (
    INSERT INTO processed_requests (user_id, request_id, method, course_id, lesson_id)
    SELECT $1::uuid, {request_id}::uuid, '{method}', $2::uuid, note_id::text FROM target
    WHERE {request_id}::uuid IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING true
),
proceed AS (
    SELECT note_id FROM target
    WHERE {request_id}::uuid IS NULL OR EXISTS (SELECT FROM claimed)
)"""


# $1 user, $2 course, $3 note, $4 anchor (NULL: keep), $5 body (NULL: keep), $6 request id.
UPDATE_NOTE = f"""
WITH {_target_ctes("UpdateNote", "$6")},
note AS (
    UPDATE lesson_notes n
    SET anchor = COALESCE($4::text, n.anchor), body = COALESCE($5::text, n.body)
    FROM proceed p
    WHERE n.course_id = $2::uuid AND n.user_id = $1::uuid AND n.note_id = p.note_id
    RETURNING {NOTE_COLUMNS}
)
SELECT * FROM note
"""

# $1 user, $2 course, $3 note, $4 request id.
DELETE_NOTE = f"""
WITH {_target_ctes("DeleteNote", "$4")},
gone AS (
    DELETE FROM lesson_notes n USING proceed p
    WHERE n.course_id = $2::uuid AND n.user_id = $1::uuid AND n.note_id = p.note_id
    RETURNING 1
)
SELECT count(*) FROM gone
"""

# One note of the current outline.
GET_NOTE = f"""
SELECT {NOTE_COLUMNS} FROM lesson_notes n
JOIN lessons l ON l.course_id = n.course_id AND l.lesson_id = n.lesson_id
WHERE n.course_id = $2::uuid AND n.user_id = $1::uuid AND n.note_id = $3::uuid
  AND l.position IS NOT NULL
"""

# Keyset paging, newest first, over lesson_notes_newest_idx; $3 NULL lists every lesson.
LIST_NOTES = f"""
SELECT {NOTE_COLUMNS} FROM lesson_notes n
JOIN lessons l ON l.course_id = n.course_id AND l.lesson_id = n.lesson_id
WHERE n.course_id = $2::uuid AND n.user_id = $1::uuid AND l.position IS NOT NULL
  AND ($3::varchar IS NULL OR n.lesson_id = $3::varchar)
  AND ($4::timestamptz IS NULL OR (n.created_at, n.note_id) < ($4::timestamptz, $5::uuid))
ORDER BY n.created_at DESC, n.note_id DESC
LIMIT $6
"""


@dataclass(frozen=True, slots=True)
class NoteCursor:
    """Where the next page of ListNotes starts (exclusive)."""

    created_at: datetime
    note_id: str


def _note_not_found(note_id: str) -> errors.NotFound:
    return errors.NotFound(
        f"note {note_id} does not exist for this learner in a lesson of the course's outline",
        reason="NOTE_NOT_FOUND",
    )


class NoteStore:
    """Reads and writes learners' lesson notes."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def create_note(
        self,
        user_id: str,
        course_id: str,
        lesson_id: str,
        anchor: str,
        body: str,
        request_id: str | None,
    ) -> Record:
        """Adds a note; a replayed request id gives the note its first call created."""

        async def work(connection: Connection) -> Record:
            row = await connection.fetchrow(
                CREATE_NOTE, user_id, course_id, lesson_id, anchor, request_id, body
            )
            if row is not None:
                return row
            await ensure_lesson(connection, course_id, lesson_id)
            assert request_id is not None  # without one, a known lesson always inserts
            await ensure_request_id_fits(
                connection, "CreateNote", user_id, course_id, lesson_id, request_id
            )
            first = await connection.fetchrow(NOTE_OF_REQUEST, user_id, course_id, request_id)
            if first is None:
                raise errors.NotFound(
                    "the note this request created was deleted since", reason="NOTE_NOT_FOUND"
                )
            return first

        return await self.database.run(work)

    async def update_note(
        self,
        user_id: str,
        course_id: str,
        note_id: str,
        anchor: str | None,
        body: str | None,
        request_id: str | None,
    ) -> Record:
        """Changes a note's anchor and/or body (None keeps it); returns the note."""

        async def work(connection: Connection) -> Record:
            row = await connection.fetchrow(
                UPDATE_NOTE, user_id, course_id, note_id, anchor, body, request_id
            )
            if row is not None:
                return row
            await self._explain(connection, "UpdateNote", user_id, course_id, note_id, request_id)
            current = await connection.fetchrow(GET_NOTE, user_id, course_id, note_id)
            if current is None:  # deleted after the update that the retry repeats
                raise _note_not_found(note_id)
            return current

        return await self.database.run(work)

    async def delete_note(
        self, user_id: str, course_id: str, note_id: str, request_id: str | None
    ) -> None:
        """Deletes a note (a replayed request id succeeds again)."""

        async def work(connection: Connection) -> None:
            deleted = await connection.fetchval(
                DELETE_NOTE, user_id, course_id, note_id, request_id
            )
            if not deleted:
                await self._explain(
                    connection, "DeleteNote", user_id, course_id, note_id, request_id
                )

        await self.database.run(work)

    @staticmethod
    async def _explain(
        connection: Connection,
        method: str,
        user_id: str,
        course_id: str,
        note_id: str,
        request_id: str | None,
    ) -> None:
        """Why a note write changed nothing: returns for a replay of the same call, raises
        NotFound (course, note) or InvalidArgument (a request id used for another call)."""
        await ensure_course(connection, course_id)
        if request_id is not None:
            used = await connection.fetchrow(LOOKUP_REQUEST, user_id, request_id, course_id)
            if used is not None:
                await ensure_request_id_fits(
                    connection, method, user_id, course_id, note_id, request_id
                )
                return
        raise _note_not_found(note_id)

    async def list_notes(
        self,
        user_id: str,
        course_id: str,
        lesson_id: str | None,
        *,
        after: NoteCursor | None,
        limit: int,
    ) -> list[Record]:
        """Up to ``limit`` notes after ``after``, newest first."""

        async def work(connection: Connection) -> list[Record]:
            rows = await connection.fetch(
                LIST_NOTES,
                user_id,
                course_id,
                lesson_id,
                after.created_at if after else None,
                after.note_id if after else None,
                limit,
            )
            if not rows:
                if lesson_id is None:
                    await ensure_course(connection, course_id)
                else:
                    await ensure_lesson(connection, course_id, lesson_id)
            return rows

        return await self.database.run(work)
