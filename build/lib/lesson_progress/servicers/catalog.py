"""CatalogService: course outlines."""

from __future__ import annotations

from typing import Any

import grpc

from lesson_progress import convert
from lesson_progress.store import CatalogStore
from lesson_progress.store.catalog import LessonSpec
from lesson_progress.validation import Validator
from lessonprogress.v1 import catalog_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]

MAX_LESSONS = 10_000


class CatalogServicer:
    """Implements lessonprogress.v1.CatalogService."""

    def __init__(self, store: CatalogStore) -> None:
        self.store = store

    async def UpsertCourse(
        self, request: pb.UpsertCourseRequest, context: Context
    ) -> pb.UpsertCourseResponse:
        """Creates a course or replaces its outline."""
        check = Validator()
        course_id = check.uuid("course_id", request.course_id)
        title = check.text("title", request.title)
        if len(request.lessons) > MAX_LESSONS:
            check.fail("lessons", f"must hold at most {MAX_LESSONS} lessons")
        lessons: list[LessonSpec] = []
        seen: dict[str, int] = {}
        for index, lesson in enumerate(request.lessons):
            field = check.nested(f"lessons[{index}].")
            lesson_id = field.identifier("lesson_id", lesson.lesson_id)
            if lesson_id and lesson_id in seen:
                field.fail("lesson_id", f"duplicates lessons[{seen[lesson_id]}].lesson_id")
            seen.setdefault(lesson_id, index)
            passing_score = None
            if lesson.HasField("passing_score"):
                passing_score = field.in_range("passing_score", lesson.passing_score, 0, 100)
            lessons.append(
                LessonSpec(
                    lesson_id=lesson_id,
                    title=field.text("title", lesson.title),
                    assessed=lesson.assessed,
                    passing_score=passing_score,
                )
            )
        check.done()
        stored = await self.store.upsert_course(course_id, title, lessons)
        return pb.UpsertCourseResponse(course=convert.course(stored))

    async def GetCourse(
        self, request: pb.GetCourseRequest, context: Context
    ) -> pb.GetCourseResponse:
        """Returns a course with its outline."""
        check = Validator()
        course_id = check.uuid("course_id", request.course_id)
        check.done()
        return pb.GetCourseResponse(course=convert.course(await self.store.get_course(course_id)))

    async def DeleteCourse(
        self, request: pb.DeleteCourseRequest, context: Context
    ) -> pb.DeleteCourseResponse:
        """Deletes a course and every learner's progress in it."""
        check = Validator()
        course_id = check.uuid("course_id", request.course_id)
        check.done()
        deleted = await self.store.delete_course(course_id)
        return pb.DeleteCourseResponse(deleted_lessons=deleted)
