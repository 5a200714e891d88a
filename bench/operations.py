"""The operations a run measures, and how each is measured."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Op(enum.StrEnum):
    """One measured operation; the value is its name in the report."""

    RECORD_TIME = "RecordTime"
    RECORD_TIME_MANY = "RecordTime (many callers)"
    RECORD_TIME_BATCHING = "RecordTime (batching client)"
    BATCH_RECORD_TIME = "BatchRecordTime"
    START_LESSON = "StartLesson"
    RECORD_ATTEMPT = "RecordAttempt"
    COMPLETE_LESSON = "CompleteLesson"
    GET_LESSON_PROGRESS = "GetLessonProgress"
    LIST_LESSON_PROGRESS = "ListLessonProgress"
    GET_COURSE_PROGRESS = "GetCourseProgress"
    STREAM_LESSON_STATS = "StreamLessonStats"
    STREAM_LESSON_STATS_LARGEST = "StreamLessonStats (largest course)"
    STREAM_COURSE_LEARNERS = "StreamCourseLearners"


class Backend(enum.StrEnum):
    """Who executes the operation."""

    SERVICE = "service"
    """The gRPC service, started as a user starts it."""
    RAW = "raw"
    """asyncpg running the service's own SQL statements, one connection per client."""
    FLOOR = "floor"
    """A bare grpc.aio server (bench/floor.py): the same protos, SQL and pool, without
    validation, auth, metrics or logs; what Python gRPC itself allows."""
    NAIVE = "naive"
    """asyncpg running the seed note's data flow: SELECT, then INSERT or UPDATE, then a
    separate course_progress UPDATE, each statement its own transaction."""


class Concurrency(enum.Enum):
    """Which concurrency setting an operation runs at."""

    DEFAULT = "default"
    MANY = "many"
    """Heartbeats of many callers through one client each load process: where coalescing
    them pays (the batching client against unary RecordTime at the same concurrency)."""
    BATCH = "batch"
    SINGLE = "single"


@dataclass(frozen=True)
class OpSpec:
    """How an operation is driven and reported."""

    op: Op
    write: bool
    unit: str
    """``ops`` (calls, or whole streams) or ``rows`` (batch entries, streamed messages)."""
    concurrency: Concurrency
    naive: bool
    """Whether the seed's data flow has a counterpart to compare with."""


SPECS: dict[Op, OpSpec] = {
    spec.op: spec
    for spec in (
        OpSpec(Op.RECORD_TIME, True, "ops", Concurrency.DEFAULT, True),
        OpSpec(Op.RECORD_TIME_MANY, True, "ops", Concurrency.MANY, False),
        OpSpec(Op.RECORD_TIME_BATCHING, True, "ops", Concurrency.MANY, False),
        OpSpec(Op.BATCH_RECORD_TIME, True, "rows", Concurrency.BATCH, True),
        OpSpec(Op.START_LESSON, True, "ops", Concurrency.DEFAULT, True),
        OpSpec(Op.RECORD_ATTEMPT, True, "ops", Concurrency.DEFAULT, True),
        OpSpec(Op.COMPLETE_LESSON, True, "ops", Concurrency.DEFAULT, True),
        OpSpec(Op.GET_LESSON_PROGRESS, False, "ops", Concurrency.DEFAULT, False),
        OpSpec(Op.LIST_LESSON_PROGRESS, False, "ops", Concurrency.DEFAULT, False),
        OpSpec(Op.GET_COURSE_PROGRESS, False, "ops", Concurrency.DEFAULT, False),
        OpSpec(Op.STREAM_LESSON_STATS, False, "ops", Concurrency.DEFAULT, False),
        OpSpec(Op.STREAM_LESSON_STATS_LARGEST, False, "ops", Concurrency.SINGLE, False),
        OpSpec(Op.STREAM_COURSE_LEARNERS, False, "rows", Concurrency.SINGLE, False),
    )
}

# Operations the floor server serves, measured on it right after the service.
FLOOR_OPS = (Op.RECORD_TIME, Op.GET_LESSON_PROGRESS, Op.GET_COURSE_PROGRESS)

# Operations of the service alone: no baseline runs them (the batching client's heartbeats
# are compared with the service's own unary RecordTime at the same concurrency).
SERVICE_ONLY_OPS = (Op.RECORD_TIME_MANY, Op.RECORD_TIME_BATCHING)

#: The linger of the batching client's phase (lesson_progress_client.HeartbeatBatching).
BATCHING_LINGER = 0.002

# Latency targets checked in open loop (arrivals at half the closed-loop throughput).
LATENCY_TARGETS_MS: dict[Op, float] = {
    Op.GET_LESSON_PROGRESS: 5.0,
    Op.LIST_LESSON_PROGRESS: 20.0,
    Op.STREAM_LESSON_STATS: 100.0,
}
