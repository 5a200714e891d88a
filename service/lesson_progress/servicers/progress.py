"""ProgressService: one learner's progress."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from lesson_progress import convert, errors
from lesson_progress.page_tokens import PageTokens, page_size
from lesson_progress.servicers.notes import NoteMethods
from lesson_progress.store import ProgressStore
from lesson_progress.store.database import Record
from lesson_progress.store.events import EventStore
from lesson_progress.store.heartbeats import (
    OCCURRED_AT_RETENTION,
    OCCURRED_AT_SKEW,
    HeartbeatStore,
)
from lesson_progress.store.notes import NoteStore
from lesson_progress.store.progress import PageCursor
from lesson_progress.timestamps import from_micros, to_micros
from lesson_progress.validation import Validator
from lesson_progress.values import Heartbeat
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import resources_pb2

Context = grpc.aio.ServicerContext[Any, Any]

MAX_BATCH = 1000
MAX_BOOKMARK_BYTES = 4096


def _lesson_key(request: Any, check: Validator) -> tuple[str, str, str]:
    """The validated (user_id, course_id, lesson_id) of a request."""
    return (
        check.uuid("user_id", request.user_id),
        check.uuid("course_id", request.course_id),
        check.identifier("lesson_id", request.lesson_id),
    )


def _optional_score(request: Any, check: Validator) -> int | None:
    if not request.HasField("score"):
        return None
    return check.in_range("score", request.score, 0, 100)


class ProgressServicer(NoteMethods):
    """Implements lessonprogress.v1.ProgressService (the note methods: ``NoteMethods``)."""

    def __init__(
        self,
        store: ProgressStore,
        heartbeats: HeartbeatStore,
        events: EventStore,
        tokens: PageTokens,
        *,
        max_heartbeat_seconds: int,
        max_response_bytes: int = 4 * 1024 * 1024,
        refused_seconds: Callable[[int], None] | None = None,
        notes: NoteStore | None = None,
    ) -> None:
        self.store = store
        self.notes = notes if notes is not None else NoteStore(store.database)
        self.heartbeats = heartbeats
        self.events = events
        self.tokens = tokens
        self.max_heartbeat_seconds = max_heartbeat_seconds
        self.max_response_bytes = max_response_bytes
        self._refused_seconds = refused_seconds

    def _heartbeat(self, request: pb.RecordTimeRequest, check: Validator) -> Heartbeat:
        user_id, course_id, lesson_id = _lesson_key(request, check)
        seconds = check.in_range("seconds", request.seconds, 1, self.max_heartbeat_seconds)
        request_id = check.optional_uuid("request_id", request.request_id)
        occurred_at = None
        if request.HasField("occurred_at"):
            occurred_at = check.recent_time(
                "occurred_at",
                request.occurred_at,
                ahead=OCCURRED_AT_SKEW,
                behind=OCCURRED_AT_RETENTION,
            )
        return Heartbeat(user_id, course_id, lesson_id, seconds, request_id, occurred_at)

    def _count_refused(self, beats: list[Heartbeat], rows: list[Record]) -> None:
        """Counts the seconds the time budget refused (entries this call applied)."""
        if self._refused_seconds is None:
            return
        refused = sum(
            beat.seconds - row["credited_seconds"]
            for beat, row in zip(beats, rows, strict=True)
            if row["applied"]
        )
        if refused:
            self._refused_seconds(refused)

    async def StartLesson(
        self, request: pb.StartLessonRequest, context: Context
    ) -> pb.StartLessonResponse:
        """Records that the learner opened a lesson."""
        check = Validator()
        key = _lesson_key(request, check)
        check.done()
        row = await self.store.start_lesson(*key)
        return pb.StartLessonResponse(lesson=convert.lesson_progress(row))

    async def RecordTime(
        self, request: pb.RecordTimeRequest, context: Context
    ) -> pb.RecordTimeResponse:
        """Adds heartbeat seconds to a lesson."""
        check = Validator()
        beat = self._heartbeat(request, check)
        check.done()
        row = await self.heartbeats.record_time(beat)
        self._count_refused([beat], [row])
        return pb.RecordTimeResponse(
            lesson=convert.lesson_progress(row), credited_seconds=row["credited_seconds"]
        )

    async def BatchRecordTime(
        self, request: pb.BatchRecordTimeRequest, context: Context
    ) -> pb.BatchRecordTimeResponse:
        """Adds many heartbeats atomically."""
        check = Validator()
        count = len(request.requests)
        if not 1 <= count <= MAX_BATCH:
            check.fail("requests", f"must hold 1 to {MAX_BATCH} entries (got {count})")
        beats = [
            self._heartbeat(entry, check.nested(f"requests[{index}]."))
            for index, entry in enumerate(request.requests)
        ]
        _check_batch_request_ids(beats, check)
        check.done()
        rows = await self.heartbeats.batch_record_time(beats)
        self._count_refused(beats, rows)
        return batch_response(rows, self.max_response_bytes)

    async def RecordAttempt(
        self, request: pb.RecordAttemptRequest, context: Context
    ) -> pb.RecordAttemptResponse:
        """Records a scored attempt, completing the lesson when it passes."""
        check = Validator()
        key = _lesson_key(request, check)
        score = _optional_score(request, check)
        if score is None:
            check.fail("score", "is required")
        request_id = check.optional_uuid("request_id", request.request_id)
        check.done()
        assert score is not None
        row, passed = await self.store.record_attempt(*key, score, request_id)
        return pb.RecordAttemptResponse(lesson=convert.lesson_progress(row), passed=passed)

    async def CompleteLesson(
        self, request: pb.CompleteLessonRequest, context: Context
    ) -> pb.CompleteLessonResponse:
        """Completes a lesson and updates the course progress with it."""
        check = Validator()
        key = _lesson_key(request, check)
        score = _optional_score(request, check)
        request_id = check.optional_uuid("request_id", request.request_id)
        check.done()
        lesson, course = await self.store.complete_lesson(*key, score, request_id)
        return pb.CompleteLessonResponse(
            lesson=convert.lesson_progress(lesson),
            course=convert.course_progress(key[0], key[1], course),
        )

    async def GetLessonProgress(
        self, request: pb.GetLessonProgressRequest, context: Context
    ) -> pb.GetLessonProgressResponse:
        """Returns one lesson's progress."""
        check = Validator()
        key = _lesson_key(request, check)
        check.done()
        row = await self.store.get_lesson_progress(*key)
        return pb.GetLessonProgressResponse(lesson=convert.lesson_progress(row))

    async def ListLessonProgress(
        self, request: pb.ListLessonProgressRequest, context: Context
    ) -> pb.ListLessonProgressResponse:
        """Lists a learner's lessons in a course, a page at a time."""
        check = Validator()
        user_id = check.uuid("user_id", request.user_id)
        course_id = check.uuid("course_id", request.course_id)
        size = page_size(request.page_size, check)
        query = ("ListLessonProgress", user_id, course_id, request.completed_only)
        position = self.tokens.parse(request.page_token, query, check)
        check.done()
        after = PageCursor(from_micros(position[0]), position[1]) if position else None
        rows = await self.store.list_lesson_progress(
            user_id,
            course_id,
            completed_only=request.completed_only,
            after=after,
            limit=size + 1,
        )
        rows, next_token = self.tokens.split(
            rows,
            size,
            query,
            lambda last: (to_micros(last["first_started_at"]), last["lesson_id"]),
        )
        return pb.ListLessonProgressResponse(
            lessons=[convert.lesson_progress(r) for r in rows], next_page_token=next_token
        )

    async def GetCourseProgress(
        self, request: pb.GetCourseProgressRequest, context: Context
    ) -> pb.GetCourseProgressResponse:
        """Returns the learner's progress in a course."""
        check = Validator()
        user_id = check.uuid("user_id", request.user_id)
        course_id = check.uuid("course_id", request.course_id)
        check.done()
        row = await self.store.get_course_progress(user_id, course_id)
        return pb.GetCourseProgressResponse(course=convert.course_progress(user_id, course_id, row))

    async def ListAttempts(
        self, request: pb.ListAttemptsRequest, context: Context
    ) -> pb.ListAttemptsResponse:
        """Lists a lesson's attempt history, oldest first."""
        check = Validator()
        key = _lesson_key(request, check)
        size = page_size(request.page_size, check)
        query = ("ListAttempts", *key)
        position = self.tokens.parse(request.page_token, query, check)
        check.done()
        after = position[0] if position else 0
        rows = await self.store.list_attempts(*key, after=after, limit=size + 1)
        rows, next_token = self.tokens.split(
            rows, size, query, lambda last: (last["attempt_number"],)
        )
        return pb.ListAttemptsResponse(
            attempts=[convert.attempt(r) for r in rows], next_page_token=next_token
        )

    async def SaveBookmark(
        self, request: pb.SaveBookmarkRequest, context: Context
    ) -> pb.SaveBookmarkResponse:
        """Saves where the learner left off in a lesson."""
        check = Validator()
        key = _lesson_key(request, check)
        size = len(request.position.encode())
        if size > MAX_BOOKMARK_BYTES:
            check.fail("position", f"must be at most {MAX_BOOKMARK_BYTES} bytes (got {size})")
        elif "\x00" in request.position:
            check.fail("position", "must not contain NUL characters")
        check.done()
        row = await self.store.save_bookmark(*key, request.position or None)
        return pb.SaveBookmarkResponse(lesson=convert.lesson_progress(row))

    async def WatchProgress(
        self, request: pb.WatchProgressRequest, context: Context
    ) -> AsyncIterator[pb.WatchProgressResponse]:
        """Streams a course's progress events committed after the call began."""
        check = Validator()
        course_id = check.uuid("course_id", request.course_id)
        user_id = check.optional_uuid("user_id", request.user_id)
        if request.after_event_id < 0:
            check.fail("after_event_id", f"must not be negative (got {request.after_event_id})")
        check.done()
        async for row in self.events.watch(course_id, user_id, request.after_event_id):
            yield pb.WatchProgressResponse(event=convert.progress_event(row))

    async def DeleteUserProgress(
        self, request: pb.DeleteUserProgressRequest, context: Context
    ) -> pb.DeleteUserProgressResponse:
        """Erases everything held about a learner."""
        check = Validator()
        user_id = check.uuid("user_id", request.user_id)
        check.done()
        deleted = await self.store.delete_user_progress(user_id)
        return pb.DeleteUserProgressResponse(deleted_lessons=deleted)


def _check_batch_request_ids(beats: list[Heartbeat], check: Validator) -> None:
    """Refuses one request id on two different lessons within a batch."""
    first: dict[tuple[str, str], tuple[int, Heartbeat]] = {}
    for index, beat in enumerate(beats):
        if beat.request_id is None:
            continue
        key = (beat.user_id, beat.request_id)
        if key not in first:
            first[key] = (index, beat)
            continue
        other_index, other = first[key]
        if (other.course_id, other.lesson_id) != (beat.course_id, beat.lesson_id):
            field = f"requests[{index}].request_id"
            use = errors.RequestIdUse(
                field, "RecordTime", other.course_id, other.lesson_id, f"requests[{other_index}]"
            )
            check.fail(field, use.description)


# Bytes a repeated message field adds beyond the message itself (tag and length), at most.
_FIELD_OVERHEAD = 6


def batch_response(rows: list[Record], limit: int) -> pb.BatchRecordTimeResponse:
    """The response of BatchRecordTime, within ``limit`` bytes: each lesson once with a
    result per entry; the per-entry ``lessons`` too when they fit, the bookmarks only when
    they fit."""
    indexes: dict[tuple[object, object, object], int] = {}
    distinct: list[resources_pb2.LessonProgress] = []
    results = []
    for row in rows:
        key = (row["user_id"], row["course_id"], row["lesson_id"])
        index = indexes.get(key)
        if index is None:
            index = indexes[key] = len(distinct)
            distinct.append(convert.lesson_progress(row))
        results.append(
            pb.BatchRecordTimeEntryResult(
                lesson_index=index, credited_seconds=row["credited_seconds"]
            )
        )
    response = pb.BatchRecordTimeResponse(distinct_lessons=distinct, entry_results=results)
    sizes = [lesson.ByteSize() + _FIELD_OVERHEAD for lesson in distinct]
    size = response.ByteSize()
    if size + sum(sizes[result.lesson_index] for result in results) <= limit:
        response.lessons.extend(distinct[result.lesson_index] for result in results)
    elif size > limit:
        for lesson in response.distinct_lessons:
            lesson.ClearField("bookmark")
            lesson.ClearField("bookmarked_at")
        response.bookmarks_omitted = True
    return response
