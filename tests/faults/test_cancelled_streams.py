"""Clients that cancel streams part-way: the server logs no error for them and goes on."""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import pytest

from lessonprogress.v1 import analytics_service_pb2 as an
from lessonprogress.v1 import analytics_service_pb2_grpc, progress_service_pb2_grpc
from lessonprogress.v1 import progress_service_pb2 as pb
from tests.faults.conftest import ServeFactory
from tests.faults.support import new_id
from tests.test_operations import upsert_course

pytestmark = pytest.mark.postgres_only("the fault suite controls its own PostgreSQL processes")

LEARNERS = 6000  # far more than a stream's flow-control window
MESSAGES = LEARNERS // 500  # a StreamCourseLearners message carries up to 500 learners
CALL_TIMEOUT = 10.0


async def test_streams_cancelled_mid_send_log_no_error(serve: ServeFactory) -> None:
    child = serve("--stream-connections", "10")
    await child.wait_health()
    async with child.channel() as channel:
        course_id = await upsert_course(channel, lessons=3)
        progress = progress_service_pb2_grpc.ProgressServiceStub(channel)
        for first in range(0, LEARNERS, 500):
            await progress.BatchRecordTime(
                pb.BatchRecordTimeRequest(
                    requests=[
                        pb.RecordTimeRequest(user_id=new_id(), course_id=course_id,
                                             lesson_id=f"l{i % 3 + 1}", seconds=1,
                                             request_id=new_id())
                        for i in range(first, min(LEARNERS, first + 500))
                    ]
                ),
                timeout=CALL_TIMEOUT,
            )  # fmt: skip
        analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)
        cancelled = 0
        for read in (0, 1, 2, 3, 5, 8, 9, 10, 11):
            for page_size in (1, 10, 1000):
                call = analytics.StreamCourseLearners(
                    an.StreamCourseLearnersRequest(course_id=course_id, page_size=page_size),
                    timeout=CALL_TIMEOUT,
                )
                for _ in range(read):  # a message carries up to 500 learners: may end first
                    if await call.read() is grpc.aio.EOF:
                        break
                if read == 0:
                    await asyncio.sleep(0.01)  # cancelled while the first page is fetched
                call.cancel()
                cancelled += 1
        for read in (0, 1, 2):
            stats = analytics.StreamLessonStats(
                an.StreamLessonStatsRequest(course_id=course_id), timeout=CALL_TIMEOUT
            )
            for _ in range(read):
                assert await stats.read() is not grpc.aio.EOF
            stats.cancel()
            watch = progress.WatchProgress(
                pb.WatchProgressRequest(course_id=course_id), timeout=CALL_TIMEOUT
            )
            await asyncio.sleep(0.05)
            watch.cancel()
            cancelled += 2
        # Many at once, each blocked on flow control (nothing read) or part-way, then
        # cancelled together: their writes are in progress when the calls go.
        for round_ in range(3):
            calls = [
                analytics.StreamCourseLearners(
                    an.StreamCourseLearnersRequest(course_id=course_id, page_size=100 * (k + 1)),
                    timeout=CALL_TIMEOUT,
                )
                for k in range(8)
            ]
            for k, call in enumerate(calls):
                for _ in range(k * round_):
                    if await call.read() is grpc.aio.EOF:
                        break
            await asyncio.sleep(0.3)
            for call in calls:
                call.cancel()
            cancelled += len(calls)
        # Cancelled at random points while the server writes as fast as it can.
        rng = random.Random(7)

        async def cancel_after(reads: int, page_size: int) -> None:
            call = analytics.StreamCourseLearners(
                an.StreamCourseLearnersRequest(course_id=course_id, page_size=page_size),
                timeout=CALL_TIMEOUT,
            )
            for _ in range(reads):
                if await call.read() is grpc.aio.EOF:
                    break
            call.cancel()

        for _ in range(10):
            await asyncio.gather(
                *(
                    cancel_after(rng.randint(0, MESSAGES - 1), rng.choice((1, 7, 50)))
                    for _ in range(8)
                )
            )
            cancelled += 8
        # The server goes on: a whole stream afterwards has every learner.
        whole = [
            learner
            async for response in analytics.StreamCourseLearners(
                an.StreamCourseLearnersRequest(course_id=course_id, page_size=7),
                timeout=CALL_TIMEOUT,
            )
            for learner in response.learners
        ]
        assert len(whole) == LEARNERS
    await asyncio.sleep(0.5)  # the server finishes logging the cancelled calls
    child.assert_running()
    lines = [json.loads(line) for line in child.log().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")]
    assert errors == [], errors
    assert "Traceback" not in child.log()
    logged = [line for line in lines if line.get("code") == "CANCELLED"]
    assert len(logged) >= cancelled // 2, (len(logged), cancelled)
