"""RecordTime calls merged into shared statements behave exactly like solo calls."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter

import grpc
import pytest

from lesson_progress import server
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc
from tests.conftest import new_id, server_config
from tests.errors import bad_fields, error_info


@pytest.fixture(scope="module")
async def narrow_progress(database_url: str):
    """A server with a single heartbeat statement slot, so concurrent calls must merge."""
    running = await server.start(server_config(database_url, pool_size=2))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield progress_service_pb2_grpc.ProgressServiceStub(channel)
    await running.stop(grace=1)


async def test_merged_heartbeats_get_their_own_outcomes(make_course, narrow_progress) -> None:
    course = await make_course(3)
    rng = random.Random(7)
    users = [new_id() for _ in range(5)]
    expected: Counter[tuple[str, str]] = Counter()
    calls = []
    kinds = []
    for _ in range(300):
        user, lesson, seconds = (
            rng.choice(users),
            rng.choice(course.lesson_ids),
            rng.randint(1, 300),
        )
        roll = rng.random()
        if roll < 0.1:  # a lesson outside the outline: only this call fails
            calls.append(pb.RecordTimeRequest(
                user_id=user, course_id=course.course_id, lesson_id="nope", seconds=seconds
            ))  # fmt: skip
            kinds.append("missing")
            continue
        calls.append(pb.RecordTimeRequest(
            user_id=user, course_id=course.course_id, lesson_id=lesson, seconds=seconds,
            request_id=str(uuid.uuid4()),
        ))  # fmt: skip
        kinds.append("ok")
        expected[(user, lesson)] += seconds
    # Retries of some accepted calls, sent concurrently with the originals: counted once.
    retries = [c for c, k in zip(calls, kinds, strict=True) if k == "ok"][:40]

    results = await asyncio.gather(
        *(narrow_progress.RecordTime(c) for c in [*calls, *retries]), return_exceptions=True
    )
    for kind, result in zip([*kinds, *["ok"] * len(retries)], results, strict=True):
        if kind == "missing":
            assert isinstance(result, grpc.aio.AioRpcError)
            assert result.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(result).reason == "LESSON_NOT_FOUND"
        else:
            assert isinstance(result, pb.RecordTimeResponse), result

    for (user, lesson), total in expected.items():
        got = await narrow_progress.GetLessonProgress(
            pb.GetLessonProgressRequest(user_id=user, course_id=course.course_id, lesson_id=lesson)
        )
        assert got.lesson.time_spent_seconds == total


async def test_merged_request_id_reuse_fails_only_that_call(make_course, narrow_progress) -> None:
    course = await make_course(2)
    user = new_id()
    request_id = str(uuid.uuid4())
    first = pb.RecordTimeRequest(
        user_id=user, course_id=course.course_id, lesson_id="l1", seconds=10, request_id=request_id
    )
    await narrow_progress.RecordTime(first)
    reuse = pb.RecordTimeRequest(
        user_id=user, course_id=course.course_id, lesson_id="l2", seconds=10, request_id=request_id
    )
    fresh = [
        pb.RecordTimeRequest(user_id=user, course_id=course.course_id, lesson_id="l2", seconds=1)
        for _ in range(30)
    ]
    results = await asyncio.gather(
        *(narrow_progress.RecordTime(c) for c in [*fresh, reuse]), return_exceptions=True
    )
    assert all(isinstance(r, pb.RecordTimeResponse) for r in results[:-1])
    assert isinstance(results[-1], grpc.aio.AioRpcError)
    assert bad_fields(results[-1]) == {"request_id"}
    got = await narrow_progress.GetLessonProgress(
        pb.GetLessonProgressRequest(user_id=user, course_id=course.course_id, lesson_id="l2")
    )
    assert got.lesson.time_spent_seconds == 30


@pytest.mark.postgres_only(
    "Citus does not pass lock_timeout on to the workers, where the row locks are waited "
    "for: there the caller's deadline bounds the wait (docs/citus.md)"
)
async def test_a_locked_row_delays_only_the_heartbeats_on_it(
    make_course, narrow_progress, db
) -> None:
    """A heartbeat waits for a row lock only briefly (LOCK_WAIT, the writer's functions' own
    setting: migration 0010), then steps aside and tries again alone: with one statement
    slot, heartbeats on a row held for long would otherwise keep everyone else's waiting
    behind them."""
    course = await make_course(1)
    held, lesson = new_id(), course.lesson_ids[0]

    def beat(user: str) -> pb.RecordTimeRequest:
        return pb.RecordTimeRequest(
            user_id=user, course_id=course.course_id, lesson_id=lesson, seconds=5
        )

    await narrow_progress.RecordTime(beat(held))
    async with db.acquire() as connection, connection.transaction():
        await connection.execute(
            "SELECT FROM lesson_progress WHERE user_id = $1 AND course_id = $2 FOR UPDATE",
            held,
            course.course_id,
        )
        blocked = [
            asyncio.ensure_future(narrow_progress.RecordTime(beat(held), timeout=120))
            for _ in range(3)
        ]
        others = [narrow_progress.RecordTime(beat(new_id()), timeout=120) for _ in range(30)]
        # Only a guard against hanging: the others cannot finish unless the blocked
        # heartbeats give the slot back.
        answers = await asyncio.wait_for(asyncio.gather(*others), 60)
        assert [a.lesson.time_spent_seconds for a in answers] == [5] * 30
        assert not any(b.done() for b in blocked)
    answers = await asyncio.gather(*blocked)
    assert sorted(a.lesson.time_spent_seconds for a in answers) == [10, 15, 20]
