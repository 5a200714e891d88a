"""AnalyticsService: the per-course reports, checked against figures computed here.

Progress is seeded through the API from a seeded random.Random; the expected state is kept
in plain Python objects from what was sent, and every figure of every report is computed
from that state independently of the service.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

import asyncpg
import grpc
import pytest

from lesson_progress import server
from lessonprogress.v1 import analytics_service_pb2 as an
from lessonprogress.v1 import (
    analytics_service_pb2_grpc,
    catalog_service_pb2_grpc,
    progress_service_pb2_grpc,
    resources_pb2,
)
from lessonprogress.v1 import catalog_service_pb2 as cs
from lessonprogress.v1 import progress_service_pb2 as ps
from tests.conftest import new_id, server_config
from tests.errors import bad_fields, error_info
from tests.support import CHILD_DATABASE_URL, key, run_in_child

Catalog = catalog_service_pb2_grpc.CatalogServiceStub
Progress = progress_service_pb2_grpc.ProgressServiceStub
Analytics = analytics_service_pb2_grpc.AnalyticsServiceStub
MakeCourse = Callable[..., Awaitable[Any]]

# Only a guard against a hanging test; no assertion depends on how long anything takes.
HANG_GUARD_SECONDS = 60.0
DEFAULT_MIN_COMPLETIONS = 10


@pytest.fixture(scope="session")
def analytics(channel: grpc.aio.Channel) -> Analytics:
    return analytics_service_pb2_grpc.AnalyticsServiceStub(channel)


# --- reading streams -------------------------------------------------------------------------


async def collect(call: Any) -> list[Any]:
    """Every message of a server stream, in order."""

    async def read_all() -> list[Any]:
        return [message async for message in call]

    try:
        return await asyncio.wait_for(read_all(), HANG_GUARD_SECONDS)
    finally:
        call.cancel()


async def lesson_stats(analytics: Analytics, course_id: str) -> list[resources_pb2.LessonStats]:
    call = analytics.StreamLessonStats(an.StreamLessonStatsRequest(course_id=course_id))
    return [m.lesson_stats for m in await collect(call)]


async def difficult_lessons(
    analytics: Analytics, course_id: str, min_completions: int
) -> list[resources_pb2.DifficultLesson]:
    call = analytics.StreamDifficultLessons(
        an.StreamDifficultLessonsRequest(course_id=course_id, min_completions=min_completions)
    )
    return [m.difficult_lesson for m in await collect(call)]


async def course_learners(
    analytics: Analytics, course_id: str, page_size: int = 0
) -> list[resources_pb2.CourseProgress]:
    call = analytics.StreamCourseLearners(
        an.StreamCourseLearnersRequest(course_id=course_id, page_size=page_size)
    )
    return [learner for m in await collect(call) for learner in m.learners]


async def stream_error(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(call)
    assert raised.value.code() == code, raised.value.details()
    error_info(raised.value)
    return raised.value


# --- the expected state ----------------------------------------------------------------------


def percentile(values: Iterable[int], fraction: float) -> float:
    """Linear interpolation between closest ranks (PostgreSQL's percentile_cont)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def percent(done: int, total: int) -> int:
    if total == 0:
        return 0
    return int((Decimal(100 * done) / Decimal(total)).quantize(Decimal(1), ROUND_HALF_UP))


def bucket(score: int) -> int:
    """0-9 -> 0, 10-19 -> 1, ..., 80-89 -> 8, 90-100 -> 9."""
    return min(score // 10, 9)


@dataclass
class Row:
    """One learner's expected progress in one lesson."""

    time: int = 0
    attempts: int = 0
    score: int | None = None
    completed: bool = False
    bookmark: str = ""
    touched: int = 0  # when the learner last touched it, on the model's own clock
    first_started_micros: int = 0  # as the writes reported it
    last_accessed_micros: int = 0


@dataclass
class LessonSpec:
    lesson_id: str
    kind: str  # "plain": completed without score; "graded": passing score; "assessed"; "idle"
    passing_score: int | None = None


@dataclass
class Model:
    """The expected state of one course, updated from what the test sends."""

    course_id: str
    lessons: list[LessonSpec]
    outline: list[str] = field(default_factory=list)
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    completions: dict[str, set[str]] = field(default_factory=dict)
    course_completed: set[str] = field(default_factory=set)
    clock: int = 0

    def __post_init__(self) -> None:
        self.outline = [lesson.lesson_id for lesson in self.lessons]

    def spec(self, lesson_id: str) -> LessonSpec:
        return next(lesson for lesson in self.lessons if lesson.lesson_id == lesson_id)

    def row(self, user: str, lesson: str) -> Row:
        return self.rows.setdefault((user, lesson), Row())

    def touch(self, user: str, lesson: str, reported: resources_pb2.LessonProgress) -> None:
        self.clock += 1
        row = self.row(user, lesson)
        row.touched = self.clock
        row.first_started_micros = int(reported.first_started_at.ToMicroseconds())
        row.last_accessed_micros = int(reported.last_accessed_at.ToMicroseconds())

    def complete(self, user: str, lesson: str) -> None:
        self.row(user, lesson).completed = True
        done = self.completions.setdefault(user, set())
        done.add(lesson)
        self.check_course_completion(user)

    def check_course_completion(self, user: str) -> None:
        done = self.completions.get(user)
        if done is not None and self.outline and set(self.outline) <= done:
            self.course_completed.add(user)

    def users(self) -> list[str]:
        return sorted({user for user, _ in self.rows})

    def lesson_rows(self, lesson: str) -> list[Row]:
        return [row for (_, lesson_id), row in self.rows.items() if lesson_id == lesson]

    # The reports, computed from the model.

    def expected_stats(self) -> list[dict[str, Any]]:
        stats = []
        for lesson in self.outline:
            rows = self.lesson_rows(lesson)
            done = [row for row in rows if row.completed]
            scores = [row.score for row in rows if row.score is not None]
            histogram = [0] * 10
            for score in scores:
                histogram[bucket(score)] += 1
            stats.append(
                {
                    "lesson_id": lesson,
                    "started_count": len(rows),
                    "completed_count": len(done),
                    "completion_rate": len(done) / len(rows) if rows else 0.0,
                    "avg_attempts": sum(r.attempts for r in rows) / len(rows) if rows else 0.0,
                    "avg_time_spent_seconds": (
                        sum(r.time for r in rows) / len(rows) if rows else 0.0
                    ),
                    "p50_time_spent_seconds": percentile((r.time for r in done), 0.5),
                    "p90_time_spent_seconds": percentile((r.time for r in done), 0.9),
                    "scored_count": len(scores),
                    "avg_score": sum(scores) / len(scores) if scores else 0.0,
                    "min_score": min(scores, default=0),
                    "max_score": max(scores, default=0),
                    "score_histogram": histogram,
                }
            )
        return stats

    def expected_difficult(self, minimum: int) -> list[tuple[str, Fraction, Fraction, int]]:
        found = []
        for lesson in self.outline:
            done = [row for row in self.lesson_rows(lesson) if row.completed]
            if done and len(done) >= minimum:
                found.append(
                    (
                        lesson,
                        Fraction(sum(r.attempts for r in done), len(done)),
                        Fraction(sum(r.time for r in done), len(done)),
                        len(done),
                    )
                )
        return sorted(found, key=lambda item: (-item[1], item[0]))

    def completion_counts(self) -> dict[str, int]:
        return {
            lesson: sum(row.completed for row in self.lesson_rows(lesson))
            for lesson in self.outline
        }

    def expected_learner(self, user: str) -> dict[str, Any]:
        mine = {lesson: row for (u, lesson), row in self.rows.items() if u == user}
        done = self.completions.get(user, set())
        completed_ids = [lesson for lesson in self.outline if lesson in done]
        last_lesson, last_row = max(mine.items(), key=lambda item: item[1].touched)
        return {
            "user_id": user,
            "course_id": self.course_id,
            "completed_lesson_ids": completed_ids,
            "completed_lessons": len(completed_ids),
            "total_lessons": len(self.outline),
            "progress_percentage": percent(len(completed_ids), len(self.outline)),
            "total_time_spent_seconds": sum(row.time for row in mine.values()),
            "last_lesson_id": last_lesson,
            "last_lesson_bookmark": last_row.bookmark,
            "started_at": min(row.first_started_micros for row in mine.values()),
            "last_accessed_at": max(row.last_accessed_micros for row in mine.values()),
            "course_completed": user in self.course_completed,
            "next_lesson_id": next((lesson for lesson in self.outline if lesson not in done), ""),
            "review_lesson_ids": [
                lesson
                for lesson in self.outline
                if (spec := self.spec(lesson)).kind in ("graded", "assessed")
                and spec.passing_score is not None
                and (row := mine.get(lesson)) is not None
                and row.score is not None
                and row.score < spec.passing_score
            ],
        }


def stats_as_dict(stats: resources_pb2.LessonStats) -> dict[str, Any]:
    return {
        "lesson_id": stats.lesson_id,
        "started_count": stats.started_count,
        "completed_count": stats.completed_count,
        "completion_rate": stats.completion_rate,
        "avg_attempts": stats.avg_attempts,
        "avg_time_spent_seconds": stats.avg_time_spent_seconds,
        "p50_time_spent_seconds": stats.p50_time_spent_seconds,
        "p90_time_spent_seconds": stats.p90_time_spent_seconds,
        "scored_count": stats.scored_count,
        "avg_score": stats.avg_score,
        "min_score": stats.min_score,
        "max_score": stats.max_score,
        "score_histogram": list(stats.score_histogram),
    }


def learner_as_dict(learner: resources_pb2.CourseProgress) -> dict[str, Any]:
    return {
        "user_id": learner.user_id,
        "course_id": learner.course_id,
        "completed_lesson_ids": list(learner.completed_lesson_ids),
        "completed_lessons": learner.completed_lessons,
        "total_lessons": learner.total_lessons,
        "progress_percentage": learner.progress_percentage,
        "total_time_spent_seconds": learner.total_time_spent_seconds,
        "last_lesson_id": learner.last_lesson_id,
        "last_lesson_bookmark": learner.last_lesson_bookmark,
        "started_at": int(learner.started_at.ToMicroseconds()),
        "last_accessed_at": int(learner.last_accessed_at.ToMicroseconds()),
        "course_completed": learner.HasField("completed_at"),
        "next_lesson_id": learner.next_lesson_id,
        "review_lesson_ids": list(learner.review_lesson_ids),
    }


def assert_stats(got: list[resources_pb2.LessonStats], model: Model) -> None:
    expected = model.expected_stats()
    assert [s.lesson_id for s in got] == [e["lesson_id"] for e in expected]
    for stats, want in zip(got, expected, strict=True):
        assert_same_stats(stats, want)


def assert_same_stats(stats: resources_pb2.LessonStats, want: dict[str, Any]) -> None:
    got = stats_as_dict(stats)
    want = dict(want)
    lesson_id = want.pop("lesson_id")
    assert got.pop("lesson_id") == lesson_id
    assert got.pop("score_histogram") == want.pop("score_histogram"), lesson_id
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9), lesson_id


def assert_difficult(got: list[resources_pb2.DifficultLesson], model: Model, minimum: int) -> None:
    expected = model.expected_difficult(minimum)
    assert [(d.lesson_id, d.completion_count) for d in got] == [
        (lesson, count) for lesson, _, _, count in expected
    ], f"min_completions={minimum}"
    for lesson, (_, attempts, seconds, _) in zip(got, expected, strict=True):
        assert lesson.avg_attempts == pytest.approx(float(attempts), rel=1e-9)
        assert lesson.avg_time_spent_seconds == pytest.approx(float(seconds), rel=1e-9)


def assert_learners(got: list[resources_pb2.CourseProgress], model: Model) -> None:
    assert [learner.user_id for learner in got] == model.users()
    for learner in got:
        assert learner_as_dict(learner) == model.expected_learner(learner.user_id)


# --- seeding through the API -----------------------------------------------------------------

TIME_CHOICES = [30, 60, 60, 60, 90, 120, 300, 1, 45]
SCORE_CHOICES = [0, 9, 10, 49, 50, 69, 70, 79, 80, 89, 90, 99, 100]


async def register(catalog: Catalog, course_id: str, lessons: list[LessonSpec]) -> None:
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id,
            title="analytics course",
            lessons=[
                resources_pb2.Lesson(
                    lesson_id=lesson.lesson_id,
                    assessed=lesson.kind in ("graded", "assessed"),
                    passing_score=lesson.passing_score,
                )
                for lesson in lessons
            ],
        )
    )


Op = tuple[Any, ...]


def plan_lesson(rng: random.Random, spec: LessonSpec) -> list[Op]:
    """A random sequence of writes by one learner on one lesson."""
    lesson = spec.lesson_id
    ops: list[Op] = []
    if rng.random() < 0.7:
        ops.append(("start", lesson))
    for _ in range(rng.randint(0, 3)):
        ops.append(("time", lesson, rng.choice(TIME_CHOICES)))
    if rng.random() < 0.2:
        ops.append(("batch", lesson, [rng.randint(1, 300) for _ in range(rng.randint(2, 4))]))
    if rng.random() < 0.3:
        ops.append(("bookmark", lesson, f"{lesson}@{rng.randint(0, 9999)}"))
    if spec.kind in ("graded", "assessed"):
        for _ in range(rng.randint(0, 4)):
            score = rng.choice(SCORE_CHOICES) if rng.random() < 0.6 else rng.randint(0, 100)
            ops.append(("attempt", lesson, score))
    if spec.kind == "plain" and rng.random() < 0.6:
        ops.append(("complete", lesson, None))
    if spec.kind == "assessed" and rng.random() < 0.5:
        ops.append(("complete", lesson, rng.randint(0, 100)))
    if ops and ops[-1][0] == "complete" and rng.random() < 0.25:
        again = rng.choice([None, rng.randint(0, 100)]) if spec.kind == "assessed" else None
        ops.append(("complete", lesson, again))
    return ops or [("start", lesson)]


def plan_learner(rng: random.Random, specs: list[LessonSpec], most: int) -> list[Op]:
    """Writes on a random subset of lessons, the lessons' sequences randomly interleaved."""
    chosen = rng.sample(specs, rng.randint(1, min(most, len(specs))))
    sequences = [plan_lesson(rng, spec) for spec in chosen]
    ops: list[Op] = []
    while sequences:
        sequence = rng.choice(sequences)
        ops.append(sequence.pop(0))
        if not sequence:
            sequences.remove(sequence)
    return ops


async def apply(progress: Progress, model: Model, user: str, op: Op) -> None:
    """Sends one write and updates the model from what was sent."""
    cid = model.course_id
    what, lesson = op[0], op[1]
    row = model.row(user, lesson)
    touches = True
    if what == "start":
        reply = (await progress.StartLesson(ps.StartLessonRequest(**key(user, cid, lesson)))).lesson
    elif what == "time":
        reply = (
            await progress.RecordTime(ps.RecordTimeRequest(**key(user, cid, lesson), seconds=op[2]))
        ).lesson
        row.time += op[2]
    elif what == "batch":
        response = await progress.BatchRecordTime(
            ps.BatchRecordTimeRequest(
                requests=[
                    ps.RecordTimeRequest(**key(user, cid, lesson), seconds=seconds)
                    for seconds in op[2]
                ]
            )
        )
        reply = response.lessons[-1]
        row.time += sum(op[2])
    elif what == "bookmark":
        reply = (
            await progress.SaveBookmark(
                ps.SaveBookmarkRequest(**key(user, cid, lesson), position=op[2])
            )
        ).lesson
        row.bookmark = op[2]
    elif what == "attempt":
        score = op[2]
        response = await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, cid, lesson), score=score)
        )
        reply = response.lesson
        row.attempts += 1
        row.score = score if row.score is None else max(row.score, score)
        passing = model.spec(lesson).passing_score
        passed = passing is not None and score >= passing
        assert response.passed is passed
        if passed:
            model.complete(user, lesson)
    elif what == "complete":
        score = op[2]
        reply = (
            await progress.CompleteLesson(
                ps.CompleteLessonRequest(**key(user, cid, lesson), score=score)
            )
        ).lesson
        better = score is not None and (row.score is None or score > row.score)
        # Completing an already completed lesson changes nothing, unless the score is better.
        touches = not row.completed or better
        if better:
            row.score = score
        model.complete(user, lesson)
    else:
        raise AssertionError(op)
    if touches:
        model.touch(user, lesson, reply)
    # The write reports the state the model expects.
    assert (reply.time_spent_seconds, reply.attempts, reply.completed) == (
        row.time,
        row.attempts,
        row.completed,
    ), (user, op)
    assert (reply.score if reply.HasField("score") else None) == row.score, (user, op)
    assert reply.bookmark == row.bookmark


async def run_plans(progress: Progress, model: Model, plans: dict[str, list[Op]]) -> None:
    """Each learner's writes in order; learners concurrently."""
    gate = asyncio.Semaphore(8)

    async def learner(user: str, ops: list[Op]) -> None:
        async with gate:
            for op in ops:
                await apply(progress, model, user, op)

    await asyncio.gather(*(learner(user, ops) for user, ops in plans.items()))


@dataclass
class Seeded:
    model: Model
    stats_before_removal: list[resources_pb2.LessonStats]
    model_stats_before_removal: list[dict[str, Any]]
    removed: str


async def seed_course(
    progress: Progress,
    catalog: Catalog,
    analytics: Analytics,
    rng: random.Random,
    lessons: list[LessonSpec],
    *,
    learners: int,
    most_lessons: int,
    removed: str,
    extra: dict[str, list[Op]] | None = None,
) -> Seeded:
    """Two phases of random progress, with ``removed`` leaving the outline in between."""
    course_id = new_id()
    await register(catalog, course_id, lessons)
    model = Model(course_id, lessons)
    active = [lesson for lesson in lessons if lesson.kind != "idle"]
    users = [new_id() for _ in range(learners)]
    plans = {user: plan_learner(rng, active, most_lessons) for user in users}
    plans.update(extra or {})
    await run_plans(progress, model, plans)

    stats_before = await lesson_stats(analytics, course_id)
    model_stats_before = model.expected_stats()

    remaining = [lesson for lesson in lessons if lesson.lesson_id != removed]
    await register(catalog, course_id, remaining)
    model.outline = [lesson.lesson_id for lesson in remaining]
    for user in model.completions:
        model.check_course_completion(user)

    still_active = [lesson for lesson in remaining if lesson.kind != "idle"]
    later = {user: plan_learner(rng, still_active, 2) for user in users if rng.random() < 0.35}
    later.update({new_id(): plan_learner(rng, still_active, 2) for _ in range(3)})
    await run_plans(progress, model, later)
    return Seeded(model, stats_before, model_stats_before, removed)


@pytest.fixture(scope="module")
async def main_course(progress: Progress, catalog: Catalog, analytics: Analytics) -> Seeded:
    """45+ learners over every kind of lesson; a lesson without activity; one removed."""
    rng = random.Random(20240611)
    lessons = [
        LessonSpec("welcome", "plain"),
        LessonSpec("quiz-2", "graded", 70),
        LessonSpec("video-a", "plain"),
        LessonSpec("quiz-1", "graded", 50),
        LessonSpec("essay", "assessed"),
        LessonSpec("bonus", "idle"),
        LessonSpec("retired", "graded", 60),
        LessonSpec("lab", "plain"),
    ]
    # A learner whose only progress is in the lesson that will be removed.
    only_retired = {new_id(): [("start", "retired"), ("time", "retired", 77)]}
    return await seed_course(
        progress,
        catalog,
        analytics,
        rng,
        lessons,
        learners=45,
        most_lessons=5,
        removed="retired",
        extra=only_retired,
    )


@pytest.fixture(scope="module")
async def completing_course(progress: Progress, catalog: Catalog, analytics: Analytics) -> Seeded:
    """30 learners who complete a lot: some finish the course by completing its lessons,
    some because the lesson they had not done leaves the outline."""
    rng = random.Random(77)
    lessons = [
        LessonSpec("b1", "plain"),
        LessonSpec("b2", "graded", 80),
        LessonSpec("b3", "plain"),
        LessonSpec("b4", "plain"),
    ]
    finish_all = [("complete", "b1", None), ("attempt", "b2", 85), ("complete", "b3", 70)]
    extra = {
        new_id(): [*finish_all, ("complete", "b4", None)],  # finishes before the removal
        new_id(): finish_all,  # finishes when b4 leaves the outline
        new_id(): [*finish_all[:2], ("time", "b4", 5)],  # not finished
    }
    return await seed_course(
        progress,
        catalog,
        analytics,
        rng,
        lessons,
        learners=30,
        most_lessons=4,
        removed="b4",
        extra=extra,
    )


# --- StreamLessonStats -----------------------------------------------------------------------


async def test_lesson_stats_match_the_model(analytics: Analytics, main_course: Seeded):
    model = main_course.model
    got = await lesson_stats(analytics, model.course_id)
    assert_stats(got, model)
    # The outline order, not the lesson id order.
    assert [s.lesson_id for s in got] == [
        "welcome",
        "quiz-2",
        "video-a",
        "quiz-1",
        "essay",
        "bonus",
        "lab",
    ]
    # The seed covers what it should: scored and unscored rows, completions and not.
    by_id = {s.lesson_id: s for s in got}
    assert by_id["welcome"].completed_count > 0
    assert by_id["welcome"].scored_count == 0
    assert 0 < by_id["quiz-2"].completed_count < by_id["quiz-2"].started_count
    assert 0 < by_id["essay"].scored_count < by_id["essay"].started_count


async def test_lesson_stats_before_a_lesson_left_the_outline(main_course: Seeded):
    before = main_course.stats_before_removal
    expected = main_course.model_stats_before_removal
    assert [s.lesson_id for s in before] == [e["lesson_id"] for e in expected]
    assert main_course.removed in [s.lesson_id for s in before]
    for stats, want in zip(before, expected, strict=True):
        assert_same_stats(stats, want)


async def test_lesson_without_activity_streams_zeros(analytics: Analytics, main_course: Seeded):
    got = {s.lesson_id: s for s in await lesson_stats(analytics, main_course.model.course_id)}
    assert got["bonus"] == resources_pb2.LessonStats(lesson_id="bonus", score_histogram=[0] * 10)
    assert list(got["bonus"].score_histogram) == [0] * 10


async def test_lesson_stats_of_completing_course(analytics: Analytics, completing_course: Seeded):
    model = completing_course.model
    assert_stats(await lesson_stats(analytics, model.course_id), model)
    assert "b4" not in [s.lesson_id for s in await lesson_stats(analytics, model.course_id)]


async def test_lesson_stats_of_course_without_progress(analytics: Analytics, catalog: Catalog):
    course_id = new_id()
    lessons = [LessonSpec(f"x{i}", "plain") for i in (3, 1, 2)]
    await register(catalog, course_id, lessons)
    got = await lesson_stats(analytics, course_id)
    assert got == [
        resources_pb2.LessonStats(lesson_id=lesson_id, score_histogram=[0] * 10)
        for lesson_id in ("x3", "x1", "x2")
    ]
    assert await difficult_lessons(analytics, course_id, 1) == []
    assert await course_learners(analytics, course_id) == []

    empty_id = new_id()
    await register(catalog, empty_id, [])
    assert await lesson_stats(analytics, empty_id) == []
    assert await difficult_lessons(analytics, empty_id, 1) == []
    assert await course_learners(analytics, empty_id) == []


async def test_lesson_stats_exact_figures(
    progress: Progress, analytics: Analytics, catalog: Catalog
):
    """A small hand-checked case: interpolated percentiles, bucket edges, unscored rows."""
    course_id = new_id()
    await register(catalog, course_id, [LessonSpec("q", "assessed"), LessonSpec("r", "plain")])
    times = [10, 20, 30, 40]  # completers' times; p50 = 25, p90 = 37
    scores = [9, 10, 89, 90]
    for seconds, score in zip(times, scores, strict=True):
        user = new_id()
        await progress.RecordTime(
            ps.RecordTimeRequest(**key(user, course_id, "q"), seconds=seconds)
        )
        await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, course_id, "q"), score=score)
        )
        await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, course_id, "q")))
    for score in (100, 0):  # started, scored, not completed
        user = new_id()
        await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, course_id, "q"), score=score)
        )
        await progress.RecordAttempt(
            ps.RecordAttemptRequest(**key(user, course_id, "q"), score=score)
        )
    unscored = new_id()  # started, 100 seconds, no score
    await progress.RecordTime(ps.RecordTimeRequest(**key(unscored, course_id, "q"), seconds=100))

    got = await lesson_stats(analytics, course_id)
    q = got[0]
    assert (q.lesson_id, q.started_count, q.completed_count, q.scored_count) == ("q", 7, 4, 6)
    assert q.completion_rate == pytest.approx(4 / 7)
    assert q.avg_attempts == pytest.approx(8 / 7)
    assert q.avg_time_spent_seconds == pytest.approx(200 / 7)
    assert q.p50_time_spent_seconds == pytest.approx(25.0)
    assert q.p90_time_spent_seconds == pytest.approx(37.0)
    assert q.avg_score == pytest.approx(298 / 6)
    assert (q.min_score, q.max_score) == (0, 100)
    assert list(q.score_histogram) == [2, 1, 0, 0, 0, 0, 0, 0, 1, 2]
    assert got[1] == resources_pb2.LessonStats(lesson_id="r", score_histogram=[0] * 10)


async def test_lesson_stats_single_completer_percentiles(
    progress: Progress, analytics: Analytics, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    await progress.RecordTime(
        ps.RecordTimeRequest(**key(user, course.course_id, "l1"), seconds=123)
    )
    await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, course.course_id, "l1")))
    (stats,) = await lesson_stats(analytics, course.course_id)
    assert stats.p50_time_spent_seconds == stats.p90_time_spent_seconds == 123
    assert stats.completion_rate == 1.0
    assert stats.scored_count == 0
    assert (stats.avg_score, stats.min_score, stats.max_score) == (0, 0, 0)
    assert list(stats.score_histogram) == [0] * 10


# --- StreamDifficultLessons ------------------------------------------------------------------


async def check_difficult_against_model(analytics: Analytics, seeded: Seeded) -> None:
    model = seeded.model
    counts = sorted(set(model.completion_counts().values()))
    assert len(counts) >= 3, counts  # the seed gives lessons different completion counts
    minimums = {1, 2, *counts, *(c + 1 for c in counts), *(c - 1 for c in counts)}
    for minimum in sorted(m for m in minimums if m >= 1):
        got = await difficult_lessons(analytics, model.course_id, minimum)
        assert_difficult(got, model, minimum)
        # The removed lesson is never reported, however few completions are asked for.
        assert seeded.removed not in [d.lesson_id for d in got]
    got = await difficult_lessons(analytics, model.course_id, 0)
    assert_difficult(got, model, DEFAULT_MIN_COMPLETIONS)


async def test_difficult_lessons_match_the_model(analytics: Analytics, main_course: Seeded):
    await check_difficult_against_model(analytics, main_course)


async def test_difficult_lessons_of_completing_course(
    analytics: Analytics, completing_course: Seeded
):
    await check_difficult_against_model(analytics, completing_course)


async def test_difficult_lessons_boundaries_and_order(
    progress: Progress, analytics: Analytics, catalog: Catalog
):
    course_id = new_id()
    lessons = [
        LessonSpec("m-lesson", "assessed"),
        LessonSpec("a-lesson", "assessed"),
        LessonSpec("z-lesson", "assessed"),
        LessonSpec("k-lesson", "assessed"),
        LessonSpec("gone", "assessed"),
    ]
    await register(catalog, course_id, lessons)
    model = Model(course_id, lessons)
    # lesson -> attempts of each learner who completes it; then attempts of those who do not
    plans: dict[str, tuple[list[int], list[int]]] = {
        "m-lesson": ([2] * 10, [9, 9, 9]),  # exactly 10 completions, avg 2
        "a-lesson": ([1] * 5 + [3] * 5, [7]),  # exactly 10 completions, avg 2 (a tie with m)
        "z-lesson": ([5] * 9, []),  # 9 completions, avg 5
        "k-lesson": ([3] * 11, [0]),  # 11 completions, avg 3
        "gone": ([7] * 12, []),  # 12 completions, but leaves the outline
    }
    ops: dict[str, list[Op]] = {}
    for lesson, (completers, others) in plans.items():
        for index, attempts in enumerate(completers):
            ops[new_id()] = [
                ("time", lesson, 10 + index),
                *[("attempt", lesson, 40 + a) for a in range(attempts)],
                ("complete", lesson, None),
            ]
        for attempts in others:
            ops[new_id()] = [
                ("time", lesson, 300),
                *[("attempt", lesson, 10) for _ in range(attempts)],
            ]
    await run_plans(progress, model, ops)
    await register(catalog, course_id, lessons[:4])
    model.outline = [lesson.lesson_id for lesson in lessons[:4]]

    async def names(minimum: int) -> list[str]:
        got = await difficult_lessons(analytics, course_id, minimum)
        assert_difficult(got, model, DEFAULT_MIN_COMPLETIONS if minimum == 0 else minimum)
        return [d.lesson_id for d in got]

    assert await names(0) == ["k-lesson", "a-lesson", "m-lesson"]  # default 10, inclusive
    assert await names(10) == ["k-lesson", "a-lesson", "m-lesson"]
    assert await names(11) == ["k-lesson"]
    assert await names(12) == []  # "gone" has 12, but is not in the outline
    assert await names(9) == ["z-lesson", "k-lesson", "a-lesson", "m-lesson"]
    assert await names(1) == ["z-lesson", "k-lesson", "a-lesson", "m-lesson"]
    assert await names(2**31 - 1) == []

    got = {d.lesson_id: d for d in await difficult_lessons(analytics, course_id, 1)}
    # Averages over completers only: the learners who did not complete are left out.
    assert got["m-lesson"].avg_attempts == 2.0
    assert got["m-lesson"].avg_time_spent_seconds == pytest.approx(sum(range(10, 20)) / 10)
    assert got["k-lesson"].completion_count == 11


# --- StreamCourseLearners --------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [0, 1, 7, 10_000])
async def test_course_learners_match_the_model(
    analytics: Analytics, main_course: Seeded, page_size: int
):
    model = main_course.model
    got = await course_learners(analytics, model.course_id, page_size)
    assert len(got) == len(model.users()) >= 45
    assert_learners(got, model)
    # The seed reaches every case of what to study next.
    assert any(learner.review_lesson_ids for learner in got)
    assert any(not learner.next_lesson_id for learner in got) or not model.course_completed
    assert len({learner.next_lesson_id for learner in got}) >= 2


async def test_course_learners_agree_with_course_progress(
    progress: Progress, analytics: Analytics, completing_course: Seeded
):
    model = completing_course.model
    got = await course_learners(analytics, model.course_id, 5)
    assert_learners(got, model)
    assert any(learner.progress_percentage == 100 for learner in got)
    assert any(0 < learner.progress_percentage < 100 for learner in got)
    assert len(model.course_completed) >= 2
    for learner in got:
        single = await progress.GetCourseProgress(
            ps.GetCourseProgressRequest(user_id=learner.user_id, course_id=model.course_id)
        )
        assert single.course == learner


async def test_course_learners_count_removed_lessons_time_only(
    analytics: Analytics, main_course: Seeded
):
    model = main_course.model
    got = {
        learner.user_id: learner for learner in await course_learners(analytics, model.course_id)
    }
    retired_only = [
        user
        for user in model.users()
        if {lesson for (u, lesson) in model.rows if u == user} == {"retired"}
    ]
    assert retired_only
    for user in retired_only:
        learner = got[user]
        assert learner.completed_lesson_ids == []
        assert learner.total_lessons == 7
        assert (
            learner.total_time_spent_seconds
            == model.expected_learner(user)["total_time_spent_seconds"]
        )
        assert learner.last_lesson_id == "retired"


# --- errors ----------------------------------------------------------------------------------


def the_three_calls(analytics: Analytics, course_id: str) -> list[Any]:
    return [
        analytics.StreamLessonStats(an.StreamLessonStatsRequest(course_id=course_id)),
        analytics.StreamDifficultLessons(
            an.StreamDifficultLessonsRequest(course_id=course_id, min_completions=1)
        ),
        analytics.StreamCourseLearners(an.StreamCourseLearnersRequest(course_id=course_id)),
    ]


async def test_unknown_course_not_found(analytics: Analytics):
    for call in the_three_calls(analytics, new_id()):
        await stream_error(call, grpc.StatusCode.NOT_FOUND)


async def test_deleted_course_not_found(
    analytics: Analytics, catalog: Catalog, progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    await progress.CompleteLesson(ps.CompleteLessonRequest(**key(new_id(), course.course_id, "l1")))
    await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course.course_id))
    for call in the_three_calls(analytics, course.course_id):
        await stream_error(call, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    "course_id", ["", "nope", "0123456789abcdef0123456789abcdef", "{" + "0" * 36 + "}"]
)
async def test_malformed_course_id_rejected(analytics: Analytics, course_id: str):
    for call in the_three_calls(analytics, course_id):
        error = await stream_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(error) == {"course_id"}


async def test_uppercase_course_id_accepted(
    analytics: Analytics, progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    await progress.CompleteLesson(ps.CompleteLessonRequest(**key(user, course.course_id, "l1")))
    upper = course.course_id.upper()
    (stats,) = await lesson_stats(analytics, upper)
    assert stats.completed_count == 1
    assert [d.lesson_id for d in await difficult_lessons(analytics, upper, 1)] == ["l1"]
    (learner,) = await course_learners(analytics, upper)
    assert (learner.user_id, learner.course_id) == (user, course.course_id)


@pytest.mark.parametrize("min_completions", [-1, -(2**31)])
async def test_negative_min_completions_rejected(
    analytics: Analytics, make_course: MakeCourse, min_completions: int
):
    course = await make_course(1)
    call = analytics.StreamDifficultLessons(
        an.StreamDifficultLessonsRequest(
            course_id=course.course_id, min_completions=min_completions
        )
    )
    error = await stream_error(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(error) == {"min_completions"}
    both = analytics.StreamDifficultLessons(
        an.StreamDifficultLessonsRequest(course_id="bad", min_completions=min_completions)
    )
    error = await stream_error(both, grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(error) == {"course_id", "min_completions"}


@pytest.mark.parametrize("page_size", [-1, 10_001, -(2**31), 2**31 - 1])
async def test_page_size_out_of_range_rejected(
    analytics: Analytics, make_course: MakeCourse, page_size: int
):
    course = await make_course(1)
    call = analytics.StreamCourseLearners(
        an.StreamCourseLearnersRequest(course_id=course.course_id, page_size=page_size)
    )
    error = await stream_error(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(error) == {"page_size"}
    both = analytics.StreamCourseLearners(
        an.StreamCourseLearnersRequest(course_id="", page_size=page_size)
    )
    error = await stream_error(both, grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(error) == {"course_id", "page_size"}


# --- many learners ---------------------------------------------------------------------------

BIG_LEARNERS = 3000
BOOKMARK_BYTES = 4000


def big_bookmark(user: str) -> str:
    return (user + "#" * BOOKMARK_BYTES)[:BOOKMARK_BYTES]


@dataclass
class BigCourse:
    course_id: str
    seconds: dict[str, int]  # user -> seconds in l1
    second_lesson: dict[str, int]  # user -> seconds in l2, for some


@pytest.fixture(scope="module")
async def big_course(progress: Progress, catalog: Catalog, db: asyncpg.Pool) -> BigCourse:
    """3,000 learners through BatchRecordTime (1,000 entries a call), each with a 4 KB
    bookmark (set in SQL) so that the stream is far larger than any flow-control window."""
    course_id = new_id()
    await register(catalog, course_id, [LessonSpec("l1", "plain"), LessonSpec("l2", "plain")])
    users = [new_id() for _ in range(BIG_LEARNERS)]
    seconds = {user: index % 300 + 1 for index, user in enumerate(users)}
    for start in range(0, BIG_LEARNERS, 1000):
        await progress.BatchRecordTime(
            ps.BatchRecordTimeRequest(
                requests=[
                    ps.RecordTimeRequest(**key(user, course_id, "l1"), seconds=seconds[user])
                    for user in users[start : start + 1000]
                ]
            )
        )
    second_lesson = {user: 5 + index % 7 for index, user in enumerate(users[::10])}
    await progress.BatchRecordTime(
        ps.BatchRecordTimeRequest(
            requests=[
                ps.RecordTimeRequest(**key(user, course_id, "l2"), seconds=value)
                for user, value in second_lesson.items()
            ]
        )
    )
    await db.execute(
        "UPDATE lesson_progress SET bookmark = rpad(user_id::text, $2, '#'), bookmarked_at = now()"
        " WHERE course_id = $1 AND lesson_id = 'l1'",
        course_id,
        BOOKMARK_BYTES,
    )
    return BigCourse(course_id, seconds, second_lesson)


async def test_many_learners_stream_complete_and_in_order(
    analytics: Analytics, big_course: BigCourse
):
    got = await course_learners(analytics, big_course.course_id, page_size=50)
    assert len(got) == BIG_LEARNERS
    assert [learner.user_id for learner in got] == sorted(big_course.seconds)
    for learner in got:
        user = learner.user_id
        extra = big_course.second_lesson.get(user, 0)
        assert learner.total_time_spent_seconds == big_course.seconds[user] + extra
        assert learner.total_lessons == 2
        assert learner.completed_lesson_ids == []
        assert learner.progress_percentage == 0
        # l2 was written after l1, so it is the resume point of those who have it.
        if user in big_course.second_lesson:
            assert (learner.last_lesson_id, learner.last_lesson_bookmark) == ("l2", "")
        else:
            assert learner.last_lesson_id == "l1"
            assert learner.last_lesson_bookmark == big_bookmark(user)


@pytest.mark.parametrize("page_size", [1, 999, 0, 10_000])
async def test_many_learners_page_size_is_only_the_batch(
    analytics: Analytics, big_course: BigCourse, page_size: int
):
    call = analytics.StreamCourseLearners(
        an.StreamCourseLearnersRequest(course_id=big_course.course_id, page_size=page_size)
    )
    ids = [learner.user_id for m in await collect(call) for learner in m.learners]
    assert ids == sorted(big_course.seconds)


# The bounds of one StreamCourseLearnersResponse, as the proto states them.
CHUNK_LEARNERS = 500
CHUNK_BYTES = 1 << 20


async def test_learners_come_in_chunks_bounded_by_bytes(
    analytics: Analytics, big_course: BigCourse
):
    """4 KB bookmarks: a chunk ends when the next learner would pass 1 MiB."""
    call = analytics.StreamCourseLearners(
        an.StreamCourseLearnersRequest(course_id=big_course.course_id)
    )
    messages = await collect(call)
    sizes = [len(m.learners) for m in messages]
    assert sum(sizes) == BIG_LEARNERS
    assert all(0 < size <= CHUNK_LEARNERS for size in sizes)
    assert all(m.ByteSize() <= CHUNK_BYTES for m in messages)
    largest_learner = max(learner.ByteSize() for m in messages for learner in m.learners)
    # Every chunk but the last is full: one more learner would not have fitted.
    assert all(m.ByteSize() > CHUNK_BYTES - largest_learner - 8 for m in messages[:-1])
    ids = [learner.user_id for m in messages for learner in m.learners]
    assert ids == sorted(big_course.seconds)


async def test_learners_come_in_chunks_of_at_most_500(
    analytics: Analytics, progress: Progress, catalog: Catalog
):
    course_id = new_id()
    await register(catalog, course_id, [LessonSpec("l1", "plain")])
    users = [new_id() for _ in range(1100)]
    for start in range(0, len(users), 1000):
        await progress.BatchRecordTime(
            ps.BatchRecordTimeRequest(
                requests=[
                    ps.RecordTimeRequest(**key(user, course_id, "l1"), seconds=7)
                    for user in users[start : start + 1000]
                ]
            )
        )
    call = analytics.StreamCourseLearners(
        an.StreamCourseLearnersRequest(course_id=course_id, page_size=300)
    )
    messages = await collect(call)
    assert [len(m.learners) for m in messages] == [500, 500, 100]
    assert [learner.user_id for m in messages for learner in m.learners] == sorted(users)
    assert {learner.total_time_spent_seconds for m in messages for learner in m.learners} == {7}


async def stream_backends(db: asyncpg.Connection) -> int:
    """Backends still inside a StreamCourseLearners query (running it, or holding its
    cursor in an open transaction)."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND query LIKE '%learners AS%' AND state <> 'idle'"
        )
    )


async def wait_until_released(db: asyncpg.Connection, running: server.RunningServer) -> None:
    """Waits (bounded) until the server's pool has every connection back and no backend
    is still in the stream's query; then asserts it."""
    database = running.database
    for _ in range(200):
        if database.stream_stats().in_use == 0 and await stream_backends(db) == 0:
            break
        await asyncio.sleep(0.05)
    assert database.stream_stats().in_use == 0, database.stream_stats()
    assert await stream_backends(db) == 0


async def pool_still_serves(
    analytics: Analytics, course_id: str, running: server.RunningServer, db: asyncpg.Connection
) -> None:
    """As many streams as the streams' pool has connections can all be in flight at once:
    each holds a connection until cancelled, so a connection lost earlier would hang one."""
    size = running.database.stream_connections
    calls = [
        analytics.StreamCourseLearners(
            an.StreamCourseLearnersRequest(course_id=course_id, page_size=10)
        )
        for _ in range(size)
    ]
    try:
        firsts = await asyncio.wait_for(
            asyncio.gather(*(call.read() for call in calls)), HANG_GUARD_SECONDS
        )
        assert all(first is not grpc.aio.EOF for first in firsts)
        assert await stream_backends(db) == size
    finally:
        for call in calls:
            call.cancel()


async def abandon_stream(database_url: str, course_id: str, first_user: str, how: str) -> None:
    """Runs in a child process (see below): a server of its own, one large
    StreamCourseLearners read for one message and then cancelled (or left to its deadline),
    and the checks that the server let go of the query and of the pooled connection."""
    running = await server.start(server_config(database_url))
    db = await asyncpg.connect(database_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)
            await wait_until_released(db, running)
            call = analytics.StreamCourseLearners(
                an.StreamCourseLearnersRequest(course_id=course_id, page_size=50),
                timeout=2.0 if how == "deadline" else None,
            )
            try:
                first = await asyncio.wait_for(call.read(), HANG_GUARD_SECONDS)
                assert first is not grpc.aio.EOF
                assert first.learners[0].user_id == first_user
                # The stream is in flight: its snapshot transaction is open on the server.
                assert await stream_backends(db) == 1
                assert running.database.stream_stats().in_use > 0
                if how == "deadline":
                    # Read nothing more: the deadline passes while the server is blocked on
                    # flow control.
                    code = await asyncio.wait_for(call.code(), HANG_GUARD_SECONDS)
                    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                call.cancel()
            await wait_until_released(db, running)
            await pool_still_serves(analytics, course_id, running, db)
            await wait_until_released(db, running)
    finally:
        await db.close()
        await running.stop(grace=1)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_abandoned_stream_returns_its_connection(
    big_course: BigCourse, database_url: str, how: str
):
    """A caller that cancels a large stream after its first message, or lets its deadline
    pass without reading, ends the query and gives the connection back to the pool.

    The server runs in a child process so that a crash of the server process fails this
    test instead of ending the whole test session.
    """
    await run_in_child(
        "tests.test_analytics",
        database_url,
        how,
        big_course.course_id,
        min(big_course.seconds),
        hang_guard=4 * HANG_GUARD_SECONDS,
    )


if __name__ == "__main__":
    asyncio.run(
        abandon_stream(os.environ[CHILD_DATABASE_URL], sys.argv[2], sys.argv[3], sys.argv[1])
    )
