"""The figures of a course report, read through the public API.

Nothing here draws: :func:`fetch_report` reads ``GetCourse`` and the three analytics streams
with the typed client and returns plain values that :mod:`.render` turns into HTML and that
:meth:`CourseReport.as_json` embeds in the page for machines (and tests) to read back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from lesson_progress_client import ProgressClient

#: The labels of LessonStats.score_histogram's ten buckets.
SCORE_BUCKETS: tuple[str, ...] = (*(f"{low}-{low + 9}" for low in range(0, 90, 10)), "90-100")


@dataclass(frozen=True, slots=True)
class LessonFigures:
    """One lesson of the outline with its ``LessonStats`` (figures exactly as streamed)."""

    lesson_id: str
    title: str
    assessed: bool
    passing_score: int | None
    started_count: int
    completed_count: int
    completion_rate: float
    avg_attempts: float
    avg_time_spent_seconds: float
    p50_time_spent_seconds: float
    p90_time_spent_seconds: float
    scored_count: int
    avg_score: float
    min_score: int
    max_score: int
    score_histogram: list[int]

    @property
    def has_scores(self) -> bool:
        """Whether the lesson gets a score chart: it is assessed or somebody has a score."""
        return self.assessed or self.scored_count > 0


@dataclass(frozen=True, slots=True)
class DifficultFigures:
    """One row of ``StreamDifficultLessons``, hardest first."""

    lesson_id: str
    title: str
    avg_attempts: float
    avg_time_spent_seconds: float
    completion_count: int


@dataclass(frozen=True, slots=True)
class Headline:
    """Course-wide figures over every learner of ``StreamCourseLearners``."""

    learners: int
    course_completions: int
    """Learners whose course progress reached 100% at some point (``completed_at`` set)."""
    average_progress_percentage: float
    total_time_spent_seconds: int
    average_time_spent_seconds: float
    lessons: int
    assessed_lessons: int


@dataclass(frozen=True, slots=True)
class CourseReport:
    """Everything the report shows about one course."""

    course_id: str
    title: str
    generated_at: str
    min_completions: int
    headline: Headline
    lessons: list[LessonFigures]
    difficult_lessons: list[DifficultFigures]

    def as_json(self) -> dict[str, Any]:
        """The report's figures as JSON-ready values (what the HTML's data block holds)."""
        return asdict(self)


async def fetch_report(
    client: ProgressClient, course_id: str, *, min_completions: int = 0
) -> CourseReport:
    """Reads the course's outline and its analytics streams into a :class:`CourseReport`.

    ``min_completions`` is passed to ``StreamDifficultLessons`` (0: the server's default).
    Raises :class:`lesson_progress_client.ProgressError` as the client does (NOT_FOUND for
    an unknown course, UNAVAILABLE when the server cannot be reached, ...). Each stream is
    its own snapshot, so figures of different sections can differ by the writes that
    landed between them.
    """
    course = await client.get_course(course_id=course_id)
    outline = {lesson.lesson_id: lesson for lesson in course.lessons}

    lessons: list[LessonFigures] = []
    async for stats in client.stream_lesson_stats(course_id=course.course_id):
        lesson = outline.get(stats.lesson_id)
        lessons.append(
            LessonFigures(
                lesson_id=stats.lesson_id,
                title=lesson.title if lesson is not None else "",
                assessed=lesson.assessed if lesson is not None else False,
                passing_score=(
                    lesson.passing_score
                    if lesson is not None and lesson.HasField("passing_score")
                    else None
                ),
                started_count=stats.started_count,
                completed_count=stats.completed_count,
                completion_rate=stats.completion_rate,
                avg_attempts=stats.avg_attempts,
                avg_time_spent_seconds=stats.avg_time_spent_seconds,
                p50_time_spent_seconds=stats.p50_time_spent_seconds,
                p90_time_spent_seconds=stats.p90_time_spent_seconds,
                scored_count=stats.scored_count,
                avg_score=stats.avg_score,
                min_score=stats.min_score,
                max_score=stats.max_score,
                score_histogram=list(stats.score_histogram),
            )
        )

    difficult = [
        DifficultFigures(
            lesson_id=row.lesson_id,
            title=outline[row.lesson_id].title if row.lesson_id in outline else "",
            avg_attempts=row.avg_attempts,
            avg_time_spent_seconds=row.avg_time_spent_seconds,
            completion_count=row.completion_count,
        )
        async for row in client.stream_difficult_lessons(
            course_id=course.course_id, min_completions=min_completions
        )
    ]

    learners = 0
    completions = 0
    progress_sum = 0
    time_sum = 0
    async for learner in client.stream_course_learners(course_id=course.course_id):
        learners += 1
        completions += learner.HasField("completed_at")
        progress_sum += learner.progress_percentage
        time_sum += learner.total_time_spent_seconds

    return CourseReport(
        course_id=course.course_id,
        title=course.title,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        min_completions=min_completions,
        headline=Headline(
            learners=learners,
            course_completions=completions,
            average_progress_percentage=progress_sum / learners if learners else 0.0,
            total_time_spent_seconds=time_sum,
            average_time_spent_seconds=time_sum / learners if learners else 0.0,
            lessons=len(course.lessons),
            assessed_lessons=sum(lesson.assessed for lesson in course.lessons),
        ),
        lessons=lessons,
        difficult_lessons=difficult,
    )
