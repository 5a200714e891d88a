"""What the fault scenarios share: load that retries like a careful client, and checks of
what the database holds afterwards, computed from the database alone.

The server child process, free ports and environment come from ``tests.test_operations``
(``Serve``, ``free_port``), not copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import grpc
import psutil

from lesson_progress import migrate
from lesson_progress.config import Config
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc
from tests.faults.cluster import SERVICE_APPLICATION_NAME, Cluster
from tests.postgres import fresh_database_name

Code = grpc.StatusCode
CALL_TIMEOUT = 10.0  # the deadline of each call in the load (no fault lasts this long)
SETTLE_TIMEOUT = 60.0  # hang guard: how long unresolved writes may keep retrying at the end
# Codes after which a careful client resends the same request (same request id): the
# write was applied once or not at all, so resending until OK counts it exactly once.
# INTERNAL, UNKNOWN and CANCELLED are resent too, so that the sums stay checkable even
# while a defect makes them appear; whether they appear at all is asserted separately.
RESENT = frozenset(
    {
        Code.UNAVAILABLE,
        Code.ABORTED,
        Code.DEADLINE_EXCEEDED,
        Code.INTERNAL,
        Code.UNKNOWN,
        Code.CANCELLED,
        Code.RESOURCE_EXHAUSTED,
    }
)
RETRYABLE = frozenset({Code.OK, Code.UNAVAILABLE, Code.ABORTED})


def new_id() -> str:
    return str(uuid.uuid4())


def kill_9(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to a server child and, under ``--workers``, to its workers first (as when
    the container is killed); reaps the child."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for worker in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    if process.poll() is None:
        process.kill()
    process.wait()


async def create_database(cluster: Cluster) -> str:
    """A fresh database on ``cluster`` with every migration applied; returns its URL."""
    name = fresh_database_name()
    admin = await asyncpg.connect(cluster.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = cluster.database_url(name)
    connection = await asyncpg.connect(url)
    try:
        await migrate.migrate(connection, Config().migrations_dir)
    finally:
        await connection.close()
    return url


async def drop_database(cluster: Cluster, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(cluster.url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def terminate_service_backends(url: str) -> int:
    """``pg_terminate_backend`` of every connection the service holds; returns how many."""
    connection = await asyncpg.connect(url)
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1 AND pid <> pg_backend_pid()",
                SERVICE_APPLICATION_NAME,
            )
        )
    finally:
        await connection.close()


async def time_spent(url: str, course_id: str) -> dict[tuple[str, str], int]:
    """Stored seconds per (user, lesson) of a course, rows with 0 left out."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT user_id::text, lesson_id, time_spent_seconds FROM lesson_progress"
            " WHERE course_id = $1 AND time_spent_seconds > 0",
            uuid.UUID(course_id),
        )
    finally:
        await connection.close()
    return {(r["user_id"], r["lesson_id"]): r["time_spent_seconds"] for r in rows}


# Learners of a course whose course row disagrees with their lesson rows: the course
# row's completed-lessons list (none: empty) is not exactly their completed lesson rows.
CONSISTENCY_PROBLEMS = """
WITH learners AS (
    SELECT user_id FROM lesson_progress WHERE course_id = $1
    UNION
    SELECT user_id FROM course_progress WHERE course_id = $1
)
SELECT learners.user_id::text
FROM learners
WHERE (SELECT coalesce(array_agg(x ORDER BY x), '{}')
       FROM course_progress c, jsonb_array_elements_text(c.completed_lessons) AS x
       WHERE c.user_id = learners.user_id AND c.course_id = $1)
   <> (SELECT coalesce(array_agg(l.lesson_id::text ORDER BY l.lesson_id::text), '{}')
       FROM lesson_progress l
       WHERE l.user_id = learners.user_id AND l.course_id = $1 AND l.completed)
"""


async def consistency_problems(url: str, course_id: str) -> list[str]:
    """Learners of ``course_id`` whose course row disagrees with their lesson rows."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(CONSISTENCY_PROBLEMS, uuid.UUID(course_id))
    finally:
        await connection.close()
    return [r[0] for r in rows]


@dataclass
class Outcomes:
    """What a load saw: every status code (resends included) and what was acknowledged."""

    codes: Counter[Code] = field(default_factory=Counter)
    acknowledged: Counter[tuple[str, str]] = field(default_factory=Counter)
    unresolved: int = 0
    refused: list[str] = field(default_factory=list)

    def unexpected(self, allowed: frozenset[Code] = RETRYABLE) -> dict[str, int]:
        return {code.name: n for code, n in self.codes.items() if code not in allowed}


async def resend_until_ok(
    outcomes: Outcomes, call: Callable[[], Awaitable[object]], give_up: asyncio.Event
) -> bool:
    """Sends one logical write (``call`` reuses its request id) until it is OK; False if
    the write is still unresolved when ``give_up`` is set, or got a non-resendable code."""
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            outcomes.codes[exc.code()] += 1
            if exc.code() not in RESENT:
                outcomes.refused.append(f"{exc.code().name}: {exc.details()}")
                return False
            if give_up.is_set():
                outcomes.unresolved += 1
                return False
            await asyncio.sleep(0.05)
        else:
            outcomes.codes[Code.OK] += 1
            return True


async def heartbeat_writer(
    channel: grpc.aio.Channel,
    course_id: str,
    lessons: list[str],
    outcomes: Outcomes,
    stop: asyncio.Event,
    give_up: asyncio.Event,
) -> None:
    """One learner sending RecordTime and BatchRecordTime calls until ``stop``, each
    resent with its request id until OK; acknowledged seconds go to ``outcomes``."""
    stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
    user_id = new_id()
    rng = random.Random(user_id)
    while not stop.is_set():
        if rng.random() < 0.7:
            lesson, seconds = rng.choice(lessons), rng.randint(1, 9)
            request = pb.RecordTimeRequest(
                user_id=user_id, course_id=course_id, lesson_id=lesson,
                seconds=seconds, request_id=new_id(),
            )  # fmt: skip
            if await resend_until_ok(
                outcomes, lambda r=request: stub.RecordTime(r, timeout=CALL_TIMEOUT), give_up
            ):
                outcomes.acknowledged[(user_id, lesson)] += seconds
        else:
            entries = [
                pb.RecordTimeRequest(
                    user_id=user_id,
                    course_id=course_id,
                    lesson_id=rng.choice(lessons),
                    seconds=rng.randint(1, 9),
                    request_id=new_id(),
                )
                for _ in range(rng.randint(2, 6))
            ]
            batch = pb.BatchRecordTimeRequest(requests=entries)
            if await resend_until_ok(
                outcomes, lambda b=batch: stub.BatchRecordTime(b, timeout=CALL_TIMEOUT), give_up
            ):
                for entry in entries:
                    outcomes.acknowledged[(user_id, entry.lesson_id)] += entry.seconds


class Load:
    """``writers`` heartbeat writers on one course, started by ``async with``; leaving the
    block stops them, lets each finish (resend) its current write, and waits for them."""

    def __init__(
        self, channel: grpc.aio.Channel, course_id: str, lessons: list[str], writers: int
    ) -> None:
        self.outcomes = Outcomes()
        self._stop = asyncio.Event()
        self._give_up = asyncio.Event()
        self._tasks = [
            asyncio.create_task(
                heartbeat_writer(
                    channel, course_id, lessons, self.outcomes, self._stop, self._give_up
                )
            )
            for _ in range(writers)
        ]

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=SETTLE_TIMEOUT)
        if pending:
            self._give_up.set()
            await asyncio.gather(*pending)
        for task in done:
            task.result()

    async def wait_for_oks(self, count: int) -> None:
        """Until ``count`` more calls than now are OK (the service works again)."""
        wanted = self.outcomes.codes[Code.OK] + count

        async def enough() -> bool:
            return self.outcomes.codes[Code.OK] >= wanted

        await poll(enough, f"{count} more OK calls ({dict(self.outcomes.codes)})")


POLL_TIMEOUT = 30.0  # hang guard of a polled condition


async def poll(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls ``condition`` until it holds; fails naming ``what`` after POLL_TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_TIMEOUT
    while not await condition():
        assert loop.time() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.05)
