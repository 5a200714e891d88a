"""Which rows each operation touches: plain parameter tuples, the same for every backend.

Each backend gets its own disjoint share of the sampled enrollments (and each load
generator process its own part of that share), walked in a shuffled order, so that a write
that changes state for good (a completion, a first start) meets fresh rows whichever
backend runs it and in whatever order the backends run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.dataset import (
    ASSESSED_LESSONS,
    LESSON_IDS,
    LESSONS_PER_COURSE,
    PASSING_SCORE,
    Dataset,
    Enrollment,
)
from bench.operations import Backend, Op
from lesson_progress import values

HEARTBEAT_SECONDS = 30
BATCHES_PER_PLAN = 64
STREAM_PICKS = 1000


@dataclass(frozen=True, slots=True)
class Key:
    """One lesson row's key."""

    user_id: str
    course_id: str
    lesson_id: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """RecordTime parameters."""

    key: Key
    seconds: int

    def value(self) -> values.Heartbeat:
        """The heartbeat as the service's store takes it (no request id, now)."""
        return values.Heartbeat(
            self.key.user_id, self.key.course_id, self.key.lesson_id, self.seconds
        )


@dataclass(frozen=True, slots=True)
class Scored:
    """RecordAttempt or CompleteLesson parameters; ``passes`` as the catalog decides."""

    key: Key
    score: int | None
    passes: bool


@dataclass(frozen=True, slots=True)
class CourseKey:
    """A learner in a course."""

    user_id: str
    course_id: str


Params = Key | Heartbeat | Scored | CourseKey | tuple[Heartbeat, ...] | str


def share(dataset: Dataset, backend: Backend, worker: int, workers: int) -> list[Enrollment]:
    """The enrollments one load generator process uses for one backend."""
    index = list(Backend).index(backend)
    return list(dataset.sample[index :: len(Backend)][worker::workers])


class Planner:
    """Builds the parameter list of an operation from a share of enrollments."""

    def __init__(self, dataset: Dataset, enrollments: list[Enrollment], seed: int) -> None:
        self.dataset = dataset
        self.rng = random.Random(seed)
        self.enrollments = enrollments or list(dataset.sample[:1])
        self.rng.shuffle(self.enrollments)

    def _key(self, enrollment: Enrollment, lesson: int) -> Key:
        return Key(
            enrollment.user_id, self.dataset.course_ids[enrollment.course], LESSON_IDS[lesson]
        )

    def existing(self, enrollment: Enrollment) -> Key:
        """A lesson the learner has a row for."""
        return self._key(enrollment, self.rng.randrange(enrollment.started))

    def heartbeat(self, enrollment: Enrollment) -> Heartbeat:
        """Time on a lesson the learner has started."""
        return Heartbeat(self.existing(enrollment), HEARTBEAT_SECONDS)

    def start(self, enrollment: Enrollment) -> Key:
        """Opening a lesson: one already started, or the next one of the outline."""
        last = min(enrollment.started, LESSONS_PER_COURSE - 1)
        return self._key(enrollment, self.rng.randint(0, last))

    def attempt(self, enrollment: Enrollment) -> Scored:
        """A quiz attempt on the first quiz not passed yet (or any quiz when all are)."""
        pending = [i for i in sorted(ASSESSED_LESSONS) if i >= enrollment.completed]
        lesson = pending[0] if pending else self.rng.choice(sorted(ASSESSED_LESSONS))
        score = self.rng.randint(0, 100)
        return Scored(self._key(enrollment, lesson), score, score >= PASSING_SCORE)

    def completion(self, enrollment: Enrollment) -> Scored:
        """Completing the lesson in progress (an already completed one when all are done)."""
        if enrollment.finished:
            lesson = self.rng.randrange(LESSONS_PER_COURSE)
        else:
            lesson = enrollment.started - 1
        score = self.rng.randint(PASSING_SCORE, 100) if lesson in ASSESSED_LESSONS else None
        return Scored(self._key(enrollment, lesson), score, True)

    def course(self, enrollment: Enrollment) -> CourseKey:
        """A learner's course."""
        return CourseKey(enrollment.user_id, self.dataset.course_ids[enrollment.course])

    def batch(self, size: int) -> tuple[Heartbeat, ...]:
        """``size`` heartbeats of learners picked at random."""
        return tuple(self.heartbeat(self.rng.choice(self.enrollments)) for _ in range(size))

    def plan(self, op: Op, batch_size: int) -> list[Params]:
        """The parameters of ``op``, in the order the clients take them."""
        people = self.enrollments
        match op:
            case Op.RECORD_TIME | Op.RECORD_TIME_MANY | Op.RECORD_TIME_BATCHING:
                return [self.heartbeat(e) for e in people]
            case Op.BATCH_RECORD_TIME:
                return [self.batch(batch_size) for _ in range(BATCHES_PER_PLAN)]
            case Op.START_LESSON:
                return [self.start(e) for e in people]
            case Op.RECORD_ATTEMPT:
                return [self.attempt(e) for e in people]
            case Op.COMPLETE_LESSON:
                return [self.completion(e) for e in people]
            case Op.GET_LESSON_PROGRESS:
                return [self.existing(e) for e in people]
            case Op.LIST_LESSON_PROGRESS | Op.GET_COURSE_PROGRESS:
                return [self.course(e) for e in people]
            case Op.STREAM_LESSON_STATS:
                ids = self.dataset.course_ids
                return [self.rng.choice(ids) for _ in range(STREAM_PICKS)]
            case Op.STREAM_LESSON_STATS_LARGEST | Op.STREAM_COURSE_LEARNERS:
                return [self.dataset.course_ids[self.dataset.largest_course]]
        raise AssertionError(op)
