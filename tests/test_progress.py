"""ProgressService: every rule of the contract for one learner's progress."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
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
from tests.support import key, micros

Catalog = catalog_service_pb2_grpc.CatalogServiceStub
Progress = progress_service_pb2_grpc.ProgressServiceStub
LessonProgress = resources_pb2.LessonProgress
CourseProgress = resources_pb2.CourseProgress
MakeCourse = Callable[..., Awaitable[Any]]

MAX_HEARTBEAT = 300


# --- helpers -------------------------------------------------------------------------------


def percent(done: int, total: int) -> int:
    """round(100 * done / total) with halves rounded up; 0 for an empty outline."""
    if total == 0:
        return 0
    return int((Decimal(100 * done) / Decimal(total)).quantize(Decimal(1), ROUND_HALF_UP))


async def start(progress: Progress, user: str, course: str, lesson: str) -> LessonProgress:
    response = await progress.StartLesson(ps.StartLessonRequest(**key(user, course, lesson)))
    return response.lesson


async def record_time(
    progress: Progress, user: str, course: str, lesson: str, seconds: int, request_id: str = ""
) -> LessonProgress:
    response = await progress.RecordTime(
        ps.RecordTimeRequest(**key(user, course, lesson), seconds=seconds, request_id=request_id)
    )
    return response.lesson


async def attempt(
    progress: Progress, user: str, course: str, lesson: str, score: int, request_id: str = ""
) -> ps.RecordAttemptResponse:
    return await progress.RecordAttempt(
        ps.RecordAttemptRequest(**key(user, course, lesson), score=score, request_id=request_id)
    )


async def complete(
    progress: Progress,
    user: str,
    course: str,
    lesson: str,
    score: int | None = None,
    request_id: str = "",
) -> ps.CompleteLessonResponse:
    return await progress.CompleteLesson(
        ps.CompleteLessonRequest(**key(user, course, lesson), score=score, request_id=request_id)
    )


async def get_lesson(progress: Progress, user: str, course: str, lesson: str) -> LessonProgress:
    response = await progress.GetLessonProgress(
        ps.GetLessonProgressRequest(**key(user, course, lesson))
    )
    return response.lesson


async def course_progress(progress: Progress, user: str, course: str) -> CourseProgress:
    response = await progress.GetCourseProgress(
        ps.GetCourseProgressRequest(user_id=user, course_id=course)
    )
    return response.course


async def list_page(
    progress: Progress,
    user: str,
    course: str,
    *,
    page_size: int = 0,
    page_token: str = "",
    completed_only: bool = False,
) -> ps.ListLessonProgressResponse:
    return await progress.ListLessonProgress(
        ps.ListLessonProgressRequest(
            user_id=user,
            course_id=course,
            page_size=page_size,
            page_token=page_token,
            completed_only=completed_only,
        )
    )


async def list_all(
    progress: Progress, user: str, course: str, *, page_size: int, completed_only: bool = False
) -> list[list[str]]:
    """Every page's lesson ids, following next_page_token to the end."""
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await list_page(
            progress,
            user,
            course,
            page_size=page_size,
            page_token=token,
            completed_only=completed_only,
        )
        pages.append([x.lesson_id for x in page.lessons])
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 1000, "paging does not end"


Call = Callable[[], Awaitable[Any]]


async def expect_error(call: Awaitable[Any] | Call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """The error of ``call`` (an awaitable, or a function making the call), checking its code."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await (call() if callable(call) else call)
    assert raised.value.code() == code, raised.value.details()
    return raised.value


async def history(db: asyncpg.Pool, user: str, course: str, lesson: str) -> list[tuple[int, int]]:
    rows = await db.fetch(
        "SELECT attempt_number, score FROM lesson_attempts"
        " WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3 ORDER BY attempt_number",
        user,
        course,
        lesson,
    )
    return [(r["attempt_number"], r["score"]) for r in rows]


async def stored_completed(db: asyncpg.Pool, user: str, course: str) -> list[str]:
    """The course row's list of completed lesson ids, as stored (completion order)."""
    value = await db.fetchval(
        "SELECT array(SELECT jsonb_array_elements_text(completed_lessons)) FROM course_progress"
        " WHERE user_id = $1 AND course_id = $2",
        user,
        course,
    )
    return list(value or [])


# --- StartLesson -----------------------------------------------------------------------------


async def test_start_lesson_first_call_creates_row(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    user = new_id()
    lesson = await start(progress, user, course.course_id, "l2")
    assert (lesson.user_id, lesson.course_id, lesson.lesson_id) == (user, course.course_id, "l2")
    assert lesson.completed is False
    assert lesson.time_spent_seconds == 0
    assert lesson.attempts == 0
    assert not lesson.HasField("score")
    assert lesson.HasField("first_started_at")
    assert lesson.HasField("last_accessed_at")
    assert lesson.HasField("created_at")
    assert lesson.HasField("updated_at")
    assert not lesson.HasField("completed_at")
    assert micros(lesson.last_accessed_at) >= micros(lesson.first_started_at)


async def test_start_lesson_again_only_moves_last_accessed_at(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2)
    user = new_id()
    first = await start(progress, user, course.course_id, "l1")
    await record_time(progress, user, course.course_id, "l1", 45)
    second = await start(progress, user, course.course_id, "l1")
    third = await start(progress, user, course.course_id, "l1")

    for later in (second, third):
        assert later.first_started_at == first.first_started_at
        assert later.created_at == first.created_at
        assert later.time_spent_seconds == 45
        assert later.attempts == 0
        assert later.completed is False
        assert not later.HasField("score")
    assert micros(second.last_accessed_at) > micros(first.last_accessed_at)
    assert micros(third.last_accessed_at) > micros(second.last_accessed_at)

    stored = await get_lesson(progress, user, course.course_id, "l1")
    assert stored.first_started_at == first.first_started_at
    assert stored.last_accessed_at == third.last_accessed_at


async def test_start_lesson_does_not_undo_completion(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    done = await complete(progress, user, course.course_id, "l1", score=77)
    again = await start(progress, user, course.course_id, "l1")
    assert again.completed is True
    assert again.completed_at == done.lesson.completed_at
    assert again.score == 77


# --- every write creates the row ----------------------------------------------------------


async def test_heartbeat_before_start_creates_row(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    beat = await record_time(progress, user, course.course_id, "l1", 30)
    assert beat.time_spent_seconds == 30
    assert beat.HasField("first_started_at")
    assert beat.completed is False

    started = await start(progress, user, course.course_id, "l1")
    assert started.time_spent_seconds == 30
    assert started.first_started_at == beat.first_started_at
    assert micros(started.last_accessed_at) > micros(beat.last_accessed_at)


async def test_attempt_before_start_creates_row(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    response = await attempt(progress, user, course.course_id, "l2", 64)
    assert response.lesson.attempts == 1
    assert response.lesson.score == 64
    assert response.lesson.HasField("first_started_at")
    stored = await get_lesson(progress, user, course.course_id, "l2")
    assert stored.attempts == 1


async def test_complete_before_start_creates_row(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    response = await complete(progress, user, course.course_id, "l1")
    assert response.lesson.completed is True
    assert response.lesson.HasField("first_started_at")
    assert response.lesson.HasField("completed_at")
    stored = await get_lesson(progress, user, course.course_id, "l1")
    assert stored.completed is True


# --- RecordTime ------------------------------------------------------------------------------


async def test_record_time_adds_up_exactly(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    seconds = [1, 300, 17, 45, 299, 120, 3]
    running = 0
    previous_access = None
    for value in seconds:
        running += value
        lesson = await record_time(progress, user, course.course_id, "l1", value)
        assert lesson.time_spent_seconds == running
        if previous_access is not None:
            assert micros(lesson.last_accessed_at) > previous_access
        previous_access = micros(lesson.last_accessed_at)
    assert (await get_lesson(progress, user, course.course_id, "l1")).time_spent_seconds == sum(
        seconds
    )
    # The other lesson is untouched.
    await expect_error(
        partial(
            progress.GetLessonProgress,
            ps.GetLessonProgressRequest(**key(user, course.course_id, "l2")),
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_record_time_maximum_accepted(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    lesson = await record_time(progress, user, course.course_id, "l1", MAX_HEARTBEAT)
    assert lesson.time_spent_seconds == MAX_HEARTBEAT


@pytest.mark.parametrize("seconds", [MAX_HEARTBEAT + 1, 0, -1, -300, 2**31 - 1])
async def test_record_time_out_of_bounds_rejected(
    progress: Progress, make_course: MakeCourse, seconds: int
):
    course = await make_course(1)
    user = new_id()
    await record_time(progress, user, course.course_id, "l1", 10)
    error = await expect_error(
        progress.RecordTime(
            ps.RecordTimeRequest(**key(user, course.course_id, "l1"), seconds=seconds)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"seconds"}
    assert (await get_lesson(progress, user, course.course_id, "l1")).time_spent_seconds == 10


async def test_record_time_overflow_is_out_of_range(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(1)
    user = new_id()
    await record_time(progress, user, course.course_id, "l1", 1)
    near_max = 2**31 - 1 - 100
    await db.execute(
        "UPDATE lesson_progress SET time_spent_seconds = $3 WHERE user_id = $1 AND course_id = $2",
        user,
        course.course_id,
        near_max,
    )
    error = await expect_error(
        partial(
            progress.RecordTime,
            ps.RecordTimeRequest(**key(user, course.course_id, "l1"), seconds=101),
        ),
        grpc.StatusCode.OUT_OF_RANGE,
    )
    error_info(error)
    lesson = await record_time(progress, user, course.course_id, "l1", 100)
    assert lesson.time_spent_seconds == 2**31 - 1


# --- RecordAttempt ---------------------------------------------------------------------------


async def test_record_attempt_counts_keeps_best_and_history(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(2, assessed=True)
    user = new_id()
    scores = [40, 90, 60]
    for number, score in enumerate(scores, start=1):
        response = await attempt(progress, user, course.course_id, "l1", score)
        assert response.lesson.attempts == number
        assert response.lesson.score == max(scores[:number])
        assert response.passed is False
        assert response.lesson.completed is False
        assert not response.lesson.HasField("completed_at")

    stored = await get_lesson(progress, user, course.course_id, "l1")
    assert stored.attempts == len(scores)
    assert stored.score == max(scores)
    assert await history(db, user, course.course_id, "l1") == list(enumerate(scores, start=1))
    # No passing score: the course is not affected.
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == []


async def test_score_zero_is_a_real_score(progress: Progress, make_course: MakeCourse):
    course = await make_course(1, assessed=True)
    user = new_id()
    started = await start(progress, user, course.course_id, "l1")
    assert not started.HasField("score")
    response = await attempt(progress, user, course.course_id, "l1", 0)
    assert response.lesson.HasField("score")
    assert response.lesson.score == 0
    stored = await get_lesson(progress, user, course.course_id, "l1")
    assert stored.HasField("score")
    assert stored.score == 0
    assert stored.attempts == 1


@pytest.mark.parametrize("score", [None, -1, 101, 1000])
async def test_record_attempt_score_required_and_in_range(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool, score: int | None
):
    course = await make_course(1, assessed=True)
    user = new_id()
    error = await expect_error(
        progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, course.course_id, "l1"), score=score)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"score"}
    assert await history(db, user, course.course_id, "l1") == []


async def test_record_attempt_score_bounds_accepted(progress: Progress, make_course: MakeCourse):
    course = await make_course(1, assessed=True)
    user = new_id()
    low = await attempt(progress, user, course.course_id, "l1", 0)
    high = await attempt(progress, user, course.course_id, "l1", 100)
    assert (low.lesson.score, high.lesson.score) == (0, 100)


async def test_passing_attempt_completes_lesson_and_course_progress(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(3, passing_score=70)
    user = new_id()

    below = await attempt(progress, user, course.course_id, "l2", 69)
    assert below.passed is False
    assert below.lesson.completed is False
    assert not below.lesson.HasField("completed_at")
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == []
    assert summary.progress_percentage == 0

    reached = await attempt(progress, user, course.course_id, "l2", 70)
    assert reached.passed is True
    assert reached.lesson.completed is True
    assert reached.lesson.HasField("completed_at")
    assert reached.lesson.attempts == 2
    assert reached.lesson.score == 70
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == ["l2"]
    assert summary.completed_lessons == 1
    assert summary.total_lessons == 3
    assert summary.progress_percentage == percent(1, 3)
    assert not summary.HasField("completed_at")

    # A later, better attempt keeps the first completion time and does not duplicate l2.
    better = await attempt(progress, user, course.course_id, "l2", 95)
    assert better.lesson.completed is True
    assert better.lesson.completed_at == reached.lesson.completed_at
    assert better.lesson.score == 95
    assert better.lesson.attempts == 3
    # A failing attempt after completion does not undo it.
    worse = await attempt(progress, user, course.course_id, "l2", 10)
    assert worse.passed is False
    assert worse.lesson.completed is True
    assert worse.lesson.score == 95
    assert worse.lesson.completed_at == reached.lesson.completed_at

    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == ["l2"]
    assert summary.completed_lessons == 1
    assert await stored_completed(db, user, course.course_id) == ["l2"]
    assert await history(db, user, course.course_id, "l2") == [(1, 69), (2, 70), (3, 95), (4, 10)]


async def test_passing_attempt_completes_the_course(progress: Progress, make_course: MakeCourse):
    course = await make_course(2, passing_score=60)
    user = new_id()
    await complete(progress, user, course.course_id, "l1")
    response = await attempt(progress, user, course.course_id, "l2", 100)
    assert response.passed is True
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == ["l1", "l2"]
    assert summary.progress_percentage == 100
    assert summary.HasField("completed_at")


async def test_passing_score_zero_passes_any_attempt(progress: Progress, make_course: MakeCourse):
    course = await make_course(2, passing_score=0)
    user = new_id()
    response = await attempt(progress, user, course.course_id, "l1", 0)
    assert response.passed is True
    assert response.lesson.completed is True
    assert response.lesson.score == 0
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == ["l1"]


async def test_attempt_without_passing_score_never_completes(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1, assessed=True)
    user = new_id()
    response = await attempt(progress, user, course.course_id, "l1", 100)
    assert response.passed is False
    assert response.lesson.completed is False
    summary = await course_progress(progress, user, course.course_id)
    assert summary.progress_percentage == 0
    assert not summary.HasField("completed_at")


# --- CompleteLesson --------------------------------------------------------------------------


async def test_complete_lesson_sets_completion_once(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(3)
    user = new_id()
    await record_time(progress, user, course.course_id, "l1", 12)
    first = await complete(progress, user, course.course_id, "l1")
    assert first.lesson.completed is True
    assert first.lesson.HasField("completed_at")
    assert first.lesson.time_spent_seconds == 12
    assert not first.lesson.HasField("score")
    assert list(first.course.completed_lesson_ids) == ["l1"]
    assert first.course.completed_lessons == 1
    assert first.course.total_lessons == 3
    assert first.course.progress_percentage == percent(1, 3)

    second = await complete(progress, user, course.course_id, "l1")
    # Completing twice changes nothing the second time.
    assert second.lesson.completed_at == first.lesson.completed_at
    assert second.lesson.updated_at == first.lesson.updated_at
    assert second.lesson == first.lesson
    assert list(second.course.completed_lesson_ids) == ["l1"]
    assert second.course.completed_lessons == 1
    assert second.course.progress_percentage == percent(1, 3)

    stored = await get_lesson(progress, user, course.course_id, "l1")
    assert stored == first.lesson
    listed = await db.fetchval(
        "SELECT completed_lessons::text FROM course_progress WHERE user_id = $1 AND course_id = $2",
        user,
        course.course_id,
    )
    assert listed == '["l1"]'


async def test_complete_lesson_keeps_better_score(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(1)
    user = new_id()
    first = await complete(progress, user, course.course_id, "l1", score=70)
    assert first.lesson.score == 70
    better = await complete(progress, user, course.course_id, "l1", score=85)
    assert better.lesson.score == 85
    assert better.lesson.completed_at == first.lesson.completed_at
    worse = await complete(progress, user, course.course_id, "l1", score=50)
    assert worse.lesson.score == 85
    assert worse.lesson.completed_at == first.lesson.completed_at
    unscored = await complete(progress, user, course.course_id, "l1")
    assert unscored.lesson.score == 85
    assert (await get_lesson(progress, user, course.course_id, "l1")).score == 85
    # Re-completing with a better score must not list the lesson twice, in the API or stored.
    assert list(unscored.course.completed_lesson_ids) == ["l1"]
    assert await stored_completed(db, user, course.course_id) == ["l1"]


async def test_complete_lesson_score_against_attempt_best(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2, assessed=True)
    user = new_id()
    await attempt(progress, user, course.course_id, "l1", 60)
    lower = await complete(progress, user, course.course_id, "l1", score=40)
    assert lower.lesson.completed is True
    assert lower.lesson.score == 60
    assert lower.lesson.attempts == 1  # completion is not an attempt

    await attempt(progress, user, course.course_id, "l2", 60)
    higher = await complete(progress, user, course.course_id, "l2", score=0)
    assert higher.lesson.score == 60
    zero = await complete(progress, new_id(), course.course_id, "l2", score=0)
    assert zero.lesson.HasField("score")
    assert zero.lesson.score == 0


@pytest.mark.parametrize("score", [-1, 101])
async def test_complete_lesson_score_out_of_range(
    progress: Progress, make_course: MakeCourse, score: int
):
    course = await make_course(1)
    user = new_id()
    error = await expect_error(
        progress.CompleteLesson(
            ps.CompleteLessonRequest(**key(user, course.course_id, "l1"), score=score)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"score"}
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == []


async def test_completed_lesson_ids_in_outline_order(progress: Progress, make_course: MakeCourse):
    course = await make_course(5)
    user = new_id()
    done: set[str] = set()
    for lesson_id in ["l4", "l1", "l5", "l4", "l2", "l1"]:
        done.add(lesson_id)
        expected = [x for x in course.lesson_ids if x in done]
        response = await complete(progress, user, course.course_id, lesson_id)
        assert list(response.course.completed_lesson_ids) == expected
        assert response.course.completed_lessons == len(expected)
        assert response.course.total_lessons == 5
        assert response.course.progress_percentage == percent(len(expected), 5)
        read = await course_progress(progress, user, course.course_id)
        assert list(read.completed_lesson_ids) == expected
        assert read.progress_percentage == percent(len(expected), 5)


async def test_percentage_rounds_half_up_eighths(progress: Progress, make_course: MakeCourse):
    course = await make_course(8)
    user = new_id()
    first = await complete(progress, user, course.course_id, "l1")
    assert percent(1, 8) == 13  # 12.5 rounds up
    assert first.course.progress_percentage == 13
    for done, lesson_id in enumerate(course.lesson_ids[1:], start=2):
        response = await complete(progress, user, course.course_id, lesson_id)
        assert response.course.progress_percentage == percent(done, 8)
    assert percent(8, 8) == 100


async def test_percentage_thirds(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    user = new_id()
    expected = [33, 67, 100]
    for done, lesson_id in enumerate(course.lesson_ids, start=1):
        assert percent(done, 3) == expected[done - 1]
        response = await complete(progress, user, course.course_id, lesson_id)
        assert response.course.progress_percentage == expected[done - 1]
        summary = await course_progress(progress, user, course.course_id)
        assert summary.progress_percentage == expected[done - 1]


async def test_course_completed_at_set_when_reaching_100(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2)
    user = new_id()
    half = await complete(progress, user, course.course_id, "l2")
    assert not half.course.HasField("completed_at")
    assert half.course.progress_percentage == 50

    full = await complete(progress, user, course.course_id, "l1")
    assert full.course.progress_percentage == 100
    assert full.course.HasField("completed_at")
    assert list(full.course.completed_lesson_ids) == ["l1", "l2"]
    assert micros(full.course.completed_at) >= micros(full.lesson.completed_at)

    again = await complete(progress, user, course.course_id, "l2", score=99)
    assert again.course.completed_at == full.course.completed_at
    assert again.course.progress_percentage == 100
    assert list(again.course.completed_lesson_ids) == ["l1", "l2"]

    read = await course_progress(progress, user, course.course_id)
    assert read.completed_at == full.course.completed_at


async def test_one_lesson_course_completes_on_first_completion(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    response = await complete(progress, new_id(), course.course_id, "l1")
    assert response.course.progress_percentage == 100
    assert response.course.HasField("completed_at")


# --- GetLessonProgress -----------------------------------------------------------------------


async def test_get_lesson_progress_returns_the_row(progress: Progress, make_course: MakeCourse):
    course = await make_course(2, assessed=True)
    user = new_id()
    await start(progress, user, course.course_id, "l1")
    await record_time(progress, user, course.course_id, "l1", 20)
    await record_time(progress, user, course.course_id, "l1", 22)
    await attempt(progress, user, course.course_id, "l1", 35)
    lesson = await get_lesson(progress, user, course.course_id, "l1")
    assert (lesson.user_id, lesson.course_id, lesson.lesson_id) == (user, course.course_id, "l1")
    assert lesson.time_spent_seconds == 42
    assert lesson.attempts == 1
    assert lesson.score == 35
    assert lesson.completed is False


async def test_get_lesson_progress_not_found_reasons(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    await start(progress, user, course.course_id, "l1")

    no_row = await expect_error(
        partial(
            progress.GetLessonProgress,
            ps.GetLessonProgressRequest(**key(user, course.course_id, "l2")),
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error_info(no_row).reason == "PROGRESS_NOT_FOUND"

    other_user = await expect_error(
        progress.GetLessonProgress(
            ps.GetLessonProgressRequest(**key(new_id(), course.course_id, "l1"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error_info(other_user).reason == "PROGRESS_NOT_FOUND"

    unknown_course = await expect_error(
        partial(
            progress.GetLessonProgress, ps.GetLessonProgressRequest(**key(user, new_id(), "l1"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error_info(unknown_course).reason == "COURSE_NOT_FOUND"

    not_in_outline = await expect_error(
        progress.GetLessonProgress(
            ps.GetLessonProgressRequest(**key(user, course.course_id, "l99"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error_info(not_in_outline).reason == "LESSON_NOT_FOUND"


# --- NOT_FOUND on every call -----------------------------------------------------------------


def lesson_calls(progress: Progress, user: str, course: str, lesson: str) -> list[Call]:
    ids = key(user, course, lesson)
    return [
        partial(progress.StartLesson, ps.StartLessonRequest(**ids)),
        partial(progress.RecordTime, ps.RecordTimeRequest(**ids, seconds=5)),
        partial(progress.RecordTime, ps.RecordTimeRequest(**ids, seconds=5, request_id=new_id())),
        partial(progress.RecordAttempt, ps.RecordAttemptRequest(**ids, score=50)),
        partial(
            progress.RecordAttempt, ps.RecordAttemptRequest(**ids, score=50, request_id=new_id())
        ),
        partial(progress.CompleteLesson, ps.CompleteLessonRequest(**ids)),
        partial(
            progress.CompleteLesson, ps.CompleteLessonRequest(**ids, score=5, request_id=new_id())
        ),
        partial(progress.GetLessonProgress, ps.GetLessonProgressRequest(**ids)),
    ]


async def test_unknown_course_not_found_on_every_call(progress: Progress, db: asyncpg.Pool):
    user = new_id()
    course = new_id()
    calls = [
        *lesson_calls(progress, user, course, "l1"),
        partial(
            progress.ListLessonProgress,
            ps.ListLessonProgressRequest(user_id=user, course_id=course),
        ),
        partial(
            progress.GetCourseProgress, ps.GetCourseProgressRequest(user_id=user, course_id=course)
        ),
    ]
    for call in calls:
        error = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert error_info(error).reason == "COURSE_NOT_FOUND"
    assert await db.fetchval("SELECT count(*) FROM lesson_progress WHERE user_id = $1", user) == 0
    assert (
        await db.fetchval("SELECT count(*) FROM processed_requests WHERE user_id = $1", user) == 0
    )


async def test_lesson_not_in_outline_not_found_on_every_call(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(2)
    user = new_id()
    for call in lesson_calls(progress, user, course.course_id, "L1"):  # ids are case-sensitive
        error = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert error_info(error).reason == "LESSON_NOT_FOUND"
    assert await db.fetchval("SELECT count(*) FROM lesson_progress WHERE user_id = $1", user) == 0


# --- ListLessonProgress ----------------------------------------------------------------------


async def test_list_ordered_by_first_started_at(progress: Progress, make_course: MakeCourse):
    course = await make_course(5)
    user = new_id()
    order = ["l3", "l1", "l5", "l2"]
    for lesson_id in order:
        await start(progress, user, course.course_id, lesson_id)
    # Touching l3 again later does not move it: the order is by first start.
    await record_time(progress, user, course.course_id, "l3", 7)
    page = await list_page(progress, user, course.course_id)
    assert [x.lesson_id for x in page.lessons] == order
    assert page.next_page_token == ""
    assert [x.time_spent_seconds for x in page.lessons] == [7, 0, 0, 0]


async def test_list_ties_broken_by_lesson_id(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(6)
    user = new_id()
    for lesson_id in ["l6", "l4", "l2", "l5", "l1"]:
        await start(progress, user, course.course_id, lesson_id)
    # l6, l2 and l1 share a start time; l4 and l5 come later, in this order.
    await db.execute(
        """
        UPDATE lesson_progress SET first_started_at = CASE
            WHEN lesson_id IN ('l6', 'l2', 'l1') THEN '2024-01-01T00:00:00Z'::timestamptz
            WHEN lesson_id = 'l4' THEN '2024-01-01T00:00:01Z'::timestamptz
            WHEN lesson_id = 'l5' THEN '2024-01-01T00:00:02Z'::timestamptz
        END
        WHERE user_id = $1 AND course_id = $2
        """,
        user,
        course.course_id,
    )
    expected = ["l1", "l2", "l6", "l4", "l5"]
    page = await list_page(progress, user, course.course_id)
    assert [x.lesson_id for x in page.lessons] == expected
    # Keyset paging must cut through the tie correctly.
    assert await list_all(progress, user, course.course_id, page_size=2) == [
        ["l1", "l2"],
        ["l6", "l4"],
        ["l5"],
    ]
    assert await list_all(progress, user, course.course_id, page_size=1) == [[x] for x in expected]


async def test_list_pages_through_everything(progress: Progress, make_course: MakeCourse):
    course = await make_course(7)
    user = new_id()
    for lesson_id in course.lesson_ids:
        await start(progress, user, course.course_id, lesson_id)
    assert await list_all(progress, user, course.course_id, page_size=3) == [
        ["l1", "l2", "l3"],
        ["l4", "l5", "l6"],
        ["l7"],
    ]
    # An exact multiple: the last full page carries no token.
    assert await list_all(progress, user, course.course_id, page_size=7) == [course.lesson_ids]
    # The page size may change between pages.
    first = await list_page(progress, user, course.course_id, page_size=2)
    rest = await list_page(
        progress, user, course.course_id, page_size=10, page_token=first.next_page_token
    )
    assert [x.lesson_id for x in first.lessons] == ["l1", "l2"]
    assert [x.lesson_id for x in rest.lessons] == ["l3", "l4", "l5", "l6", "l7"]
    assert rest.next_page_token == ""


async def test_list_exact_multiple_last_page_has_no_token(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(6)
    user = new_id()
    for lesson_id in course.lesson_ids:
        await start(progress, user, course.course_id, lesson_id)
    first = await list_page(progress, user, course.course_id, page_size=3)
    assert first.next_page_token != ""
    second = await list_page(
        progress, user, course.course_id, page_size=3, page_token=first.next_page_token
    )
    assert [x.lesson_id for x in second.lessons] == ["l4", "l5", "l6"]
    assert second.next_page_token == ""


async def test_list_default_page_size_is_50(progress: Progress, make_course: MakeCourse):
    course = await make_course(60)
    user = new_id()
    for lesson_id in course.lesson_ids:
        await start(progress, user, course.course_id, lesson_id)
    first = await list_page(progress, user, course.course_id, page_size=0)
    assert [x.lesson_id for x in first.lessons] == course.lesson_ids[:50]
    assert first.next_page_token != ""
    second = await list_page(progress, user, course.course_id, page_token=first.next_page_token)
    assert [x.lesson_id for x in second.lessons] == course.lesson_ids[50:]
    assert second.next_page_token == ""


async def test_list_page_size_capped_at_500(progress: Progress, make_course: MakeCourse):
    course = await make_course(501)
    user = new_id()
    for lesson_id in course.lesson_ids:
        await start(progress, user, course.course_id, lesson_id)
    first = await list_page(progress, user, course.course_id, page_size=10_000)
    assert len(first.lessons) == 500
    assert [x.lesson_id for x in first.lessons] == course.lesson_ids[:500]
    assert first.next_page_token != ""
    second = await list_page(
        progress, user, course.course_id, page_size=501, page_token=first.next_page_token
    )
    assert [x.lesson_id for x in second.lessons] == ["l501"]
    assert second.next_page_token == ""


async def test_list_completed_only(progress: Progress, make_course: MakeCourse):
    course = await make_course(6)
    user = new_id()
    for lesson_id in ["l1", "l2", "l3", "l4", "l5"]:
        await start(progress, user, course.course_id, lesson_id)
    for lesson_id in ["l5", "l2", "l4"]:
        await complete(progress, user, course.course_id, lesson_id)
    await complete(progress, user, course.course_id, "l6")  # started by its completion

    everything = await list_page(progress, user, course.course_id)
    assert [x.lesson_id for x in everything.lessons] == ["l1", "l2", "l3", "l4", "l5", "l6"]

    done = await list_page(progress, user, course.course_id, completed_only=True)
    assert [x.lesson_id for x in done.lessons] == ["l2", "l4", "l5", "l6"]
    assert all(x.completed for x in done.lessons)
    assert await list_all(progress, user, course.course_id, page_size=3, completed_only=True) == [
        ["l2", "l4", "l5"],
        ["l6"],
    ]


async def test_list_only_the_learners_rows(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    other_course = await make_course(3)
    user, other = new_id(), new_id()
    await start(progress, user, course.course_id, "l2")
    await start(progress, other, course.course_id, "l1")
    await start(progress, user, other_course.course_id, "l1")
    page = await list_page(progress, user, course.course_id)
    assert [(x.user_id, x.course_id, x.lesson_id) for x in page.lessons] == [
        (user, course.course_id, "l2")
    ]


async def test_list_empty_for_learner_without_progress(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    page = await list_page(progress, new_id(), course.course_id)
    assert list(page.lessons) == []
    assert page.next_page_token == ""


async def test_list_token_from_another_query_rejected(progress: Progress, make_course: MakeCourse):
    course = await make_course(4)
    other_course = await make_course(4)
    user, other = new_id(), new_id()
    for lesson_id in course.lesson_ids:
        await start(progress, user, course.course_id, lesson_id)
        await start(progress, other, course.course_id, lesson_id)
        await start(progress, user, other_course.course_id, lesson_id)
        await complete(progress, user, course.course_id, lesson_id)
    token = (await list_page(progress, user, course.course_id, page_size=1)).next_page_token
    assert token

    other_queries = [
        {"user": other, "course": course.course_id, "completed_only": False},
        {"user": user, "course": course.course_id, "completed_only": True},
        {"user": user, "course": other_course.course_id, "completed_only": False},
    ]
    for query in other_queries:
        error = await expect_error(
            progress.ListLessonProgress(
                ps.ListLessonProgressRequest(
                    user_id=query["user"],
                    course_id=query["course"],
                    completed_only=query["completed_only"],
                    page_size=1,
                    page_token=token,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert bad_fields(error) == {"page_token"}

    # The token still works for its own query.
    page = await list_page(progress, user, course.course_id, page_size=1, page_token=token)
    assert [x.lesson_id for x in page.lessons] == ["l2"]


def _tampered(token: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


async def test_list_garbage_token_rejected(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    user = new_id()
    for lesson_id in course.lesson_ids:
        await start(progress, user, course.course_id, lesson_id)
    token = (await list_page(progress, user, course.course_id, page_size=1)).next_page_token
    garbage = [
        "garbage",
        "!!!!",
        "é",
        "x" * 5000,
        base64.urlsafe_b64encode(b'[["ListLessonProgress"],[0,"l1"]]').decode(),
        token[:-4],
        token + "AAAA",
        _tampered(token),
    ]
    for bad in garbage:
        error = await expect_error(
            progress.ListLessonProgress(
                ps.ListLessonProgressRequest(
                    user_id=user, course_id=course.course_id, page_token=bad
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert bad_fields(error) == {"page_token"}, bad


@pytest.mark.parametrize("page_size", [-1, -500, -(2**31)])
async def test_list_negative_page_size_rejected(
    progress: Progress, make_course: MakeCourse, page_size: int
):
    course = await make_course(1)
    error = await expect_error(
        progress.ListLessonProgress(
            ps.ListLessonProgressRequest(
                user_id=new_id(), course_id=course.course_id, page_size=page_size
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"page_size"}


# --- GetCourseProgress -----------------------------------------------------------------------


async def test_course_progress_zeroed_without_progress(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    user = new_id()
    summary = await course_progress(progress, user, course.course_id)
    assert summary.user_id == user
    assert summary.course_id == course.course_id
    assert list(summary.completed_lesson_ids) == []
    assert summary.completed_lessons == 0
    assert summary.total_lessons == 3
    assert summary.progress_percentage == 0
    assert summary.total_time_spent_seconds == 0
    assert summary.last_lesson_id == ""
    assert not summary.HasField("started_at")
    assert not summary.HasField("last_accessed_at")
    assert not summary.HasField("completed_at")


async def test_course_progress_totals_and_last_lesson(progress: Progress, make_course: MakeCourse):
    course = await make_course(4)
    other_course = await make_course(4)
    user = new_id()
    first = await record_time(progress, user, course.course_id, "l2", 10)
    await record_time(progress, user, course.course_id, "l1", 20)
    await start(progress, user, course.course_id, "l3")
    await record_time(progress, user, course.course_id, "l2", 5)
    await record_time(progress, new_id(), course.course_id, "l2", 100)  # another learner
    await record_time(progress, user, other_course.course_id, "l2", 100)  # another course

    summary = await course_progress(progress, user, course.course_id)
    assert summary.total_time_spent_seconds == 10 + 20 + 5
    assert summary.last_lesson_id == "l2"
    assert summary.started_at == first.first_started_at
    assert summary.completed_lessons == 0

    done = await complete(progress, user, course.course_id, "l3")
    assert done.course.last_lesson_id == "l3"
    assert done.course.total_time_spent_seconds == 35
    assert done.course.last_accessed_at == done.lesson.last_accessed_at
    assert done.course.started_at == first.first_started_at

    await start(progress, user, course.course_id, "l1")
    summary = await course_progress(progress, user, course.course_id)
    assert summary.last_lesson_id == "l1"
    assert micros(summary.last_accessed_at) > micros(done.course.last_accessed_at)
    assert summary.started_at == first.first_started_at
    assert list(summary.completed_lesson_ids) == ["l3"]
    assert summary.progress_percentage == percent(1, 4)


@pytest.mark.parametrize(
    ("user_id", "course_id", "expected"),
    [
        ("nope", None, {"user_id"}),
        (None, "nope", {"course_id"}),
        ("", "", {"user_id", "course_id"}),
    ],
)
async def test_course_progress_invalid_ids(
    progress: Progress, user_id: str | None, course_id: str | None, expected: set[str]
):
    error = await expect_error(
        progress.GetCourseProgress(
            ps.GetCourseProgressRequest(
                user_id=new_id() if user_id is None else user_id,
                course_id=new_id() if course_id is None else course_id,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == expected


# --- DeleteUserProgress ----------------------------------------------------------------------


async def _user_counts(db: asyncpg.Pool, user: str) -> dict[str, int]:
    counts = {}
    for table in ("lesson_progress", "course_progress", "lesson_attempts", "processed_requests"):
        counts[table] = int(
            await db.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", user)
        )
    return counts


async def test_delete_user_progress_erases_one_learner(
    progress: Progress, catalog: Catalog, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(3, assessed=True)
    other_course = await make_course(2, passing_score=50)
    user, bystander = new_id(), new_id()

    # The learner: 3 lessons in one course (one later removed), 1 in the other.
    await record_time(progress, user, course.course_id, "l1", 30, request_id=new_id())
    await attempt(progress, user, course.course_id, "l1", 20, request_id=new_id())
    await attempt(progress, user, course.course_id, "l1", 40)
    await complete(progress, user, course.course_id, "l2", score=90, request_id=new_id())
    await start(progress, user, course.course_id, "l3")
    await attempt(progress, user, other_course.course_id, "l1", 75)
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course.course_id,
            lessons=[resources_pb2.Lesson(lesson_id=x) for x in ("l1", "l2")],
        )
    )
    # The bystander: 2 lessons in the same course, with the same request id as one of ours.
    shared_request = new_id()
    await record_time(progress, user, course.course_id, "l2", 5, request_id=shared_request)
    await record_time(progress, bystander, course.course_id, "l1", 8, request_id=shared_request)
    await attempt(progress, bystander, course.course_id, "l1", 66)
    await complete(progress, bystander, course.course_id, "l2")

    assert await _user_counts(db, user) == {
        "lesson_progress": 4,
        "course_progress": 2,
        "lesson_attempts": 3,
        "processed_requests": 4,
    }
    bystander_counts = {
        "lesson_progress": 2,
        "course_progress": 1,
        "lesson_attempts": 1,
        "processed_requests": 1,
    }
    assert await _user_counts(db, bystander) == bystander_counts

    deleted = await progress.DeleteUserProgress(ps.DeleteUserProgressRequest(user_id=user))
    assert deleted.deleted_lessons == 4

    assert await _user_counts(db, user) == dict.fromkeys(bystander_counts, 0)
    assert await _user_counts(db, bystander) == bystander_counts

    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == []
    assert summary.total_time_spent_seconds == 0
    assert summary.last_lesson_id == ""
    error = await expect_error(
        partial(
            progress.GetLessonProgress,
            ps.GetLessonProgressRequest(**key(user, course.course_id, "l1")),
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error_info(error).reason == "PROGRESS_NOT_FOUND"

    kept = await get_lesson(progress, bystander, course.course_id, "l1")
    assert (kept.time_spent_seconds, kept.attempts, kept.score) == (8, 1, 66)
    kept_course = await course_progress(progress, bystander, course.course_id)
    assert list(kept_course.completed_lesson_ids) == ["l2"]

    again = await progress.DeleteUserProgress(ps.DeleteUserProgressRequest(user_id=user))
    assert again.deleted_lessons == 0


async def test_delete_user_progress_unknown_user_reports_zero(progress: Progress):
    response = await progress.DeleteUserProgress(ps.DeleteUserProgressRequest(user_id=new_id()))
    assert response.deleted_lessons == 0


async def test_delete_user_progress_uppercase_id(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(2)
    user = new_id()
    await start(progress, user, course.course_id, "l1")
    await start(progress, user, course.course_id, "l2")
    response = await progress.DeleteUserProgress(ps.DeleteUserProgressRequest(user_id=user.upper()))
    assert response.deleted_lessons == 2
    assert (await _user_counts(db, user))["lesson_progress"] == 0


@pytest.mark.parametrize("user_id", ["", "someone", "0f8fad5bd9cb469fa16570867728950e"])
async def test_delete_user_progress_invalid_id(progress: Progress, user_id: str):
    error = await expect_error(
        partial(progress.DeleteUserProgress, ps.DeleteUserProgressRequest(user_id=user_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"user_id"}


# --- Idempotency -----------------------------------------------------------------------------


async def test_record_time_retry_counts_once(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    request_id = new_id()
    first = await record_time(progress, user, course.course_id, "l1", 30, request_id)
    assert first.time_spent_seconds == 30
    retry = await record_time(progress, user, course.course_id, "l1", 30, request_id)
    assert retry.time_spent_seconds == 30
    other = await record_time(progress, user, course.course_id, "l1", 20, new_id())
    assert other.time_spent_seconds == 50
    # A late retry of the first request returns the current state, adding nothing.
    late = await record_time(progress, user, course.course_id, "l1", 30, request_id)
    assert late.time_spent_seconds == 50
    # Without a request id, every call counts.
    await record_time(progress, user, course.course_id, "l1", 7)
    plain = await record_time(progress, user, course.course_id, "l1", 7)
    assert plain.time_spent_seconds == 64
    assert (await get_lesson(progress, user, course.course_id, "l1")).time_spent_seconds == 64


async def test_record_attempt_retry_counts_once(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(1, assessed=True)
    user = new_id()
    request_id = new_id()
    first = await attempt(progress, user, course.course_id, "l1", 45, request_id)
    retry = await attempt(progress, user, course.course_id, "l1", 45, request_id)
    assert first.lesson.attempts == 1
    assert retry.lesson.attempts == 1
    assert retry.lesson.score == 45
    assert await history(db, user, course.course_id, "l1") == [(1, 45)]

    second = await attempt(progress, user, course.course_id, "l1", 30, new_id())
    assert second.lesson.attempts == 2
    assert second.lesson.score == 45
    assert await history(db, user, course.course_id, "l1") == [(1, 45), (2, 30)]
    stored_ids = await db.fetch(
        "SELECT request_id::text AS r FROM lesson_attempts"
        " WHERE user_id = $1 AND course_id = $2 ORDER BY attempt_number",
        user,
        course.course_id,
    )
    assert stored_ids[0]["r"] == request_id


async def test_passing_attempt_retry_does_not_count_again(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(2, passing_score=50)
    user = new_id()
    request_id = new_id()
    first = await attempt(progress, user, course.course_id, "l1", 80, request_id)
    assert first.passed is True
    retry = await attempt(progress, user, course.course_id, "l1", 80, request_id)
    assert retry.lesson.attempts == 1
    assert retry.lesson.completed is True
    assert retry.lesson.completed_at == first.lesson.completed_at
    assert await history(db, user, course.course_id, "l1") == [(1, 80)]
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == ["l1"]


async def test_complete_lesson_retry_counts_once(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    request_id = new_id()
    first = await complete(progress, user, course.course_id, "l1", score=60, request_id=request_id)
    retry = await complete(progress, user, course.course_id, "l1", score=60, request_id=request_id)
    assert retry.lesson.completed is True
    assert retry.lesson.completed_at == first.lesson.completed_at
    assert retry.lesson.score == 60
    assert list(retry.course.completed_lesson_ids) == ["l1"]
    assert retry.course.progress_percentage == 50
    # A new request id with a better score is a new call.
    better = await complete(progress, user, course.course_id, "l1", score=90, request_id=new_id())
    assert better.lesson.score == 90
    assert better.lesson.completed_at == first.lesson.completed_at


async def test_request_id_is_per_learner(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    request_id = new_id()
    alice, bob = new_id(), new_id()
    a = await record_time(progress, alice, course.course_id, "l1", 10, request_id)
    b = await record_time(progress, bob, course.course_id, "l1", 15, request_id)
    assert (a.time_spent_seconds, b.time_spent_seconds) == (10, 15)


async def test_request_id_case_insensitive(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    request_id = new_id()
    await record_time(progress, user, course.course_id, "l1", 10, request_id.upper())
    retry = await record_time(progress, user, course.course_id, "l1", 10, request_id)
    assert retry.time_spent_seconds == 10


async def test_request_id_reused_on_other_lesson_rejected(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(3, assessed=True)
    user = new_id()
    request_id = new_id()
    await record_time(progress, user, course.course_id, "l1", 10, request_id)

    reuses: list[Call] = [
        partial(
            progress.RecordTime,
            ps.RecordTimeRequest(
                **key(user, course.course_id, "l2"), seconds=10, request_id=request_id
            ),
        ),
        partial(
            progress.RecordAttempt,
            ps.RecordAttemptRequest(
                **key(user, course.course_id, "l3"), score=50, request_id=request_id
            ),
        ),
        partial(
            progress.CompleteLesson,
            ps.CompleteLessonRequest(**key(user, course.course_id, "l2"), request_id=request_id),
        ),
    ]
    for call in reuses:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(error) == {"request_id"}

    # Nothing was written by the refused calls.
    for lesson_id in ("l2", "l3"):
        error = await expect_error(
            progress.GetLessonProgress(
                ps.GetLessonProgressRequest(**key(user, course.course_id, lesson_id))
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        assert error_info(error).reason == "PROGRESS_NOT_FOUND"
    assert (await get_lesson(progress, user, course.course_id, "l1")).time_spent_seconds == 10
    summary = await course_progress(progress, user, course.course_id)
    assert list(summary.completed_lesson_ids) == []


async def test_request_id_reused_in_other_course_is_separate_write(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    # Request ids are remembered per learner and course: the same id in another course is
    # another call, applied once there too (and replayed there like any other).
    course = await make_course(2, assessed=True)
    other_course = await make_course(2, assessed=True)
    user = new_id()
    request_id = new_id()
    await record_time(progress, user, course.course_id, "l1", 10, request_id)
    for _ in range(2):  # the second call is a replay in the other course
        beat = await record_time(progress, user, other_course.course_id, "l2", 7, request_id)
        assert beat.time_spent_seconds == 7
    attempted = await progress.RecordAttempt(
        ps.RecordAttemptRequest(
            **key(user, other_course.course_id, "l1"), score=50, request_id=new_id()
        )
    )
    assert attempted.lesson.attempts == 1
    assert (await get_lesson(progress, user, course.course_id, "l1")).time_spent_seconds == 10
    remembered = await db.fetch(
        "SELECT course_id::text, method, lesson_id FROM processed_requests"
        " WHERE user_id = $1 AND request_id = $2 ORDER BY course_id",
        user,
        request_id,
    )
    assert sorted(tuple(r) for r in remembered) == sorted(
        [(course.course_id, "RecordTime", "l1"), (other_course.course_id, "RecordTime", "l2")]
    )


async def test_request_id_reused_by_other_method_on_same_lesson_rejected(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(1, assessed=True)
    user = new_id()
    time_id, attempt_id, complete_id = new_id(), new_id(), new_id()
    await record_time(progress, user, course.course_id, "l1", 10, time_id)
    await attempt(progress, user, course.course_id, "l1", 40, attempt_id)
    await complete(progress, user, course.course_id, "l1", request_id=complete_id)
    ids = key(user, course.course_id, "l1")
    reuses: list[Call] = [
        partial(
            progress.RecordAttempt, ps.RecordAttemptRequest(**ids, score=50, request_id=time_id)
        ),
        partial(progress.CompleteLesson, ps.CompleteLessonRequest(**ids, request_id=time_id)),
        partial(progress.RecordTime, ps.RecordTimeRequest(**ids, seconds=5, request_id=attempt_id)),
        partial(
            progress.CompleteLesson,
            ps.CompleteLessonRequest(**ids, score=99, request_id=attempt_id),
        ),
        partial(
            progress.RecordTime, ps.RecordTimeRequest(**ids, seconds=5, request_id=complete_id)
        ),
        partial(
            progress.RecordAttempt, ps.RecordAttemptRequest(**ids, score=99, request_id=complete_id)
        ),
    ]
    for call in reuses:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(error) == {"request_id"}
    lesson = await get_lesson(progress, user, course.course_id, "l1")
    assert (lesson.time_spent_seconds, lesson.attempts, lesson.score) == (10, 1, 40)
    assert await history(db, user, course.course_id, "l1") == [(1, 40)]


@pytest.mark.parametrize("request_id", ["abc", "0f8fad5bd9cb469fa16570867728950e", "{x}"])
async def test_malformed_request_id_rejected(
    progress: Progress, make_course: MakeCourse, request_id: str
):
    course = await make_course(1)
    user = new_id()
    ids = key(user, course.course_id, "l1")
    calls: list[Call] = [
        partial(progress.RecordTime, ps.RecordTimeRequest(**ids, seconds=5, request_id=request_id)),
        partial(
            progress.RecordAttempt, ps.RecordAttemptRequest(**ids, score=5, request_id=request_id)
        ),
        partial(progress.CompleteLesson, ps.CompleteLessonRequest(**ids, request_id=request_id)),
    ]
    for call in calls:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(error) == {"request_id"}


# --- Identifiers -----------------------------------------------------------------------------


async def test_uppercase_uuids_accepted_and_returned_lowercase(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2)
    user = new_id()
    upper = key(user.upper(), course.course_id.upper(), "l1")
    started = (await progress.StartLesson(ps.StartLessonRequest(**upper))).lesson
    assert (started.user_id, started.course_id) == (user, course.course_id)
    timed = (await progress.RecordTime(ps.RecordTimeRequest(**upper, seconds=9))).lesson
    assert (timed.user_id, timed.course_id) == (user, course.course_id)
    tried = (await progress.RecordAttempt(ps.RecordAttemptRequest(**upper, score=9))).lesson
    assert (tried.user_id, tried.course_id) == (user, course.course_id)
    done = await progress.CompleteLesson(ps.CompleteLessonRequest(**upper))
    assert (done.lesson.user_id, done.lesson.course_id) == (user, course.course_id)
    assert (done.course.user_id, done.course.course_id) == (user, course.course_id)

    # The same learner whichever case the ids are written in.
    lower = await get_lesson(progress, user, course.course_id, "l1")
    assert (lower.time_spent_seconds, lower.attempts, lower.completed) == (9, 1, True)
    mixed = (await progress.GetLessonProgress(ps.GetLessonProgressRequest(**upper))).lesson
    assert mixed == lower
    summary = await course_progress(progress, user.upper(), course.course_id.upper())
    assert (summary.user_id, summary.course_id) == (user, course.course_id)
    assert list(summary.completed_lesson_ids) == ["l1"]
    listed = await list_page(progress, user.upper(), course.course_id.upper())
    assert [(x.user_id, x.course_id, x.lesson_id) for x in listed.lessons] == [
        (user, course.course_id, "l1")
    ]


async def test_long_and_unicode_lesson_ids_accepted(progress: Progress, catalog: Catalog):
    course_id = new_id()
    long_id = "ß" * 255
    odd_ids = [long_id, "lesson with spaces", "路径/ünïcode?#&"]
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id, lessons=[resources_pb2.Lesson(lesson_id=x) for x in odd_ids]
        )
    )
    user = new_id()
    for lesson_id in odd_ids:
        lesson = await record_time(progress, user, course_id, lesson_id, 3)
        assert lesson.lesson_id == lesson_id
    summary = await course_progress(progress, user, course_id)
    assert summary.total_time_spent_seconds == 3 * len(odd_ids)


GOOD = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.mark.parametrize(
    ("user_id", "course_id", "lesson_id", "expected"),
    [
        ("", GOOD, "l1", {"user_id"}),
        ("not-a-uuid", GOOD, "l1", {"user_id"}),
        ("0f8fad5bd9cb469fa16570867728950e", GOOD, "l1", {"user_id"}),
        ("{0f8fad5b-d9cb-469f-a165-70867728950e}", GOOD, "l1", {"user_id"}),
        ("urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e", GOOD, "l1", {"user_id"}),
        (GOOD + "0", GOOD, "l1", {"user_id"}),
        ("0f8fad5b-d9cb-469f-a165-70867728950g", GOOD, "l1", {"user_id"}),
        (GOOD, "", "l1", {"course_id"}),
        (GOOD, "course-1", "l1", {"course_id"}),
        (GOOD, GOOD, "", {"lesson_id"}),
        (GOOD, GOOD, "x" * 256, {"lesson_id"}),
        (GOOD, GOOD, "a\x00b", {"lesson_id"}),
        (GOOD, GOOD, "a\tb", {"lesson_id"}),
        (GOOD, GOOD, "a\x7fb", {"lesson_id"}),
        (GOOD, GOOD, "a\x85b", {"lesson_id"}),
        ("x", "y", "", {"user_id", "course_id", "lesson_id"}),
    ],
)
async def test_malformed_identifiers_rejected_on_every_lesson_call(
    progress: Progress, user_id: str, course_id: str, lesson_id: str, expected: set[str]
):
    ids = key(user_id, course_id, lesson_id)
    calls: list[Call] = [
        partial(progress.StartLesson, ps.StartLessonRequest(**ids)),
        partial(progress.RecordTime, ps.RecordTimeRequest(**ids, seconds=5)),
        partial(progress.RecordAttempt, ps.RecordAttemptRequest(**ids, score=5)),
        partial(progress.CompleteLesson, ps.CompleteLessonRequest(**ids)),
        partial(progress.GetLessonProgress, ps.GetLessonProgressRequest(**ids)),
    ]
    for call in calls:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(error) == expected


async def test_every_bad_field_named_at_once(progress: Progress):
    error = await expect_error(
        progress.RecordTime(
            ps.RecordTimeRequest(
                user_id="u", course_id="c", lesson_id="", seconds=0, request_id="r"
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"user_id", "course_id", "lesson_id", "seconds", "request_id"}

    listing = await expect_error(
        progress.ListLessonProgress(
            ps.ListLessonProgressRequest(user_id="u", course_id="c", page_size=-1)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(listing) == {"user_id", "course_id", "page_size"}
