"""The typed client's heartbeat batching, against the real server.

Concurrent ``record_time`` calls through one client with ``HeartbeatBatching`` become fewer
BatchRecordTime calls (counted by an interceptor on the client's channel); each caller gets
its own row or its own error; a batch whose response is lost is resent with the same request
ids and each heartbeat counts once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from lesson_progress import server
from lesson_progress_client import (
    HeartbeatBatching,
    Lesson,
    LessonProgress,
    ProgressClient,
    ProgressError,
)
from tests.conftest import new_id
from tests.support import lost_response

HANG_GUARD = 60.0
BATCH = "/lessonprogress.v1.ProgressService/BatchRecordTime"
UNARY = "/lessonprogress.v1.ProgressService/RecordTime"


class CountCalls(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the calls of each method and the entries of each BatchRecordTime; can make
    the first BatchRecordTime's response 'lost' after the server committed it."""

    def __init__(self, lose_first_batch: bool = False) -> None:
        self.calls: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.lose_first_batch = lose_first_batch

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        self.calls[method] += 1
        call = await continuation(client_call_details, request)
        if method != BATCH:
            return call
        self.batch_sizes.append(len(request.requests))
        if self.lose_first_batch and self.calls[BATCH] == 1:
            await call  # the server has committed the batch
            raise lost_response()
        return call


@pytest.fixture
async def counter() -> CountCalls:
    return CountCalls()


@pytest.fixture
async def client(
    running_server: server.RunningServer, counter: CountCalls
) -> AsyncIterator[ProgressClient]:
    async with ProgressClient(
        f"127.0.0.1:{running_server.port}",
        timeout=HANG_GUARD,
        batching=HeartbeatBatching(linger=0.05, max_batch=16),
        interceptors=[counter],
    ) as client:
        yield client


async def course(client: ProgressClient, lessons: int = 2) -> list[str]:
    course_id = new_id()
    lesson_ids = [f"l{i + 1}" for i in range(lessons)]
    await client.upsert_course(
        course_id=course_id, lessons=[Lesson(lesson_id=lesson) for lesson in lesson_ids]
    )
    return [course_id, *lesson_ids]


async def settle(calls: list[Any]) -> list[LessonProgress | BaseException]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_concurrent_heartbeats_share_batches_and_each_caller_gets_its_own_row(
    client: ProgressClient, counter: CountCalls
) -> None:
    course_id, l1, l2 = await course(client)
    # 40 heartbeats: 20 learners, each on both lessons, each with its own seconds.
    beats = [
        (user, lesson, 1 + (index * 7 + offset) % 50)
        for index, user in enumerate(new_id() for _ in range(20))
        for offset, lesson in enumerate((l1, l2))
    ]
    results = await settle(
        [
            client.record_time(user_id=user, course_id=course_id, lesson_id=lesson, seconds=s)
            for user, lesson, s in beats
        ]
    )
    for (user, lesson, seconds), got in zip(beats, results, strict=True):
        assert isinstance(got, LessonProgress)
        assert (got.user_id, got.course_id, got.lesson_id) == (user, course_id, lesson)
        assert got.time_spent_seconds == seconds
    assert counter.calls[UNARY] == 0
    assert sum(counter.batch_sizes) == len(beats)
    assert 0 < counter.calls[BATCH] < len(beats)
    assert max(counter.batch_sizes) <= 16  # max_batch


async def test_a_bad_entry_fails_its_caller_only(
    client: ProgressClient, counter: CountCalls
) -> None:
    course_id, l1, _ = await course(client)
    good = [(new_id(), 3 + index) for index in range(6)]
    calls = [
        client.record_time(user_id=user, course_id=course_id, lesson_id=l1, seconds=s)
        for user, s in good
    ]
    calls.insert(2, client.record_time(user_id=new_id(), course_id=course_id, lesson_id=l1,
                                       seconds=0))  # fmt: skip
    calls.insert(5, client.record_time(user_id=new_id(), course_id=course_id,
                                       lesson_id="not-in-outline", seconds=5))  # fmt: skip
    results = await settle(calls)
    invalid, missing = results.pop(2), results.pop(4)
    assert isinstance(invalid, ProgressError)
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.fields == {"seconds"}  # the caller's own field, not requests[i].seconds
    assert isinstance(missing, ProgressError)
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert [(r.user_id, r.time_spent_seconds) for r in results] == good  # type: ignore[union-attr]
    assert counter.calls[BATCH] >= 2  # the refused batch, then the good ones again


async def test_a_batch_sent_twice_counts_each_heartbeat_once(
    running_server: server.RunningServer, database_url: str
) -> None:
    counter = CountCalls(lose_first_batch=True)
    async with ProgressClient(
        f"127.0.0.1:{running_server.port}",
        timeout=HANG_GUARD,
        batching=HeartbeatBatching(linger=0.05),
        interceptors=[counter],
    ) as client:
        course_id, l1, _ = await course(client)
        users = [new_id() for _ in range(5)]
        given = new_id()
        results = await settle(
            [
                client.record_time(
                    user_id=user,
                    course_id=course_id,
                    lesson_id=l1,
                    seconds=10 + index,
                    request_id=given if index == 0 else None,
                )
                for index, user in enumerate(users)
            ]
        )
    assert counter.calls[BATCH] == 2  # lost, then resent
    assert [r.time_spent_seconds for r in results] == [10, 11, 12, 13, 14]  # type: ignore[union-attr]
    connection = await asyncpg.connect(database_url)
    try:
        stored = await connection.fetch(
            "SELECT user_id::text, time_spent_seconds FROM lesson_progress WHERE course_id = $1",
            course_id,
        )
        ids = await connection.fetchval(
            "SELECT array_agg(request_id::text) FROM processed_requests WHERE course_id = $1",
            course_id,
        )
    finally:
        await connection.close()
    assert {row["user_id"]: row["time_spent_seconds"] for row in stored} == {
        user: 10 + index for index, user in enumerate(users)
    }
    assert len(set(ids)) == len(users)  # one generated (or given) id per logical call
    assert given in ids


async def test_each_callers_deadline_holds(
    running_server: server.RunningServer,
) -> None:
    """A heartbeat whose deadline is shorter than the linger fails with DEADLINE_EXCEEDED
    while the others, with time to spare, are written."""
    async with ProgressClient(
        f"127.0.0.1:{running_server.port}",
        timeout=HANG_GUARD,
        batching=HeartbeatBatching(linger=0.3),
    ) as client:
        course_id, l1, _ = await course(client)
        short, patient = new_id(), new_id()
        results = await settle(
            [
                client.record_time(
                    user_id=short, course_id=course_id, lesson_id=l1, seconds=4, timeout=0.05
                ),
                client.record_time(user_id=patient, course_id=course_id, lesson_id=l1, seconds=6),
            ]
        )
    assert isinstance(results[0], ProgressError)
    assert results[0].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(results[1], LessonProgress)
    assert results[1].time_spent_seconds == 6


def test_batching_settings_reject_nonsense() -> None:
    for bad in ({"linger": -0.001}, {"max_batch": 0}, {"max_batch": 1001}):
        with pytest.raises(ValueError, match=r"linger|max_batch"):
            HeartbeatBatching(**bad)  # type: ignore[arg-type]
