"""SIGTERM under continuous load, kill -9 in the middle of writes, and the largest valid
batch: what callers see, and that nothing is left applied in part or behind an error."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc
from tests.errors import error_info
from tests.faults.conftest import ServeFactory
from tests.faults.support import consistency_problems, kill_9, new_id
from tests.test_operations import upsert_course

pytestmark = pytest.mark.postgres_only("the fault suite controls its own PostgreSQL processes")

Code = grpc.StatusCode
GRACE = 3  # seconds of shutdown grace
EXIT_SLACK = 8.0  # seconds beyond the grace the process may take to exit (hang guard)
CALLERS = 32


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_continuous_load_refuses_with_unavailable_only(
    serve: ServeFactory, workers: int
) -> None:
    seen: Counter[str] = Counter()
    for run in range(2):
        child = serve("--shutdown-grace", f"{GRACE}s", name=f"serve-{run}", workers=workers)
        await child.wait_health()
        async with child.channel() as channel:
            course_id = await upsert_course(channel)
            stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
            exited = asyncio.Event()

            async def caller(
                stub: progress_service_pb2_grpc.ProgressServiceStub = stub,
                course_id: str = course_id,
                exited: asyncio.Event = exited,
            ) -> None:
                user = new_id()
                while not exited.is_set():
                    request = pb.RecordTimeRequest(
                        user_id=user,
                        course_id=course_id,
                        lesson_id="l1",
                        seconds=1,
                        request_id=new_id(),
                    )
                    try:
                        await stub.RecordTime(request, timeout=GRACE + EXIT_SLACK)
                        seen["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != Code.UNAVAILABLE:
                            seen[exc.code().name] += 1
                        elif any(
                            k == "grpc-status-details-bin" for k, _ in exc.trailing_metadata() or ()
                        ):
                            seen[f"UNAVAILABLE {error_info(exc).reason}"] += 1
                            await asyncio.sleep(0.01)
                        else:  # the process is gone: the client could not connect
                            seen["UNAVAILABLE no server"] += 1
                            await asyncio.sleep(0.01)

            callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
            try:
                while seen["OK"] < 200 * (run + 1):
                    child.assert_running()
                    await asyncio.sleep(0.05)
                child.send(signal.SIGTERM)
                code = await asyncio.to_thread(child.process.wait, GRACE + EXIT_SLACK)
            finally:
                exited.set()
                await asyncio.gather(*callers)
        assert code == 0, child.log_tail()
    assert seen["UNAVAILABLE SHUTTING_DOWN"] > 0, dict(seen)
    assert set(seen) <= {"OK", "UNAVAILABLE SHUTTING_DOWN", "UNAVAILABLE no server"}, dict(seen)


async def test_largest_valid_batch_gets_a_response_or_commits_nothing(
    serve: ServeFactory, database: str
) -> None:
    child = serve()
    await child.wait_health()
    user = new_id()
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(child.address, options=options) as channel:
        course_id = await upsert_course(channel)
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        await stub.SaveBookmark(
            pb.SaveBookmarkRequest(
                user_id=user, course_id=course_id, lesson_id="l1", position="b" * 4096
            ),
            timeout=30,
        )
        # An offline history: 1,000 consecutive seconds, so the time budget credits all.
        start = int(time.time()) - 2000
        batch = pb.BatchRecordTimeRequest(
            requests=[
                pb.RecordTimeRequest(user_id=user, course_id=course_id, lesson_id="l1",
                                     seconds=1, request_id=new_id(),
                                     occurred_at=Timestamp(seconds=start + i + 1))
                for i in range(1000)
            ]
        )  # fmt: skip
        response = None
        try:
            response = await stub.BatchRecordTime(batch, timeout=60)
            failed = None
        except grpc.aio.AioRpcError as exc:
            failed = exc.code()
    connection = await asyncpg.connect(database)
    try:
        stored = await connection.fetchval(
            "SELECT time_spent_seconds FROM lesson_progress WHERE user_id = $1",
            uuid.UUID(user),
        )
    finally:
        await connection.close()
    assert (failed, stored) in {(None, 1000), (Code.RESOURCE_EXHAUSTED, 0)}, (failed, stored)
    assert failed is None  # a valid request gets its response
    assert response is not None
    assert [r.credited_seconds for r in response.entry_results] == [1] * 1000
    assert {r.lesson_index for r in response.entry_results} == {0}
    (lesson,) = response.distinct_lessons
    assert (lesson.time_spent_seconds, lesson.bookmark) == (1000, "b" * 4096)
    assert len(response.lessons) == 0  # 1,000 copies of the row would not fit


@pytest.mark.parametrize("workers", [1, 2])
async def test_kill_9_during_batches_and_completions_leaves_no_partial_write(
    serve: ServeFactory, database: str, workers: int
) -> None:
    lessons = [f"l{i + 1}" for i in range(6)]
    batch_size = 50  # entries of one batch, one second each: stored sums are multiples
    users = [new_id() for _ in range(12)]
    course_id = ""
    for run in range(2):
        child = serve(name=f"serve-{run}", workers=workers)
        await child.wait_health()
        async with child.channel() as channel:
            if not course_id:
                course_id = await upsert_course(channel, lessons=len(lessons))
            stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
            ok = 0

            async def writer(
                user: str,
                course_id: str,
                stub: progress_service_pb2_grpc.ProgressServiceStub = stub,
            ) -> None:
                nonlocal ok
                for i in range(10_000):
                    lesson = lessons[i % len(lessons)]
                    try:
                        if i % 3 == 2:
                            await stub.CompleteLesson(
                                pb.CompleteLessonRequest(
                                    user_id=user,
                                    course_id=course_id,
                                    lesson_id=lesson,
                                    request_id=new_id(),
                                ),
                                timeout=10,
                            )
                        else:
                            await stub.BatchRecordTime(
                                pb.BatchRecordTimeRequest(
                                    requests=[
                                        pb.RecordTimeRequest(
                                            user_id=user,
                                            course_id=course_id,
                                            lesson_id=lessons[(i + k) % 2 * 3],
                                            seconds=1,
                                            request_id=new_id(),
                                        )
                                        for k in range(batch_size)
                                    ]
                                ),
                                timeout=10,
                            )
                        ok += 1
                    except grpc.aio.AioRpcError:
                        return

            tasks = [asyncio.create_task(writer(user, course_id)) for user in users]
            while ok < 60:
                child.assert_running()
                await asyncio.sleep(0.02)
            kill_9(child.process)  # with its workers, if any
            await asyncio.gather(*tasks)
            child.kill()

    connection = await asyncpg.connect(database)
    try:
        sums = await connection.fetch(
            "SELECT user_id, sum(time_spent_seconds) AS total FROM lesson_progress"
            " WHERE course_id = $1 GROUP BY user_id",
            uuid.UUID(course_id),
        )
        duplicates = await connection.fetch(
            "SELECT user_id, lesson_id, count(*) FROM progress_events"
            " WHERE course_id = $1 AND kind = 3 GROUP BY user_id, lesson_id HAVING count(*) <> 1",
            uuid.UUID(course_id),
        )
        completed = await connection.fetchval(
            "SELECT count(*) FROM lesson_progress WHERE course_id = $1 AND completed",
            uuid.UUID(course_id),
        )
        events = await connection.fetchval(
            "SELECT count(*) FROM progress_events WHERE course_id = $1 AND kind = 3",
            uuid.UUID(course_id),
        )
    finally:
        await connection.close()
    assert sums, "no write was applied before the kill"
    assert [r["total"] % batch_size for r in sums] == [0] * len(sums)  # whole batches only
    assert duplicates == []
    assert completed == events  # one COMPLETED event per completed lesson
    assert await consistency_problems(database, course_id) == []
