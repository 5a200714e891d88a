"""What the seed produced, in the form the load generators need: ids and a key sample.

A ``Dataset`` is pickled once to every load-generator process. It holds no database rows,
only what is needed to address them: course and lesson ids, and a sample of enrollments
(learner, course, how far the learner got) from which every operation draws its keys.
"""

from __future__ import annotations

from dataclasses import dataclass

LESSONS_PER_COURSE = 20
# Lessons (by index) that end in a quiz; their rows carry scores and attempts.
ASSESSED_LESSONS = frozenset({4, 9, 14, 19})
PASSING_SCORE = 70


def lesson_id(index: int) -> str:
    """The id of the lesson at ``index`` (0-based) in every course's outline."""
    return f"lesson-{index + 1:02d}"


LESSON_IDS = tuple(lesson_id(i) for i in range(LESSONS_PER_COURSE))


@dataclass(frozen=True, slots=True)
class Enrollment:
    """One learner in one course, as seeded.

    ``started`` lessons (the first ones of the outline) have a row; all but the last of
    them are completed, or all of them when ``finished``.
    """

    user_id: str
    course: int
    started: int
    finished: bool

    @property
    def completed(self) -> int:
        """How many of the started lessons are completed."""
        return self.started if self.finished else self.started - 1


@dataclass(frozen=True)
class Dataset:
    """Ids of the seeded data and a sample of its enrollments."""

    rows: int
    learners: int
    enrollments: int
    course_ids: tuple[str, ...]
    course_rows: tuple[int, ...]
    sample: tuple[Enrollment, ...]

    @property
    def largest_course(self) -> int:
        """Index of the course with the most lesson rows (the most learners)."""
        return max(range(len(self.course_rows)), key=self.course_rows.__getitem__)

    @property
    def median_course_rows(self) -> int:
        """Lesson rows of the median course."""
        ordered = sorted(self.course_rows)
        return ordered[len(ordered) // 2]
