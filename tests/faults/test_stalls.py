"""PostgreSQL stalled (SIGSTOP to every one of its processes), stopped, or holding a row
lock, and readers that stop reading: what callers see, and what is written afterwards."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lessonprogress.v1 import analytics_service_pb2 as apb
from lessonprogress.v1 import analytics_service_pb2_grpc, progress_service_pb2_grpc
from lessonprogress.v1 import progress_service_pb2 as pb
from tests.faults.cluster import SERVICE_APPLICATION_NAME, Cluster
from tests.faults.conftest import ServeFactory
from tests.faults.support import new_id, poll
from tests.test_operations import NOT_SERVING, SERVING, Serve, upsert_course

pytestmark = pytest.mark.postgres_only("the fault suite controls its own PostgreSQL processes")

Code = grpc.StatusCode
SHORT_DEADLINE = 1.0  # seconds: deadline of calls made while the database cannot answer
GRACE = 2  # seconds of shutdown grace for the shutdown scenarios
EXIT_SLACK = 8.0  # seconds beyond the grace a stopping process may take (hang guard)


async def health(serve: Serve) -> int:
    async with serve.channel() as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(response.status)


async def wait_health(serve: Serve, wanted: int) -> None:
    async def reached() -> bool:
        return await health(serve) == wanted

    await poll(reached, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)}")


def record_time(user_id: str, course_id: str, seconds: int = 5) -> pb.RecordTimeRequest:
    return pb.RecordTimeRequest(
        user_id=user_id, course_id=course_id, lesson_id="l1", seconds=seconds,
        request_id=new_id(),
    )  # fmt: skip


async def code_of(call: object) -> Code:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def stored_seconds(url: str, user_ids: list[str]) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(
            await connection.fetchval(
                "SELECT coalesce(sum(time_spent_seconds), 0) FROM lesson_progress"
                " WHERE user_id = ANY($1::uuid[])",
                [uuid.UUID(u) for u in user_ids],
            )
        )
    finally:
        await connection.close()


async def service_idle(url: str) -> bool:
    """No statement of the service is running (nothing left to apply)."""
    connection = await asyncpg.connect(url)
    try:
        return not await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND state NOT IN ('idle')",
            SERVICE_APPLICATION_NAME,
        )
    finally:
        await connection.close()


async def test_stalled_database_calls_end_at_their_deadline_and_health_follows(
    serve: ServeFactory, cluster: Cluster
) -> None:
    child = serve()
    await child.wait_health()
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        cluster.stall()
        try:
            codes = Counter(
                await asyncio.gather(
                    *(
                        code_of(stub.RecordTime(record_time(new_id(), course_id),
                                                timeout=SHORT_DEADLINE))
                        for _ in range(20)
                    )
                )
            )  # fmt: skip
            assert set(codes) <= {Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE}, codes
            await wait_health(child, NOT_SERVING)
        finally:
            cluster.resume()
        await wait_health(child, SERVING)
        await stub.RecordTime(record_time(new_id(), course_id), timeout=30)
    child.assert_running()


async def test_no_write_of_an_ended_call_is_applied_after_the_database_resumes(
    serve: ServeFactory, cluster: Cluster, database: str
) -> None:
    child = serve()
    await child.wait_health()
    users = [new_id() for _ in range(30)]
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        cluster.stall()
        try:
            codes = Counter(
                await asyncio.gather(
                    *(
                        code_of(stub.RecordTime(record_time(user, course_id),
                                                timeout=SHORT_DEADLINE))
                        for user in users
                    )
                )
            )  # fmt: skip
        finally:
            cluster.resume()
        assert Code.OK not in codes, codes
        # The service works again, and has nothing left running.
        await stub.RecordTime(record_time(new_id(), course_id), timeout=30)
        await poll(lambda: service_idle(database), "the service's statements to finish")
    assert await stored_seconds(database, users) == 0


async def test_health_follows_the_first_failed_and_succeeding_database_call(
    serve: ServeFactory, cluster: Cluster
) -> None:
    # The periodic check never comes round in this test: only calls can move health.
    child = serve(env={"LESSON_PROGRESS_HEALTH_INTERVAL": "1h"})
    await child.wait_health()
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        await asyncio.to_thread(cluster.stop, "fast")
        try:
            code = await code_of(stub.RecordTime(record_time(new_id(), course_id), timeout=10))
            assert code == Code.UNAVAILABLE
            assert await health(child) == NOT_SERVING
        finally:
            await asyncio.to_thread(cluster.start)

        async def serving_again() -> bool:
            code = await code_of(stub.RecordTime(record_time(new_id(), course_id), timeout=10))
            return code == Code.OK

        await poll(serving_again, "a call that succeeds again")
        assert await health(child) == SERVING


async def test_shutdown_while_the_database_is_stalled_exits_within_the_grace(
    serve: ServeFactory, cluster: Cluster
) -> None:
    child = serve("--shutdown-grace", f"{GRACE}s")
    await child.wait_health()
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        cluster.stall()
        try:
            pending = [
                asyncio.ensure_future(
                    code_of(stub.RecordTime(record_time(new_id(), course_id), timeout=30))
                )
                for _ in range(4)
            ]
            await asyncio.sleep(0.5)  # the calls reach the stalled database
            child.send(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(child.process.wait, GRACE + EXIT_SLACK)
            except subprocess.TimeoutExpired:
                code = None
            for call in pending:
                call.cancel()
        finally:
            cluster.resume()
    assert code == 0, f"exit code {code} (None: still running):\n{child.log_tail()}"


async def test_one_locked_row_does_not_stall_heartbeats_on_other_rows(
    serve: ServeFactory, database: str
) -> None:
    child = serve("--pool-size", "4")
    await child.wait_health()
    locked_user = new_id()
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        await stub.RecordTime(record_time(locked_user, course_id), timeout=30)
        holder = await asyncpg.connect(database)
        others: Counter[Code] = Counter()
        stop = asyncio.Event()

        async def on_the_locked_row() -> None:
            while not stop.is_set():
                await code_of(stub.RecordTime(record_time(locked_user, course_id), timeout=2))

        async def on_another_row() -> None:
            user = new_id()
            while not stop.is_set():
                others[await code_of(stub.RecordTime(record_time(user, course_id), timeout=2))] += 1

        try:
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM lesson_progress WHERE user_id = $1 FOR UPDATE",
                    uuid.UUID(locked_user),
                )
                tasks = [asyncio.create_task(on_the_locked_row()) for _ in range(4)]
                tasks += [asyncio.create_task(on_another_row()) for _ in range(12)]
                await asyncio.sleep(6)  # the lock is held this long
                stop.set()
                await asyncio.gather(*tasks)
        finally:
            await holder.close()
    assert set(others) == {Code.OK}, dict(others)


async def seed_learners(url: str, course_id: str, learners: int) -> None:
    """``learners`` learners with a lesson row each on lesson l1, straight into the table."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "INSERT INTO lesson_progress (user_id, course_id, lesson_id, time_spent_seconds)"
            " SELECT gen_random_uuid(), $1, 'l1', 1 FROM generate_series(1, $2)",
            uuid.UUID(course_id),
            learners,
        )
    finally:
        await connection.close()


async def test_stalled_stream_readers_do_not_starve_unary_calls(
    serve: ServeFactory, database: str
) -> None:
    pool_size = 3
    child = serve("--pool-size", str(pool_size))
    await child.wait_health()
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        await seed_learners(database, course_id, 60_000)
        analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)
        progress = progress_service_pb2_grpc.ProgressServiceStub(channel)
        streams = [
            analytics.StreamCourseLearners(
                apb.StreamCourseLearnersRequest(course_id=course_id, page_size=100), timeout=30
            )
            for _ in range(pool_size + 2)
        ]
        try:
            for stream in streams[:pool_size]:
                await stream.read()  # one message: the stream runs, then nobody reads
            await asyncio.sleep(1)  # the server fills the flow-control window and waits
            codes = Counter(
                [
                    await code_of(progress.RecordTime(record_time(new_id(), course_id),
                                                      timeout=3))
                    for _ in range(5)
                ]
            )  # fmt: skip
            status = await health(child)
        finally:
            for stream in streams:
                stream.cancel()
    assert (dict(codes), status) == ({Code.OK: 5}, SERVING)


async def test_a_reader_that_stops_reading_is_ended_and_its_transaction_released(
    serve: ServeFactory, database: str
) -> None:
    child = serve("--stream-idle-timeout", "1s")
    await child.wait_health()
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        await seed_learners(database, course_id, 60_000)
        analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)
        stream = analytics.StreamCourseLearners(
            apb.StreamCourseLearnersRequest(course_id=course_id, page_size=100), timeout=60
        )
        await stream.read()  # the stream runs; then nobody reads
        await poll(lambda: no_open_transaction(database), "the stream's transaction to end")
        stream.cancel()


async def no_open_transaction(url: str) -> bool:
    """No connection of the service is inside a transaction."""
    connection = await asyncpg.connect(url)
    try:
        return not await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND xact_start IS NOT NULL",
            SERVICE_APPLICATION_NAME,
        )
    finally:
        await connection.close()


def resident_kib(pid: int) -> int:
    """The process's resident memory (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def test_memory_stays_bounded_while_the_database_is_stalled(
    serve: ServeFactory, cluster: Cluster
) -> None:
    callers = 48  # concurrent callers, each sending as soon as its previous call ended
    child = serve()
    await child.wait_health()
    async with child.channel() as channel:
        course_id = await upsert_course(channel)
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        phase = {"stop": False}
        ended: Counter[Code] = Counter()

        async def caller(index: int) -> None:
            user = new_id()
            while not phase["stop"]:
                if index % 4:
                    call = stub.RecordTime(record_time(user, course_id), timeout=0.5)
                else:  # a batch of 100 heartbeats: more held per waiting call
                    batch = pb.BatchRecordTimeRequest(
                        requests=[record_time(user, course_id, 1) for _ in range(100)]
                    )
                    call = stub.BatchRecordTime(batch, timeout=0.5)
                ended[await code_of(call)] += 1

        async def load_for(seconds: float) -> None:
            phase["stop"] = False
            tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
            await asyncio.sleep(seconds)
            phase["stop"] = True
            await asyncio.gather(*tasks)

        await load_for(3.0)  # warm: plans, pool, buffers
        before = resident_kib(child.process.pid)
        peak = before
        cluster.stall()
        try:
            load = asyncio.create_task(load_for(8.0))
            while not load.done():
                peak = max(peak, resident_kib(child.process.pid))
                await asyncio.sleep(0.2)
            await load
        finally:
            cluster.resume()
        await wait_health(child, SERVING)
        await load_for(2.0)
        after = resident_kib(child.process.pid)
    child.assert_running()
    assert ended[Code.DEADLINE_EXCEEDED] + ended[Code.UNAVAILABLE] > callers, ended
    # Calls held during the stall are let go: no growth beyond a bounded factor.
    assert peak < 2 * before, (before, peak, after)
    assert after < 2 * before, (before, peak, after)
