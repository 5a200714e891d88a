"""SQL for course outlines: courses and their ordered lessons."""

from __future__ import annotations

from dataclasses import dataclass

from lesson_progress import errors
from lesson_progress.store.database import Connection, Database, Record
from lesson_progress.store.events import EventKind, EventNotifier, outbox_ctes

UPSERT_COURSE = """
INSERT INTO courses AS c (course_id, title) VALUES ($1::uuid, $2::text)
ON CONFLICT (course_id) DO UPDATE SET title = EXCLUDED.title
"""

# Lessons left out of the new outline keep their rows (and so their progress) but leave it.
RETIRE_LESSONS = """
UPDATE lessons SET position = NULL
WHERE course_id = $1::uuid AND position IS NOT NULL AND lesson_id <> ALL ($2::varchar[])
"""

# The position uniqueness is checked at commit, so lessons can swap places here.
UPSERT_LESSONS = """
INSERT INTO lessons AS l (course_id, lesson_id, position, title, assessed, passing_score)
SELECT $1::uuid, t.lesson_id, t.position - 1, t.title, t.assessed, t.passing_score
FROM unnest($2::varchar[], $3::text[], $4::boolean[], $5::integer[])
    WITH ORDINALITY AS t(lesson_id, title, assessed, passing_score, position)
ORDER BY t.lesson_id
ON CONFLICT (course_id, lesson_id) DO UPDATE
SET position = EXCLUDED.position, title = EXCLUDED.title, assessed = EXCLUDED.assessed,
    passing_score = EXCLUDED.passing_score
"""

_COURSE_COMPLETED = f"VALUES ({EventKind.COURSE_COMPLETED})"

# A learner whose completed lessons now cover the whole (non-empty) outline has finished
# the course, e.g. after a lesson they had not done was removed; watchers hear about it.
COMPLETE_COVERED_COURSES = f"""
WITH covered AS (
    UPDATE course_progress cp SET completed_at = now()
    WHERE cp.course_id = $1::uuid AND cp.completed_at IS NULL
      AND EXISTS (SELECT FROM lessons WHERE course_id = $1::uuid AND position IS NOT NULL)
      AND NOT EXISTS (
          SELECT FROM lessons l
          WHERE l.course_id = $1::uuid AND l.position IS NOT NULL
            AND NOT cp.completed_lessons ? l.lesson_id
      )
    RETURNING cp.user_id, cp.course_id
),
{outbox_ctes("covered", _COURSE_COMPLETED, snapshot=False)}
SELECT count(*) FROM covered
"""

SELECT_COURSE = """
SELECT course_id, title, created_at, updated_at FROM courses WHERE course_id = $1::uuid
"""

SELECT_OUTLINE = """
SELECT lesson_id, title, assessed, passing_score FROM lessons
WHERE course_id = $1::uuid AND position IS NOT NULL
ORDER BY position
"""

# Progress rows are counted before the cascade (courses -> lessons -> lesson_progress ->
# lesson_attempts; courses -> course_progress, progress_events) removes them. The course's
# remembered request ids go too: a retry after the course is registered again is new work.
DELETE_COURSE = """
WITH progress AS (SELECT count(*) AS n FROM lesson_progress WHERE course_id = $1::uuid),
     requests AS (DELETE FROM processed_requests WHERE course_id = $1::uuid),
     course AS (DELETE FROM courses WHERE course_id = $1::uuid RETURNING 1)
SELECT (SELECT count(*) FROM course) AS deleted_courses, progress.n AS deleted_lessons
FROM progress
"""


@dataclass(frozen=True, slots=True)
class LessonSpec:
    """One lesson of an outline to register (already validated)."""

    lesson_id: str
    title: str
    assessed: bool
    passing_score: int | None


@dataclass(frozen=True, slots=True)
class CourseRecord:
    """A course and its outline, as stored."""

    course: Record
    lessons: list[Record]


class CatalogStore:
    """Reads and writes course outlines."""

    def __init__(self, database: Database, notifier: EventNotifier) -> None:
        self.database = database
        self.notifier = notifier

    async def upsert_course(
        self, course_id: str, title: str, lessons: list[LessonSpec]
    ) -> CourseRecord:
        """Creates a course or replaces its outline, in one transaction."""
        lesson_ids = [lesson.lesson_id for lesson in lessons]

        async def work(connection: Connection) -> tuple[CourseRecord, int]:
            async with connection.transaction():
                await connection.execute(UPSERT_COURSE, course_id, title)
                await connection.execute(RETIRE_LESSONS, course_id, lesson_ids)
                await connection.execute(
                    UPSERT_LESSONS,
                    course_id,
                    lesson_ids,
                    [lesson.title for lesson in lessons],
                    [lesson.assessed for lesson in lessons],
                    [lesson.passing_score for lesson in lessons],
                )
                completed = await connection.fetchval(COMPLETE_COVERED_COURSES, course_id)
                return await _read_course(connection, course_id), completed

        stored, completed = await self.database.run(work)
        if completed:
            self.notifier.changed(course_id)
        return stored

    async def get_course(self, course_id: str) -> CourseRecord:
        """A course and its outline in order."""

        async def work(connection: Connection) -> CourseRecord:
            return await _read_course(connection, course_id)

        return await self.database.run(work)

    async def delete_course(self, course_id: str) -> int:
        """Deletes a course and all progress in it; returns the lesson rows deleted."""

        async def work(connection: Connection) -> int:
            row = await connection.fetchrow(DELETE_COURSE, course_id)
            assert row is not None
            if not row["deleted_courses"]:
                raise errors.NotFound.course(course_id)
            return int(row["deleted_lessons"])

        return await self.database.run(work)


async def _read_course(connection: Connection, course_id: str) -> CourseRecord:
    course = await connection.fetchrow(SELECT_COURSE, course_id)
    if course is None:
        raise errors.NotFound.course(course_id)
    return CourseRecord(course, await connection.fetch(SELECT_OUTLINE, course_id))
