"""``serve --workers N``: real supervisor and worker processes on one port.

The workers are found as the supervisor's child processes listening on the gRPC port
(psutil reads /proc); which worker served a connection is read the same way, from the
established connections each worker holds. Metrics are compared with the calls made,
connections with pg_stat_activity, both counted here. Timeouts are hang guards only.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import psutil

from lesson_progress.store.database import APPLICATION_NAME
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc
from tests.errors import error_info
from tests.test_operations import POLL_TIMEOUT, Serve, upsert_course

Code = grpc.StatusCode
CALL_TIMEOUT = 10.0
GRACE = 3  # seconds of shutdown grace
EXIT_SLACK = 20.0  # seconds past the grace the group may take to exit (hang guard)


def listening_workers(served: Serve) -> set[int]:
    """Pids of the supervisor's children that listen on the gRPC port."""
    pids = set()
    for child in psutil.Process(served.process.pid).children():
        try:
            connections = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == served.port
               for c in connections):  # fmt: skip
            pids.add(child.pid)
    return pids


def serving_workers(served: Serve) -> set[int]:
    """Pids of the workers that hold an accepted client connection on the gRPC port."""
    pids = set()
    for pid in listening_workers(served):
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == served.port
               for c in connections):  # fmt: skip
            pids.add(pid)
    return pids


async def wait_for_workers(
    served: Serve, count: int, other_than: set[int] = frozenset()
) -> set[int]:  # type: ignore[assignment]
    """Polls until ``count`` workers (none of ``other_than``) listen; returns their pids."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_TIMEOUT
    while True:
        served.assert_running()
        pids = listening_workers(served)
        if len(pids) == count and not pids & other_than:
            return pids
        assert loop.time() < deadline, f"workers {pids}:\n{served.log_tail()}"
        await asyncio.sleep(0.1)


def new_channel(served: Serve) -> grpc.aio.Channel:
    """A channel with a connection of its own (not shared with other channels)."""
    return grpc.aio.insecure_channel(
        served.address, options=[("grpc.use_local_subchannel_pool", 1)]
    )


def heartbeat(course_id: str, user_id: str) -> pb.RecordTimeRequest:
    return pb.RecordTimeRequest(
        user_id=user_id,
        course_id=course_id,
        lesson_id="l1",
        seconds=1,
        request_id=str(uuid.uuid4()),
    )


async def service_connections(url: str) -> int:
    """The service's connections to the test's database, by application_name."""
    connection = await asyncpg.connect(url)
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND datname = current_database()",
                APPLICATION_NAME,
            )
        )
    finally:
        await connection.close()


async def test_two_workers_serve_one_port_with_divided_pools_and_added_up_metrics(
    tmp_path: Path, fresh_url: str
) -> None:
    pool_size, stream_connections, workers = 4, 2, 2
    # The database is empty: the supervisor migrates it once (a later flag wins).
    with Serve(
        tmp_path, fresh_url, "--workers", str(workers), "--migrate",
        "--pool-size", str(pool_size), "--stream-connections", str(stream_connections),
    ) as served:  # fmt: skip
        await served.wait_health()
        pids = await wait_for_workers(served, workers)
        assert served.log().count("applying migration 0001") == 1, served.log_tail()

        calls = 0
        channels: list[grpc.aio.Channel] = []
        try:
            async with served.channel() as first:
                course_id = await upsert_course(first)
            # New connections until each worker has accepted one (the kernel picks).
            while serving_workers(served) != pids:
                assert len(channels) < 64, (pids, serving_workers(served))
                channel = new_channel(served)
                channels.append(channel)
                stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
                await stub.RecordTime(heartbeat(course_id, str(uuid.uuid4())), timeout=CALL_TIMEOUT)
                calls += 1

            # Concurrent load on every connection; the pools fill up to their shares.
            most = 0
            load_done = asyncio.Event()

            async def sample() -> None:
                nonlocal most
                while not load_done.is_set():
                    most = max(most, await service_connections(fresh_url))
                    await asyncio.sleep(0.05)

            async def caller(channel: grpc.aio.Channel) -> int:
                stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
                user = str(uuid.uuid4())
                for _ in range(15):
                    await stub.RecordTime(heartbeat(course_id, user), timeout=CALL_TIMEOUT)
                return 15

            sampler = asyncio.create_task(sample())
            done = await asyncio.gather(*(caller(c) for c in channels for _ in range(8)))
            load_done.set()
            await sampler
            calls += sum(done)
        finally:
            for channel in channels:
                await channel.close()

        samples = await served.scrape()
        counted = Counter(
            {(s.labels["method"], s.labels["code"]): s.value
             for s in samples["lesson_progress_rpc_requests_total"]}
        )  # fmt: skip
        assert counted == {
            ("/lessonprogress.v1.CatalogService/UpsertCourse", "OK"): 1,
            ("/lessonprogress.v1.ProgressService/RecordTime", "OK"): calls,
        }
        (max_size,) = samples["lesson_progress_db_pool_max_size"]
        assert max_size.value == pool_size  # the workers' shares add up to the setting
        # Each worker: its pool share, its stream share, a health and a LISTEN connection.
        assert 0 < most <= pool_size + stream_connections + 2 * workers, most

        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()
        assert not any(psutil.pid_exists(pid) for pid in pids)  # the supervisor reaped them


async def test_a_killed_worker_is_replaced_and_sigterm_refuses_only_with_unavailable(
    tmp_path: Path, fresh_url: str
) -> None:
    with Serve(
        tmp_path, fresh_url, "--workers", "2", "--migrate", "--shutdown-grace", f"{GRACE}s"
    ) as served:  # fmt: skip
        await served.wait_health()
        pids = await wait_for_workers(served, 2)
        async with served.channel() as first:
            course_id = await upsert_course(first)

        seen: Counter[str] = Counter()
        stop = asyncio.Event()

        async def caller() -> None:
            # A careful client: a channel of its own, resending on UNAVAILABLE after a
            # back-off (as the typed client does), each call with a fresh request id.
            async with new_channel(served) as channel:
                stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
                user = str(uuid.uuid4())
                while not stop.is_set():
                    try:
                        await stub.RecordTime(
                            heartbeat(course_id, user), timeout=GRACE + EXIT_SLACK
                        )
                        seen["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != Code.UNAVAILABLE:
                            seen[exc.code().name] += 1
                        elif any(k == "grpc-status-details-bin"
                                 for k, _ in exc.trailing_metadata() or ()):  # fmt: skip
                            seen[f"UNAVAILABLE {error_info(exc).reason}"] += 1
                        else:  # no server behind the connection (killed, or gone)
                            seen["UNAVAILABLE no server"] += 1
                        await asyncio.sleep(0.2)

        async def oks(count: int) -> None:
            wanted = seen["OK"] + count
            loop = asyncio.get_running_loop()
            deadline = loop.time() + POLL_TIMEOUT
            while seen["OK"] < wanted:
                served.assert_running()
                assert loop.time() < deadline, (dict(seen), served.log_tail())
                await asyncio.sleep(0.05)

        callers = [asyncio.create_task(caller()) for _ in range(12)]
        try:
            await oks(100)
            victim = min(pids)
            psutil.Process(victim).kill()
            replaced = await wait_for_workers(served, 2, other_than={victim})
            assert pids - {victim} <= replaced
            await oks(100)  # calls go on through the survivor and the replacement
            assert "replacing it in" in served.log()

            served.send(signal.SIGTERM)
            code = await asyncio.to_thread(served.process.wait, GRACE + EXIT_SLACK)
        finally:
            stop.set()
            await asyncio.gather(*callers)
        assert code == 0, served.log_tail()
        assert set(seen) <= {"OK", "UNAVAILABLE SHUTTING_DOWN", "UNAVAILABLE no server"}, dict(seen)


async def test_a_worker_that_cannot_start_stops_the_group(tmp_path: Path, fresh_url: str) -> None:
    # Not migrated and told not to migrate: every worker refuses to start.
    with Serve(tmp_path, fresh_url, "--workers", "2", metrics=False) as served:
        code = await served.wait_exit()
        assert code == 1, served.log_tail()
        assert "no lesson-progress schema" in served.log()
        assert "before serving, 3 times in a row" in served.log()
