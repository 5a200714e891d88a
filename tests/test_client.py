"""lesson_progress_client: every method end to end, errors, retries and request ids.

The end-to-end tests run against the in-process server of ``conftest.py``. The retry tests
use a private embedded PostgreSQL that is stopped and restarted under a second server, and
a tiny scripted grpc.aio server on a random port that fails on cue and records what it got.
Timeouts here are hang guards only: nothing asserts how long anything takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lesson_progress import server
from lesson_progress.auth import hash_token
from lesson_progress.embedded import EmbeddedPostgres
from lesson_progress_client import (
    DOMAIN,
    NO_RETRIES,
    Heartbeat,
    Lesson,
    ProgressClient,
    ProgressError,
    ProgressEventKind,
    RecordTimeRequest,
    RetryPolicy,
    TlsConfig,
)
from lessonprogress.v1 import (
    analytics_service_pb2,
    progress_service_pb2,
    resources_pb2,
)
from tests.certs import make_pki
from tests.conftest import new_id, server_config
from tests.support import lost_response

HANG_GUARD = 60.0  # seconds; a deadline that only stops a broken test from hanging


@pytest.fixture
async def client(running_server: server.RunningServer) -> AsyncIterator[ProgressClient]:
    """A client of the in-process test server."""
    async with ProgressClient(f"127.0.0.1:{running_server.port}", timeout=HANG_GUARD) as client:
        yield client


async def register(client: ProgressClient, lessons: int = 3, **lesson: Any) -> list[str]:
    """Registers a course with lessons l1, l2, ...; returns [course_id, l1, l2, ...]."""
    course_id = new_id()
    lesson_ids = [f"l{i + 1}" for i in range(lessons)]
    await client.upsert_course(
        course_id=course_id,
        title="course",
        lessons=[
            Lesson(lesson_id=lesson_id, title=lesson_id, **lesson) for lesson_id in lesson_ids
        ],
    )
    return [course_id, *lesson_ids]


# --- end to end against the real server ------------------------------------------------------


async def test_catalog_round_trip(client: ProgressClient) -> None:
    course_id = new_id()
    course = await client.upsert_course(
        course_id=course_id.upper(),
        title="Python",
        lessons=[
            Lesson(lesson_id="intro", title="Intro"),
            Lesson(lesson_id="quiz", passing_score=80),
        ],
    )
    assert course.course_id == course_id
    assert [lesson.lesson_id for lesson in course.lessons] == ["intro", "quiz"]

    fetched = await client.get_course(course_id=course_id)
    assert fetched.title == "Python"
    assert fetched.lessons[1].HasField("passing_score")
    assert fetched.lessons[1].passing_score == 80

    user = new_id()
    await client.start_lesson(user_id=user, course_id=course_id, lesson_id="intro")
    assert await client.delete_course(course_id=course_id) == 1
    with pytest.raises(ProgressError) as caught:
        await client.get_course(course_id=course_id)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.domain == DOMAIN
    assert caught.value.reason
    assert caught.value.reason.isupper()


async def test_progress_methods_end_to_end(client: ProgressClient) -> None:
    course_id, l1, l2, l3 = await register(client, 3)
    quiz_course, quiz = await register(client, 1, assessed=True, passing_score=70)
    user = new_id()
    key = {"user_id": user, "course_id": course_id}

    started = await client.start_lesson(**key, lesson_id=l1)
    assert started.lesson_id == l1
    assert started.HasField("first_started_at")

    assert (await client.record_time(**key, lesson_id=l1, seconds=30)).time_spent_seconds == 30
    assert (await client.record_time(**key, lesson_id=l1, seconds=12)).time_spent_seconds == 42

    failed = await client.record_attempt(**key, lesson_id=l2, score=40)
    assert not failed.passed
    assert failed.lesson.attempts == 1
    assert failed.lesson.score == 40

    passed = await client.record_attempt(
        user_id=user, course_id=quiz_course, lesson_id=quiz, score=90
    )
    assert passed.passed
    assert passed.lesson.completed

    done = await client.complete_lesson(**key, lesson_id=l1, score=75)
    assert done.lesson.completed
    assert done.lesson.score == 75
    assert list(done.course.completed_lesson_ids) == [l1]
    assert done.course.total_lessons == 3

    got = await client.get_lesson_progress(**key, lesson_id=l1)
    assert got.completed
    assert got.time_spent_seconds == 42

    lessons = await client.list_lesson_progress(**key)
    assert [lesson.lesson_id for lesson in lessons.lessons] == [l1, l2]
    assert lessons.next_page_token == ""
    first_page = await client.list_lesson_progress(**key, page_size=1)
    assert len(first_page.lessons) == 1
    assert first_page.next_page_token
    all_pages = [lesson async for lesson in client.iter_lesson_progress(**key, page_size=1)]
    assert [lesson.lesson_id for lesson in all_pages] == [l1, l2]
    completed = [
        lesson.lesson_id async for lesson in client.iter_lesson_progress(**key, completed_only=True)
    ]
    assert completed == [l1]

    await client.record_attempt(**key, lesson_id=l2, score=65)
    attempts = await client.list_attempts(**key, lesson_id=l2)
    assert [attempt.score for attempt in attempts.attempts] == [40, 65]
    assert all(uuid.UUID(attempt.request_id) for attempt in attempts.attempts)
    paged = [a.score async for a in client.iter_attempts(**key, lesson_id=l2, page_size=1)]
    assert paged == [40, 65]

    bookmarked = await client.save_bookmark(**key, lesson_id=l3, position="video=01:02")
    assert bookmarked.bookmark == "video=01:02"

    course = await client.get_course_progress(**key)
    assert course.completed_lessons == 1
    assert course.progress_percentage == 33
    assert course.total_time_spent_seconds == 42
    assert course.last_lesson_id == l3
    assert course.last_lesson_bookmark == "video=01:02"

    assert await client.delete_user_progress(user_id=user) == 4  # l1, l2, l3 and the quiz
    with pytest.raises(ProgressError) as caught:
        await client.get_lesson_progress(**key, lesson_id=l1)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    zeroed = await client.get_course_progress(**key)
    assert zeroed.completed_lessons == 0


async def test_batch_record_time(client: ProgressClient) -> None:
    course_id, l1, l2 = await register(client, 2)
    user = new_id()
    given = new_id()
    lessons = await client.batch_record_time(
        [
            Heartbeat(user, course_id, l1, 10),
            Heartbeat(user, course_id, l1, 5, request_id=given),
            RecordTimeRequest(user_id=user, course_id=course_id, lesson_id=l2, seconds=7),
        ]
    )
    assert [(lesson.lesson_id, lesson.time_spent_seconds) for lesson in lessons] == [
        (l1, 15),
        (l1, 15),
        (l2, 7),
    ]
    # The given request id was sent: repeating it adds nothing.
    again = await client.batch_record_time([Heartbeat(user, course_id, l1, 5, request_id=given)])
    assert again[0].time_spent_seconds == 15


async def test_credited_seconds_and_occurred_at(client: ProgressClient) -> None:
    course_id, l1 = await register(client, 1)
    user = new_id()
    hour_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    # Two 60 s heartbeats a minute apart, an hour ago: credited in full.
    results = await client.batch_record_time_credited(
        [
            Heartbeat(user, course_id, l1, 60, occurred_at=hour_ago),
            Heartbeat(user, course_id, l1, 60, occurred_at=hour_ago + timedelta(minutes=1)),
        ]
    )
    assert [(r.lesson.time_spent_seconds, r.credited_seconds) for r in results] == [
        (120, 60),
        (120, 60),
    ]
    # The same minute again: the budget (allowance 30 days on the test server) takes it from
    # the time before, a second earlier minute; the response says how much was credited.
    again = await client.record_time_credited(
        user_id=user, course_id=course_id, lesson_id=l1, seconds=60, occurred_at=hour_ago
    )
    assert (again.lesson.time_spent_seconds, again.credited_seconds) == (180, 60)


async def test_request_ids_given_are_honoured_and_generated_ones_are_fresh(
    client: ProgressClient,
) -> None:
    course_id, l1 = await register(client, 1)
    user = new_id()
    key = {"user_id": user, "course_id": course_id, "lesson_id": l1}
    request_id = new_id()
    await client.record_time(**key, seconds=10, request_id=request_id)
    repeated = await client.record_time(**key, seconds=10, request_id=request_id)
    assert repeated.time_spent_seconds == 10
    # Without a request id every logical call gets its own: both count.
    await client.record_time(**key, seconds=3)
    assert (await client.record_time(**key, seconds=3)).time_spent_seconds == 16

    attempt_id = new_id()
    await client.record_attempt(**key, score=50, request_id=attempt_id)
    repeated_attempt = await client.record_attempt(**key, score=50, request_id=attempt_id)
    assert repeated_attempt.lesson.attempts == 1
    completion_id = new_id()
    first = await client.complete_lesson(**key, request_id=completion_id)
    second = await client.complete_lesson(**key, request_id=completion_id)
    assert first.lesson.completed_at == second.lesson.completed_at


async def test_analytics_streams(client: ProgressClient) -> None:
    course_id, l1, l2, l3 = await register(client, 3)
    first, second = sorted([new_id(), new_id()])
    for _ in range(3):
        await client.record_attempt(user_id=first, course_id=course_id, lesson_id=l1, score=30)
    await client.complete_lesson(user_id=first, course_id=course_id, lesson_id=l1)
    await client.complete_lesson(user_id=second, course_id=course_id, lesson_id=l1)
    await client.record_attempt(user_id=second, course_id=course_id, lesson_id=l2, score=80)
    await client.complete_lesson(user_id=second, course_id=course_id, lesson_id=l2)

    stats = [s async for s in client.stream_lesson_stats(course_id=course_id)]
    assert [s.lesson_id for s in stats] == [l1, l2, l3]
    assert (stats[0].started_count, stats[0].completed_count) == (2, 2)
    assert (stats[2].started_count, stats[2].completed_count) == (0, 0)

    difficult = [
        d async for d in client.stream_difficult_lessons(course_id=course_id, min_completions=1)
    ]
    assert [(d.lesson_id, d.completion_count, d.avg_attempts) for d in difficult] == [
        (l1, 2, 1.5),
        (l2, 1, 1.0),
    ]

    learners = [c async for c in client.stream_course_learners(course_id=course_id, page_size=1)]
    assert [(c.user_id, c.completed_lessons) for c in learners] == [(first, 1), (second, 2)]


async def test_stream_course_learners_yields_learners_one_by_one_across_chunks(
    client: ProgressClient,
) -> None:
    """1,100 learners arrive in several messages (at most 500 each); the client yields each
    learner once, in user_id order, and closing early cancels the stream."""
    course_id, l1 = await register(client, 1)
    users = [new_id() for _ in range(1100)]
    for start in range(0, len(users), 1000):
        await client.batch_record_time(
            Heartbeat(user, course_id, l1, index % 50 + 1)
            for index, user in enumerate(users[start : start + 1000], start)
        )
    learners = [c async for c in client.stream_course_learners(course_id=course_id)]
    assert [c.user_id for c in learners] == sorted(users)
    seconds = {user: index % 50 + 1 for index, user in enumerate(users)}
    assert {c.user_id: c.total_time_spent_seconds for c in learners} == seconds

    stream = client.stream_course_learners(course_id=course_id)
    async with contextlib.aclosing(stream):
        first = await anext(stream)
    assert first.user_id == min(users)


async def test_watch_progress_delivers_and_replays(client: ProgressClient) -> None:
    course_id, l1, l2 = await register(client, 2)
    user = new_id()
    key = {"user_id": user, "course_id": course_id}
    watch = client.watch_progress(**key, timeout=HANG_GUARD)
    async with contextlib.aclosing(watch):
        first_event = asyncio.ensure_future(anext(watch))
        # A watch sees commits made after it began: write until the first event shows up.
        for _ in range(300):
            if first_event.done():
                break
            await client.save_bookmark(**key, lesson_id=l1, position="p")
            await asyncio.wait({first_event}, timeout=0.2)
        first = await first_event
        assert first.kind == ProgressEventKind.PROGRESS_EVENT_KIND_BOOKMARKED
        assert first.lesson.bookmark == "p"

        await client.start_lesson(**key, lesson_id=l2)
        async for event in watch:
            if event.kind == ProgressEventKind.PROGRESS_EVENT_KIND_STARTED:
                assert event.lesson.lesson_id == l2
                break

    replay = client.watch_progress(**key, after_event_id=first.event_id, timeout=HANG_GUARD)
    async with contextlib.aclosing(replay):
        async for event in replay:
            assert event.event_id > first.event_id
            if event.kind == ProgressEventKind.PROGRESS_EVENT_KIND_STARTED:
                break


# --- errors ---------------------------------------------------------------------------------


async def test_invalid_argument_carries_reason_and_fields(client: ProgressClient) -> None:
    course_id, l1 = await register(client, 1)
    with pytest.raises(ProgressError) as caught:
        await client.record_time(user_id="not-a-uuid", course_id=course_id, lesson_id=l1, seconds=0)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.domain == DOMAIN
    assert error.reason
    assert error.reason.isupper()
    assert {"user_id", "seconds"} <= error.fields
    assert all(v.description for v in error.field_violations)
    assert error.attempts == 1
    assert not error.retryable
    assert "INVALID_ARGUMENT" in str(error)

    user = new_id()
    with pytest.raises(ProgressError) as caught:
        await client.batch_record_time(
            [Heartbeat(user, course_id, l1, 5), Heartbeat(user, course_id, l1, -1)]
        )
    assert "requests[1].seconds" in caught.value.fields


async def test_not_found_errors_including_streams(client: ProgressClient) -> None:
    unknown = new_id()
    with pytest.raises(ProgressError) as caught:
        await client.get_course_progress(user_id=new_id(), course_id=unknown)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason

    with pytest.raises(ProgressError) as caught:
        async for _ in client.stream_lesson_stats(course_id=unknown):
            pass
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.domain == DOMAIN


def test_mutual_tls_needs_both_halves() -> None:
    with pytest.raises(ValueError, match="certificate_chain and private_key"):
        TlsConfig(certificate_chain=b"chain")


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="retries must not be negative"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="back-off"):
        RetryPolicy(backoff_initial=2.0, backoff_max=1.0)
    # The back-off grows exponentially, capped, and is drawn from [ceiling / 2, ceiling].
    policy = RetryPolicy(backoff_initial=0.1, backoff_multiplier=3.0, backoff_max=0.5)
    for retry, ceiling in ((0, 0.1), (1, 0.3), (2, 0.5), (7, 0.5)):
        delay = policy.backoff(retry)
        assert ceiling / 2 <= delay <= ceiling


# --- retries through a database restart -------------------------------------------------------

RECORD_TIME = "/lessonprogress.v1.ProgressService/RecordTime"


@dataclass
class Sent:
    """One attempt of an intercepted call: its request id and how it ended."""

    request_id: str
    code: grpc.StatusCode


class LoseFirstResponse(grpc.aio.UnaryUnaryClientInterceptor):
    """Records every RecordTime attempt; the first one's response is 'lost'.

    The first attempt reaches the server and commits; then ``after_first`` runs (the test
    stops the database) and the caller gets UNAVAILABLE as if the connection dropped before
    the response arrived: the case where only the request id prevents double counting.
    """

    def __init__(self, after_first: Callable[[], Awaitable[None]]) -> None:
        self.after_first = after_first
        self.sent: list[Sent] = []

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        if method != RECORD_TIME:
            return await continuation(client_call_details, request)
        call = await continuation(client_call_details, request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            self.sent.append(Sent(request.request_id, exc.code()))
            raise
        self.sent.append(Sent(request.request_id, grpc.StatusCode.OK))
        if len(self.sent) == 1:
            await self.after_first()
            raise lost_response()
        return call


async def test_retry_through_database_restart_counts_the_heartbeat_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="lesson-progress-client-test-"))
    # The live handle of the private database: the original, then the restarted one.
    databases = [await asyncio.to_thread(EmbeddedPostgres, directory)]
    url = databases[0].url
    restarts: list[asyncio.Task[None]] = []

    async def restart_after_a_second() -> None:
        await asyncio.sleep(1.0)
        databases.append(await asyncio.to_thread(EmbeddedPostgres, directory))

    async def stop_database_and_schedule_restart() -> None:
        await asyncio.to_thread(databases[0].stop)
        restarts.append(asyncio.create_task(restart_after_a_second()))

    running = await server.start(server_config(url, migrate_on_start=True, pool_size=2))
    interceptor = LoseFirstResponse(stop_database_and_schedule_restart)
    try:
        async with ProgressClient(
            f"127.0.0.1:{running.port}",
            timeout=HANG_GUARD,
            retry=RetryPolicy(retries=100, backoff_initial=0.05, backoff_max=0.5),
            interceptors=[interceptor],
        ) as client:
            course_id, l1 = await register(client, 1)
            user = new_id()
            key = {"user_id": user, "course_id": course_id, "lesson_id": l1}
            with caplog.at_level(logging.INFO, logger="lesson_progress_client.client"):
                lesson = await client.record_time(**key, seconds=7)
            assert restarts, "the database was never stopped"
            await restarts[0]
            assert databases[-1].url == url

            assert lesson.time_spent_seconds == 7
            assert (await client.get_lesson_progress(**key)).time_spent_seconds == 7
            # The first attempt committed, later ones met the stopped database, the last one
            # succeeded after the restart: all carried the same request id.
            codes = [sent.code for sent in interceptor.sent]
            assert codes[0] == grpc.StatusCode.OK
            assert grpc.StatusCode.UNAVAILABLE in codes[1:-1]
            assert codes[-1] == grpc.StatusCode.OK
            assert len({sent.request_id for sent in interceptor.sent}) == 1
            assert uuid.UUID(interceptor.sent[0].request_id)
            assert any("RecordTime failed with UNAVAILABLE" in r.message for r in caplog.records)
    finally:
        await running.stop(grace=1)
        for task in restarts:
            with contextlib.suppress(Exception):
                await task
        await asyncio.to_thread(databases[-1].stop)
        shutil.rmtree(directory, ignore_errors=True)


# --- a scripted fake server -----------------------------------------------------------------

PROGRESS_SERVICE = "lessonprogress.v1.ProgressService"
ANALYTICS_SERVICE = "lessonprogress.v1.AnalyticsService"


@contextlib.asynccontextmanager
async def fake_server(
    service: str,
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
) -> AsyncIterator[str]:
    """A real grpc.aio server on a random loopback port; yields its target."""
    fake = grpc.aio.server()
    fake.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = fake.add_insecure_port("127.0.0.1:0")
    await fake.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await fake.stop(None)


def rich_status(code: int, reason: str, *bad_fields: str) -> grpc.Status:
    """A status with the service's google.rpc details."""
    details = [any_pb2.Any()]
    details[0].Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    if bad_fields:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description="is bad")
                    for f in bad_fields
                ]
            )
        )
        details.append(bad_request)
    return rpc_status.to_status(
        status_pb2.Status(code=code, message=f"scripted {reason}", details=details)
    )


def authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The authorization metadata the call carried."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


@dataclass
class Seen:
    """What the fake server saw in one call."""

    request: Any
    authorization: str | None


def scripted_record_time(
    failures: list[grpc.Status], seen: list[Seen]
) -> grpc.RpcMethodHandler[Any, Any]:
    """RecordTime that fails with each of ``failures`` in turn, then succeeds."""

    async def record_time(
        request: progress_service_pb2.RecordTimeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> progress_service_pb2.RecordTimeResponse:
        seen.append(Seen(request, authorization(context)))
        if failures:
            await context.abort_with_status(failures.pop(0))
        return progress_service_pb2.RecordTimeResponse(
            lesson=resources_pb2.LessonProgress(
                lesson_id=request.lesson_id, time_spent_seconds=request.seconds
            )
        )

    return grpc.unary_unary_rpc_method_handler(
        record_time,
        request_deserializer=progress_service_pb2.RecordTimeRequest.FromString,
        response_serializer=progress_service_pb2.RecordTimeResponse.SerializeToString,
    )


def fast_client(
    target: str, *, retries: int = 4, timeout: float = HANG_GUARD, token: str | None = None
) -> ProgressClient:
    """A client with short back-offs, for the fake server."""
    retry = RetryPolicy(retries=retries, backoff_initial=0.01, backoff_max=0.05)
    return ProgressClient(target, token=token, retry=retry, timeout=timeout)


async def test_retry_reuses_the_request_id_and_sends_the_token() -> None:
    seen: list[Seen] = []
    failures = [
        rich_status(code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
        rich_status(code_pb2.ABORTED, "CONCURRENCY_CONFLICT"),
    ]
    handlers = {"RecordTime": scripted_record_time(failures, seen)}
    async with (
        fake_server(PROGRESS_SERVICE, handlers) as target,
        fast_client(target, token="s3cret") as client,
    ):
        lesson = await client.record_time(
            user_id=new_id(), course_id=new_id(), lesson_id="l1", seconds=9
        )
    assert lesson.time_spent_seconds == 9
    assert len(seen) == 3
    request_ids = {s.request.request_id for s in seen}
    assert len(request_ids) == 1
    assert uuid.UUID(request_ids.pop())
    assert {s.authorization for s in seen} == {"Bearer s3cret"}


async def test_each_logical_call_gets_its_own_request_id() -> None:
    seen: list[Seen] = []
    failures = [rich_status(code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE")]
    handlers = {"RecordTime": scripted_record_time(failures, seen)}
    async with fake_server(PROGRESS_SERVICE, handlers) as target, fast_client(target) as client:
        for _ in range(2):
            await client.record_time(user_id=new_id(), course_id=new_id(), lesson_id="l", seconds=1)
    ids = [s.request.request_id for s in seen]
    assert len(ids) == 3
    assert ids[0] == ids[1] != ids[2]
    assert {s.authorization for s in seen} == {None}


async def test_invalid_argument_is_not_retried() -> None:
    seen: list[Seen] = []
    failures = [rich_status(code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT", "seconds", "user_id")]
    handlers = {"RecordTime": scripted_record_time(failures, seen)}
    async with fake_server(PROGRESS_SERVICE, handlers) as target, fast_client(target) as client:
        with pytest.raises(ProgressError) as caught:
            await client.record_time(user_id="x", course_id=new_id(), lesson_id="l", seconds=0)
    assert len(seen) == 1
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.message == "scripted INVALID_ARGUMENT"
    assert error.fields == {"seconds", "user_id"}
    assert error.attempts == 1


async def test_retries_give_up_after_the_budget() -> None:
    seen: list[Seen] = []
    failures = [rich_status(code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE") for _ in range(10)]
    handlers = {"RecordTime": scripted_record_time(failures, seen)}
    async with (
        fake_server(PROGRESS_SERVICE, handlers) as target,
        fast_client(target, retries=2) as client,
    ):
        with pytest.raises(ProgressError) as caught:
            await client.record_time(user_id=new_id(), course_id=new_id(), lesson_id="l", seconds=1)
    assert len(seen) == 3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "DATABASE_UNAVAILABLE"
    assert caught.value.attempts == 3
    assert caught.value.retryable


async def test_batch_entries_keep_their_ids_across_retries() -> None:
    seen: list[Any] = []
    failures = [rich_status(code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE")]

    async def batch(
        request: progress_service_pb2.BatchRecordTimeRequest, context: Any
    ) -> progress_service_pb2.BatchRecordTimeResponse:
        seen.append(request)
        if failures:
            await context.abort_with_status(failures.pop(0))
        return progress_service_pb2.BatchRecordTimeResponse(
            lessons=[resources_pb2.LessonProgress(lesson_id=r.lesson_id) for r in request.requests]
        )

    handlers = {
        "BatchRecordTime": grpc.unary_unary_rpc_method_handler(
            batch,
            request_deserializer=progress_service_pb2.BatchRecordTimeRequest.FromString,
            response_serializer=progress_service_pb2.BatchRecordTimeResponse.SerializeToString,
        )
    }
    given = new_id()
    user, course = new_id(), new_id()
    async with fake_server(PROGRESS_SERVICE, handlers) as target, fast_client(target) as client:
        lessons = await client.batch_record_time(
            [
                Heartbeat(user, course, "a", 1),
                Heartbeat(user, course, "b", 2, request_id=given),
                RecordTimeRequest(user_id=user, course_id=course, lesson_id="c", seconds=3),
            ]
        )
    assert [lesson.lesson_id for lesson in lessons] == ["a", "b", "c"]
    assert len(seen) == 2
    first, retry = ([r.request_id for r in request.requests] for request in seen)
    assert first == retry
    assert first[1] == given
    assert len(set(first)) == 3


def event(event_id: int) -> progress_service_pb2.WatchProgressResponse:
    """A WatchProgress response carrying event ``event_id``."""
    return progress_service_pb2.WatchProgressResponse(
        event=resources_pb2.ProgressEvent(
            event_id=event_id, kind=ProgressEventKind.PROGRESS_EVENT_KIND_STARTED
        )
    )


async def test_watch_resumes_after_the_last_delivered_event() -> None:
    requests: list[progress_service_pb2.WatchProgressRequest] = []

    async def watch(
        request: progress_service_pb2.WatchProgressRequest, context: Any
    ) -> AsyncIterator[progress_service_pb2.WatchProgressResponse]:
        requests.append(request)
        if len(requests) == 1:
            yield event(1)
            yield event(2)
            await context.abort_with_status(rich_status(code_pb2.UNAVAILABLE, "SHUTTING_DOWN"))
        elif len(requests) == 2:
            await context.abort_with_status(rich_status(code_pb2.UNAVAILABLE, "SHUTTING_DOWN"))
        else:
            yield event(3)

    handlers = {
        "WatchProgress": grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=progress_service_pb2.WatchProgressRequest.FromString,
            response_serializer=progress_service_pb2.WatchProgressResponse.SerializeToString,
        )
    }
    course, user = new_id(), new_id()
    async with (
        fake_server(PROGRESS_SERVICE, handlers) as target,
        fast_client(target, retries=2) as client,
    ):
        # Two failures in a row, with retries=2: the retry count starts over after event 2.
        events = [e.event_id async for e in client.watch_progress(course_id=course, user_id=user)]
    assert events == [1, 2, 3]
    assert [(r.course_id, r.user_id, r.after_event_id) for r in requests] == [
        (course, user, 0),
        (course, user, 2),
        (course, user, 2),
    ]


async def test_streams_retry_only_before_the_first_response() -> None:
    calls: list[int] = []

    async def stats(
        request: analytics_service_pb2.StreamLessonStatsRequest, context: Any
    ) -> AsyncIterator[analytics_service_pb2.StreamLessonStatsResponse]:
        calls.append(1)
        if len(calls) == 1:
            await context.abort_with_status(rich_status(code_pb2.UNAVAILABLE, "DB"))
        yield analytics_service_pb2.StreamLessonStatsResponse(
            lesson_stats=resources_pb2.LessonStats(lesson_id="l1")
        )
        await context.abort_with_status(rich_status(code_pb2.UNAVAILABLE, "DB"))

    handlers = {
        "StreamLessonStats": grpc.unary_stream_rpc_method_handler(
            stats,
            request_deserializer=analytics_service_pb2.StreamLessonStatsRequest.FromString,
            response_serializer=analytics_service_pb2.StreamLessonStatsResponse.SerializeToString,
        )
    }
    received: list[str] = []

    async def read_all(client: ProgressClient) -> None:
        async for stats_row in client.stream_lesson_stats(course_id=new_id()):
            received.append(stats_row.lesson_id)

    async with fake_server(ANALYTICS_SERVICE, handlers) as target, fast_client(target) as client:
        with pytest.raises(ProgressError) as caught:
            await read_all(client)
    assert received == ["l1"]
    assert len(calls) == 2  # retried before the first row, not after it
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_deadline_bounds_the_retries() -> None:
    seen: list[Seen] = []
    failures = [rich_status(code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE") for _ in range(10_000)]
    handlers = {"RecordTime": scripted_record_time(failures, seen)}
    async with (
        fake_server(PROGRESS_SERVICE, handlers) as target,
        fast_client(target, retries=10_000, timeout=0.5) as client,
    ):
        with pytest.raises(ProgressError) as caught:
            await client.record_time(user_id=new_id(), course_id=new_id(), lesson_id="l", seconds=1)
    assert caught.value.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert len(seen) < 10_000


# --- TLS and tokens against the real server ---------------------------------------------------


async def test_mutual_tls_and_tokens_against_the_server(database_url: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"writer {hash_token('writer-token')} catalog:admin,progress:write,progress:read\n"
        f"reader {hash_token('reader-token')} progress:read\n"
    )
    running = await server.start(
        server_config(
            database_url,
            tls_cert_file=pki.server.cert,
            tls_key_file=pki.server.key,
            tls_client_ca_file=pki.ca.cert,
            auth_tokens_file=tokens,
        )
    )
    target = f"127.0.0.1:{running.port}"
    ca = pki.ca.cert.read_bytes()
    tls: dict[str, Any] = {
        "tls": TlsConfig(
            root_certificates=ca,
            certificate_chain=pki.client.cert.read_bytes(),
            private_key=pki.client.key.read_bytes(),
        ),
        "timeout": HANG_GUARD,
    }
    try:
        async with ProgressClient(target, token="writer-token", **tls) as writer:
            course_id, l1 = await register(writer, 1)
            user = new_id()
            key = {"user_id": user, "course_id": course_id, "lesson_id": l1}
            assert (await writer.record_time(**key, seconds=4)).time_spent_seconds == 4

        async with ProgressClient(target, token="reader-token", **tls) as reader:
            assert (await reader.get_lesson_progress(**key)).time_spent_seconds == 4
            with pytest.raises(ProgressError) as caught:
                await reader.record_time(**key, seconds=4)
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert caught.value.reason
            assert caught.value.attempts == 1

        async with ProgressClient(target, **tls) as anonymous:
            with pytest.raises(ProgressError) as caught:
                await anonymous.get_lesson_progress(**key)
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED

        # Without a client certificate the TLS handshake fails: UNAVAILABLE, from the
        # channel rather than the service (no ErrorInfo).
        async with ProgressClient(
            target,
            token="writer-token",
            tls=TlsConfig(root_certificates=ca),
            retry=NO_RETRIES,
            timeout=HANG_GUARD,
        ) as no_certificate:
            with pytest.raises(ProgressError) as caught:
                await no_certificate.get_lesson_progress(**key)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert caught.value.reason is None
    finally:
        await running.stop(grace=1)
