"""ProgressService.WatchProgress: the progress event stream of a course."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest

from lesson_progress import server
from lessonprogress.v1 import catalog_service_pb2 as cs
from lessonprogress.v1 import catalog_service_pb2_grpc, progress_service_pb2_grpc, resources_pb2
from lessonprogress.v1 import progress_service_pb2 as ps
from tests.conftest import new_id, server_config
from tests.errors import bad_fields, error_info
from tests.support import CHILD_DATABASE_URL, key, micros, run_in_child

Catalog = catalog_service_pb2_grpc.CatalogServiceStub
Progress = progress_service_pb2_grpc.ProgressServiceStub
MakeCourse = Callable[..., Awaitable[Any]]
Event = resources_pb2.ProgressEvent
Watch = Any  # grpc.aio.UnaryStreamCall of WatchProgress

STARTED = resources_pb2.PROGRESS_EVENT_KIND_STARTED
ATTEMPTED = resources_pb2.PROGRESS_EVENT_KIND_ATTEMPTED
COMPLETED = resources_pb2.PROGRESS_EVENT_KIND_COMPLETED
COURSE_COMPLETED = resources_pb2.PROGRESS_EVENT_KIND_COURSE_COMPLETED
BOOKMARKED = resources_pb2.PROGRESS_EVENT_KIND_BOOKMARKED

# Only a guard against a hanging test; no assertion depends on how long anything takes.
HANG_GUARD_SECONDS = 30.0


# --- helpers -------------------------------------------------------------------------------


def describe(event: Event) -> str:
    kind = resources_pb2.ProgressEventKind.Name(event.kind)
    lesson = event.lesson.lesson_id if event.HasField("lesson") else "-"
    return f"#{event.event_id} {kind} user={event.user_id} lesson={lesson}"


@contextlib.asynccontextmanager
async def watching(
    progress: Progress, course_id: str, *, user_id: str = "", after_event_id: int = 0
) -> AsyncIterator[Watch]:
    """A WatchProgress call, cancelled when the block exits."""
    call = progress.WatchProgress(
        ps.WatchProgressRequest(course_id=course_id, user_id=user_id, after_event_id=after_event_id)
    )
    try:
        yield call
    finally:
        call.cancel()


SYNC_PREFIX = "sync-"


def is_marker(event: Event, prefix: str = SYNC_PREFIX) -> bool:
    """A bookmark saved by sync() (with ``prefix``: by that very sync)."""
    return event.kind == BOOKMARKED and event.lesson.bookmark.startswith(prefix)


async def read_raw(call: Watch) -> Event:
    response = await asyncio.wait_for(call.read(), HANG_GUARD_SECONDS)
    assert response is not grpc.aio.EOF, "the watch ended"
    return response.event


async def next_event(call: Watch) -> Event:
    """The next event that is not a sync() marker."""
    while True:
        event = await read_raw(call)
        if not is_marker(event):
            return event


async def next_events(call: Watch, count: int) -> list[Event]:
    return [await next_event(call) for _ in range(count)]


async def sync(
    progress: Progress, call: Watch, course_id: str, *, user_id: str = "", lesson_id: str = "l1"
) -> None:
    """Waits until the watch is live, so that later writes commit after the call began.

    Saves numbered bookmarks (as ``user_id``, or a marker learner) until the watch delivers
    one, then reads off the later ones. Every event before the first marker, other than the
    markers of another sync(), would be an event committed before the watch began: none is
    allowed.
    """
    marker_user = user_id or new_id()
    prefix = f"{SYNC_PREFIX}{new_id()}-"
    pending = asyncio.ensure_future(read_raw(call))
    written = 0
    try:
        while True:
            while not pending.done():
                assert written < 300, "the watch never delivered an event"
                written += 1
                await progress.SaveBookmark(
                    ps.SaveBookmarkRequest(
                        **key(marker_user, course_id, lesson_id), position=f"{prefix}{written}"
                    )
                )
                await asyncio.wait([pending], timeout=0.05)
            first = pending.result()
            if is_marker(first, prefix):
                break
            assert is_marker(first), f"event from before the watch: {describe(first)}"
            pending = asyncio.ensure_future(read_raw(call))
    except BaseException:
        pending.cancel()
        raise
    assert (first.user_id, first.lesson.lesson_id) == (marker_user, lesson_id)
    number = int(first.lesson.bookmark.removeprefix(prefix))
    expected = number + 1
    while expected <= written:
        event = await read_raw(call)
        assert is_marker(event), f"unexpected {describe(event)}"
        if is_marker(event, prefix):
            assert event.lesson.bookmark == f"{prefix}{expected}"
            expected += 1


async def fence(
    progress: Progress, call: Watch | list[Watch], user_id: str, course_id: str, lesson_id: str
) -> Event:
    """Saves a bookmark and checks that it is the next event of each call: nothing came in
    between."""
    position = f"fence-{new_id()}"
    await progress.SaveBookmark(
        ps.SaveBookmarkRequest(**key(user_id, course_id, lesson_id), position=position)
    )
    events = [await next_event(c) for c in (call if isinstance(call, list) else [call])]
    for event in events:
        assert event.kind == BOOKMARKED, f"unexpected {describe(event)}"
        assert (event.user_id, event.lesson.lesson_id, event.lesson.bookmark) == (
            user_id,
            lesson_id,
            position,
        ), f"unexpected {describe(event)}"
        assert event == events[0]
    return events[0]


def check_event(
    event: Event,
    kind: int,
    user_id: str,
    course_id: str,
    snapshot: resources_pb2.LessonProgress | None,
) -> None:
    assert event.kind == kind, describe(event)
    assert event.user_id == user_id
    assert event.course_id == course_id
    assert event.event_id > 0
    assert event.HasField("occurred_at")
    if snapshot is None:
        assert not event.HasField("lesson"), describe(event)
    else:
        assert event.HasField("lesson"), describe(event)
        assert event.lesson == snapshot, (event.lesson, snapshot)


def check_increasing(events: list[Event]) -> None:
    ids = [e.event_id for e in events]
    assert all(a < b for a, b in itertools.pairwise(ids)), ids
    times = [micros(e.occurred_at) for e in events]
    assert times == sorted(times)


async def register(catalog: Catalog, course_id: str, lessons: list[tuple[str, int | None]]) -> None:
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id,
            title="watched course",
            lessons=[
                resources_pb2.Lesson(
                    lesson_id=lesson_id,
                    assessed=passing is not None,
                    passing_score=passing,
                )
                for lesson_id, passing in lessons
            ],
        )
    )


async def expect_stream_error(call: Watch, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call.read(), HANG_GUARD_SECONDS)
    assert raised.value.code() == code, raised.value.details()
    error_info(raised.value)
    return raised.value


async def course_event_ids(db: asyncpg.Pool, course_id: str) -> list[int]:
    rows = await db.fetch(
        "SELECT event_id FROM progress_events WHERE course_id = $1 ORDER BY event_id", course_id
    )
    return [r["event_id"] for r in rows]


# --- kinds and snapshots ---------------------------------------------------------------------


async def test_start_lesson_is_started_event(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    cid = course.course_id
    user = new_id()
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        first = await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l2")))
        event = await next_event(call)
        check_event(event, STARTED, user, cid, first.lesson)
        assert event.lesson.attempts == 0
        assert event.lesson.completed is False

        # Opening the lesson again is heard again, with the moved last access.
        again = await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l2")))
        second = await next_event(call)
        check_event(second, STARTED, user, cid, again.lesson)
        assert second.event_id > event.event_id
        assert micros(second.lesson.last_accessed_at) > micros(event.lesson.last_accessed_at)
        await fence(progress, call, user, cid, "l1")


async def test_attempt_events_with_completion_and_course_completion(
    progress: Progress, catalog: Catalog
):
    cid = new_id()
    await register(catalog, cid, [("quiz-a", 70), ("quiz-b", 50)])
    user = new_id()
    seen: list[Event] = []
    async with watching(progress, cid) as call:
        await sync(progress, call, cid, lesson_id="quiz-a")

        async def attempt(lesson: str, score: int) -> ps.RecordAttemptResponse:
            return await progress.RecordAttempt(
                ps.RecordAttemptRequest(**key(user, cid, lesson), score=score)
            )

        failed = await attempt("quiz-a", 69)
        assert failed.passed is False
        (event,) = await next_events(call, 1)
        check_event(event, ATTEMPTED, user, cid, failed.lesson)
        assert (event.lesson.attempts, event.lesson.score, event.lesson.completed) == (1, 69, False)
        seen.append(event)
        seen.append(await fence(progress, call, user, cid, "quiz-b"))

        passed = await attempt("quiz-a", 70)
        assert passed.passed is True
        events = await next_events(call, 2)
        check_event(events[0], ATTEMPTED, user, cid, passed.lesson)
        check_event(events[1], COMPLETED, user, cid, passed.lesson)
        assert (events[1].lesson.attempts, events[1].lesson.score) == (2, 70)
        assert events[1].lesson.completed is True
        seen.extend(events)
        seen.append(await fence(progress, call, user, cid, "quiz-b"))

        # A further attempt on a completed lesson is an attempt only.
        later = await attempt("quiz-a", 95)
        (event,) = await next_events(call, 1)
        check_event(event, ATTEMPTED, user, cid, later.lesson)
        assert (event.lesson.attempts, event.lesson.score) == (3, 95)
        seen.append(event)
        seen.append(await fence(progress, call, user, cid, "quiz-b"))

        # Passing the last lesson completes it and the course, in that order.
        last = await attempt("quiz-b", 50)
        events = await next_events(call, 3)
        check_event(events[0], ATTEMPTED, user, cid, last.lesson)
        check_event(events[1], COMPLETED, user, cid, last.lesson)
        check_event(events[2], COURSE_COMPLETED, user, cid, last.lesson)
        seen.extend(events)
        seen.append(await fence(progress, call, user, cid, "quiz-a"))

        # Nothing completes twice.
        again = await attempt("quiz-b", 100)
        (event,) = await next_events(call, 1)
        check_event(event, ATTEMPTED, user, cid, again.lesson)
        seen.append(event)
        seen.append(await fence(progress, call, user, cid, "quiz-a"))
    check_increasing(seen)


async def test_attempt_without_passing_score_is_attempt_only(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1, assessed=True)
    cid = course.course_id
    user = new_id()
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        response = await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, cid, "l1"), score=100)
        )
        check_event(await next_event(call), ATTEMPTED, user, cid, response.lesson)
        await fence(progress, call, user, cid, "l1")


async def test_complete_lesson_events_once(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    cid = course.course_id
    user = new_id()

    async def complete(
        lesson: str, score: int | None = None, request_id: str = ""
    ) -> ps.CompleteLessonResponse:
        return await progress.CompleteLesson(
            ps.CompleteLessonRequest(**key(user, cid, lesson), score=score, request_id=request_id)
        )

    seen: list[Event] = []
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        request_id = new_id()
        first = await complete("l1", 60, request_id)
        event = await next_event(call)
        check_event(event, COMPLETED, user, cid, first.lesson)
        assert (event.lesson.completed, event.lesson.score) == (True, 60)
        assert event.lesson.completed_at == first.lesson.completed_at
        seen.append(event)

        # Completing again, retrying, or completing with a better score: no new event.
        await complete("l1")
        await complete("l1", 60, request_id)
        better = await complete("l1", 90)
        assert better.lesson.score == 90
        seen.append(await fence(progress, call, user, cid, "l1"))

        second = await complete("l2")
        check_event(await next_event(call), COMPLETED, user, cid, second.lesson)
        third = await complete("l3", 75)
        events = await next_events(call, 2)
        check_event(events[0], COMPLETED, user, cid, third.lesson)
        check_event(events[1], COURSE_COMPLETED, user, cid, third.lesson)
        assert third.course.progress_percentage == 100
        seen.extend(events)

        await complete("l3")
        await complete("l2", 100)
        seen.append(await fence(progress, call, user, cid, "l2"))
    check_increasing(seen)


async def test_bookmark_events_carry_the_bookmark(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    cid = course.course_id
    user = new_id()
    async with watching(progress, cid) as call:
        await sync(progress, call, cid, lesson_id="l2")
        for position in ("video#t=42", "é" * 2048, ""):
            saved = await progress.SaveBookmark(
                ps.SaveBookmarkRequest(**key(user, cid, "l1"), position=position)
            )
            event = await next_event(call)
            check_event(event, BOOKMARKED, user, cid, saved.lesson)
            assert event.lesson.bookmark == position
            assert event.lesson.HasField("bookmarked_at") == bool(position)


async def test_heartbeats_and_replays_are_not_events(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    cid = course.course_id
    user = new_id()
    await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l1")))
    request_id = new_id()
    await progress.RecordAttempt(
        ps.RecordAttemptRequest(**key(user, cid, "l2"), score=40, request_id=request_id)
    )
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        await progress.RecordTime(ps.RecordTimeRequest(**key(user, cid, "l1"), seconds=30))
        await progress.RecordTime(
            ps.RecordTimeRequest(**key(user, cid, "l2"), seconds=20, request_id=new_id())
        )
        other = new_id()
        await progress.BatchRecordTime(
            ps.BatchRecordTimeRequest(
                requests=[
                    ps.RecordTimeRequest(**key(user, cid, "l1"), seconds=10),
                    ps.RecordTimeRequest(**key(user, cid, "l1"), seconds=5),
                    ps.RecordTimeRequest(**key(other, cid, "l2"), seconds=7),  # creates a row
                ]
            )
        )
        # A retried attempt changes nothing, so it is not an event either.
        await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, cid, "l2"), score=40, request_id=request_id)
        )
        event = await fence(progress, call, user, cid, "l1")
        assert event.lesson.time_spent_seconds == 45
        event = await fence(progress, call, other, cid, "l2")
        assert event.lesson.time_spent_seconds == 7


async def test_failed_writes_are_not_events(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    cid = course.course_id
    user = new_id()
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        for bad in (
            progress.SaveBookmark(ps.SaveBookmarkRequest(**key(user, cid, "l1"), position="\0")),
            progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "nope"))),
            progress.RecordAttempt(ps.RecordAttemptRequest(**key(user, cid, "l1"), score=101)),
        ):
            with pytest.raises(grpc.aio.AioRpcError):
                await bad
        await fence(progress, call, user, cid, "l1")


# --- what a watch delivers -------------------------------------------------------------------


async def test_events_before_the_watch_are_not_delivered(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(3)
    cid = course.course_id
    user = new_id()
    await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l1")))
    await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, cid, "l1")))
    await progress.SaveBookmark(ps.SaveBookmarkRequest(**key(user, cid, "l2"), position="p"))
    async with watching(progress, cid) as call:
        # sync() refuses any event ahead of its first marker.
        await sync(progress, call, cid)
        started = await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l3")))
        check_event(await next_event(call), STARTED, user, cid, started.lesson)


async def test_other_courses_events_are_not_delivered(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    other = await make_course(1)
    user = new_id()
    async with watching(progress, course.course_id) as call:
        await sync(progress, call, course.course_id)
        await progress.StartLesson(ps.StartLessonRequest(**key(user, other.course_id, "l1")))
        await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, other.course_id, "l1")))
        await fence(progress, call, user, course.course_id, "l1")


async def test_user_filter_delivers_only_that_learner(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    cid = course.course_id
    alice, bob = new_id(), new_id()
    async with (
        watching(progress, cid, user_id=alice) as alice_call,
        watching(progress, cid, user_id=alice.upper()) as alice_upper_call,
        watching(progress, cid) as all_call,
    ):
        await sync(progress, alice_call, cid, user_id=alice, lesson_id="l3")
        await sync(progress, alice_upper_call, cid, user_id=alice, lesson_id="l3")
        await sync(progress, all_call, cid)

        writes: list[tuple[str, int, resources_pb2.LessonProgress]] = []
        r1 = await progress.StartLesson(ps.StartLessonRequest(**key(alice, cid, "l1")))
        writes.append((alice, STARTED, r1.lesson))
        r2 = await progress.StartLesson(ps.StartLessonRequest(**key(bob, cid, "l1")))
        writes.append((bob, STARTED, r2.lesson))
        r3 = await progress.CompleteLesson(ps.CompleteLessonRequest(**key(bob, cid, "l1")))
        writes.append((bob, COMPLETED, r3.lesson))
        r4 = await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(alice, cid, "l2"), score=33)
        )
        writes.append((alice, ATTEMPTED, r4.lesson))
        r5 = await progress.SaveBookmark(
            ps.SaveBookmarkRequest(**key(bob, cid, "l2"), position="bob")
        )
        writes.append((bob, BOOKMARKED, r5.lesson))
        r6 = await progress.CompleteLesson(ps.CompleteLessonRequest(**key(alice, cid, "l1")))
        writes.append((alice, COMPLETED, r6.lesson))

        everything = await next_events(all_call, len(writes))
        for event, (user, kind, snapshot) in zip(everything, writes, strict=True):
            check_event(event, kind, user, cid, snapshot)
        check_increasing(everything)

        alices = [e for e in everything if e.user_id == alice]
        assert len(alices) == 3
        for call in (alice_call, alice_upper_call):
            assert await next_events(call, len(alices)) == alices
        # Bob's events are skipped, not queued: the next one is Alice's fence.
        await fence(progress, [alice_call, alice_upper_call, all_call], alice, cid, "l3")
        await fence(progress, all_call, bob, cid, "l3")
        await fence(progress, [alice_call, alice_upper_call, all_call], alice, cid, "l3")


async def test_watch_across_server_processes(
    progress: Progress, make_course: MakeCourse, database_url: str
):
    course = await make_course(2)
    cid = course.course_id
    user = new_id()
    second = await server.start(server_config(database_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            progress2 = progress_service_pb2_grpc.ProgressServiceStub(channel)
            async with (
                watching(progress, cid) as here,
                watching(progress2, cid) as there,
            ):
                await sync(progress, here, cid)
                await sync(progress2, there, cid)

                # Written through the second process, heard by the first (and the second).
                done = await progress2.CompleteLesson(
                    ps.CompleteLessonRequest(**key(user, cid, "l1"), score=80)
                )
                check_event(await next_event(here), COMPLETED, user, cid, done.lesson)
                check_event(await next_event(there), COMPLETED, user, cid, done.lesson)

                # Written through the first process, heard by the second (and the first).
                last = await progress.RecordAttempt(
                    ps.RecordAttemptRequest(**key(user, cid, "l2"), score=64)
                )
                last_done = await progress.CompleteLesson(
                    ps.CompleteLessonRequest(**key(user, cid, "l2"))
                )
                for call in (there, here):
                    events = await next_events(call, 3)
                    check_event(events[0], ATTEMPTED, user, cid, last.lesson)
                    check_event(events[1], COMPLETED, user, cid, last_done.lesson)
                    check_event(events[2], COURSE_COMPLETED, user, cid, last_done.lesson)
    finally:
        await second.stop(grace=1)


async def test_replay_after_event_id_then_live(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    cid = course.course_id
    alice, bob = new_id(), new_id()
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        await progress.StartLesson(ps.StartLessonRequest(**key(alice, cid, "l1")))
        await progress.RecordAttempt(ps.RecordAttemptRequest(**key(bob, cid, "l2"), score=12))
        await progress.CompleteLesson(ps.CompleteLessonRequest(**key(alice, cid, "l1")))
        await progress.SaveBookmark(ps.SaveBookmarkRequest(**key(bob, cid, "l2"), position="x"))
        await progress.StartLesson(ps.StartLessonRequest(**key(alice, cid, "l3")))
        log = await next_events(call, 5)
    check_increasing(log)
    assert [e.kind for e in log] == [STARTED, ATTEMPTED, COMPLETED, BOOKMARKED, STARTED]

    for index in (0, 1, 3, 4):
        after = log[index].event_id
        async with watching(progress, cid, after_event_id=after) as replay:
            missed = await next_events(replay, len(log) - index - 1)
            assert missed == log[index + 1 :]
            # Then it goes on live, without repeating anything.
            log.append(await fence(progress, replay, bob, cid, "l3"))

    # A learner filter applies to the replay too.
    async with watching(progress, cid, user_id=bob, after_event_id=log[0].event_id) as replay:
        expected = [e for e in log[1:] if e.user_id == bob]
        assert len(expected) == 6
        assert await next_events(replay, len(expected)) == expected
        await fence(progress, replay, bob, cid, "l1")


async def test_replay_from_before_the_course_had_events(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(2)
    cid = course.course_id
    user = new_id()
    await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l1")))
    await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l2")))
    ids = await course_event_ids(db, cid)
    assert len(ids) == 2
    # Any id before the course's first event replays everything the course has.
    async with watching(progress, cid, after_event_id=ids[0] - 1) as call:
        events = await next_events(call, 2)
        assert [e.event_id for e in events] == ids
        assert [e.lesson.lesson_id for e in events] == ["l1", "l2"]
        await fence(progress, call, user, cid, "l1")


async def test_stalled_watcher_does_not_block_writes(progress: Progress, make_course: MakeCourse):
    course = await make_course(4)
    cid = course.course_id
    users = [new_id() for _ in range(4)]
    async with (
        watching(progress, cid) as never_read,
        watching(progress, cid) as stalled,
    ):
        await sync(progress, stalled, cid)
        expected: list[tuple[str, str, int, str]] = []

        async def writes() -> None:
            for i in range(200):
                user, lesson = users[i % 4], f"l{i % 3 + 1}"
                if i % 2:
                    position = f"{i:04d}" + "b" * 4000
                    await progress.SaveBookmark(
                        ps.SaveBookmarkRequest(**key(user, cid, lesson), position=position)
                    )
                    expected.append((user, lesson, BOOKMARKED, position))
                else:
                    await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, lesson)))
                    expected.append((user, lesson, STARTED, ""))

        # Neither watcher reads while 200 events (~400 KB) are written.
        await asyncio.wait_for(writes(), 120)

        # The stalled watcher then catches up with everything, in order.
        events = await next_events(stalled, len(expected))
        got = [
            (
                e.user_id,
                e.lesson.lesson_id,
                e.kind,
                e.lesson.bookmark if e.kind == BOOKMARKED else "",
            )
            for e in events
        ]
        assert got == expected
        check_increasing(events)
        await fence(progress, stalled, users[0], cid, "l4")
        assert never_read.done() is False


async def cancel_far_behind_watch(database_url: str) -> None:
    """Runs in a child process (see below): a server of its own, a watcher left ~8 MB of
    events behind (its stream blocked on flow control) and then cancelled, and then the
    checks that the server still serves writes and new watches."""
    running = await server.start(server_config(database_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            progress = progress_service_pb2_grpc.ProgressServiceStub(channel)
            catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
            cid, user = new_id(), new_id()
            users = [new_id() for _ in range(8)]
            await register(catalog, cid, [("l1", None), ("l2", None)])
            async with watching(progress, cid) as stalled:
                await sync(progress, stalled, cid)
                gate = asyncio.Semaphore(8)

                async def save(i: int) -> None:
                    async with gate:
                        await progress.SaveBookmark(
                            ps.SaveBookmarkRequest(
                                **key(users[i % 8], cid, "l1"), position=f"{i:05d}" + "s" * 4000
                            )
                        )

                await asyncio.wait_for(
                    asyncio.gather(*(save(i) for i in range(2000))), 4 * HANG_GUARD_SECONDS
                )
                assert stalled.done() is False
            # The watcher is cancelled; the server goes on serving.
            for _ in range(20):
                await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l2")))
                await asyncio.sleep(0.05)
            async with watching(progress, cid) as fresh:
                await sync(progress, fresh, cid)
                await fence(progress, fresh, user, cid, "l2")
    finally:
        await running.stop(grace=1)


async def test_cancelling_a_watcher_far_behind_keeps_the_server_up(database_url: str):
    """A watcher that fell far behind (a dropped mobile client) and is then cancelled.

    The server runs in a child process so that a crash of the server process fails this
    test instead of ending the whole test session.
    """
    await run_in_child("tests.test_events", database_url, hang_guard=8 * HANG_GUARD_SECONDS)


# --- retention -------------------------------------------------------------------------------


async def test_replay_beyond_retention_is_out_of_range(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(4)
    cid = course.course_id
    user = new_id()
    for lesson in ("l1", "l2", "l3", "l4"):
        await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, lesson)))
    ids = await course_event_ids(db, cid)
    assert len(ids) == 4
    # The retention window removed the first two events of the course.
    async with db.acquire() as connection, connection.transaction():
        await connection.execute(
            "DELETE FROM progress_events WHERE course_id = $1 AND event_id <= $2", cid, ids[1]
        )
        await connection.execute(
            "INSERT INTO progress_event_purges (course_id, purged_through) VALUES ($1, $2)",
            cid,
            ids[1],
        )

    for after in (ids[0], ids[0] - 1, 1):
        async with watching(progress, cid, after_event_id=after) as call:
            error = await expect_stream_error(call, grpc.StatusCode.OUT_OF_RANGE)
            assert error.details()

    # Resuming after the last purged event loses nothing: it still works.
    async with watching(progress, cid, after_event_id=ids[1]) as call:
        events = await next_events(call, 2)
        assert [(e.event_id, e.lesson.lesson_id) for e in events] == [
            (ids[2], "l3"),
            (ids[3], "l4"),
        ]
        await fence(progress, call, user, cid, "l1")
    # A new watch (no after_event_id) is not affected.
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        started = await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l2")))
        check_event(await next_event(call), STARTED, user, cid, started.lesson)


async def test_purge_makes_older_positions_out_of_range(
    progress: Progress, make_course: MakeCourse, running_server: server.RunningServer
):
    """The service's own retention purge (here with a zero window: every event so far)."""
    course = await make_course(3)
    cid = course.course_id
    user = new_id()
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        for lesson in ("l1", "l2", "l3"):
            await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, lesson)))
        events = await next_events(call, 3)
        purged = await running_server.event_store.purge(0)
        assert purged >= 3 + 1  # at least these and the marker

        # A live watcher that had read everything goes on.
        started = await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l1")))
        check_event(await next_event(call), STARTED, user, cid, started.lesson)

    for after in (events[0].event_id, events[1].event_id):
        async with watching(progress, cid, after_event_id=after) as replay:
            await expect_stream_error(replay, grpc.StatusCode.OUT_OF_RANGE)
    async with watching(progress, cid, after_event_id=events[2].event_id) as replay:
        check_event(await next_event(replay), STARTED, user, cid, started.lesson)


# --- errors ----------------------------------------------------------------------------------


async def test_watch_unknown_course_not_found(progress: Progress):
    async with watching(progress, new_id()) as call:
        await expect_stream_error(call, grpc.StatusCode.NOT_FOUND)
    async with watching(progress, new_id(), user_id=new_id(), after_event_id=5) as call:
        await expect_stream_error(call, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    ("course_id", "user_id", "after_event_id", "fields"),
    [
        ("", "", 0, {"course_id"}),
        ("not-a-uuid", "", 0, {"course_id"}),
        (None, "1234", 0, {"user_id"}),
        (None, "", -1, {"after_event_id"}),
        ("x", "y", -(2**62), {"course_id", "user_id", "after_event_id"}),
    ],
)
async def test_watch_malformed_request_rejected(
    progress: Progress,
    make_course: MakeCourse,
    course_id: str | None,
    user_id: str,
    after_event_id: int,
    fields: set[str],
):
    if course_id is None:
        course_id = (await make_course(1)).course_id
    async with watching(
        progress, course_id, user_id=user_id, after_event_id=after_event_id
    ) as call:
        error = await expect_stream_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(error) == fields


# --- erasure ---------------------------------------------------------------------------------


async def test_delete_user_progress_removes_their_events(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(2)
    other_course = await make_course(1)
    cid = course.course_id
    alice, bob = new_id(), new_id()
    for user in (alice, bob):
        await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l1")))
        await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, cid, "l1")))
        await progress.SaveBookmark(ps.SaveBookmarkRequest(**key(user, cid, "l2"), position="b"))
        await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, other_course.course_id, "l1"), score=5)
        )

    # STARTED, COMPLETED and BOOKMARKED in one course, ATTEMPTED in the other.
    count = "SELECT count(*) FROM progress_events WHERE user_id = $1"
    assert await db.fetchval(count, alice) == 4
    assert await db.fetchval(count, bob) == 4

    await progress.DeleteUserProgress(ps.DeleteUserProgressRequest(user_id=alice))
    assert await db.fetchval(count, alice) == 0
    assert await db.fetchval(count, bob) == 4

    # A replay of the course no longer holds anything about Alice.
    async with watching(progress, cid, after_event_id=1) as call:
        replayed = await next_events(call, 3)
        assert {e.user_id for e in replayed} == {bob}
        await fence(progress, call, bob, cid, "l1")


async def test_delete_course_removes_its_events(
    progress: Progress, catalog: Catalog, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(2)
    kept = await make_course(1)
    user = new_id()
    for cid in (course.course_id, kept.course_id):
        await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l1")))
        await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, cid, "l1")))
    count = "SELECT count(*) FROM progress_events WHERE course_id = $1"
    assert await db.fetchval(count, course.course_id) == 2
    await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course.course_id))
    assert await db.fetchval(count, course.course_id) == 0
    assert await db.fetchval(count, kept.course_id) == 3  # STARTED, COMPLETED, COURSE_COMPLETED
    async with watching(progress, course.course_id) as call:
        await expect_stream_error(call, grpc.StatusCode.NOT_FOUND)


# --- outline changes -------------------------------------------------------------------------


async def test_outline_change_that_completes_a_course_is_an_event(
    progress: Progress, catalog: Catalog, make_course: MakeCourse
):
    course = await make_course(3)
    cid = course.course_id
    done, not_done = new_id(), new_id()
    for lesson in ("l1", "l2"):
        await progress.CompleteLesson(ps.CompleteLessonRequest(**key(done, cid, lesson)))
    await progress.CompleteLesson(ps.CompleteLessonRequest(**key(not_done, cid, "l1")))
    async with watching(progress, cid) as call:
        await sync(progress, call, cid)
        await register(catalog, cid, [("l1", None), ("l2", None)])  # l3 leaves the outline
        event = await next_event(call)
        check_event(event, COURSE_COMPLETED, done, cid, None)
        await fence(progress, call, done, cid, "l1")
    after = (
        await progress.GetCourseProgress(ps.GetCourseProgressRequest(user_id=done, course_id=cid))
    ).course
    assert after.progress_percentage == 100
    assert after.HasField("completed_at")


if __name__ == "__main__":
    asyncio.run(cancel_far_behind_watch(os.environ[CHILD_DATABASE_URL]))
