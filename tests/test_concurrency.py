"""The contract's "Concurrency" promise, through two real server processes.

Two ``lesson-progress serve`` processes share the session database. Hundreds of concurrent
writes for ONE learner in ONE course, split between them, must add up exactly: time is the
sum of the accepted seconds, attempts the number of accepted attempts (each with its own
history row), the completed lesson list has no duplicates and matches the completed rows,
and the percentage matches it. Every write carries a request_id, so a call that comes back
ABORTED (legal after the service's own retries) is retried here with the same id and
still counts once.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from lessonprogress.v1 import (
    catalog_service_pb2,
    catalog_service_pb2_grpc,
    progress_service_pb2,
    progress_service_pb2_grpc,
    resources_pb2,
)
from tests.support import GENEROUS_TIME_BUDGET, ServerProcess, free_port

CALL_TIMEOUT = 60.0  # seconds; only there so that a hung call fails instead of hanging
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
MAX_ABORTED_RETRIES = 20
CONCURRENCY = 64

LESSONS = [f"l{i}" for i in range(1, 9)]  # 8 lessons: 5 completed gives 62.5%, a half
PASSING = {"l2": 70, "l4": 70}  # completed by a passing attempt
COMPLETED_DIRECTLY = ["l1", "l3", "l5"]  # completed by CompleteLesson
ATTEMPTED = ["l2", "l4", "l6", "l7"]  # l6, l7 have no passing score


def round_half_up(value: Fraction) -> int:
    return int(value + Fraction(1, 2))


def replica(
    database_url: str, log_path: Path, extra: tuple[str, ...] = GENEROUS_TIME_BUDGET
) -> ServerProcess:
    """A server process on the database, on a port of its own, with ``extra`` flags."""
    port = free_port()
    flags = [
        "--database-url", database_url, "--port", str(port), "--no-migrate",
        "--host", "127.0.0.1",
        # Two replicas on one host cannot share the default metrics port (9464).
        "--metrics-port", "0",
        *extra,
    ]  # fmt: skip
    return ServerProcess(
        flags, log_path, f"127.0.0.1:{port}", start_timeout=START_TIMEOUT, stop_timeout=STOP_TIMEOUT
    )


@dataclass
class Server:
    """A started server process with stubs on a channel to it."""

    process: ServerProcess
    channel: grpc.aio.Channel
    catalog: catalog_service_pb2_grpc.CatalogServiceStub
    progress: progress_service_pb2_grpc.ProgressServiceStub


@pytest.fixture
async def servers(database_url: str, tmp_path: Path) -> AsyncIterator[list[Server]]:
    """Two server processes on the session database; asserts each stops with exit code 0."""
    processes = [replica(database_url, tmp_path / f"server{i}.log") for i in range(2)]
    channels: list[grpc.aio.Channel] = []
    try:
        for p in processes:
            await p.wait_ready()
        started = []
        for p in processes:
            channel = grpc.aio.insecure_channel(p.address)
            channels.append(channel)
            started.append(
                Server(
                    p,
                    channel,
                    catalog_service_pb2_grpc.CatalogServiceStub(channel),
                    progress_service_pb2_grpc.ProgressServiceStub(channel),
                )
            )
        yield started
        for channel in channels:
            await channel.close()
        channels.clear()
        codes = [await p.terminate() for p in processes]
        assert codes == [0, 0], "\n".join(p.log_tail() for p in processes)
    finally:
        for channel in channels:
            await channel.close()
        for p in processes:
            p.kill()


@dataclass
class Outcome:
    """What the test sent and saw, to compare the final state with."""

    seconds: dict[str, list[int]] = field(default_factory=dict)
    attempt_scores: dict[str, list[int]] = field(default_factory=dict)
    complete_scores: dict[str, list[int | None]] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    # Per lesson, the time total / attempt count each successful response reported.
    time_seen: dict[str, list[int]] = field(default_factory=dict)
    attempts_seen: dict[str, list[int]] = field(default_factory=dict)
    aborted: int = 0
    request_ids: int = 0


async def call(method: Callable[..., Awaitable[Any]], request: Any, outcome: Outcome) -> Any:
    """Calls ``method``; an ABORTED call is retried with the very same request."""
    for _ in range(MAX_ABORTED_RETRIES):
        try:
            return await method(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ABORTED:
                raise
            outcome.aborted += 1
            await asyncio.sleep(random.uniform(0.01, 0.05))
    raise AssertionError(f"still ABORTED after {MAX_ABORTED_RETRIES} tries: {request}")


async def register_course(server: Server) -> str:
    course_id = str(uuid.uuid4())
    await server.catalog.UpsertCourse(
        catalog_service_pb2.UpsertCourseRequest(
            course_id=course_id,
            title="concurrency",
            lessons=[
                resources_pb2.Lesson(
                    lesson_id=lesson_id,
                    title=lesson_id,
                    assessed=lesson_id in PASSING,
                    passing_score=PASSING.get(lesson_id),
                )
                for lesson_id in LESSONS
            ],
        ),
        timeout=CALL_TIMEOUT,
    )
    return course_id


def plan(user_id: str, course_id: str, rng: random.Random) -> list[tuple[str, Any]]:
    """~600 calls: StartLesson, RecordTime, RecordAttempt and CompleteLesson, shuffled."""
    calls: list[tuple[str, Any]] = []
    key = {"user_id": user_id, "course_id": course_id}

    def request_id() -> str:
        return str(uuid.uuid4())

    for _ in range(60):
        lesson_id = rng.choice(LESSONS)
        request = progress_service_pb2.StartLessonRequest(**key, lesson_id=lesson_id)
        calls.append(("StartLesson", request))
    for _ in range(240):
        calls.append(
            (
                "RecordTime",
                progress_service_pb2.RecordTimeRequest(
                    **key,
                    lesson_id=rng.choice(LESSONS),
                    seconds=rng.randint(1, 300),
                    request_id=request_id(),
                ),
            )
        )
    for _ in range(150):
        calls.append(
            (
                "RecordAttempt",
                progress_service_pb2.RecordAttemptRequest(
                    **key,
                    lesson_id=rng.choice(ATTEMPTED),
                    score=rng.randint(0, 100),
                    request_id=request_id(),
                ),
            )
        )
    for i in range(150):
        calls.append(
            (
                "CompleteLesson",
                progress_service_pb2.CompleteLessonRequest(
                    **key,
                    lesson_id=COMPLETED_DIRECTLY[i % len(COMPLETED_DIRECTLY)],
                    score=rng.randint(0, 100) if rng.random() < 0.5 else None,
                    request_id=request_id(),
                ),
            )
        )
    rng.shuffle(calls)
    return calls


async def run_calls(servers: list[Server], calls: list[tuple[str, Any]]) -> Outcome:
    """Sends every call, half to each server, at most CONCURRENCY at a time."""
    outcome = Outcome()
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int, method_name: str, request: Any) -> None:
        stub = servers[index % len(servers)].progress
        async with semaphore:
            response = await call(getattr(stub, method_name), request, outcome)
        lesson_id = request.lesson_id
        if method_name == "StartLesson":
            outcome.started.add(lesson_id)
        elif method_name == "RecordTime":
            outcome.seconds.setdefault(lesson_id, []).append(request.seconds)
            outcome.time_seen.setdefault(lesson_id, []).append(response.lesson.time_spent_seconds)
        elif method_name == "RecordAttempt":
            outcome.attempt_scores.setdefault(lesson_id, []).append(request.score)
            outcome.attempts_seen.setdefault(lesson_id, []).append(response.lesson.attempts)
        else:
            score = request.score if request.HasField("score") else None
            outcome.complete_scores.setdefault(lesson_id, []).append(score)
            assert response.lesson.completed
        if method_name != "StartLesson":
            outcome.request_ids += 1

    await asyncio.gather(*(one(i, name, request) for i, (name, request) in enumerate(calls)))
    return outcome


async def test_concurrent_writes_through_two_servers_add_up(
    servers: list[Server], db: asyncpg.Pool
) -> None:
    course_id = await register_course(servers[0])
    user_id = str(uuid.uuid4())
    rng = random.Random(20251102)
    calls = plan(user_id, course_id, rng)
    assert len(calls) == 600

    outcome = await run_calls(servers, calls)

    # What the final state must be, computed from what was sent.
    touched = (
        outcome.started
        | set(outcome.seconds)
        | set(outcome.attempt_scores)
        | set(outcome.complete_scores)
    )
    passed_by_attempt = {
        lesson_id
        for lesson_id, scores in outcome.attempt_scores.items()
        if lesson_id in PASSING and max(scores) >= PASSING[lesson_id]
    }
    assert passed_by_attempt == set(PASSING), "the seed should pass both assessed lessons"
    completed = set(outcome.complete_scores) | passed_by_attempt
    completed_in_order = [lesson_id for lesson_id in LESSONS if lesson_id in completed]
    total_seconds = sum(sum(s) for s in outcome.seconds.values())

    def best_score(lesson_id: str) -> int | None:
        scores = [s for s in outcome.complete_scores.get(lesson_id, []) if s is not None]
        scores += outcome.attempt_scores.get(lesson_id, [])
        return max(scores) if scores else None

    # Each lesson row, as both servers report it.
    for server in servers:
        for lesson_id in LESSONS:
            request = progress_service_pb2.GetLessonProgressRequest(
                user_id=user_id, course_id=course_id, lesson_id=lesson_id
            )
            if lesson_id not in touched:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await server.progress.GetLessonProgress(request, timeout=CALL_TIMEOUT)
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND
                continue
            lesson = (await server.progress.GetLessonProgress(request, timeout=CALL_TIMEOUT)).lesson
            assert lesson.time_spent_seconds == sum(outcome.seconds.get(lesson_id, [])), lesson_id
            assert lesson.attempts == len(outcome.attempt_scores.get(lesson_id, [])), lesson_id
            assert lesson.completed == (lesson_id in completed), lesson_id
            assert lesson.HasField("completed_at") == (lesson_id in completed), lesson_id
            expected_score = best_score(lesson_id)
            assert lesson.HasField("score") == (expected_score is not None), lesson_id
            if expected_score is not None:
                assert lesson.score == expected_score, lesson_id

    # Every response showed a state that includes its own write and nothing beyond the end
    # state; the last write of each lesson saw the final count. (Concurrent heartbeats may
    # be merged into one statement, so two responses can show the same total.)
    for lesson_id, seen in outcome.attempts_seen.items():
        assert all(1 <= n <= len(seen) for n in seen), lesson_id
        assert max(seen) == len(seen), lesson_id
    for lesson_id, seen in outcome.time_seen.items():
        total = sum(outcome.seconds[lesson_id])
        assert all(
            own <= shown <= total
            for own, shown in zip(outcome.seconds[lesson_id], seen, strict=True)
        ), lesson_id
        assert max(seen) == total, lesson_id

    # The course, as both servers report it.
    for server in servers:
        course = (
            await server.progress.GetCourseProgress(
                progress_service_pb2.GetCourseProgressRequest(user_id=user_id, course_id=course_id),
                timeout=CALL_TIMEOUT,
            )
        ).course
        assert list(course.completed_lesson_ids) == completed_in_order
        assert course.completed_lessons == len(completed_in_order)
        assert course.total_lessons == len(LESSONS)
        assert course.progress_percentage == round_half_up(
            Fraction(100 * len(completed_in_order), len(LESSONS))
        )
        assert course.total_time_spent_seconds == total_seconds
        assert not course.HasField("completed_at")  # 5 of 8 lessons

    # The rows behind them.
    user = uuid.UUID(user_id)
    course_uuid = uuid.UUID(course_id)
    rows = await db.fetch(
        "SELECT lesson_id, completed, attempts FROM lesson_progress "
        "WHERE user_id = $1 AND course_id = $2",
        user,
        course_uuid,
    )
    assert {r["lesson_id"] for r in rows} == touched
    assert {r["lesson_id"] for r in rows if r["completed"]} == completed
    for row in rows:
        history = await db.fetch(
            "SELECT attempt_number, score FROM lesson_attempts "
            "WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3 ORDER BY attempt_number",
            user,
            course_uuid,
            row["lesson_id"],
        )
        assert len(history) == row["attempts"], row["lesson_id"]
        assert [h["attempt_number"] for h in history] == list(range(1, row["attempts"] + 1))
        assert sorted(h["score"] for h in history) == sorted(
            outcome.attempt_scores.get(row["lesson_id"], [])
        )
    stored_list = json.loads(
        await db.fetchval(
            "SELECT completed_lessons FROM course_progress WHERE user_id = $1 AND course_id = $2",
            user,
            course_uuid,
        )
    )
    assert len(stored_list) == len(set(stored_list)), stored_list
    assert set(stored_list) == completed
    remembered = await db.fetchval(
        "SELECT count(*) FROM processed_requests WHERE user_id = $1", user
    )
    assert remembered == outcome.request_ids
    print(f"\n{outcome.aborted} calls came back ABORTED and were retried")


async def test_retry_storm_counts_once(servers: list[Server], db: asyncpg.Pool) -> None:
    course_id = await register_course(servers[0])
    user_id = str(uuid.uuid4())
    key = {"user_id": user_id, "course_id": course_id}
    outcome = Outcome()
    copies = 20  # to each server

    async def storm(method_name: str, request: Any) -> list[Any]:
        return await asyncio.gather(
            *(
                call(getattr(server.progress, method_name), request, outcome)
                for _ in range(copies)
                for server in servers
            )
        )

    time_request = progress_service_pb2.RecordTimeRequest(
        **key, lesson_id="l8", seconds=37, request_id=str(uuid.uuid4())
    )
    attempt_request = progress_service_pb2.RecordAttemptRequest(
        **key, lesson_id="l6", score=55, request_id=str(uuid.uuid4())
    )
    complete_request = progress_service_pb2.CompleteLessonRequest(
        **key, lesson_id="l1", score=90, request_id=str(uuid.uuid4())
    )
    time_responses, attempt_responses, complete_responses = await asyncio.gather(
        storm("RecordTime", time_request),
        storm("RecordAttempt", attempt_request),
        storm("CompleteLesson", complete_request),
    )

    assert len(time_responses) == 2 * copies
    assert {r.lesson.time_spent_seconds for r in time_responses} == {37}
    assert {r.lesson.attempts for r in attempt_responses} == {1}
    assert {r.lesson.score for r in attempt_responses} == {55}
    assert all(r.lesson.completed and r.lesson.score == 90 for r in complete_responses)

    course = (
        await servers[1].progress.GetCourseProgress(
            progress_service_pb2.GetCourseProgressRequest(**key), timeout=CALL_TIMEOUT
        )
    ).course
    assert list(course.completed_lesson_ids) == ["l1"]
    assert course.total_time_spent_seconds == 37
    # round-half-up(100 * 1 / 8) = round-half-up(12.5) = 13
    assert course.progress_percentage == 13

    user = uuid.UUID(user_id)
    assert await db.fetchval("SELECT count(*) FROM lesson_attempts WHERE user_id = $1", user) == 1
    assert (
        await db.fetchval("SELECT count(*) FROM processed_requests WHERE user_id = $1", user) == 3
    )
    stored = json.loads(
        await db.fetchval("SELECT completed_lessons FROM course_progress WHERE user_id = $1", user)
    )
    assert stored == ["l1"]

    # A later retry, after the storm, still changes nothing.
    again = await call(servers[0].progress.RecordTime, time_request, outcome)
    assert again.lesson.time_spent_seconds == 37
