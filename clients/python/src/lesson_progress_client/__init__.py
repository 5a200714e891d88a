"""A typed async client for the lesson progress service, for calling teams.

Usage::

    from lesson_progress_client import ProgressClient, ProgressError, RetryPolicy, TlsConfig

    async with ProgressClient("lesson-progress:50051", token=token) as client:
        lesson = await client.record_time(
            user_id=user_id, course_id=course_id, lesson_id="intro", seconds=30
        )
        print(lesson.time_spent_seconds)
        async for stats in client.stream_lesson_stats(course_id=course_id):
            print(stats.lesson_id, stats.completion_rate)

What the client does for every call:

* **Deadline.** Every unary call has one (``timeout``, 5 s by default). It covers the whole
  logical call, retries and back-off included: a call never takes longer than its deadline.
  Streams have none unless one is given (``stream_timeout`` or the call's ``timeout``).
  Every method takes ``timeout=`` to override the default for that call.
* **Retries.** ``UNAVAILABLE`` (the server or its database cannot be reached) and
  ``ABORTED`` (a write lost a race repeatedly) are retried as ``retry=RetryPolicy(...)``
  says (4 times by default) with exponential back-off and jitter; no other code is retried.
* **Safe retries.** ``record_time``, ``record_attempt``, ``complete_lesson``, the note
  writes (``create_note``, ``update_note``, ``delete_note``) and every entry of
  ``batch_record_time`` carry a ``request_id``: the caller's own (e.g. the id of the event it
  is forwarding), else a fresh UUID generated once per logical call. The same id is sent on
  every retry, so the service applies the write at most once even when an attempt committed
  but its response was lost.
* **Heartbeat batching** (off by default). With ``batching=HeartbeatBatching(linger=0.002,
  max_batch=500)``, ``record_time`` calls made concurrently through one client wait up to
  ``linger`` seconds and go out together as one ``BatchRecordTime`` call. Each caller still
  gets its own lesson progress or its own error: a batch the server refuses because of one
  entry (``requests[i]``) fails that entry's caller only and is sent again without it;
  retries resend the same request ids, so each heartbeat counts once. Each call's deadline
  holds. Off by default because it adds up to ``linger`` to every heartbeat and pays off
  only when many heartbeats are in flight at once (a gateway forwarding many learners').
* **Authentication.** ``token`` is sent as ``authorization: Bearer <token>`` metadata.
* **TLS.** ``tls=TlsConfig(root_certificates=..., server_name=...)`` (with
  ``certificate_chain`` + ``private_key`` for mutual TLS; ``TlsConfig()`` for the system's
  roots) makes a TLS channel; without it the channel is plaintext, for loopback or a service
  mesh that provides TLS.
* **Errors.** A failed call raises :class:`ProgressError` with the status code, the message,
  the ``google.rpc.ErrorInfo`` reason and the ``google.rpc.BadRequest`` field violations
  that the service sends in the ``grpc-status-details-bin`` trailer.

Streams are async generators. Leaving an ``async for`` early does not end the call until the
generator is closed: wrap it in ``contextlib.aclosing`` (or call ``aclose()``) to cancel the
call at once.

This distribution (``lesson-progress-client``) holds the client and the generated stubs
(``lessonprogress.v1``); it depends on grpcio, protobuf and googleapis-common-protos only.
"""

from lesson_progress_client.batching import Credited
from lesson_progress_client.client import (
    Attempt,
    CompleteLessonResponse,
    Course,
    CourseProgress,
    DifficultLesson,
    Heartbeat,
    Lesson,
    LessonProgress,
    LessonStats,
    ListAttemptsResponse,
    ListLessonProgressResponse,
    ListNotesResponse,
    Note,
    ProgressClient,
    ProgressEvent,
    ProgressEventKind,
    RecordAttemptResponse,
    RecordTimeRequest,
)
from lesson_progress_client.errors import DOMAIN, RETRYABLE_CODES, FieldViolation, ProgressError
from lesson_progress_client.settings import NO_RETRIES, HeartbeatBatching, RetryPolicy, TlsConfig

__all__ = [
    "DOMAIN",
    "NO_RETRIES",
    "RETRYABLE_CODES",
    "Attempt",
    "CompleteLessonResponse",
    "Course",
    "CourseProgress",
    "Credited",
    "DifficultLesson",
    "FieldViolation",
    "Heartbeat",
    "HeartbeatBatching",
    "Lesson",
    "LessonProgress",
    "LessonStats",
    "ListAttemptsResponse",
    "ListLessonProgressResponse",
    "ListNotesResponse",
    "Note",
    "ProgressClient",
    "ProgressError",
    "ProgressEvent",
    "ProgressEventKind",
    "RecordAttemptResponse",
    "RecordTimeRequest",
    "RetryPolicy",
    "TlsConfig",
]
