"""Calls the running service over gRPC (grpc.aio), one channel per load generator process
(or, against several workers, one per client)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from bench.backends import Call, Outcome, Window, unsupported
from bench.keys import CourseKey, Heartbeat, Key, Params, Scored
from bench.operations import BATCHING_LINGER, Op
from lesson_progress_client import HeartbeatBatching, ProgressClient
from lessonprogress.v1 import (
    analytics_service_pb2,
    analytics_service_pb2_grpc,
    progress_service_pb2,
    progress_service_pb2_grpc,
)

pb = progress_service_pb2
apb = analytics_service_pb2


def _record_time(beat: Heartbeat) -> pb.RecordTimeRequest:
    key = beat.key
    return pb.RecordTimeRequest(
        user_id=key.user_id, course_id=key.course_id, lesson_id=key.lesson_id, seconds=beat.seconds
    )


def _request(op: Op, params: Params) -> object:
    """The request message of ``op`` for ``params``."""
    match op, params:
        case Op.RECORD_TIME | Op.RECORD_TIME_MANY | Op.RECORD_TIME_BATCHING, Heartbeat():
            return _record_time(params)
        case Op.BATCH_RECORD_TIME, tuple():
            return pb.BatchRecordTimeRequest(requests=[_record_time(b) for b in params])
        case Op.START_LESSON, Key(user_id=user, course_id=course, lesson_id=lesson):
            return pb.StartLessonRequest(user_id=user, course_id=course, lesson_id=lesson)
        case Op.GET_LESSON_PROGRESS, Key(user_id=user, course_id=course, lesson_id=lesson):
            return pb.GetLessonProgressRequest(user_id=user, course_id=course, lesson_id=lesson)
        case Op.RECORD_ATTEMPT, Scored(key=key, score=score):
            return pb.RecordAttemptRequest(
                user_id=key.user_id, course_id=key.course_id, lesson_id=key.lesson_id, score=score
            )
        case Op.COMPLETE_LESSON, Scored(key=key, score=score):
            return pb.CompleteLessonRequest(
                user_id=key.user_id, course_id=key.course_id, lesson_id=key.lesson_id, score=score
            )
        case Op.LIST_LESSON_PROGRESS, CourseKey(user_id=user, course_id=course):
            return pb.ListLessonProgressRequest(user_id=user, course_id=course)
        case Op.GET_COURSE_PROGRESS, CourseKey(user_id=user, course_id=course):
            return pb.GetCourseProgressRequest(user_id=user, course_id=course)
        case Op.STREAM_LESSON_STATS | Op.STREAM_LESSON_STATS_LARGEST, str():
            return apb.StreamLessonStatsRequest(course_id=params)
        case Op.STREAM_COURSE_LEARNERS, str():
            return apb.StreamCourseLearnersRequest(course_id=params)
    raise AssertionError((op, params))


class ServiceBackend:
    """The service under test, reached at ``address``."""

    def __init__(self, address: str, connection_per_slot: bool = False) -> None:
        self.address = address
        self.connection_per_slot = connection_per_slot
        self._channels: list[grpc.aio.Channel] = []

    async def open(self, slots: int) -> None:
        """Opens the channel (all slots share it, as a client library would), or one
        channel with a connection of its own per slot."""
        if self.connection_per_slot:
            options = [("grpc.use_local_subchannel_pool", 1)]
            self._channels = [
                grpc.aio.insecure_channel(self.address, options=options) for _ in range(slots)
            ]
        else:
            self._channels = [grpc.aio.insecure_channel(self.address)]
        for channel in self._channels:
            await channel.channel_ready()
        # The typed client with heartbeat batching, as one application process shares it.
        self._batching = ProgressClient(
            self.address, batching=HeartbeatBatching(linger=BATCHING_LINGER), timeout=30
        )
        progress = [progress_service_pb2_grpc.ProgressServiceStub(c) for c in self._channels]
        analytics = [analytics_service_pb2_grpc.AnalyticsServiceStub(c) for c in self._channels]
        self._unary = {
            Op.RECORD_TIME: [p.RecordTime for p in progress],
            Op.RECORD_TIME_MANY: [p.RecordTime for p in progress],
            Op.START_LESSON: [p.StartLesson for p in progress],
            Op.RECORD_ATTEMPT: [p.RecordAttempt for p in progress],
            Op.COMPLETE_LESSON: [p.CompleteLesson for p in progress],
            Op.GET_LESSON_PROGRESS: [p.GetLessonProgress for p in progress],
            Op.LIST_LESSON_PROGRESS: [p.ListLessonProgress for p in progress],
            Op.GET_COURSE_PROGRESS: [p.GetCourseProgress for p in progress],
        }
        self._batch = [p.BatchRecordTime for p in progress]
        self._lesson_stats = [a.StreamLessonStats for a in analytics]
        self._learners = [a.StreamCourseLearners for a in analytics]

    def prepare(self, op: Op, params: list[Params]) -> list[object]:
        """Builds every request message before the clock starts."""
        return [_request(op, p) for p in params]

    def call(self, op: Op) -> Call:
        """The call of ``op``."""
        if op in self._unary:
            methods = self._unary[op]
            count = len(methods)

            async def unary(slot: int, request: object, window: Window) -> Outcome:
                await methods[slot % count](request)  # type: ignore[operator]
                return 1, True

            return unary
        if op is Op.RECORD_TIME_BATCHING:
            client = self._batching

            async def batched(slot: int, request: object, window: Window) -> Outcome:
                assert isinstance(request, pb.RecordTimeRequest)
                await client.record_time(
                    user_id=request.user_id,
                    course_id=request.course_id,
                    lesson_id=request.lesson_id,
                    seconds=request.seconds,
                    request_id=request.request_id,
                )
                return 1, True

            return batched
        if op is Op.BATCH_RECORD_TIME:
            batches = self._batch

            async def batch(slot: int, request: object, window: Window) -> Outcome:
                response = await batches[slot % len(batches)](request)  # type: ignore[arg-type]
                return len(response.entry_results) or len(response.lessons), True

            return batch
        if op in (Op.STREAM_LESSON_STATS, Op.STREAM_LESSON_STATS_LARGEST):
            return self._stream(self._lesson_stats, lambda response: 1)
        if op is Op.STREAM_COURSE_LEARNERS:
            return self._stream(self._learners, lambda response: len(response.learners))
        return unsupported(op, "service")

    @staticmethod
    def _stream(methods: list[object], rows_of: Callable[[Any], int]) -> Call:
        """A stream whose responses carry ``rows_of(response)`` rows each."""

        async def stream(slot: int, request: object, window: Window) -> Outcome:
            call = methods[slot % len(methods)](request)  # type: ignore[operator]
            rows = 0
            async for response in call:
                inside, past = window.rows_now()
                if past:
                    call.cancel()
                    return rows, False
                rows += inside * rows_of(response)
            return rows, True

        return stream

    def counts_rows_in_window(self, op: Op) -> bool:
        """Streamed learners are counted as they arrive."""
        return op is Op.STREAM_COURSE_LEARNERS

    async def close(self) -> None:
        """Closes the channels and the batching client."""
        for channel in self._channels:
            await channel.close()
        if self._channels:
            await self._batching.close()
        self._channels = []
