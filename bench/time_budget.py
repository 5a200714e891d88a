"""What the time budget costs on the heartbeat path: its statement against the one before it.

``python -m bench.time_budget [--rounds 3] [--seconds 4] [--before REV]`` migrates a fresh
database (``BENCH_DATABASE_URL``, else an embedded PostgreSQL), registers 20 courses of 20
lessons, then alternates phases of the two statements (before, after, before, after, ...)
so that the shared machine's drift hits both alike:

* lone heartbeats: statements of one heartbeat (30 s, with a request id), 4 connections in
  closed loop: RecordTime while a statement slot is free;
* merged heartbeats: statements of 100 independent heartbeats (100 learners, 30 s each,
  with request ids), 4 connections in closed loop: RecordTime calls merged under load;
* batches: BatchRecordTime statements of 500 entries of one new learner (an offline sync:
  30 s heartbeats 30 s apart, with request ids), 2 connections in closed loop.

Lone and merged heartbeats come from new learners (each heartbeat creates its learner's
clock row: the worst case) and from returning learners (2,000 per connection, each
heartbeat stamped 30 s after the same learner's previous one, so their clock rows exist and
their time never overlaps: the steady state of learners who keep watching).

"Before" is the heartbeat statement of the store at git revision ``REV`` (default: the
commit before migration 0007; the migrated schema still runs it, once the single-heartbeat
function of that revision, dropped by 0008, is created again from its migration).

Last, the same through the service: the service as it was at ``REV`` (extracted with ``git
archive``, started with ``--no-migrate``: it accepts the newer schema) and as it is, 16
RecordTime callers sending heartbeats of new learners, then 2 BatchRecordTime callers
sending offline syncs, phases interleaved the same way: the cost as a caller sees it (and
whatever else changed between the revisions). Prints heartbeats per second per phase and
the after/before ratio of the sums.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import asyncpg
import grpc

from bench.postgres import fresh_database
from bench.service import ServiceProcess
from lesson_progress import values
from lesson_progress.store import heartbeats
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc

BEFORE = "a769ec1^"
COURSES = 20
LESSONS = 20
#: Concurrent RecordTime callers of the gRPC phase (the harness's default concurrency).
GRPC_CALLERS = 16


def _at(revision: str, path: str) -> str:
    """The text of the repository's file ``path`` at git revision ``revision``."""
    return subprocess.run(
        ["git", "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def _before_module(revision: str) -> ModuleType:
    """The heartbeats module as it was at ``revision`` (its SQL constants only are used)."""
    source = _at(revision, "service/lesson_progress/store/heartbeats.py")
    module = ModuleType("heartbeats_before")
    sys.modules[module.__name__] = module  # for its dataclasses
    exec(compile(source, "heartbeats_before.py", "exec"), module.__dict__)
    return module


def _old_lone_function(revision: str) -> str:
    """The CREATE FUNCTION of the single-heartbeat function at ``revision``."""
    source = _at(revision, "migrations/0004_write_functions.sql")
    start = source.index("CREATE FUNCTION lp_record_time(")
    return source[start : source.index("$$;", start) + 3]


Beats = Callable[[], list[values.Heartbeat]]


def _new_learners(courses: list[str], count: int) -> Beats:
    """Statements of ``count`` heartbeats of new learners, 30 s each, stamped now."""

    def take() -> list[values.Heartbeat]:
        return [
            values.Heartbeat(
                str(uuid.uuid4()),
                courses[i % COURSES],
                f"l{i % LESSONS + 1}",
                30,
                str(uuid.uuid4()),
            )
            for i in range(count)
        ]

    return take


@dataclass
class _ReturningLearners:
    """Statements of ``count`` heartbeats of 2,000 learners taken in turn, each stamped 30 s
    after the same learner's previous one (starting six days back, within the retention)."""

    courses: list[str]
    count: int
    learners: list[str] = field(default_factory=lambda: [str(uuid.uuid4()) for _ in range(2000)])
    at: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(days=6))
    position: int = 0

    def __call__(self) -> list[values.Heartbeat]:
        beats = []
        for _ in range(self.count):
            if self.position == len(self.learners):
                self.position = 0
                self.at += timedelta(seconds=30)
            i = self.position
            self.position += 1
            beats.append(
                values.Heartbeat(
                    self.learners[i],
                    self.courses[i % COURSES],
                    f"l{i % LESSONS + 1}",
                    30,
                    str(uuid.uuid4()),
                    self.at,
                )
            )
        return beats


def _offline_sync(courses: list[str]) -> list[values.Heartbeat]:
    """500 heartbeats of a new learner, 30 s apart, a day ago."""
    user = str(uuid.uuid4())
    start = datetime.now(UTC) - timedelta(days=1)
    return [
        values.Heartbeat(
            user,
            courses[0],
            f"l{i % LESSONS + 1}",
            30,
            str(uuid.uuid4()),
            start + timedelta(seconds=30 * (i + 1)),
        )
        for i in range(500)
    ]


@dataclass(frozen=True)
class _Shape:
    name: str
    connections: int
    beats: Callable[[list[str]], Beats]
    """Per connection, what its statements send."""
    batch: bool = False


SHAPES = (
    _Shape("lone heartbeats, new learners", 4, lambda c: _new_learners(c, 1)),
    _Shape("lone heartbeats, returning learners", 4, lambda c: _ReturningLearners(c, 1)),
    _Shape("merged heartbeats (100), new learners", 4, lambda c: _new_learners(c, 100)),
    _Shape("merged heartbeats (100), returning learners", 4, lambda c: _ReturningLearners(c, 100)),
    _Shape("batches of 500 (offline sync)", 2, lambda c: lambda: _offline_sync(c), batch=True),
)


def _arguments(old: ModuleType | None, beats: list[values.Heartbeat], batch: bool) -> tuple:
    if len(beats) == 1:
        (h,) = beats
        if old is None:
            return (heartbeats.HEARTBEAT, *heartbeats.heartbeat_arguments(h, 300))
        return (old.RECORD_TIME, h.user_id, h.course_id, h.lesson_id, h.seconds, h.request_id)
    if old is None:  # merged: what RecordTime's writer sends for heartbeats it merged
        statement = heartbeats.HEARTBEATS if batch else heartbeats.MERGED_HEARTBEATS
        return (statement, *heartbeats.array_arguments(beats, 300))
    statement = old.BATCH_RECORD_TIME if batch else old.INDEPENDENT_HEARTBEATS
    return (
        statement,
        [b.user_id for b in beats],
        [b.course_id for b in beats],
        [b.lesson_id for b in beats],
        [b.seconds for b in beats],
        [b.request_id for b in beats],
    )


async def _phase(
    url: str, courses: list[str], old: ModuleType | None, shape: _Shape, seconds: float
) -> float:
    """Heartbeats per second of one phase of ``shape``."""
    connections = [await asyncpg.connect(url) for _ in range(shape.connections)]
    done = 0
    end = time.monotonic() + seconds

    async def worker(connection: asyncpg.Connection, beats: Beats) -> None:
        nonlocal done
        while time.monotonic() < end:
            sent = beats()
            statement, *arguments = _arguments(old, sent, shape.batch)
            async with connection.transaction():
                await connection.fetch(statement, *arguments)
            done += len(sent)

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker(c, shape.beats(courses)) for c in connections))
    finally:
        for connection in connections:
            await connection.close()
    return done / (time.monotonic() - started)


def _request(beat: values.Heartbeat) -> pb.RecordTimeRequest:
    request = pb.RecordTimeRequest(
        user_id=beat.user_id,
        course_id=beat.course_id,
        lesson_id=beat.lesson_id,
        seconds=beat.seconds,
        request_id=beat.request_id,
    )
    if beat.occurred_at is not None:
        request.occurred_at.FromDatetime(beat.occurred_at)
    return request


async def _grpc_phase(address: str, courses: list[str], seconds: float, batch: bool) -> float:
    """Heartbeats per second through gRPC: GRPC_CALLERS RecordTime callers, a new learner
    each, or 2 BatchRecordTime callers sending offline syncs of 500."""
    done = 0
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        progress = progress_service_pb2_grpc.ProgressServiceStub(channel)

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < end:
                if batch:
                    requests = [_request(b) for b in _offline_sync(courses)]
                    await progress.BatchRecordTime(pb.BatchRecordTimeRequest(requests=requests))
                    done += len(requests)
                else:
                    await progress.RecordTime(_request(_new_learners(courses, 1)()[0]))
                    done += 1

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(2 if batch else GRPC_CALLERS)))
    return done / (time.monotonic() - started)


def _extract(revision: str, into: Path) -> Path:
    """The service and its client stubs as they were at ``revision``, under ``into``."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "archive", revision, "service", "clients/python/src", "migrations"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


async def _through_grpc(
    url: str, courses: list[str], rounds: int, seconds: float, revision: str
) -> None:
    """Heartbeats through the service as it was at ``revision`` and as it is: the budget's
    cost as a caller sees it (and whatever else changed in between)."""
    with tempfile.TemporaryDirectory() as work:
        logs = Path(work)
        old = _extract(revision, logs / "before")
        servers = {
            "before": ServiceProcess(url, logs / "before.log", source=old),
            "after": ServiceProcess(url, logs / "after.log"),
        }
        try:
            for batch in (False, True):
                name = (
                    "BatchRecordTime through the service (2 callers, offline syncs of 500)"
                    if batch
                    else f"RecordTime through the service ({GRPC_CALLERS} callers, new learners)"
                )
                sums = {"before": 0.0, "after": 0.0}
                for round_ in range(rounds):
                    for label, server in servers.items():
                        rate = await _grpc_phase(server.address, courses, seconds, batch)
                        sums[label] += rate
                        print(f"{name}, round {round_ + 1}, {label}: {rate:,.0f} heartbeats/s")
                print(f"{name}: after/before = {sums['after'] / sums['before']:.2f}")
        finally:
            for server in servers.values():
                server.stop()


async def main(rounds: int, seconds: float, revision: str) -> None:
    old = _before_module(revision)
    async with fresh_database() as provisioned:
        connection = await asyncpg.connect(provisioned.url)
        courses = [str(uuid.uuid4()) for _ in range(COURSES)]
        for course in courses:
            await connection.execute(
                "INSERT INTO courses (course_id, title) VALUES ($1, 'c')", course
            )
            await connection.executemany(
                "INSERT INTO lessons (course_id, lesson_id, position) VALUES ($1, $2, $3)",
                [(course, f"l{i + 1}", i) for i in range(LESSONS)],
            )
        await connection.execute(_old_lone_function(revision))
        await connection.close()
        print(f"database: {provisioned.origin}")
        for shape in SHAPES:
            sums = {"before": 0.0, "after": 0.0}
            for round_ in range(rounds):
                for label, module in (("before", old), ("after", None)):
                    rate = await _phase(provisioned.url, courses, module, shape, seconds)
                    sums[label] += rate
                    print(f"{shape.name}, round {round_ + 1}, {label}: {rate:,.0f} heartbeats/s")
            print(f"{shape.name}: after/before = {sums['after'] / sums['before']:.2f}")
        await _through_grpc(provisioned.url, courses, rounds, seconds, revision)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--before", default=BEFORE, help="git revision of the old statement")
    options = parser.parse_args()
    asyncio.run(main(options.rounds, options.seconds, options.before))
