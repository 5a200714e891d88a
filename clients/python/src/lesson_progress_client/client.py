"""ProgressClient: one method per RPC, with deadlines, retries and request ids."""
# ASYNC109: ``timeout`` is the gRPC deadline sent to the server with each call (grpc's own
# name for it), not a local wait that ``asyncio.timeout`` could replace.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import grpc
from google.protobuf import message as protobuf_message

from lesson_progress_client.batching import Credited, HeartbeatBatcher, credited_by_entry
from lesson_progress_client.errors import ProgressError
from lesson_progress_client.settings import HeartbeatBatching, RetryPolicy, TlsConfig
from lessonprogress.v1 import (
    analytics_service_pb2,
    analytics_service_pb2_grpc,
    catalog_service_pb2,
    catalog_service_pb2_grpc,
    progress_service_pb2,
    progress_service_pb2_grpc,
    resources_pb2,
)

log = logging.getLogger(__name__)

_USER_AGENT: Final = "lesson-progress-client/0.1"
DEFAULT_RETRY: Final = RetryPolicy()

# The resources and responses that the client's methods return, under short names.
Lesson = resources_pb2.Lesson
Course = resources_pb2.Course
LessonProgress = resources_pb2.LessonProgress
CourseProgress = resources_pb2.CourseProgress
Attempt = resources_pb2.Attempt
ProgressEvent = resources_pb2.ProgressEvent
ProgressEventKind = resources_pb2.ProgressEventKind
LessonStats = resources_pb2.LessonStats
DifficultLesson = resources_pb2.DifficultLesson
RecordTimeRequest = progress_service_pb2.RecordTimeRequest
RecordAttemptResponse = progress_service_pb2.RecordAttemptResponse
CompleteLessonResponse = progress_service_pb2.CompleteLessonResponse
ListLessonProgressResponse = progress_service_pb2.ListLessonProgressResponse
ListAttemptsResponse = progress_service_pb2.ListAttemptsResponse
Note = resources_pb2.Note
ListNotesResponse = progress_service_pb2.ListNotesResponse

RequestT = TypeVar("RequestT", bound=protobuf_message.Message)
ResponseT = TypeVar("ResponseT", bound=protobuf_message.Message)
ItemT = TypeVar("ItemT")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Seconds spent in one lesson: one entry of :meth:`ProgressClient.batch_record_time`.

    ``request_id`` is the entry's idempotency key; the client generates one when it is None.
    ``occurred_at`` (an aware datetime) is when the time was spent, for clients that sync
    later; None means now. The server credits the entry under its time budget at that time.
    """

    user_id: str
    course_id: str
    lesson_id: str
    seconds: int
    request_id: str | None = None
    occurred_at: datetime | None = None


# --- requests --------------------------------------------------------------------------------


def _request_id(given: str | None) -> str:
    """The caller's request id, or a fresh UUID (generated once per logical call)."""
    return given if given else str(uuid.uuid4())


def _heartbeat_request(entry: Heartbeat | RecordTimeRequest) -> RecordTimeRequest:
    """A batch entry as a request message with its request id fixed."""
    if isinstance(entry, Heartbeat):
        request = RecordTimeRequest(
            user_id=entry.user_id,
            course_id=entry.course_id,
            lesson_id=entry.lesson_id,
            seconds=entry.seconds,
            request_id=_request_id(entry.request_id),
        )
        if entry.occurred_at is not None:
            request.occurred_at.FromDatetime(entry.occurred_at)
        return request
    request = RecordTimeRequest()
    request.CopyFrom(entry)
    request.request_id = _request_id(entry.request_id)
    return request


async def _flatten(
    chunks: AsyncGenerator[Iterable[ItemT], None],
) -> AsyncGenerator[ItemT, None]:
    """The items of a stream of chunks, one by one; closing it closes (cancels) the stream."""
    try:
        async for chunk in chunks:
            for item in chunk:
                yield item
    finally:
        await chunks.aclose()


# --- the client ------------------------------------------------------------------------------


_Page = TypeVar("_Page", ListLessonProgressResponse, ListAttemptsResponse, ListNotesResponse)


async def _paged(
    fetch: Callable[[str], Awaitable[_Page]], items: Callable[[_Page], Iterable[ItemT]]
) -> AsyncIterator[ItemT]:
    """Every item of an AIP-158 listing: ``fetch(page_token)`` page after page."""
    page_token = ""
    while True:
        page = await fetch(page_token)
        for item in items(page):
            yield item
        page_token = page.next_page_token
        if not page_token:
            return


class ProgressClient:
    """Async client of CatalogService, ProgressService and AnalyticsService.

    Use it as an async context manager (``async with ProgressClient(...) as client``), or
    call :meth:`close` when done. One client (one channel) can serve any number of
    concurrent calls; create it once per process and share it.

    Args:
        target: ``host:port`` of the service (any gRPC target, e.g. ``dns:///svc:50051``).
        token: bearer token sent as ``authorization: Bearer <token>`` on every call.
        tls: a :class:`TlsConfig` for a TLS channel (``TlsConfig()``: the system's roots);
            None (the default) for plaintext, on loopback or behind a mesh that adds TLS.
        retry: which failures are retried and how (:class:`RetryPolicy`).
        timeout: default deadline in seconds of each unary call, retries included; None for
            none (not recommended).
        stream_timeout: default deadline of each stream; None (the default) for none.
        options: extra gRPC channel options (keepalive, message sizes, ...).
        interceptors: grpc.aio client interceptors (tracing, logging, ...).
        batching: a :class:`HeartbeatBatching` to coalesce concurrent ``record_time`` calls
            into BatchRecordTime calls (a few milliseconds of linger for far fewer calls);
            None (the default) sends each as its own RecordTime.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float | None = 5.0,
        stream_timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        batching: HeartbeatBatching | None = None,
    ) -> None:
        for name, value in (("timeout", timeout), ("stream_timeout", stream_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        self.target = target
        self.retry = retry
        self._timeout = timeout
        self._stream_timeout = stream_timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

        channel_options: list[tuple[str, Any]] = [("grpc.primary_user_agent", _USER_AGENT)]
        if tls is not None and tls.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel_options.extend(options)
        if tls is not None:
            self._channel = grpc.aio.secure_channel(
                target, tls.credentials(), options=channel_options, interceptors=interceptors
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                target, options=channel_options, interceptors=interceptors
            )
        self._catalog = catalog_service_pb2_grpc.CatalogServiceStub(self._channel)
        self._progress = progress_service_pb2_grpc.ProgressServiceStub(self._channel)
        self._analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(self._channel)
        self._batcher = (
            None
            if batching is None
            else HeartbeatBatcher(batching, self._send_batch, self._batch_retry_delay)
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel, e.g. for the standard health service's stub."""
        return self._channel

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still in flight are cancelled (batched heartbeats
        still waiting for their batch are sent first)."""
        if self._batcher is not None:
            await self._batcher.close()
        await self._channel.close()

    # --- call machinery ----------------------------------------------------------------------

    async def _unary(
        self,
        name: str,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        timeout: float | None,
    ) -> ResponseT:
        """Sends ``request``, retrying UNAVAILABLE and ABORTED within the call's deadline.

        The same request message (so the same request ids) is sent on every attempt.
        """
        loop = asyncio.get_running_loop()
        budget = self._timeout if timeout is None else timeout
        deadline = None if budget is None else loop.time() + budget
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                return await method(request, timeout=remaining, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                error = ProgressError.from_rpc_error(exc, attempts=attempt)
                delay = self._retry_delay(name, error, attempt, deadline)
                if delay is None:
                    raise error from exc
            await asyncio.sleep(delay)

    async def _send_batch(
        self, request: progress_service_pb2.BatchRecordTimeRequest, timeout: float | None
    ) -> progress_service_pb2.BatchRecordTimeResponse:
        """One attempt of a batch of coalesced heartbeats (the batcher retries)."""
        try:
            return await self._progress.BatchRecordTime(
                request, timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise ProgressError.from_rpc_error(exc) from exc

    def _batch_retry_delay(
        self, error: ProgressError, attempt: int, deadline: float | None
    ) -> float | None:
        return self._retry_delay("BatchRecordTime", error, attempt, deadline)

    def _retry_delay(
        self, name: str, error: ProgressError, attempt: int, deadline: float | None
    ) -> float | None:
        """The back-off before retrying a failed attempt, or None if it is not retried."""
        if not error.retryable or attempt > self.retry.retries:
            return None
        delay = self.retry.backoff(attempt - 1)
        if deadline is not None and asyncio.get_running_loop().time() + delay >= deadline:
            return None
        log.info(
            "%s failed with %s (%s); retry %d of %d in %.2fs",
            name,
            error.code.name,
            error.reason or error.message,
            attempt,
            self.retry.retries,
            delay,
        )
        return delay

    async def _stream(
        self,
        name: str,
        method: grpc.aio.UnaryStreamMultiCallable[RequestT, ResponseT],
        request: RequestT,
        timeout: float | None,
        unwrap: Callable[[ResponseT], ItemT],
        resume: Callable[[RequestT, ResponseT], RequestT] | None = None,
    ) -> AsyncGenerator[ItemT, None]:
        """Yields ``unwrap(response)`` for each response of a server stream.

        UNAVAILABLE and ABORTED are retried while nothing has been delivered yet. With
        ``resume``, they are also retried later on, with the request that ``resume`` builds
        from the last delivered response (the retry count starts over after each response).
        Closing the generator cancels the call.
        """
        loop = asyncio.get_running_loop()
        budget = self._stream_timeout if timeout is None else timeout
        deadline = None if budget is None else loop.time() + budget
        delivered = False
        failures = 0
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            call = method(request, timeout=remaining, metadata=self._metadata)
            try:
                async for response in call:
                    if resume is not None:
                        request = resume(request, response)
                        failures = 0
                    delivered = True
                    yield unwrap(response)
                return
            except grpc.aio.AioRpcError as exc:
                failures += 1
                error = ProgressError.from_rpc_error(exc, attempts=failures)
                retry = resume is not None or not delivered
                delay = self._retry_delay(name, error, failures, deadline) if retry else None
                if delay is None:
                    raise error from exc
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    # --- CatalogService ----------------------------------------------------------------------

    async def upsert_course(
        self,
        *,
        course_id: str,
        title: str = "",
        lessons: Iterable[Lesson] = (),
        timeout: float | None = None,
    ) -> Course:
        """Creates a course or replaces its outline; ``lessons`` in lesson order.

        Build lessons with ``Lesson(lesson_id=..., title=..., assessed=..., passing_score=...)``.
        Raises ProgressError INVALID_ARGUMENT for a malformed id, title or lesson.
        """
        request = catalog_service_pb2.UpsertCourseRequest(
            course_id=course_id, title=title, lessons=list(lessons)
        )
        response = await self._unary("UpsertCourse", self._catalog.UpsertCourse, request, timeout)
        return response.course

    async def get_course(self, *, course_id: str, timeout: float | None = None) -> Course:
        """The course with its lessons in order; NOT_FOUND if it is not registered."""
        request = catalog_service_pb2.GetCourseRequest(course_id=course_id)
        response = await self._unary("GetCourse", self._catalog.GetCourse, request, timeout)
        return response.course

    async def delete_course(self, *, course_id: str, timeout: float | None = None) -> int:
        """Deletes a course and all progress in it; returns the lesson rows deleted.

        NOT_FOUND if it is not registered; note that after a retried UNAVAILABLE, NOT_FOUND
        can mean that the failed attempt did delete it.
        """
        request = catalog_service_pb2.DeleteCourseRequest(course_id=course_id)
        response = await self._unary("DeleteCourse", self._catalog.DeleteCourse, request, timeout)
        return int(response.deleted_lessons)

    # --- ProgressService ---------------------------------------------------------------------

    async def start_lesson(
        self, *, user_id: str, course_id: str, lesson_id: str, timeout: float | None = None
    ) -> LessonProgress:
        """Records that the learner opened a lesson; returns the lesson progress."""
        request = progress_service_pb2.StartLessonRequest(
            user_id=user_id, course_id=course_id, lesson_id=lesson_id
        )
        response = await self._unary("StartLesson", self._progress.StartLesson, request, timeout)
        return response.lesson

    async def record_time(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        seconds: int,
        request_id: str | None = None,
        occurred_at: datetime | None = None,
        timeout: float | None = None,
    ) -> LessonProgress:
        """Adds ``seconds`` of heartbeat time to a lesson; returns the lesson progress.

        ``request_id`` (a UUID) makes the write idempotent; one is generated if not given,
        and reused on every retry. INVALID_ARGUMENT for ``seconds`` outside 1..max. The
        server's time budget may credit less than ``seconds``: ``record_time_credited``
        says how much.

        With ``batching``, the heartbeat joins the others sent concurrently through this
        client in one BatchRecordTime call; the result and errors are this call's own. Two
        heartbeats for the same lesson in one batch both return the state after both.
        """
        credited = await self.record_time_credited(
            user_id=user_id,
            course_id=course_id,
            lesson_id=lesson_id,
            seconds=seconds,
            request_id=request_id,
            occurred_at=occurred_at,
            timeout=timeout,
        )
        return credited.lesson

    async def record_time_credited(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        seconds: int,
        request_id: str | None = None,
        occurred_at: datetime | None = None,
        timeout: float | None = None,
    ) -> Credited:
        """Like ``record_time``, with the seconds the time budget credited."""
        request = _heartbeat_request(
            Heartbeat(user_id, course_id, lesson_id, seconds, request_id, occurred_at)
        )
        if self._batcher is not None:
            budget = self._timeout if timeout is None else timeout
            return await self._batcher.record_time(request, budget)
        response = await self._unary("RecordTime", self._progress.RecordTime, request, timeout)
        return Credited(response.lesson, response.credited_seconds)

    async def batch_record_time(
        self, heartbeats: Iterable[Heartbeat | RecordTimeRequest], *, timeout: float | None = None
    ) -> list[LessonProgress]:
        """Adds many heartbeats atomically; returns one lesson progress per entry, in order.

        Entries without a request id get a generated one, reused on every retry. One bad
        entry rejects the whole batch: INVALID_ARGUMENT naming ``requests[i].<field>``.
        """
        results = await self.batch_record_time_credited(heartbeats, timeout=timeout)
        return [result.lesson for result in results]

    async def batch_record_time_credited(
        self, heartbeats: Iterable[Heartbeat | RecordTimeRequest], *, timeout: float | None = None
    ) -> list[Credited]:
        """Like ``batch_record_time``, with the seconds the time budget credited each entry.

        Entries on one lesson share one LessonProgress message. When the server left the
        bookmarks out to fit its message limit, the lessons carry none (read them with
        ``get_lesson_progress``).
        """
        request = progress_service_pb2.BatchRecordTimeRequest(
            requests=[_heartbeat_request(entry) for entry in heartbeats]
        )
        response = await self._unary(
            "BatchRecordTime", self._progress.BatchRecordTime, request, timeout
        )
        return credited_by_entry(response, request.requests)

    async def record_attempt(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        score: int,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> RecordAttemptResponse:
        """Records a scored attempt (0-100); returns the lesson and whether it passed.

        ``request_id`` makes the write idempotent; one is generated if not given, and reused
        on every retry.
        """
        request = progress_service_pb2.RecordAttemptRequest(
            user_id=user_id,
            course_id=course_id,
            lesson_id=lesson_id,
            score=score,
            request_id=_request_id(request_id),
        )
        return await self._unary("RecordAttempt", self._progress.RecordAttempt, request, timeout)

    async def complete_lesson(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        score: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> CompleteLessonResponse:
        """Marks a lesson completed (with an optional final score).

        Returns the lesson progress and the learner's course progress. ``request_id`` makes
        the write idempotent; one is generated if not given, and reused on every retry.
        """
        request = progress_service_pb2.CompleteLessonRequest(
            user_id=user_id,
            course_id=course_id,
            lesson_id=lesson_id,
            score=score,
            request_id=_request_id(request_id),
        )
        return await self._unary("CompleteLesson", self._progress.CompleteLesson, request, timeout)

    async def get_lesson_progress(
        self, *, user_id: str, course_id: str, lesson_id: str, timeout: float | None = None
    ) -> LessonProgress:
        """One learner's progress in one lesson; NOT_FOUND if there is none."""
        request = progress_service_pb2.GetLessonProgressRequest(
            user_id=user_id, course_id=course_id, lesson_id=lesson_id
        )
        response = await self._unary(
            "GetLessonProgress", self._progress.GetLessonProgress, request, timeout
        )
        return response.lesson

    async def list_lesson_progress(
        self,
        *,
        user_id: str,
        course_id: str,
        page_size: int = 0,
        page_token: str = "",
        completed_only: bool = False,
        timeout: float | None = None,
    ) -> ListLessonProgressResponse:
        """One page of a learner's lessons in a course (``lessons``, ``next_page_token``)."""
        request = progress_service_pb2.ListLessonProgressRequest(
            user_id=user_id,
            course_id=course_id,
            page_size=page_size,
            page_token=page_token,
            completed_only=completed_only,
        )
        return await self._unary(
            "ListLessonProgress", self._progress.ListLessonProgress, request, timeout
        )

    async def iter_lesson_progress(
        self,
        *,
        user_id: str,
        course_id: str,
        completed_only: bool = False,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[LessonProgress]:
        """Every lesson of a learner in a course, fetching page after page.

        Each page is one call with its own deadline (``timeout``) and retries.
        """
        async for lesson in _paged(
            lambda token: self.list_lesson_progress(
                user_id=user_id,
                course_id=course_id,
                page_size=page_size,
                page_token=token,
                completed_only=completed_only,
                timeout=timeout,
            ),
            lambda page: page.lessons,
        ):
            yield lesson

    async def get_course_progress(
        self, *, user_id: str, course_id: str, timeout: float | None = None
    ) -> CourseProgress:
        """One learner's progress in one course (zeroed if the learner has none)."""
        request = progress_service_pb2.GetCourseProgressRequest(
            user_id=user_id, course_id=course_id
        )
        response = await self._unary(
            "GetCourseProgress", self._progress.GetCourseProgress, request, timeout
        )
        return response.course

    async def delete_user_progress(self, *, user_id: str, timeout: float | None = None) -> int:
        """Erases everything held about a learner; returns the lesson rows deleted.

        After a retried UNAVAILABLE the count may miss rows that the failed attempt deleted.
        """
        request = progress_service_pb2.DeleteUserProgressRequest(user_id=user_id)
        response = await self._unary(
            "DeleteUserProgress", self._progress.DeleteUserProgress, request, timeout
        )
        return int(response.deleted_lessons)

    async def list_attempts(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> ListAttemptsResponse:
        """One page of a lesson's attempt history, oldest first."""
        request = progress_service_pb2.ListAttemptsRequest(
            user_id=user_id,
            course_id=course_id,
            lesson_id=lesson_id,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._unary("ListAttempts", self._progress.ListAttempts, request, timeout)

    async def iter_attempts(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Attempt]:
        """The whole attempt history of a lesson, oldest first, page after page."""
        async for attempt in _paged(
            lambda token: self.list_attempts(
                user_id=user_id,
                course_id=course_id,
                lesson_id=lesson_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            ),
            lambda page: page.attempts,
        ):
            yield attempt

    async def save_bookmark(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        position: str,
        timeout: float | None = None,
    ) -> LessonProgress:
        """Saves where the learner left off (at most 4 KiB; empty clears it)."""
        request = progress_service_pb2.SaveBookmarkRequest(
            user_id=user_id, course_id=course_id, lesson_id=lesson_id, position=position
        )
        response = await self._unary("SaveBookmark", self._progress.SaveBookmark, request, timeout)
        return response.lesson

    async def create_note(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str,
        body: str,
        anchor: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Note:
        """Adds a private note to a lesson (body 1-10,000 characters, anchor at most 4 KiB).

        ``request_id`` makes the write idempotent (a retry returns the same note); one is
        generated if not given, and reused on every retry.
        """
        request = progress_service_pb2.CreateNoteRequest(
            user_id=user_id,
            course_id=course_id,
            lesson_id=lesson_id,
            anchor=anchor,
            body=body,
            request_id=_request_id(request_id),
        )
        response = await self._unary("CreateNote", self._progress.CreateNote, request, timeout)
        return response.note

    async def update_note(
        self,
        *,
        user_id: str,
        course_id: str,
        note_id: str,
        body: str | None = None,
        anchor: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Note:
        """Changes a note's body and/or anchor (None keeps it); returns the note."""
        request = progress_service_pb2.UpdateNoteRequest(
            user_id=user_id,
            course_id=course_id,
            note_id=note_id,
            anchor=anchor,
            body=body,
            request_id=_request_id(request_id),
        )
        response = await self._unary("UpdateNote", self._progress.UpdateNote, request, timeout)
        return response.note

    async def delete_note(
        self,
        *,
        user_id: str,
        course_id: str,
        note_id: str,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Deletes a note; a retried deletion (same request id) succeeds again."""
        request = progress_service_pb2.DeleteNoteRequest(
            user_id=user_id,
            course_id=course_id,
            note_id=note_id,
            request_id=_request_id(request_id),
        )
        await self._unary("DeleteNote", self._progress.DeleteNote, request, timeout)

    async def list_notes(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> ListNotesResponse:
        """One page of a learner's notes in a course (or one lesson), newest first."""
        request = progress_service_pb2.ListNotesRequest(
            user_id=user_id,
            course_id=course_id,
            lesson_id=lesson_id,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._unary("ListNotes", self._progress.ListNotes, request, timeout)

    async def iter_notes(
        self,
        *,
        user_id: str,
        course_id: str,
        lesson_id: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Note]:
        """Every note of a learner in a course (or one lesson), newest first, page by page."""
        async for note in _paged(
            lambda token: self.list_notes(
                user_id=user_id,
                course_id=course_id,
                lesson_id=lesson_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            ),
            lambda page: page.notes,
        ):
            yield note

    def watch_progress(
        self,
        *,
        course_id: str,
        user_id: str = "",
        after_event_id: int = 0,
        resume: bool = True,
        timeout: float | None = None,
    ) -> AsyncGenerator[ProgressEvent, None]:
        """The progress events of a course (or of one learner in it), as they are committed.

        Runs until closed or until its deadline passes. With ``resume`` (the default), a
        stream broken by UNAVAILABLE or ABORTED (a server restart) is reopened after the
        last delivered ``event_id``, so no event is lost or repeated; before the first event
        it reopens after ``after_event_id``, and when that is 0, events committed while
        disconnected are not replayed. OUT_OF_RANGE if the events to replay have expired.
        """
        request = progress_service_pb2.WatchProgressRequest(
            course_id=course_id, user_id=user_id, after_event_id=after_event_id
        )

        def after_last(
            previous: progress_service_pb2.WatchProgressRequest,
            response: progress_service_pb2.WatchProgressResponse,
        ) -> progress_service_pb2.WatchProgressRequest:
            return progress_service_pb2.WatchProgressRequest(
                course_id=previous.course_id,
                user_id=previous.user_id,
                after_event_id=response.event.event_id,
            )

        return self._stream(
            "WatchProgress",
            self._progress.WatchProgress,
            request,
            timeout,
            lambda response: response.event,
            after_last if resume else None,
        )

    # --- AnalyticsService --------------------------------------------------------------------

    def stream_lesson_stats(
        self, *, course_id: str, timeout: float | None = None
    ) -> AsyncGenerator[LessonStats, None]:
        """One LessonStats per lesson of the course's outline, in outline order."""
        request = analytics_service_pb2.StreamLessonStatsRequest(course_id=course_id)
        return self._stream(
            "StreamLessonStats",
            self._analytics.StreamLessonStats,
            request,
            timeout,
            lambda response: response.lesson_stats,
        )

    def stream_difficult_lessons(
        self, *, course_id: str, min_completions: int = 0, timeout: float | None = None
    ) -> AsyncGenerator[DifficultLesson, None]:
        """Lessons with at least ``min_completions`` completions (0 means 10), hardest first."""
        request = analytics_service_pb2.StreamDifficultLessonsRequest(
            course_id=course_id, min_completions=min_completions
        )
        return self._stream(
            "StreamDifficultLessons",
            self._analytics.StreamDifficultLessons,
            request,
            timeout,
            lambda response: response.difficult_lesson,
        )

    def stream_course_learners(
        self, *, course_id: str, page_size: int = 0, timeout: float | None = None
    ) -> AsyncGenerator[CourseProgress, None]:
        """One CourseProgress per learner with progress in the course, by ``user_id``.

        The server sends the learners in chunks (up to 500 per message); they are yielded
        one by one. ``page_size`` is how many rows the server reads per round trip (0 means
        1,000).
        """
        request = analytics_service_pb2.StreamCourseLearnersRequest(
            course_id=course_id, page_size=page_size
        )
        return _flatten(
            self._stream(
                "StreamCourseLearners",
                self._analytics.StreamCourseLearners,
                request,
                timeout,
                lambda response: response.learners,
            )
        )
