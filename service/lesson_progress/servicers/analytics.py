"""AnalyticsService: server-streaming reports over one course."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from lesson_progress import convert
from lesson_progress.store.analytics import AnalyticsStore
from lesson_progress.validation import Validator
from lessonprogress.v1 import analytics_service_pb2 as pb
from lessonprogress.v1.resources_pb2 import CourseProgress

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_MIN_COMPLETIONS = 10
DEFAULT_PREFETCH = 1000
MAX_PREFETCH = 10_000

# Bounds of one StreamCourseLearnersResponse (the proto documents them): one message per
# learner cost an HTTP/2 frame and an event-loop turn each, which was most of the export's
# CPU; a chunk stays well under gRPC's default 4 MiB receive limit.
MAX_LEARNERS_PER_MESSAGE = 500
MAX_MESSAGE_BYTES = 1 << 20


def _entry_bytes(learner_bytes: int) -> int:
    """What one learner adds to a response: its tag (1 byte), its length as a varint, and
    the learner itself; the sum over a chunk is the chunk's exact serialized size."""
    return 1 + max(1, (learner_bytes.bit_length() + 6) // 7) + learner_bytes


class AnalyticsServicer:
    """Implements lessonprogress.v1.AnalyticsService."""

    def __init__(self, store: AnalyticsStore) -> None:
        self.store = store

    async def StreamLessonStats(
        self, request: pb.StreamLessonStatsRequest, context: Context
    ) -> AsyncIterator[pb.StreamLessonStatsResponse]:
        """Streams per-lesson statistics in outline order."""
        check = Validator()
        course_id = check.uuid("course_id", request.course_id)
        check.done()
        async for row in self.store.lesson_stats(course_id):
            yield pb.StreamLessonStatsResponse(lesson_stats=convert.lesson_stats(row))

    async def StreamDifficultLessons(
        self, request: pb.StreamDifficultLessonsRequest, context: Context
    ) -> AsyncIterator[pb.StreamDifficultLessonsResponse]:
        """Streams the lessons with the most attempts per completion."""
        check = Validator()
        course_id = check.uuid("course_id", request.course_id)
        if request.min_completions < 0:
            check.fail("min_completions", f"must not be negative (got {request.min_completions})")
        check.done()
        minimum = request.min_completions or DEFAULT_MIN_COMPLETIONS
        async for row in self.store.difficult_lessons(course_id, minimum):
            yield pb.StreamDifficultLessonsResponse(difficult_lesson=convert.difficult_lesson(row))

    async def StreamCourseLearners(
        self, request: pb.StreamCourseLearnersRequest, context: Context
    ) -> AsyncIterator[pb.StreamCourseLearnersResponse]:
        """Streams every learner's course progress in user_id order."""
        check = Validator()
        course_id = check.uuid("course_id", request.course_id)
        prefetch = request.page_size or DEFAULT_PREFETCH
        check.in_range("page_size", request.page_size, 0, MAX_PREFETCH)
        check.done()
        chunk: list[CourseProgress] = []
        size = 0
        async for row in self.store.course_learners(course_id, prefetch):
            learner = convert.course_progress(row["user_id"], course_id, row)
            entry = _entry_bytes(learner.ByteSize())
            if chunk and (
                len(chunk) >= MAX_LEARNERS_PER_MESSAGE or size + entry > MAX_MESSAGE_BYTES
            ):
                yield pb.StreamCourseLearnersResponse(learners=chunk)
                chunk, size = [], 0
            chunk.append(learner)
            size += entry
        if chunk:
            yield pb.StreamCourseLearnersResponse(learners=chunk)
