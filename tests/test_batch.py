"""BatchRecordTime: high-volume ingestion of heartbeats, atomic and idempotent per entry.

Expected totals are computed in the tests from the entries they send.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import asyncpg
import grpc
import pytest

from lesson_progress.store.heartbeats import HEARTBEATS, array_arguments
from lesson_progress.values import Heartbeat
from lessonprogress.v1 import catalog_service_pb2 as cpb
from lessonprogress.v1 import progress_service_pb2 as ppb
from lessonprogress.v1 import resources_pb2 as rpb
from tests.conftest import new_id
from tests.errors import bad_fields, error_info

Key = tuple[str, str, str]


def beat(
    user_id: str, course_id: str, lesson_id: str, seconds: int, request_id: str = ""
) -> ppb.RecordTimeRequest:
    return ppb.RecordTimeRequest(
        user_id=user_id,
        course_id=course_id,
        lesson_id=lesson_id,
        seconds=seconds,
        request_id=request_id,
    )


def key_of(entry: ppb.RecordTimeRequest) -> Key:
    return (entry.user_id.lower(), entry.course_id.lower(), entry.lesson_id)


def sums(entries: Iterable[ppb.RecordTimeRequest]) -> Counter[Key]:
    """Seconds per lesson, counting every entry."""
    totals: Counter[Key] = Counter()
    for entry in entries:
        totals[key_of(entry)] += entry.seconds
    return totals


async def send(progress: Any, entries: list[ppb.RecordTimeRequest]) -> list[Any]:
    response = await progress.BatchRecordTime(ppb.BatchRecordTimeRequest(requests=entries))
    return list(response.lessons)


async def rejected(progress: Any, entries: list[ppb.RecordTimeRequest]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await progress.BatchRecordTime(ppb.BatchRecordTimeRequest(requests=entries))
    return caught.value


async def time_of(progress: Any, key: Key) -> int:
    user_id, course_id, lesson_id = key
    response = await progress.GetLessonProgress(
        ppb.GetLessonProgressRequest(user_id=user_id, course_id=course_id, lesson_id=lesson_id)
    )
    return int(response.lesson.time_spent_seconds)


async def stored_totals(db: asyncpg.Pool, user_ids: Iterable[str]) -> Counter[Key]:
    """time_spent_seconds of every lesson row of these learners, straight from the table."""
    rows = await db.fetch(
        "SELECT user_id::text, course_id::text, lesson_id, time_spent_seconds"
        " FROM lesson_progress WHERE user_id = ANY($1::uuid[])",
        list(user_ids),
    )
    return Counter({(r[0], r[1], r[2]): r[3] for r in rows})


async def remembered_request_ids(db: asyncpg.Pool, user_ids: Iterable[str]) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM processed_requests WHERE user_id = ANY($1::uuid[])",
            list(user_ids),
        )
    )


def assert_response_matches(
    lessons: list[Any], entries: list[ppb.RecordTimeRequest], totals: Counter[Key]
) -> None:
    """One LessonProgress per entry, in order, each showing its lesson's final total."""
    assert len(lessons) == len(entries)
    for index, (lesson, entry) in enumerate(zip(lessons, entries, strict=True)):
        key = key_of(entry)
        assert (lesson.user_id, lesson.course_id, lesson.lesson_id) == key, index
        assert lesson.time_spent_seconds == totals[key], index


# --- size limits --------------------------------------------------------------------------


async def test_empty_batch_is_invalid(progress: Any):
    assert bad_fields(await rejected(progress, [])) == {"requests"}


async def test_1001_entries_are_invalid_and_nothing_is_written(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(2)
    user_id = new_id()
    entries = [beat(user_id, course.course_id, "l1", 1, new_id()) for _ in range(1001)]
    assert bad_fields(await rejected(progress, entries)) == {"requests"}
    assert await stored_totals(db, [user_id]) == Counter()
    assert await remembered_request_ids(db, [user_id]) == 0


async def test_1000_entries_are_accepted(make_course: Any, progress: Any, db: asyncpg.Pool):
    courses = [await make_course(5), await make_course(3)]
    users = [new_id() for _ in range(4)]
    rng = random.Random(1000)
    entries = []
    for i in range(1000):
        course = rng.choice(courses)
        entries.append(
            beat(
                rng.choice(users),
                course.course_id,
                rng.choice(course.lesson_ids),
                rng.randint(1, 300),
                new_id() if i % 2 else "",
            )
        )
    expected = sums(entries)
    lessons = await send(progress, entries)
    assert_response_matches(lessons, entries, expected)
    assert await stored_totals(db, users) == expected
    assert await remembered_request_ids(db, users) == 500
    for key in rng.sample(sorted(expected), 5):
        assert await time_of(progress, key) == expected[key]


async def test_1000_entries_with_uppercase_ids_and_long_lesson_ids(
    catalog: Any, progress: Any, db: asyncpg.Pool
):
    course_id = new_id()
    lesson_ids = [str(i) * 255 for i in range(10)]
    await catalog.UpsertCourse(
        cpb.UpsertCourseRequest(
            course_id=course_id, lessons=[rpb.Lesson(lesson_id=i) for i in lesson_ids]
        )
    )
    user_id = new_id()
    entries = [
        beat(
            user_id.upper() if i % 3 else user_id,
            course_id.upper() if i % 2 else course_id,
            lesson_ids[i % 10],
            300,
            new_id().upper(),
        )
        for i in range(1000)
    ]
    lessons = await send(progress, entries)
    expected = Counter({(user_id, course_id, lesson_id): 100 * 300 for lesson_id in lesson_ids})
    assert_response_matches(lessons, entries, expected)
    assert await stored_totals(db, [user_id]) == expected


# --- one bad entry rejects the whole batch --------------------------------------------------

BAD_ENTRIES = [
    (7, "seconds", 0),
    (7, "seconds", 301),
    (7, "seconds", -(2**31)),
    (3, "user_id", "not-a-uuid"),
    (3, "user_id", ""),
    (0, "course_id", "{0f8fad5b-d9cb-469f-a165-70867728950e}"),
    (9, "lesson_id", ""),
    (9, "lesson_id", "l\x001"),
    (9, "lesson_id", "x" * 256),
    (5, "request_id", "0f8fad5b-d9cb-469f-a165-70867728950e\n"),
]


@pytest.mark.parametrize(
    ("index", "field", "value"),
    [pytest.param(*case, id=f"{case[0]}-{case[1]}-{i}") for i, case in enumerate(BAD_ENTRIES)],
)
async def test_one_bad_entry_rejects_the_whole_batch(
    index: int, field: str, value: Any, make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(3)
    users = [new_id(), new_id()]
    entries = [
        beat(users[i % 2], course.course_id, course.lesson_ids[i % 3], 10 + i, new_id())
        for i in range(10)
    ]
    good = list(entries)
    setattr(entries[index], field, value)
    assert bad_fields(await rejected(progress, entries)) == {f"requests[{index}].{field}"}
    assert await stored_totals(db, users) == Counter()
    assert await remembered_request_ids(db, users) == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await time_of(progress, (users[0], course.course_id, "l1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Without the bad entry, the same batch (same request ids) is applied in full.
    del good[index]
    expected = sums(good)
    assert_response_matches(await send(progress, good), good, expected)
    assert await stored_totals(db, users) == expected


async def test_every_bad_entry_is_named(make_course: Any, progress: Any, db: asyncpg.Pool):
    course = await make_course(2)
    user_id = new_id()
    entries = [beat(user_id, course.course_id, "l1", 5) for _ in range(12)]
    entries[2].seconds = 0
    entries[4].user_id = "nope"
    entries[4].request_id = "nope"
    entries[11].lesson_id = "\x7f"
    entries[11].course_id = ""
    assert bad_fields(await rejected(progress, entries)) == {
        "requests[2].seconds",
        "requests[4].user_id",
        "requests[4].request_id",
        "requests[11].lesson_id",
        "requests[11].course_id",
    }
    assert await stored_totals(db, [user_id]) == Counter()


@pytest.mark.parametrize("where", ["unknown-lesson", "unknown-course", "removed-lesson"])
async def test_entry_outside_any_outline_is_not_found_and_nothing_is_written(
    where: str, make_course: Any, catalog: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(3)
    other = await make_course(2)
    users = [new_id(), new_id()]
    entries = [
        beat(users[i % 2], (course, other)[i % 2].course_id, "l1", 20 + i, new_id())
        for i in range(8)
    ]
    if where == "unknown-lesson":
        bad = beat(users[0], course.course_id, "l4", 5, new_id())
    elif where == "unknown-course":
        bad = beat(users[0], new_id(), "l1", 5, new_id())
    else:
        await catalog.UpsertCourse(
            cpb.UpsertCourseRequest(course_id=other.course_id, lessons=[rpb.Lesson(lesson_id="l1")])
        )
        bad = beat(users[1], other.course_id, "l2", 5, new_id())
    error = await rejected(progress, [*entries[:5], bad, *entries[5:]])
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    error_info(error)
    assert await stored_totals(db, users) == Counter()
    assert await remembered_request_ids(db, users) == 0
    # The request ids of the refused batch were not used up.
    expected = sums(entries)
    assert_response_matches(await send(progress, entries), entries, expected)
    assert await stored_totals(db, users) == expected


# --- summing and the response ---------------------------------------------------------------


async def test_entries_for_the_same_lesson_add_up(make_course: Any, progress: Any):
    course = await make_course(2)
    user_id = new_id()
    await progress.RecordTime(beat(user_id, course.course_id, "l1", 17))
    seconds = [300, 1, 299, 42, 42, 7]
    entries = [beat(user_id, course.course_id, "l1", s) for s in seconds]
    entries += [beat(user_id, course.course_id, "l1", 5, new_id()) for _ in range(3)]
    lessons = await send(progress, entries)
    total = 17 + sum(seconds) + 3 * 5
    assert [lesson.time_spent_seconds for lesson in lessons] == [total] * len(entries)
    assert await time_of(progress, (user_id, course.course_id, "l1")) == total
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await time_of(progress, (user_id, course.course_id, "l2"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_response_has_one_lesson_per_entry_in_request_order(make_course: Any, progress: Any):
    a, b = await make_course(3), await make_course(2)
    u, v = new_id(), new_id()
    entries = [
        beat(u, a.course_id, "l2", 10),
        beat(v, b.course_id, "l1", 20),
        beat(u, a.course_id, "l1", 30),
        beat(u, a.course_id, "l2", 40),
        beat(v, a.course_id, "l2", 50),
        beat(u, b.course_id, "l2", 60),
        beat(v, b.course_id, "l1", 70),
        beat(u, a.course_id, "l3", 80),
    ]
    lessons = await send(progress, entries)
    assert [(x.user_id, x.course_id, x.lesson_id) for x in lessons] == [
        (u, a.course_id, "l2"),
        (v, b.course_id, "l1"),
        (u, a.course_id, "l1"),
        (u, a.course_id, "l2"),
        (v, a.course_id, "l2"),
        (u, b.course_id, "l2"),
        (v, b.course_id, "l1"),
        (u, a.course_id, "l3"),
    ]
    assert [x.time_spent_seconds for x in lessons] == [50, 90, 30, 50, 50, 60, 90, 80]
    assert all(not x.completed and x.attempts == 0 for x in lessons)


async def test_heartbeat_batch_before_start_lesson_creates_the_row(make_course: Any, progress: Any):
    course = await make_course(1)
    user_id = new_id()
    key = {"user_id": user_id, "course_id": course.course_id, "lesson_id": "l1"}
    (lesson,) = await send(progress, [beat(user_id, course.course_id, "l1", 25, new_id())])
    assert lesson.time_spent_seconds == 25
    assert lesson.attempts == 0
    assert not lesson.completed
    assert not lesson.HasField("score")
    assert not lesson.HasField("completed_at")
    assert lesson.HasField("first_started_at")
    assert lesson.HasField("last_accessed_at")
    started = await progress.StartLesson(ppb.StartLessonRequest(**key))
    assert started.lesson.time_spent_seconds == 25
    assert started.lesson.first_started_at == lesson.first_started_at
    course_progress = await progress.GetCourseProgress(
        ppb.GetCourseProgressRequest(user_id=user_id, course_id=course.course_id)
    )
    assert course_progress.course.total_time_spent_seconds == 25
    assert course_progress.course.last_lesson_id == "l1"
    assert course_progress.course.completed_lessons == 0


async def test_batches_across_many_learners_and_courses(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    courses = [await make_course(n) for n in (1, 2, 3, 4, 5)]
    users = [new_id() for _ in range(25)]
    rng = random.Random(25)
    all_entries: list[ppb.RecordTimeRequest] = []
    for _ in range(6):
        entries = []
        for _ in range(rng.randint(1, 150)):
            course = rng.choice(courses)
            entries.append(
                beat(
                    rng.choice(users),
                    course.course_id,
                    rng.choice(course.lesson_ids),
                    rng.randint(1, 300),
                    rng.choice(["", new_id()]),
                )
            )
        all_entries.extend(entries)
        running = sums(all_entries)
        assert_response_matches(await send(progress, entries), entries, running)
    assert await stored_totals(db, users) == sums(all_entries)
    for user_id in rng.sample(users, 3):
        for course in courses:
            total = sum(
                s
                for (u, c, _), s in sums(all_entries).items()
                if (u, c) == (user_id, course.course_id)
            )
            response = await progress.GetCourseProgress(
                ppb.GetCourseProgressRequest(user_id=user_id, course_id=course.course_id)
            )
            assert response.course.total_time_spent_seconds == total


async def test_batch_that_would_overflow_a_total_is_out_of_range(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(2)
    user_id = new_id()
    await send(progress, [beat(user_id, course.course_id, "l1", 1)])
    await db.execute(
        "UPDATE lesson_progress SET time_spent_seconds = 2147483647 - 100"
        " WHERE user_id = $1::uuid AND course_id = $2::uuid AND lesson_id = 'l1'",
        user_id,
        course.course_id,
    )
    entries = [
        beat(user_id, course.course_id, "l2", 10, new_id()),
        beat(user_id, course.course_id, "l1", 60, new_id()),
        beat(user_id, course.course_id, "l1", 60, new_id()),
    ]
    error = await rejected(progress, entries)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE, error.details()
    error_info(error)
    assert await stored_totals(db, [user_id]) == Counter(
        {(user_id, course.course_id, "l1"): 2147483647 - 100}
    )
    assert await remembered_request_ids(db, [user_id]) == 0


# --- idempotency ------------------------------------------------------------------------------


async def test_retried_batch_adds_nothing(make_course: Any, progress: Any, db: asyncpg.Pool):
    course = await make_course(3)
    user_id = new_id()
    entries = [
        beat(user_id, course.course_id, course.lesson_ids[i % 3], 11 * (i + 1), new_id())
        for i in range(9)
    ]
    expected = sums(entries)
    first = await send(progress, entries)
    assert_response_matches(first, entries, expected)
    for _ in range(3):
        again = await send(progress, entries)
        assert_response_matches(again, entries, expected)
    assert await stored_totals(db, [user_id]) == expected
    # The same request ids in another order and other spelling are still the same requests.
    shuffled = [
        beat(e.user_id.upper(), e.course_id, e.lesson_id, e.seconds, e.request_id.upper())
        for e in reversed(entries)
    ]
    assert_response_matches(await send(progress, shuffled), shuffled, expected)
    assert await stored_totals(db, [user_id]) == expected


async def test_batch_mixing_new_and_seen_request_ids_adds_only_the_new(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(2)
    user_id = new_id()
    seen = [beat(user_id, course.course_id, "l1", s, new_id()) for s in (10, 20, 30)]
    seen.append(beat(user_id, course.course_id, "l2", 40, new_id()))
    await send(progress, seen)
    new = [
        beat(user_id, course.course_id, "l1", 1, new_id()),
        beat(user_id, course.course_id, "l2", 2, new_id()),
        beat(user_id, course.course_id, "l2", 4),  # no request id: always counts
    ]
    mixed = [seen[0], new[0], seen[3], new[1], seen[1], new[2], seen[2]]
    expected = sums(seen) + sums(new)
    assert expected == Counter(
        {(user_id, course.course_id, "l1"): 61, (user_id, course.course_id, "l2"): 46}
    )
    assert_response_matches(await send(progress, mixed), mixed, expected)
    assert await stored_totals(db, [user_id]) == expected
    assert await remembered_request_ids(db, [user_id]) == 6


async def test_same_request_id_twice_in_one_batch_for_the_same_lesson_counts_once(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(2)
    user_id = new_id()
    request_id = new_id()
    entries = [
        beat(user_id, course.course_id, "l1", 30, request_id),
        beat(user_id, course.course_id, "l2", 5, new_id()),
        beat(user_id.upper(), course.course_id, "l1", 30, request_id.upper()),
        beat(user_id, course.course_id, "l1", 30, request_id),
    ]
    expected = Counter(
        {(user_id, course.course_id, "l1"): 30, (user_id, course.course_id, "l2"): 5}
    )
    assert_response_matches(await send(progress, entries), entries, expected)
    assert await stored_totals(db, [user_id]) == expected


async def test_same_request_id_for_two_learners_counts_for_each(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    # Request ids are remembered per learner, so two learners may use the same one, even on
    # different lessons.
    course = await make_course(2)
    users = [new_id(), new_id()]
    request_id = new_id()
    entries = [
        beat(users[0], course.course_id, "l1", 12, request_id),
        beat(users[1], course.course_id, "l2", 13, request_id),
        beat(users[1], course.course_id, "l2", 13, request_id),
    ]
    expected = Counter({(users[0], course.course_id, "l1"): 12})
    expected[(users[1], course.course_id, "l2")] = 13
    assert_response_matches(await send(progress, entries), entries, expected)
    assert await stored_totals(db, users) == expected


@pytest.mark.parametrize("other", ["other-lesson", "other-course-same-lesson-id"])
async def test_same_request_id_for_two_lessons_in_one_batch_is_invalid(
    other: str, make_course: Any, progress: Any, db: asyncpg.Pool
):
    course, second = await make_course(2), await make_course(2)
    user_id = new_id()
    request_id = new_id()
    if other == "other-lesson":
        clash = beat(user_id, course.course_id, "l2", 8, request_id)
    else:
        clash = beat(user_id, second.course_id, "l1", 8, request_id)
    entries = [
        beat(user_id, course.course_id, "l2", 3, new_id()),
        beat(user_id, course.course_id, "l1", 8, request_id),
        beat(user_id, course.course_id, "l1", 5),
        clash,
        beat(user_id, course.course_id, "l2", 1),
    ]
    assert bad_fields(await rejected(progress, entries)) == {"requests[3].request_id"}
    assert await stored_totals(db, [user_id]) == Counter()
    assert await remembered_request_ids(db, [user_id]) == 0


async def test_request_id_of_unary_record_time_replayed_in_a_batch_counts_once(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(2)
    user_id = new_id()
    request_id = new_id()
    await progress.RecordTime(beat(user_id, course.course_id, "l1", 50, request_id))
    entries = [
        beat(user_id, course.course_id, "l1", 50, request_id.upper()),
        beat(user_id, course.course_id, "l1", 7, new_id()),
        beat(user_id, course.course_id, "l2", 9),
    ]
    expected = Counter(
        {(user_id, course.course_id, "l1"): 57, (user_id, course.course_id, "l2"): 9}
    )
    assert_response_matches(await send(progress, entries), entries, expected)
    assert await stored_totals(db, [user_id]) == expected


async def test_request_id_of_a_batch_replayed_by_unary_record_time_counts_once(
    make_course: Any, progress: Any
):
    course = await make_course(1)
    user_id = new_id()
    request_id = new_id()
    await send(progress, [beat(user_id, course.course_id, "l1", 33, request_id)])
    replay = await progress.RecordTime(beat(user_id, course.course_id, "l1", 33, request_id))
    assert replay.lesson.time_spent_seconds == 33
    assert await time_of(progress, (user_id, course.course_id, "l1")) == 33


@pytest.mark.parametrize("first_use", ["RecordAttempt", "CompleteLesson", "RecordTime-l2"])
async def test_request_id_of_another_call_reused_in_a_batch_is_invalid(
    first_use: str, make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(2)
    user_id = new_id()
    request_id = new_id()
    key = {"user_id": user_id, "course_id": course.course_id, "lesson_id": "l1"}
    if first_use == "RecordAttempt":
        await progress.RecordAttempt(
            ppb.RecordAttemptRequest(**key, score=60, request_id=request_id)
        )
    elif first_use == "CompleteLesson":
        await progress.CompleteLesson(ppb.CompleteLessonRequest(**key, request_id=request_id))
    else:
        await progress.RecordTime(beat(user_id, course.course_id, "l2", 10, request_id))
    before = await stored_totals(db, [user_id])
    remembered = await remembered_request_ids(db, [user_id])
    entries = [
        beat(user_id, course.course_id, "l2", 4, new_id()),
        beat(user_id, course.course_id, "l1", 6),
        beat(user_id, course.course_id, "l1", 8, request_id),
        beat(user_id, course.course_id, "l2", 4),
    ]
    assert bad_fields(await rejected(progress, entries)) == {"requests[2].request_id"}
    assert await stored_totals(db, [user_id]) == before
    assert await remembered_request_ids(db, [user_id]) == remembered


async def test_request_id_of_a_batch_reused_by_record_attempt_is_invalid(
    make_course: Any, progress: Any
):
    course = await make_course(1)
    user_id = new_id()
    request_id = new_id()
    await send(progress, [beat(user_id, course.course_id, "l1", 15, request_id)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await progress.RecordAttempt(
            ppb.RecordAttemptRequest(
                user_id=user_id,
                course_id=course.course_id,
                lesson_id="l1",
                score=90,
                request_id=request_id,
            )
        )
    assert bad_fields(caught.value) == {"request_id"}
    response = await progress.GetLessonProgress(
        ppb.GetLessonProgressRequest(user_id=user_id, course_id=course.course_id, lesson_id="l1")
    )
    assert response.lesson.attempts == 0
    assert response.lesson.time_spent_seconds == 15


async def outcome_of(progress: Any, entries: list[ppb.RecordTimeRequest]) -> Any:
    """The batch's lessons, or the error it got."""
    try:
        return await send(progress, entries)
    except grpc.aio.AioRpcError as error:
        return error


@pytest.mark.parametrize("with_new_time", [False, True], ids=["replay-alone", "replay-and-new"])
async def test_replay_after_the_course_was_recreated_is_no_bug(
    with_new_time: bool, make_course: Any, catalog: Any, progress: Any
):
    # The remembered request id outlives the lesson row it produced (DeleteCourse removed the
    # row, the course was registered again). The contract leaves the outcome open, but it may
    # be neither UNKNOWN/INTERNAL nor a response describing a row that does not exist.
    course = await make_course(1)
    user_id = new_id()
    request_id = new_id()
    await send(progress, [beat(user_id, course.course_id, "l1", 15, request_id)])
    await catalog.DeleteCourse(cpb.DeleteCourseRequest(course_id=course.course_id))
    await catalog.UpsertCourse(
        cpb.UpsertCourseRequest(course_id=course.course_id, lessons=[rpb.Lesson(lesson_id="l1")])
    )
    entries = [beat(user_id, course.course_id, "l1", 15, request_id)]
    if with_new_time:
        entries.append(beat(user_id, course.course_id, "l1", 4))
    outcome = await outcome_of(progress, entries)
    if isinstance(outcome, grpc.aio.AioRpcError):
        assert outcome.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
            outcome.code(),
            outcome.details(),
        )
        error_info(outcome)
        return
    assert [(x.user_id, x.course_id, x.lesson_id) for x in outcome] == [
        (user_id, course.course_id, "l1")
    ] * len(entries)
    stored = await progress.GetLessonProgress(
        ppb.GetLessonProgressRequest(user_id=user_id, course_id=course.course_id, lesson_id="l1")
    )
    assert all(x == stored.lesson for x in outcome)
    assert stored.lesson.time_spent_seconds in ((4, 19) if with_new_time else (0, 15))


# --- concurrency ------------------------------------------------------------------------------


async def gather_batches(
    progress: Any, batches: list[list[ppb.RecordTimeRequest]]
) -> list[grpc.aio.AioRpcError]:
    """Sends every batch at once; returns the failures (none are expected)."""
    outcomes = await asyncio.gather(
        *(send(progress, batch) for batch in batches), return_exceptions=True
    )
    failures = []
    for outcome in outcomes:
        if isinstance(outcome, grpc.aio.AioRpcError):
            failures.append(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
    return failures


def describe(failures: list[grpc.aio.AioRpcError]) -> str:
    # ABORTED is legal after the service's retries, but must not occur in a normal run.
    return "; ".join(f"{f.code()}: {f.details()}" for f in failures)


@pytest.mark.parametrize("round_", range(3))
async def test_concurrent_batches_over_overlapping_lessons(
    round_: int, make_course: Any, progress: Any, db: asyncpg.Pool
):
    courses = [await make_course(4), await make_course(3)]
    users = [new_id() for _ in range(3)]
    keys = [(u, c.course_id, lesson) for u in users for c in courses for lesson in c.lesson_ids]
    rng = random.Random(round_)
    batches = []
    for b in range(8):
        entries = [
            beat(*key, seconds=rng.randint(1, 300), request_id=new_id() if (b + i) % 2 else "")
            for i, key in enumerate(keys * 6)
        ]
        rng.shuffle(entries)
        batches.append(entries)
    failures = await gather_batches(progress, batches)
    assert not failures, describe(failures)
    expected = sums(entry for batch in batches for entry in batch)
    assert await stored_totals(db, users) == expected
    for key in rng.sample(keys, 4):
        assert await time_of(progress, key) == expected[key]


async def test_concurrent_identical_batches_count_once(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(3)
    users = [new_id(), new_id()]
    entries = [
        beat(users[i % 2], course.course_id, course.lesson_ids[i % 3], 1 + i, new_id())
        for i in range(60)
    ]
    rng = random.Random(60)
    copies = []
    for _ in range(8):
        copy = list(entries)
        rng.shuffle(copy)
        copies.append(copy)
    failures = await gather_batches(progress, copies)
    assert not failures, describe(failures)
    assert await stored_totals(db, users) == sums(entries)
    assert await remembered_request_ids(db, users) == 60


async def test_a_claim_made_meanwhile_rolls_a_batch_back(make_course: Any, db: asyncpg.Pool):
    """A batch that could not see a concurrent call's claim of its request id when it read
    the claims (that call had not committed) finds it when it claims the id itself, and is
    rolled back to be retried as a replay, not applied a second time. On Citus the count of
    claims made comes from RETURNING (migration 0011): its ROW_COUNT counts conflicts too."""
    course = await make_course(1)
    user, request_id = new_id(), new_id()
    arguments = array_arguments([Heartbeat(user, course.course_id, "l1", 30, request_id)], 300)
    async with db.acquire() as claimer, db.acquire() as caller:
        claim = claimer.transaction()
        await claim.start()
        await claimer.execute(
            "INSERT INTO processed_requests (user_id, request_id, method, course_id,"
            " lesson_id, credited_seconds) VALUES ($1, $2, 'RecordTime', $3, 'l1', 30)",
            user, request_id, course.course_id,
        )  # fmt: skip
        call = asyncio.ensure_future(caller.fetch(HEARTBEATS, *arguments))
        await asyncio.sleep(1.0)  # it reads no claim, then waits on the one being made
        await claim.commit()
        try:
            rows = await call
        except asyncpg.SerializationError:
            pass  # rolled back: the service retries it, and then it is a replay
        else:  # it read the claims after the commit after all: a replay
            assert not rows[0]["applied"]
    assert await stored_totals(db, [user]) == Counter()


async def test_concurrent_batches_and_unary_heartbeats(
    make_course: Any, progress: Any, db: asyncpg.Pool
):
    course = await make_course(3)
    users = [new_id(), new_id()]
    keys = [(u, course.course_id, lesson) for u in users for lesson in course.lesson_ids]
    rng = random.Random(7)
    batches = [
        [
            beat(*rng.choice(keys), seconds=rng.randint(1, 300), request_id=new_id())
            for _ in range(50)
        ]
        for _ in range(6)
    ]
    singles = [
        beat(*rng.choice(keys), seconds=rng.randint(1, 300), request_id=new_id()) for _ in range(30)
    ]
    outcomes = await asyncio.gather(
        *(send(progress, batch) for batch in batches),
        *(progress.RecordTime(single) for single in singles),
        return_exceptions=True,
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, failures
    expected = sums([*(e for batch in batches for e in batch), *singles])
    assert await stored_totals(db, users) == expected


async def test_batches_racing_outline_changes_get_no_unknown_or_internal(
    make_course: Any, catalog: Any, progress: Any
):
    # Outlines replaced and the course deleted while heartbeats arrive: every call ends OK,
    # NOT_FOUND or (after the service's retries) ABORTED, each error with its ErrorInfo, and
    # every OK batch names its own entries.
    course = await make_course(3)
    users = [new_id(), new_id()]
    rng = random.Random(99)
    batches = [
        [
            beat(rng.choice(users), course.course_id, rng.choice(["l1", "l2", "l3"]), 5, new_id())
            for _ in range(40)
        ]
        for _ in range(8)
    ]
    outlines = [["l1", "l2", "l3"], ["l3", "l1"], ["l2", "l3", "l1"], ["l1"]]

    async def replace(lesson_ids: list[str]) -> Any:
        return await catalog.UpsertCourse(
            cpb.UpsertCourseRequest(
                course_id=course.course_id, lessons=[rpb.Lesson(lesson_id=i) for i in lesson_ids]
            )
        )

    async def batch(entries: list[ppb.RecordTimeRequest]) -> tuple[list[Any], Any]:
        return entries, await outcome_of(progress, entries)

    calls: list[Any] = [batch(entries) for entries in batches]
    calls[2:2] = [replace(outline) for outline in outlines]
    calls.insert(6, catalog.DeleteCourse(cpb.DeleteCourseRequest(course_id=course.course_id)))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    allowed = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED)
    for outcome in outcomes:
        result = outcome[1] if isinstance(outcome, tuple) else outcome
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() in allowed, (result.code(), result.details())
            error_info(result)
        else:
            assert not isinstance(result, BaseException), result
        if isinstance(outcome, tuple) and isinstance(outcome[1], list):
            entries, lessons = outcome
            assert [(x.user_id, x.course_id, x.lesson_id) for x in lessons] == [
                key_of(entry) for entry in entries
            ]
