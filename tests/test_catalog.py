"""CatalogService: registering, replacing, reading and deleting course outlines."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from functools import partial
from typing import Any

import asyncpg
import grpc
import pytest

from lessonprogress.v1 import catalog_service_pb2 as cs
from lessonprogress.v1 import catalog_service_pb2_grpc, progress_service_pb2_grpc, resources_pb2
from lessonprogress.v1 import progress_service_pb2 as ps
from tests.conftest import new_id
from tests.errors import bad_fields, error_info

Catalog = catalog_service_pb2_grpc.CatalogServiceStub
Progress = progress_service_pb2_grpc.ProgressServiceStub


def lesson(
    lesson_id: str, *, title: str = "", assessed: bool = False, passing_score: int | None = None
) -> resources_pb2.Lesson:
    return resources_pb2.Lesson(
        lesson_id=lesson_id, title=title, assessed=assessed, passing_score=passing_score
    )


def percent(done: int, total: int) -> int:
    """round(100 * done / total), halves up, 0 for an empty outline: computed independently."""
    if total == 0:
        return 0
    return int((Decimal(100 * done) / Decimal(total)).quantize(Decimal(1), ROUND_HALF_UP))


async def upsert(
    catalog: Catalog, course_id: str, lesson_ids: list[str], title: str = "course"
) -> resources_pb2.Course:
    response = await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id, title=title, lessons=[lesson(i, title=i) for i in lesson_ids]
        )
    )
    return response.course


async def complete(progress: Progress, user_id: str, course_id: str, lesson_id: str) -> None:
    await progress.CompleteLesson(
        ps.CompleteLessonRequest(user_id=user_id, course_id=course_id, lesson_id=lesson_id)
    )


async def course_progress(
    progress: Progress, user_id: str, course_id: str
) -> resources_pb2.CourseProgress:
    response = await progress.GetCourseProgress(
        ps.GetCourseProgressRequest(user_id=user_id, course_id=course_id)
    )
    return response.course


# --- UpsertCourse ------------------------------------------------------------------------


async def test_upsert_creates_course_readable_with_get_course(catalog: Catalog) -> None:
    course_id = new_id()
    created = await upsert(catalog, course_id, ["intro", "basics", "quiz"], title="Algebra")
    assert created.course_id == course_id
    assert created.title == "Algebra"
    assert [x.lesson_id for x in created.lessons] == ["intro", "basics", "quiz"]
    assert [x.title for x in created.lessons] == ["intro", "basics", "quiz"]
    assert created.HasField("create_time")
    assert created.HasField("update_time")

    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))).course
    assert fetched.course_id == course_id
    assert fetched.title == "Algebra"
    assert [x.lesson_id for x in fetched.lessons] == ["intro", "basics", "quiz"]


async def test_upsert_replaces_title_and_lesson_order(catalog: Catalog) -> None:
    course_id = new_id()
    await upsert(catalog, course_id, ["a", "b", "c", "d"], title="Old title")

    replaced = await upsert(catalog, course_id, ["d", "b", "a", "c"], title="New title")
    assert replaced.title == "New title"
    assert [x.lesson_id for x in replaced.lessons] == ["d", "b", "a", "c"]

    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))).course
    assert fetched.title == "New title"
    assert [x.lesson_id for x in fetched.lessons] == ["d", "b", "a", "c"]
    assert [x.title for x in fetched.lessons] == ["d", "b", "a", "c"]


async def test_upsert_swapping_two_lessons(catalog: Catalog) -> None:
    course_id = new_id()
    await upsert(catalog, course_id, ["x", "y"])
    await upsert(catalog, course_id, ["y", "x"])
    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))).course
    assert [x.lesson_id for x in fetched.lessons] == ["y", "x"]


async def test_lesson_fields_round_trip(catalog: Catalog) -> None:
    course_id = new_id()
    lessons = [
        lesson("read", title="Reading", assessed=False),
        lesson("quiz", title="Quiz", assessed=True, passing_score=70),
        lesson("zero", title="Zero bar", assessed=True, passing_score=0),
        lesson("essay", title="Essay", assessed=True),
        lesson("full", title="Perfect", assessed=True, passing_score=100),
    ]
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(course_id=course_id, title="fields", lessons=lessons)
    )
    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))).course
    got = {x.lesson_id: x for x in fetched.lessons}
    assert [x.lesson_id for x in fetched.lessons] == ["read", "quiz", "zero", "essay", "full"]

    assert got["read"].title == "Reading"
    assert got["read"].assessed is False
    assert not got["read"].HasField("passing_score")

    assert got["quiz"].assessed is True
    assert got["quiz"].HasField("passing_score")
    assert got["quiz"].passing_score == 70

    # 0 is a real passing score, distinct from unset.
    assert got["zero"].HasField("passing_score")
    assert got["zero"].passing_score == 0

    assert got["essay"].assessed is True
    assert not got["essay"].HasField("passing_score")

    assert got["full"].passing_score == 100


async def test_upsert_replaces_lesson_fields(catalog: Catalog) -> None:
    course_id = new_id()
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id,
            lessons=[
                lesson("q1", title="first", assessed=True, passing_score=70),
                lesson("q2", title="second", assessed=False),
            ],
        )
    )
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id,
            lessons=[
                lesson("q1", title="first, revised", assessed=False),
                lesson("q2", title="second", assessed=True, passing_score=0),
            ],
        )
    )
    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))).course
    q1, q2 = fetched.lessons
    assert (q1.lesson_id, q1.title, q1.assessed) == ("q1", "first, revised", False)
    assert not q1.HasField("passing_score")
    assert (q2.lesson_id, q2.assessed) == ("q2", True)
    assert q2.HasField("passing_score")
    assert q2.passing_score == 0


async def test_upsert_accepts_uppercase_course_id_and_returns_lowercase(catalog: Catalog) -> None:
    course_id = new_id()
    created = await upsert(catalog, course_id.upper(), ["l1"])
    assert created.course_id == course_id
    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id.upper()))).course
    assert fetched.course_id == course_id
    assert [x.lesson_id for x in fetched.lessons] == ["l1"]


async def test_duplicate_lesson_ids_rejected(catalog: Catalog) -> None:
    course_id = new_id()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upsert(catalog, course_id, ["a", "b", "a", "c", "b"])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == {"lessons[2].lesson_id", "lessons[4].lesson_id"}
    # Nothing was registered.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_duplicate_lesson_ids_rejected_on_replace_keeps_old_outline(
    catalog: Catalog,
) -> None:
    course_id = new_id()
    await upsert(catalog, course_id, ["a", "b"], title="kept")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upsert(catalog, course_id, ["c", "c"], title="rejected")
    assert bad_fields(raised.value) == {"lessons[1].lesson_id"}
    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))).course
    assert fetched.title == "kept"
    assert [x.lesson_id for x in fetched.lessons] == ["a", "b"]


@pytest.mark.parametrize(
    ("course_id", "lessons", "title", "expected"),
    [
        ("not-a-uuid", [lesson("l1")], "t", {"course_id"}),
        ("", [lesson("l1")], "t", {"course_id"}),
        (None, [lesson("")], "t", {"lessons[0].lesson_id"}),
        (None, [lesson("l1"), lesson("x" * 256)], "t", {"lessons[1].lesson_id"}),
        (None, [lesson("bad\x00id")], "t", {"lessons[0].lesson_id"}),
        (None, [lesson("bad\nid")], "t", {"lessons[0].lesson_id"}),
        (None, [lesson("l1", passing_score=101)], "t", {"lessons[0].passing_score"}),
        (None, [lesson("l1", passing_score=-1)], "t", {"lessons[0].passing_score"}),
        (None, [lesson("l1")], "bad\x07title", {"title"}),
        (
            "nope",
            [lesson("l1"), lesson(""), lesson("l3", passing_score=200)],
            "t",
            {"course_id", "lessons[1].lesson_id", "lessons[2].passing_score"},
        ),
    ],
)
async def test_upsert_invalid_arguments(
    catalog: Catalog,
    course_id: str | None,
    lessons: list[resources_pb2.Lesson],
    title: str,
    expected: set[str],
) -> None:
    request = cs.UpsertCourseRequest(
        course_id=new_id() if course_id is None else course_id, title=title, lessons=lessons
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await catalog.UpsertCourse(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == expected


async def test_lesson_id_of_255_characters_accepted(catalog: Catalog) -> None:
    course_id = new_id()
    long_id = "é" * 255
    created = await upsert(catalog, course_id, [long_id])
    assert [x.lesson_id for x in created.lessons] == [long_id]


# --- empty outline --------------------------------------------------------------------------


async def test_empty_outline_allowed(catalog: Catalog, progress: Progress) -> None:
    course_id = new_id()
    created = await upsert(catalog, course_id, [])
    assert list(created.lessons) == []
    fetched = (await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))).course
    assert list(fetched.lessons) == []

    course = await course_progress(progress, new_id(), course_id)
    assert course.total_lessons == 0
    assert course.completed_lessons == 0
    assert course.progress_percentage == 0
    assert list(course.completed_lesson_ids) == []
    assert not course.HasField("completed_at")


async def test_emptying_an_outline_counts_nothing(catalog: Catalog, progress: Progress) -> None:
    course_id = new_id()
    user_id = new_id()
    await upsert(catalog, course_id, ["l1", "l2"])
    await complete(progress, user_id, course_id, "l1")
    await upsert(catalog, course_id, [])

    course = await course_progress(progress, user_id, course_id)
    assert course.total_lessons == 0
    assert course.progress_percentage == 0
    assert list(course.completed_lesson_ids) == []
    assert course.completed_lessons == 0
    # An empty outline is not a finished course.
    assert not course.HasField("completed_at")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await progress.StartLesson(
            ps.StartLessonRequest(user_id=user_id, course_id=course_id, lesson_id="l1")
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "LESSON_NOT_FOUND"


# --- lessons removed from an outline ---------------------------------------------------------


async def test_removed_lesson_keeps_rows_but_stops_counting(
    catalog: Catalog, progress: Progress, db: asyncpg.Pool
) -> None:
    course_id = new_id()
    user_id = new_id()
    await upsert(catalog, course_id, ["l1", "l2", "l3", "l4"])
    await progress.RecordTime(
        ps.RecordTimeRequest(user_id=user_id, course_id=course_id, lesson_id="l2", seconds=40)
    )
    await progress.RecordAttempt(
        ps.RecordAttemptRequest(user_id=user_id, course_id=course_id, lesson_id="l2", score=55)
    )
    await complete(progress, user_id, course_id, "l2")
    await complete(progress, user_id, course_id, "l1")
    await progress.RecordTime(
        ps.RecordTimeRequest(user_id=user_id, course_id=course_id, lesson_id="l1", seconds=15)
    )

    before = await course_progress(progress, user_id, course_id)
    assert list(before.completed_lesson_ids) == ["l1", "l2"]
    assert before.total_lessons == 4
    assert before.progress_percentage == percent(2, 4)

    await upsert(catalog, course_id, ["l1", "l3", "l4"])

    # The progress row, its attempt history and the course row's memory of it are kept.
    row = await db.fetchrow(
        "SELECT completed, time_spent_seconds, attempts, score FROM lesson_progress"
        " WHERE user_id = $1 AND course_id = $2 AND lesson_id = 'l2'",
        user_id,
        course_id,
    )
    assert row is not None
    assert dict(row) == {"completed": True, "time_spent_seconds": 40, "attempts": 1, "score": 55}
    attempts = await db.fetchval(
        "SELECT count(*) FROM lesson_attempts"
        " WHERE user_id = $1 AND course_id = $2 AND lesson_id = 'l2'",
        user_id,
        course_id,
    )
    assert attempts == 1

    after = await course_progress(progress, user_id, course_id)
    assert after.total_lessons == 3
    assert list(after.completed_lesson_ids) == ["l1"]
    assert after.completed_lessons == 1
    assert after.progress_percentage == percent(1, 3)
    # Documented in the proto: time includes lessons removed from the outline.
    assert after.total_time_spent_seconds == 40 + 15

    listed = await progress.ListLessonProgress(
        ps.ListLessonProgressRequest(user_id=user_id, course_id=course_id)
    )
    assert sorted(x.lesson_id for x in listed.lessons) == ["l1"]


async def test_removed_lesson_gets_not_found_from_every_progress_call(
    catalog: Catalog, progress: Progress
) -> None:
    course_id = new_id()
    user_id = new_id()
    await upsert(catalog, course_id, ["l1", "l2"])
    await progress.StartLesson(
        ps.StartLessonRequest(user_id=user_id, course_id=course_id, lesson_id="l2")
    )
    await upsert(catalog, course_id, ["l1"])

    key = {"user_id": user_id, "course_id": course_id, "lesson_id": "l2"}
    calls: list[Any] = [
        partial(progress.StartLesson, ps.StartLessonRequest(**key)),
        partial(progress.RecordTime, ps.RecordTimeRequest(**key, seconds=10)),
        partial(progress.RecordTime, ps.RecordTimeRequest(**key, seconds=10, request_id=new_id())),
        partial(progress.RecordAttempt, ps.RecordAttemptRequest(**key, score=80)),
        partial(progress.CompleteLesson, ps.CompleteLessonRequest(**key)),
        partial(progress.GetLessonProgress, ps.GetLessonProgressRequest(**key)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call()
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(raised.value).reason == "LESSON_NOT_FOUND"


async def test_putting_a_removed_lesson_back_revives_its_progress(
    catalog: Catalog, progress: Progress
) -> None:
    course_id = new_id()
    user_id = new_id()
    await upsert(catalog, course_id, ["l1", "l2", "l3"])
    await progress.RecordTime(
        ps.RecordTimeRequest(user_id=user_id, course_id=course_id, lesson_id="l2", seconds=25)
    )
    await complete(progress, user_id, course_id, "l2")

    await upsert(catalog, course_id, ["l1", "l3"])
    assert list((await course_progress(progress, user_id, course_id)).completed_lesson_ids) == []

    await upsert(catalog, course_id, ["l3", "l2", "l1"])
    lesson_row = (
        await progress.GetLessonProgress(
            ps.GetLessonProgressRequest(user_id=user_id, course_id=course_id, lesson_id="l2")
        )
    ).lesson
    assert lesson_row.completed is True
    assert lesson_row.time_spent_seconds == 25

    course = await course_progress(progress, user_id, course_id)
    assert list(course.completed_lesson_ids) == ["l2"]
    assert course.total_lessons == 3
    assert course.progress_percentage == percent(1, 3)

    # Writes are accepted again and add to the old row.
    again = await progress.RecordTime(
        ps.RecordTimeRequest(user_id=user_id, course_id=course_id, lesson_id="l2", seconds=5)
    )
    assert again.lesson.time_spent_seconds == 25 + 5


async def test_shrinking_outline_completes_covering_learners(
    catalog: Catalog, progress: Progress
) -> None:
    course_id = new_id()
    finisher = new_id()
    partial = new_id()
    await upsert(catalog, course_id, ["l1", "l2", "l3"])
    await complete(progress, finisher, course_id, "l1")
    await complete(progress, finisher, course_id, "l3")
    await complete(progress, partial, course_id, "l1")

    before = await course_progress(progress, finisher, course_id)
    assert not before.HasField("completed_at")
    assert before.progress_percentage == percent(2, 3)

    await upsert(catalog, course_id, ["l1", "l3"])

    done = await course_progress(progress, finisher, course_id)
    assert done.HasField("completed_at")
    assert done.progress_percentage == 100
    assert list(done.completed_lesson_ids) == ["l1", "l3"]
    assert done.total_lessons == 2

    not_done = await course_progress(progress, partial, course_id)
    assert not not_done.HasField("completed_at")
    assert not_done.progress_percentage == percent(1, 2)

    # Documented in the proto: the completion time stays set when the outline grows again.
    await upsert(catalog, course_id, ["l1", "l2", "l3"])
    regrown = await course_progress(progress, finisher, course_id)
    assert regrown.HasField("completed_at")
    assert regrown.completed_at == done.completed_at
    assert regrown.progress_percentage == percent(2, 3)


async def test_reordering_changes_completed_lesson_order(
    catalog: Catalog, progress: Progress
) -> None:
    course_id = new_id()
    user_id = new_id()
    await upsert(catalog, course_id, ["a", "b", "c"])
    await complete(progress, user_id, course_id, "c")
    await complete(progress, user_id, course_id, "a")
    assert list((await course_progress(progress, user_id, course_id)).completed_lesson_ids) == [
        "a",
        "c",
    ]
    await upsert(catalog, course_id, ["c", "b", "a"])
    assert list((await course_progress(progress, user_id, course_id)).completed_lesson_ids) == [
        "c",
        "a",
    ]


# --- GetCourse ------------------------------------------------------------------------------


async def test_get_unknown_course_not_found(catalog: Catalog) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await catalog.GetCourse(cs.GetCourseRequest(course_id=new_id()))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "COURSE_NOT_FOUND"


@pytest.mark.parametrize("course_id", ["", "123", "0f8fad5bd9cb469fa16570867728950e"])
async def test_get_course_invalid_id(catalog: Catalog, course_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))
    assert bad_fields(raised.value) == {"course_id"}


# --- DeleteCourse ---------------------------------------------------------------------------


async def _count(db: asyncpg.Pool, table: str, course_id: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table} WHERE course_id = $1", course_id))


async def test_delete_course_deletes_outline_and_all_progress(
    catalog: Catalog, progress: Progress, db: asyncpg.Pool
) -> None:
    course_id = new_id()
    other_course = new_id()
    alice, bob = new_id(), new_id()
    await upsert(catalog, course_id, ["l1", "l2", "l3"])
    await upsert(catalog, other_course, ["l1"])

    # alice: l1 (attempts), l2 (completed), l3 (time, later removed); bob: l1 completed.
    for score in (30, 80):
        await progress.RecordAttempt(
            ps.RecordAttemptRequest(user_id=alice, course_id=course_id, lesson_id="l1", score=score)
        )
    await complete(progress, alice, course_id, "l2")
    await progress.RecordTime(
        ps.RecordTimeRequest(
            user_id=alice, course_id=course_id, lesson_id="l3", seconds=9, request_id=new_id()
        )
    )
    await complete(progress, bob, course_id, "l1")
    await upsert(catalog, course_id, ["l1", "l2"])  # l3's row is kept, outside the outline
    # Progress in another course must survive.
    await complete(progress, alice, other_course, "l1")
    await progress.RecordAttempt(
        ps.RecordAttemptRequest(user_id=alice, course_id=other_course, lesson_id="l1", score=5)
    )

    assert await _count(db, "lesson_progress", course_id) == 4
    assert await _count(db, "lesson_attempts", course_id) == 2
    assert await _count(db, "course_progress", course_id) == 2

    deleted = await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course_id))
    assert deleted.deleted_lessons == 4  # alice l1, l2, l3 + bob l1

    assert await _count(db, "courses", course_id) == 0
    assert await _count(db, "lessons", course_id) == 0
    assert await _count(db, "lesson_progress", course_id) == 0
    assert await _count(db, "lesson_attempts", course_id) == 0
    assert await _count(db, "course_progress", course_id) == 0

    assert await _count(db, "lesson_progress", other_course) == 1
    assert await _count(db, "lesson_attempts", other_course) == 1
    assert await _count(db, "course_progress", other_course) == 1

    with pytest.raises(grpc.aio.AioRpcError) as get:
        await catalog.GetCourse(cs.GetCourseRequest(course_id=course_id))
    assert get.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as course_call:
        await course_progress(progress, alice, course_id)
    assert course_call.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(course_call.value).reason == "COURSE_NOT_FOUND"

    with pytest.raises(grpc.aio.AioRpcError) as lesson_call:
        await progress.StartLesson(
            ps.StartLessonRequest(user_id=alice, course_id=course_id, lesson_id="l1")
        )
    assert lesson_call.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(lesson_call.value).reason == "COURSE_NOT_FOUND"


async def test_delete_course_without_progress_reports_zero(catalog: Catalog) -> None:
    course_id = new_id()
    await upsert(catalog, course_id, ["l1", "l2"])
    deleted = await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course_id))
    assert deleted.deleted_lessons == 0


async def test_delete_unknown_course_not_found(catalog: Catalog) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=new_id()))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "COURSE_NOT_FOUND"


async def test_delete_course_twice_second_is_not_found(catalog: Catalog) -> None:
    course_id = new_id()
    await upsert(catalog, course_id, ["l1"])
    await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course_id))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_course_invalid_id(catalog: Catalog) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id="course-1"))
    assert bad_fields(raised.value) == {"course_id"}


async def test_recreating_deleted_course_starts_from_scratch(
    catalog: Catalog, progress: Progress
) -> None:
    course_id = new_id()
    user_id = new_id()
    await upsert(catalog, course_id, ["l1", "l2"])
    await complete(progress, user_id, course_id, "l1")
    await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course_id))
    await upsert(catalog, course_id, ["l1", "l2"])
    course = await course_progress(progress, user_id, course_id)
    assert list(course.completed_lesson_ids) == []
    assert course.progress_percentage == 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await progress.GetLessonProgress(
            ps.GetLessonProgressRequest(user_id=user_id, course_id=course_id, lesson_id="l1")
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "PROGRESS_NOT_FOUND"
