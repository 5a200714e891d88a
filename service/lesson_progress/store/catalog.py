"""SQL for course outlines: courses and their ordered lessons."""

from __future__ import annotations

from dataclasses import dataclass

from lesson_progress import errors
from lesson_progress.store.database import Connection, Database, Record, atomically
from lesson_progress.store.events import EventNotifier

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

# A learner whose completed lessons now cover the whole (non-empty) outline has finished
# the course, e.g. after a lesson they had not done was removed; watchers hear about it
# (function of migration 0004; returns how many learners).
COMPLETE_COVERED_COURSES = "SELECT lp_complete_covered_courses($1::uuid)"

SELECT_COURSE = """
SELECT course_id, title, created_at, updated_at FROM courses WHERE course_id = $1::uuid
"""

SELECT_OUTLINE = """
SELECT lesson_id, title, assessed, passing_score FROM lessons
WHERE course_id = $1::uuid AND position IS NOT NULL
ORDER BY position
"""

# Progress rows are counted before the cascade (courses -> lessons -> lesson_progress ->
# lesson_attempts; courses -> course_progress, progress_events) removes them, by a statement
# of their own: on Citus a writable CTE runs its DELETE before the other parts, which would
# then count nothing. The course's remembered request ids go too: a retry after the course
# is registered again is new work.
COUNT_COURSE_PROGRESS = "SELECT count(*) FROM lesson_progress WHERE course_id = $1::uuid"

DELETE_COURSE = """
WITH requests AS (DELETE FROM processed_requests WHERE course_id = $1::uuid),
     course AS (DELETE FROM courses WHERE course_id = $1::uuid RETURNING 1)
SELECT count(*) FROM course
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
            async with atomically(connection):
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
            async with atomically(connection):
                lessons = await connection.fetchval(COUNT_COURSE_PROGRESS, course_id)
                if not await connection.fetchval(DELETE_COURSE, course_id):
                    raise errors.NotFound.course(course_id)
                return int(lessons)

        return await self.database.run(work)


async def _read_course(connection: Connection, course_id: str) -> CourseRecord:
    course = await connection.fetchrow(SELECT_COURSE, course_id)
    if course is None:
        raise errors.NotFound.course(course_id)
    return CourseRecord(course, await connection.fetch(SELECT_OUTLINE, course_id))
