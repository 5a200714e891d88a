"""What to study next: CourseProgress.next_lesson_id and review_lesson_ids, in every place a
CourseProgress is returned, against the current outline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from lessonprogress.v1 import analytics_service_pb2 as an
from lessonprogress.v1 import (
    analytics_service_pb2_grpc,
    catalog_service_pb2_grpc,
    progress_service_pb2_grpc,
    resources_pb2,
)
from lessonprogress.v1 import catalog_service_pb2 as cs
from lessonprogress.v1 import progress_service_pb2 as ps
from tests.conftest import new_id
from tests.support import key

Catalog = catalog_service_pb2_grpc.CatalogServiceStub
Progress = progress_service_pb2_grpc.ProgressServiceStub

# lesson id -> passing score (None: not assessed), in outline order.
OUTLINE: dict[str, int | None] = {
    "intro": None,
    "quiz-a": 70,
    "video": None,
    "quiz-b": 50,
    "quiz-c": 80,
}


async def register(catalog: Catalog, course_id: str, outline: dict[str, int | None]) -> None:
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id,
            lessons=[
                resources_pb2.Lesson(
                    lesson_id=lesson_id, assessed=mark is not None, passing_score=mark
                )
                for lesson_id, mark in outline.items()
            ],
        )
    )


def expected(
    outline: dict[str, int | None], completed: set[str], best: dict[str, int]
) -> tuple[str, list[str]]:
    """The model: first lesson not completed; assessed lessons scored below their mark."""
    next_lesson = next((lesson for lesson in outline if lesson not in completed), "")
    review = [
        lesson
        for lesson, mark in outline.items()
        if mark is not None and lesson in best and best[lesson] < mark
    ]
    return next_lesson, review


class Learner:
    """One learner's writes, with the model of what they should produce."""

    def __init__(self, progress: Progress, course_id: str) -> None:
        self.progress = progress
        self.course_id = course_id
        self.user_id = new_id()
        self.completed: set[str] = set()
        self.best: dict[str, int] = {}

    async def attempt(self, lesson: str, score: int, outline: dict[str, int | None]) -> None:
        await self.progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(self.user_id, self.course_id, lesson), score=score)
        )
        self.best[lesson] = max(score, self.best.get(lesson, score))
        mark = outline[lesson]
        if mark is not None and score >= mark:
            self.completed.add(lesson)

    async def complete(self, lesson: str, score: int | None = None) -> resources_pb2.CourseProgress:
        response = await self.progress.CompleteLesson(
            ps.CompleteLessonRequest(**key(self.user_id, self.course_id, lesson), score=score)
        )
        self.completed.add(lesson)
        if score is not None:
            self.best[lesson] = max(score, self.best.get(lesson, score))
        return response.course

    async def course(self) -> resources_pb2.CourseProgress:
        response = await self.progress.GetCourseProgress(
            ps.GetCourseProgressRequest(user_id=self.user_id, course_id=self.course_id)
        )
        return response.course


def figures(course: resources_pb2.CourseProgress) -> tuple[str, list[str]]:
    return course.next_lesson_id, list(course.review_lesson_ids)


async def test_next_and_review_follow_the_learners_progress(
    progress: Progress, catalog: Catalog
) -> None:
    course_id = new_id()
    await register(catalog, course_id, OUTLINE)
    learner = Learner(progress, course_id)

    # No progress at all: the first lesson, nothing to review.
    assert figures(await learner.course()) == ("intro", [])

    steps: list[Callable[[], Awaitable[Any]]] = [
        lambda: learner.complete("intro"),
        lambda: learner.attempt("quiz-b", 20, OUTLINE),  # out of order, failed
        lambda: learner.attempt("quiz-a", 69, OUTLINE),  # one below the mark
        lambda: learner.attempt("quiz-b", 50, OUTLINE),  # exactly the mark: passes
        lambda: learner.complete("quiz-c", score=10),  # completed, but below its mark
        lambda: learner.attempt("quiz-a", 70, OUTLINE),  # passes
        lambda: learner.complete("video"),  # every lesson done
    ]
    seen = []
    for step in steps:
        await step()
        got = figures(await learner.course())
        assert got == expected(OUTLINE, learner.completed, learner.best)
        seen.append(got)
    assert seen[1] == ("quiz-a", ["quiz-b"])
    assert seen[2] == ("quiz-a", ["quiz-a", "quiz-b"])
    assert seen[4] == ("quiz-a", ["quiz-a", "quiz-c"])
    assert seen[-1] == ("", ["quiz-c"])


async def test_started_but_unscored_lessons_are_not_for_review(
    progress: Progress, catalog: Catalog
) -> None:
    course_id = new_id()
    await register(catalog, course_id, OUTLINE)
    learner = Learner(progress, course_id)
    for lesson in OUTLINE:
        await progress.StartLesson(ps.StartLessonRequest(**key(learner.user_id, course_id, lesson)))
    await progress.RecordTime(
        ps.RecordTimeRequest(**key(learner.user_id, course_id, "quiz-a"), seconds=60)
    )
    assert figures(await learner.course()) == ("intro", [])


async def test_complete_lesson_returns_the_new_figures(
    progress: Progress, catalog: Catalog
) -> None:
    course_id = new_id()
    await register(catalog, course_id, OUTLINE)
    learner = Learner(progress, course_id)
    await learner.attempt("quiz-a", 30, OUTLINE)
    course = await learner.complete("intro")
    assert figures(course) == ("quiz-a", ["quiz-a"])
    assert course == await learner.course()


async def test_outline_changes_show_at_once(progress: Progress, catalog: Catalog) -> None:
    course_id = new_id()
    await register(catalog, course_id, OUTLINE)
    learner = Learner(progress, course_id)
    await learner.complete("intro")
    await learner.attempt("quiz-a", 10, OUTLINE)
    await learner.attempt("quiz-b", 10, OUTLINE)
    assert figures(await learner.course()) == ("quiz-a", ["quiz-a", "quiz-b"])

    # quiz-a leaves the outline, quiz-b moves first and its mark drops below the score.
    changed: dict[str, int | None] = {"quiz-b": 5, "intro": None, "video": None, "quiz-c": 80}
    await register(catalog, course_id, changed)
    # Lowering the mark does not complete quiz-b (completion happens on a write), but its
    # score is no longer below it.
    assert figures(await learner.course()) == ("quiz-b", [])
    assert figures(await learner.course()) == expected(changed, learner.completed, learner.best)

    # Raising the mark again puts quiz-b back for review; restoring quiz-a brings it back.
    await register(catalog, course_id, OUTLINE)
    assert figures(await learner.course()) == ("quiz-a", ["quiz-a", "quiz-b"])

    # A lesson that stops being assessed is not reviewed.
    await register(catalog, course_id, {**OUTLINE, "quiz-a": None})
    assert figures(await learner.course()) == ("quiz-a", ["quiz-b"])


async def test_export_and_course_progress_agree(
    progress: Progress, catalog: Catalog, channel: Any
) -> None:
    course_id = new_id()
    await register(catalog, course_id, OUTLINE)
    learners = [Learner(progress, course_id) for _ in range(4)]
    await learners[0].complete("intro")
    await learners[0].attempt("quiz-a", 40, OUTLINE)
    await learners[1].attempt("quiz-c", 79, OUTLINE)
    await learners[1].complete("quiz-b", score=0)
    for lesson in OUTLINE:
        await learners[2].complete(lesson, score=100 if OUTLINE[lesson] else None)
    await progress.StartLesson(
        ps.StartLessonRequest(**key(learners[3].user_id, course_id, "video"))
    )

    analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)
    exported = {
        learner.user_id: learner
        async for message in analytics.StreamCourseLearners(
            an.StreamCourseLearnersRequest(course_id=course_id, page_size=2)
        )
        for learner in message.learners
    }
    assert len(exported) == 4
    for learner in learners:
        got = exported[learner.user_id]
        assert figures(got) == expected(OUTLINE, learner.completed, learner.best)
        assert got == await learner.course()
    assert figures(exported[learners[1].user_id]) == ("intro", ["quiz-b", "quiz-c"])
    assert figures(exported[learners[2].user_id]) == ("", [])
