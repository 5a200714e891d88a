"""Attempt history (ListAttempts) and resume bookmarks (SaveBookmark, GetCourseProgress)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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
MakeCourse = Callable[..., Awaitable[Any]]

MAX_BOOKMARK_BYTES = 4096


# --- helpers -------------------------------------------------------------------------------


async def attempt(
    progress: Progress, user: str, course: str, lesson: str, score: int, request_id: str = ""
) -> ps.RecordAttemptResponse:
    return await progress.RecordAttempt(
        ps.RecordAttemptRequest(**key(user, course, lesson), score=score, request_id=request_id)
    )


async def list_attempts(
    progress: Progress,
    user: str,
    course: str,
    lesson: str,
    *,
    page_size: int = 0,
    page_token: str = "",
) -> ps.ListAttemptsResponse:
    return await progress.ListAttempts(
        ps.ListAttemptsRequest(
            **key(user, course, lesson), page_size=page_size, page_token=page_token
        )
    )


async def all_attempt_pages(
    progress: Progress, user: str, course: str, lesson: str, *, page_size: int
) -> list[list[resources_pb2.Attempt]]:
    """Every page, following next_page_token to the end."""
    pages: list[list[resources_pb2.Attempt]] = []
    token = ""
    while True:
        page = await list_attempts(
            progress, user, course, lesson, page_size=page_size, page_token=token
        )
        pages.append(list(page.attempts))
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 1000, "paging does not end"


async def bookmark(
    progress: Progress, user: str, course: str, lesson: str, position: str
) -> resources_pb2.LessonProgress:
    response = await progress.SaveBookmark(
        ps.SaveBookmarkRequest(**key(user, course, lesson), position=position)
    )
    return response.lesson


async def get_lesson(
    progress: Progress, user: str, course: str, lesson: str
) -> resources_pb2.LessonProgress:
    response = await progress.GetLessonProgress(
        ps.GetLessonProgressRequest(**key(user, course, lesson))
    )
    return response.lesson


async def course_progress(
    progress: Progress, user: str, course: str
) -> resources_pb2.CourseProgress:
    response = await progress.GetCourseProgress(
        ps.GetCourseProgressRequest(user_id=user, course_id=course)
    )
    return response.course


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    error_info(raised.value)
    return raised.value


# --- ListAttempts ----------------------------------------------------------------------------


async def test_list_attempts_oldest_first_with_scores_and_request_ids(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2)
    user = new_id()
    sent = [(40, new_id()), (85, ""), (0, new_id()), (100, ""), (85, new_id())]
    for score, request_id in sent:
        await attempt(progress, user, course.course_id, "l1", score, request_id)

    page = await list_attempts(progress, user, course.course_id, "l1")
    assert page.next_page_token == ""
    assert [a.attempt_number for a in page.attempts] == [1, 2, 3, 4, 5]
    assert [a.score for a in page.attempts] == [score for score, _ in sent]
    assert [a.request_id for a in page.attempts] == [request_id for _, request_id in sent]
    times = [micros(a.attempted_at) for a in page.attempts]
    assert all(a.HasField("attempted_at") for a in page.attempts)
    assert times == sorted(times)

    # The history agrees with the lesson row's counters.
    lesson = await get_lesson(progress, user, course.course_id, "l1")
    assert lesson.attempts == len(sent)
    assert lesson.score == max(score for score, _ in sent)
    # The other lesson, and the same lesson of another learner, have no history.
    assert list((await list_attempts(progress, user, course.course_id, "l2")).attempts) == []
    assert list((await list_attempts(progress, new_id(), course.course_id, "l1")).attempts) == []


async def test_list_attempts_times_bracket_the_calls(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    # Touches of another lesson before, between and after the attempts bracket their times.
    touches = []
    for score in (10, 20, 30):
        touch = await progress.StartLesson(
            ps.StartLessonRequest(**key(user, course.course_id, "l2"))
        )
        touches.append(micros(touch.lesson.last_accessed_at))
        await attempt(progress, user, course.course_id, "l1", score)
    last = await progress.StartLesson(ps.StartLessonRequest(**key(user, course.course_id, "l2")))
    touches.append(micros(last.lesson.last_accessed_at))

    page = await list_attempts(progress, user, course.course_id, "l1")
    assert [a.score for a in page.attempts] == [10, 20, 30]
    for index, history in enumerate(page.attempts):
        assert touches[index] <= micros(history.attempted_at) <= touches[index + 1]


async def test_idempotent_retry_adds_no_history(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    request_id = new_id()
    first = await attempt(progress, user, course.course_id, "l1", 55, request_id)
    retry = await attempt(progress, user, course.course_id, "l1", 55, request_id)
    assert retry.lesson.attempts == first.lesson.attempts == 1
    other = await attempt(progress, user, course.course_id, "l1", 70)
    assert other.lesson.attempts == 2
    retry_again = await attempt(progress, user, course.course_id, "l1", 55, request_id)
    assert retry_again.lesson.attempts == 2

    page = await list_attempts(progress, user, course.course_id, "l1")
    assert [(a.attempt_number, a.score, a.request_id) for a in page.attempts] == [
        (1, 55, request_id),
        (2, 70, ""),
    ]


async def test_complete_lesson_is_not_an_attempt(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    await attempt(progress, user, course.course_id, "l1", 30)
    await progress.CompleteLesson(
        ps.CompleteLessonRequest(**key(user, course.course_id, "l1"), score=90)
    )
    await progress.CompleteLesson(
        ps.CompleteLessonRequest(**key(user, course.course_id, "l2"), score=80)
    )
    page = await list_attempts(progress, user, course.course_id, "l1")
    assert [(a.attempt_number, a.score) for a in page.attempts] == [(1, 30)]
    assert list((await list_attempts(progress, user, course.course_id, "l2")).attempts) == []


async def test_passing_attempt_is_in_history(progress: Progress, make_course: MakeCourse):
    course = await make_course(1, passing_score=60)
    user = new_id()
    for score in (20, 60, 95):
        await attempt(progress, user, course.course_id, "l1", score)
    page = await list_attempts(progress, user, course.course_id, "l1")
    assert [(a.attempt_number, a.score) for a in page.attempts] == [(1, 20), (2, 60), (3, 95)]


async def test_list_attempts_pages_of_two(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    scores = [11, 22, 33, 44, 55]
    for score in scores:
        await attempt(progress, user, course.course_id, "l1", score)
    pages = await all_attempt_pages(progress, user, course.course_id, "l1", page_size=2)
    assert [[(a.attempt_number, a.score) for a in page] for page in pages] == [
        [(1, 11), (2, 22)],
        [(3, 33), (4, 44)],
        [(5, 55)],
    ]


async def test_list_attempts_exact_multiple_has_no_empty_last_page(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    for score in (1, 2, 3, 4):
        await attempt(progress, user, course.course_id, "l1", score)
    pages = await all_attempt_pages(progress, user, course.course_id, "l1", page_size=2)
    assert [[a.score for a in page] for page in pages] == [[1, 2], [3, 4]]
    single = await all_attempt_pages(progress, user, course.course_id, "l1", page_size=4)
    assert [[a.score for a in page] for page in single] == [[1, 2, 3, 4]]


async def test_list_attempts_page_size_can_change_between_pages(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    for score in range(7):
        await attempt(progress, user, course.course_id, "l1", score)
    first = await list_attempts(progress, user, course.course_id, "l1", page_size=3)
    second = await list_attempts(
        progress, user, course.course_id, "l1", page_size=10, page_token=first.next_page_token
    )
    assert [a.attempt_number for a in first.attempts] == [1, 2, 3]
    assert [a.attempt_number for a in second.attempts] == [4, 5, 6, 7]
    assert second.next_page_token == ""


async def test_list_attempts_default_and_maximum_page_size(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    total = 507
    # The attempts of one lesson are numbered in commit order, whatever the concurrency.
    gate = asyncio.Semaphore(8)

    async def one(score: int) -> None:
        async with gate:
            await attempt(progress, user, course.course_id, "l1", score)

    await asyncio.gather(*(one(i % 101) for i in range(total)))

    default = await list_attempts(progress, user, course.course_id, "l1", page_size=0)
    assert [a.attempt_number for a in default.attempts] == list(range(1, 51))
    assert default.next_page_token

    capped = await list_attempts(progress, user, course.course_id, "l1", page_size=100_000)
    assert [a.attempt_number for a in capped.attempts] == list(range(1, 501))
    assert capped.next_page_token
    rest = await list_attempts(
        progress, user, course.course_id, "l1", page_size=501, page_token=capped.next_page_token
    )
    assert [a.attempt_number for a in rest.attempts] == list(range(501, total + 1))
    assert rest.next_page_token == ""
    everything = [*capped.attempts, *rest.attempts]
    assert sorted(a.score for a in everything) == sorted(i % 101 for i in range(total))
    assert (await get_lesson(progress, user, course.course_id, "l1")).attempts == total


async def test_concurrent_attempts_history_is_oldest_first(
    progress: Progress, make_course: MakeCourse
):
    """Attempts that race are numbered in the order they were recorded: the history is
    oldest first by attempt_number and by attempted_at alike."""
    course = await make_course(1)
    user = new_id()
    total = 120
    gate = asyncio.Semaphore(12)

    async def one(score: int) -> None:
        async with gate:
            await attempt(progress, user, course.course_id, "l1", score)

    await asyncio.gather(*(one(i % 101) for i in range(total)))
    page = await list_attempts(progress, user, course.course_id, "l1", page_size=500)
    assert [a.attempt_number for a in page.attempts] == list(range(1, total + 1))
    times = [micros(a.attempted_at) for a in page.attempts]
    regressions = [
        (page.attempts[i].attempt_number, page.attempts[i + 1].attempt_number)
        for i in range(total - 1)
        if times[i + 1] < times[i]
    ]
    assert regressions == [], "attempts recorded later carry earlier times"


@pytest.mark.parametrize("page_size", [-1, -500])
async def test_list_attempts_negative_page_size_rejected(
    progress: Progress, make_course: MakeCourse, page_size: int
):
    course = await make_course(1)
    user = new_id()
    await attempt(progress, user, course.course_id, "l1", 50)
    error = await expect_error(
        list_attempts(progress, user, course.course_id, "l1", page_size=page_size),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"page_size"}


async def test_list_attempts_token_of_another_query_rejected(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2)
    other_course = await make_course(2)
    user = new_id()
    other_user = new_id()
    for who, where, lesson in [
        (user, course.course_id, "l1"),
        (user, course.course_id, "l2"),
        (other_user, course.course_id, "l1"),
        (user, other_course.course_id, "l1"),
    ]:
        for score in (1, 2, 3):
            await attempt(progress, who, where, lesson, score)
    token = (
        await list_attempts(progress, user, course.course_id, "l1", page_size=1)
    ).next_page_token
    assert token

    for who, where, lesson in [
        (user, course.course_id, "l2"),  # another lesson
        (other_user, course.course_id, "l1"),  # another learner
        (user, other_course.course_id, "l1"),  # another course
    ]:
        error = await expect_error(
            list_attempts(progress, who, where, lesson, page_size=1, page_token=token),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert bad_fields(error) == {"page_token"}

    for garbage in ["not-a-token", token[:-2], token + "AA", "A" * 40]:
        error = await expect_error(
            list_attempts(progress, user, course.course_id, "l1", page_token=garbage),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert bad_fields(error) == {"page_token"}

    # A ListLessonProgress token is not a ListAttempts token either.
    for lesson in ("l1", "l2"):
        await progress.StartLesson(ps.StartLessonRequest(**key(user, course.course_id, lesson)))
    lessons_token = (
        await progress.ListLessonProgress(
            ps.ListLessonProgressRequest(user_id=user, course_id=course.course_id, page_size=1)
        )
    ).next_page_token
    assert lessons_token
    error = await expect_error(
        list_attempts(progress, user, course.course_id, "l1", page_token=lessons_token),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"page_token"}

    # The token still works for its own query.
    page = await list_attempts(progress, user, course.course_id, "l1", page_token=token)
    assert [a.score for a in page.attempts] == [2, 3]


async def test_list_attempts_of_lesson_without_attempts_is_empty(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2)
    user = new_id()
    await progress.StartLesson(ps.StartLessonRequest(**key(user, course.course_id, "l1")))
    await progress.RecordTime(ps.RecordTimeRequest(**key(user, course.course_id, "l1"), seconds=30))
    await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, course.course_id, "l1")))
    started = await list_attempts(progress, user, course.course_id, "l1")
    assert list(started.attempts) == []
    assert started.next_page_token == ""
    untouched = await list_attempts(progress, user, course.course_id, "l2")
    assert list(untouched.attempts) == []
    assert untouched.next_page_token == ""


async def test_list_attempts_unknown_course_or_lesson_not_found(
    progress: Progress, make_course: MakeCourse, catalog: Catalog
):
    course = await make_course(2)
    user = new_id()
    await attempt(progress, user, course.course_id, "l2", 70)
    await expect_error(list_attempts(progress, user, new_id(), "l1"), grpc.StatusCode.NOT_FOUND)
    await expect_error(
        list_attempts(progress, user, course.course_id, "l9"), grpc.StatusCode.NOT_FOUND
    )
    # A lesson removed from the outline is no longer found, though its rows are kept.
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course.course_id, lessons=[resources_pb2.Lesson(lesson_id="l1")]
        )
    )
    await expect_error(
        list_attempts(progress, user, course.course_id, "l2"), grpc.StatusCode.NOT_FOUND
    )


async def test_list_attempts_malformed_identifiers_rejected(progress: Progress):
    error = await expect_error(
        progress.ListAttempts(
            ps.ListAttemptsRequest(user_id="nope", course_id="123", lesson_id="", page_size=-1)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"user_id", "course_id", "lesson_id", "page_size"}


async def test_list_attempts_erased_with_learner(
    progress: Progress, make_course: MakeCourse, db: asyncpg.Pool
):
    course = await make_course(1)
    user = new_id()
    for score in (5, 6):
        await attempt(progress, user, course.course_id, "l1", score)
    await progress.DeleteUserProgress(ps.DeleteUserProgressRequest(user_id=user))
    assert list((await list_attempts(progress, user, course.course_id, "l1")).attempts) == []
    assert await db.fetchval("SELECT count(*) FROM lesson_attempts WHERE user_id = $1", user) == 0


# --- SaveBookmark ----------------------------------------------------------------------------


async def test_save_bookmark_stores_position_and_time(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    started = (
        await progress.StartLesson(ps.StartLessonRequest(**key(user, course.course_id, "l1")))
    ).lesson
    assert started.bookmark == ""
    assert not started.HasField("bookmarked_at")

    saved = await bookmark(progress, user, course.course_id, "l1", "video#t=93.5")
    assert saved.bookmark == "video#t=93.5"
    assert saved.HasField("bookmarked_at")
    assert micros(saved.bookmarked_at) > micros(started.last_accessed_at)
    # Saving a bookmark is a touch: it moves last_accessed_at, and nothing else.
    assert micros(saved.last_accessed_at) > micros(started.last_accessed_at)
    assert saved.first_started_at == started.first_started_at
    assert (saved.completed, saved.attempts, saved.time_spent_seconds) == (False, 0, 0)
    assert not saved.HasField("score")

    stored = await get_lesson(progress, user, course.course_id, "l1")
    assert stored.bookmark == "video#t=93.5"
    assert stored.bookmarked_at == saved.bookmarked_at


async def test_save_bookmark_overwrites_and_survives_other_writes(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    first = await bookmark(progress, user, course.course_id, "l1", "page-3")
    second = await bookmark(progress, user, course.course_id, "l1", "page-7")
    assert second.bookmark == "page-7"
    assert micros(second.bookmarked_at) > micros(first.bookmarked_at)

    beat = (
        await progress.RecordTime(
            ps.RecordTimeRequest(**key(user, course.course_id, "l1"), seconds=40)
        )
    ).lesson
    assert beat.bookmark == "page-7"
    assert beat.bookmarked_at == second.bookmarked_at
    done = (
        await progress.CompleteLesson(
            ps.CompleteLessonRequest(**key(user, course.course_id, "l1"), score=88)
        )
    ).lesson
    assert done.bookmark == "page-7"
    assert done.bookmarked_at == second.bookmarked_at

    third = await bookmark(progress, user, course.course_id, "l1", "page-1")
    assert third.bookmark == "page-1"
    assert (third.completed, third.time_spent_seconds, third.score) == (True, 40, 88)
    assert (await get_lesson(progress, user, course.course_id, "l1")).bookmark == "page-1"


async def test_empty_position_clears_bookmark(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    await bookmark(progress, user, course.course_id, "l1", "chapter-2")
    cleared = await bookmark(progress, user, course.course_id, "l1", "")
    assert cleared.bookmark == ""
    assert not cleared.HasField("bookmarked_at")
    stored = await get_lesson(progress, user, course.course_id, "l1")
    assert stored.bookmark == ""
    assert not stored.HasField("bookmarked_at")
    assert (await course_progress(progress, user, course.course_id)).last_lesson_bookmark == ""


@pytest.mark.parametrize(
    "position",
    [
        "a" * MAX_BOOKMARK_BYTES,
        "é" * (MAX_BOOKMARK_BYTES // 2),
        "🎬" * (MAX_BOOKMARK_BYTES // 4),
        "x",
        " ",
        '{"cfi": "/6/4[chap01ref]!/4[body01]/10[para05]/3:10", "t": 12.5}',
        "line\nbreak\ttab",
    ],
    ids=["4096-ascii", "4096-2byte", "4096-4byte", "one", "space", "json", "controls"],
)
async def test_bookmark_up_to_4_kib_accepted_verbatim(
    progress: Progress, make_course: MakeCourse, position: str
):
    assert len(position.encode()) <= MAX_BOOKMARK_BYTES
    course = await make_course(1)
    user = new_id()
    saved = await bookmark(progress, user, course.course_id, "l1", position)
    assert saved.bookmark == position
    assert (await get_lesson(progress, user, course.course_id, "l1")).bookmark == position


@pytest.mark.parametrize(
    "position",
    [
        "a" * (MAX_BOOKMARK_BYTES + 1),
        "é" * (MAX_BOOKMARK_BYTES // 2) + "a",  # 2,049 characters, 4,097 bytes
        "é" * (MAX_BOOKMARK_BYTES // 2 + 1),  # 4,098 bytes
        "🎬" * (MAX_BOOKMARK_BYTES // 4 + 1),  # 1,025 characters, 4,100 bytes
        "a" * 100_000,
    ],
    ids=["4097-ascii", "4097-mixed", "4098-2byte", "4100-4byte", "huge"],
)
async def test_bookmark_over_4_kib_rejected(
    progress: Progress, make_course: MakeCourse, position: str
):
    assert len(position.encode()) > MAX_BOOKMARK_BYTES
    course = await make_course(1)
    user = new_id()
    await bookmark(progress, user, course.course_id, "l1", "kept")
    error = await expect_error(
        bookmark(progress, user, course.course_id, "l1", position),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"position"}
    assert (await get_lesson(progress, user, course.course_id, "l1")).bookmark == "kept"


@pytest.mark.parametrize("position", ["\x00", "before\x00after", "a" * 4095 + "\x00"])
async def test_bookmark_with_nul_rejected(
    progress: Progress, make_course: MakeCourse, position: str
):
    course = await make_course(1)
    user = new_id()
    error = await expect_error(
        bookmark(progress, user, course.course_id, "l1", position),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"position"}
    # Nothing was written: no row was created.
    await expect_error(
        get_lesson(progress, user, course.course_id, "l1"), grpc.StatusCode.NOT_FOUND
    )


async def test_bookmark_before_start_creates_row(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    saved = await bookmark(progress, user, course.course_id, "l2", "slide-4")
    assert (saved.user_id, saved.course_id, saved.lesson_id) == (user, course.course_id, "l2")
    assert saved.HasField("first_started_at")
    assert saved.HasField("created_at")
    assert (saved.completed, saved.attempts, saved.time_spent_seconds) == (False, 0, 0)

    started = (
        await progress.StartLesson(ps.StartLessonRequest(**key(user, course.course_id, "l2")))
    ).lesson
    assert started.first_started_at == saved.first_started_at
    assert started.bookmark == "slide-4"
    assert started.bookmarked_at == saved.bookmarked_at

    listed = await progress.ListLessonProgress(
        ps.ListLessonProgressRequest(user_id=user, course_id=course.course_id)
    )
    assert [(x.lesson_id, x.bookmark) for x in listed.lessons] == [("l2", "slide-4")]


async def test_clearing_bookmark_before_start_creates_row(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    cleared = await bookmark(progress, user, course.course_id, "l1", "")
    assert cleared.bookmark == ""
    assert not cleared.HasField("bookmarked_at")
    assert (await get_lesson(progress, user, course.course_id, "l1")).lesson_id == "l1"


async def test_course_progress_reports_resume_point(progress: Progress, make_course: MakeCourse):
    course = await make_course(3)
    user = new_id()
    cid = course.course_id

    empty = await course_progress(progress, user, cid)
    assert (empty.last_lesson_id, empty.last_lesson_bookmark) == ("", "")

    await bookmark(progress, user, cid, "l1", "l1@120s")
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l1", "l1@120s")

    # A lesson touched later without a bookmark is the resume point, with no bookmark.
    await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, "l3")))
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l3", "")

    await bookmark(progress, user, cid, "l3", "l3-p2")
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l3", "l3-p2")

    # A heartbeat on l1 makes it the most recently touched lesson again.
    await progress.RecordTime(ps.RecordTimeRequest(**key(user, cid, "l1"), seconds=5))
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l1", "l1@120s")

    await progress.RecordAttempt(ps.RecordAttemptRequest(**key(user, cid, "l2"), score=40))
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l2", "")

    await bookmark(progress, user, cid, "l3", "l3-p9")
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l3", "l3-p9")

    await bookmark(progress, user, cid, "l3", "")
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l3", "")

    # Another learner's bookmarks do not leak into this learner's resume point.
    await bookmark(progress, new_id(), cid, "l2", "someone else")
    now = await course_progress(progress, user, cid)
    assert (now.last_lesson_id, now.last_lesson_bookmark) == ("l3", "")


async def test_completion_response_carries_resume_point(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(2)
    user = new_id()
    await bookmark(progress, user, course.course_id, "l2", "end-credits")
    response = await progress.CompleteLesson(
        ps.CompleteLessonRequest(**key(user, course.course_id, "l2"))
    )
    assert response.lesson.bookmark == "end-credits"
    assert response.course.last_lesson_id == "l2"
    assert response.course.last_lesson_bookmark == "end-credits"


async def test_bookmarks_are_per_learner_and_lesson(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    alice, bob = new_id(), new_id()
    await bookmark(progress, alice, course.course_id, "l1", "alice-l1")
    await bookmark(progress, alice, course.course_id, "l2", "alice-l2")
    await bookmark(progress, bob, course.course_id, "l1", "bob-l1")
    assert (await get_lesson(progress, alice, course.course_id, "l1")).bookmark == "alice-l1"
    assert (await get_lesson(progress, alice, course.course_id, "l2")).bookmark == "alice-l2"
    assert (await get_lesson(progress, bob, course.course_id, "l1")).bookmark == "bob-l1"


async def test_save_bookmark_unknown_course_or_lesson_not_found(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    await expect_error(bookmark(progress, user, new_id(), "l1", "x"), grpc.StatusCode.NOT_FOUND)
    await expect_error(
        bookmark(progress, user, course.course_id, "l2", "x"), grpc.StatusCode.NOT_FOUND
    )


async def test_save_bookmark_malformed_fields_all_named(progress: Progress):
    error = await expect_error(
        progress.SaveBookmark(
            ps.SaveBookmarkRequest(
                user_id="x", course_id="y", lesson_id="a\x00b", position="p" * 5000
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad_fields(error) == {"user_id", "course_id", "lesson_id", "position"}
