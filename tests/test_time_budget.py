"""The time budget: credited time never outruns the wall clock (RecordTime, BatchRecordTime).

Each test uses a fresh learner and servers with the default allowance (300 s); expected
credits are worked out here from the rule (a heartbeat of s seconds at t takes the latest s
uncredited seconds of [t - s - 300, t)), not read back from the service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from lesson_progress import server
from lesson_progress.validation import Validator
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc
from tests.conftest import CourseIds, new_id, server_config
from tests.errors import bad_fields
from tests.test_concurrency import replica

ALLOWANCE = 300  # the default
MAX_HEARTBEAT = 300  # the default


@pytest.fixture
async def budget_server(database_url: str) -> AsyncIterator[server.RunningServer]:
    """The service in this process with the default time allowance."""
    running = await server.start(server_config(database_url, time_allowance_seconds=ALLOWANCE))
    yield running
    await running.stop(grace=1)


@pytest.fixture
async def progress(
    budget_server: server.RunningServer,
) -> AsyncIterator[progress_service_pb2_grpc.ProgressServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{budget_server.port}") as channel:
        yield progress_service_pb2_grpc.ProgressServiceStub(channel)


def at(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def beat(user: str, course: CourseIds, lesson: str, seconds: int, **fields: object) -> object:
    return pb.RecordTimeRequest(
        user_id=user, course_id=course.course_id, lesson_id=lesson, seconds=seconds, **fields
    )


async def stored(
    progress: progress_service_pb2_grpc.ProgressServiceStub, user: str, course: CourseIds
) -> int:
    """The learner's time over every lesson of the course, as stored."""
    response = await progress.ListLessonProgress(
        pb.ListLessonProgressRequest(user_id=user, course_id=course.course_id, page_size=100)
    )
    return sum(lesson.time_spent_seconds for lesson in response.lessons)


async def test_concurrent_heartbeats_from_two_servers_stay_within_the_wall_clock(
    progress: progress_service_pb2_grpc.ProgressServiceStub,
    make_course: object,
    database_url: str,
    tmp_path: Path,
) -> None:
    courses = [await make_course(3), await make_course(2)]  # type: ignore[operator]
    other = replica(database_url, tmp_path / "other.log", extra=())  # default allowance
    user = new_id()
    try:
        await other.wait_ready()
        async with grpc.aio.insecure_channel(other.address) as channel:
            stubs = [progress, progress_service_pb2_grpc.ProgressServiceStub(channel)]
            credited: list[int] = []
            started = time.time()

            async def sender(index: int) -> None:
                stub = stubs[index % 2]
                course = courses[index % 2]
                lesson = course.lesson_ids[index % len(course.lesson_ids)]
                deadline = started + 3
                while time.time() < deadline:
                    response = await stub.RecordTime(
                        beat(user, course, lesson, MAX_HEARTBEAT, request_id=new_id())
                    )
                    credited.append(response.credited_seconds)

            await asyncio.gather(*(sender(i) for i in range(8)))
            ended = time.time()
        assert await other.terminate() == 0
    finally:
        other.kill()
    total = sum(credited)
    # Every call arrived within [started, ended]: what they were credited lies in
    # [started - one heartbeat - allowance, ended], one second more for whole seconds.
    bound = (ended - started) + MAX_HEARTBEAT + ALLOWANCE + 1
    assert len(credited) >= 8  # every sender got its calls in
    assert MAX_HEARTBEAT <= total <= bound, (total, bound, len(credited))
    assert sum([await stored(progress, user, course) for course in courses]) == total


async def test_offline_sync_is_credited_in_full(
    progress: progress_service_pb2_grpc.ProgressServiceStub, make_course: object
) -> None:
    course = await make_course(2)  # type: ignore[operator]
    user = new_id()
    start = int(time.time()) - 6 * 3600
    # 40 heartbeats of 30 s, one every 30 s (a 20-minute session, six hours ago), on two
    # lessons; sent in two batches, the later half first.
    entries = [
        beat(user, course, course.lesson_ids[i // 20], 30, occurred_at=at(start + 30 * (i + 1)))
        for i in range(40)
    ]
    for half in (entries[20:], entries[:20]):
        response = await progress.BatchRecordTime(pb.BatchRecordTimeRequest(requests=half))
        assert [r.credited_seconds for r in response.entry_results] == [30] * 20
    assert await stored(progress, user, course) == 40 * 30


async def test_fabricated_history_is_refused_in_part(
    progress: progress_service_pb2_grpc.ProgressServiceStub, make_course: object
) -> None:
    course = await make_course(2)  # type: ignore[operator]
    user = new_id()
    t = int(time.time()) - 3600
    # 20 heartbeats of 300 s all at the same moment: the window [t - 600, t) holds 600 s.
    same_time = [
        beat(user, course, course.lesson_ids[i % 2], 300, occurred_at=at(t)) for i in range(20)
    ]
    response = await progress.BatchRecordTime(pb.BatchRecordTimeRequest(requests=same_time))
    assert [r.credited_seconds for r in response.entry_results] == [300, 300] + [0] * 18
    # 20 heartbeats of 300 s, 10 s apart (a later hour): at most the span plus one heartbeat
    # plus the allowance, and the first entry in full.
    t2 = t + 3600 - 300
    spread = [beat(user, course, "l1", 300, occurred_at=at(t2 + 10 * i)) for i in range(20)]
    response = await progress.BatchRecordTime(pb.BatchRecordTimeRequest(requests=spread))
    credits = [r.credited_seconds for r in response.entry_results]
    assert credits[0] == 300
    assert sum(credits) <= 19 * 10 + MAX_HEARTBEAT + ALLOWANCE
    assert await stored(progress, user, course) == 600 + sum(credits)


async def test_replay_is_counted_once_and_consumes_no_budget(
    progress: progress_service_pb2_grpc.ProgressServiceStub, make_course: object
) -> None:
    course = await make_course(1)  # type: ignore[operator]
    user = new_id()
    t = at(int(time.time()) - 3600)
    first = beat(user, course, "l1", 100, request_id=new_id(), occurred_at=t)
    credits = []
    for request in (
        first,
        first,  # the replay: reports 100 again, adds nothing, takes no time
        beat(user, course, "l1", 300, occurred_at=t),  # takes [t - 400, t - 100)
        beat(user, course, "l1", 300, occurred_at=t),  # what is left: [t - 600, t - 400)
    ):
        response = await progress.RecordTime(request)
        credits.append(response.credited_seconds)
    assert credits == [100, 100, 300, 200]
    assert response.lesson.time_spent_seconds == 600
    # The same in one batch: a repeated request id within the batch counts once.
    again = beat(user, course, "l1", 50, request_id=new_id(), occurred_at=at(t.seconds + 900))
    response = await progress.BatchRecordTime(pb.BatchRecordTimeRequest(requests=[again, again]))
    assert [r.credited_seconds for r in response.entry_results] == [50, 50]
    assert response.distinct_lessons[0].time_spent_seconds == 650


async def test_a_replay_beside_new_time_in_one_batch_is_counted_once(
    progress: progress_service_pb2_grpc.ProgressServiceStub, make_course: object
) -> None:
    """A replayed entry next to new entries whose time is clear of the clock: the new ones
    are credited in full, the replay reports its first credit and adds nothing."""
    course = await make_course(1)  # type: ignore[operator]
    user = new_id()
    t = int(time.time()) - 3600
    first = beat(user, course, "l1", 30, request_id=new_id(), occurred_at=at(t))
    await progress.BatchRecordTime(pb.BatchRecordTimeRequest(requests=[first]))
    later = [
        beat(user, course, "l1", 30, request_id=new_id(), occurred_at=at(t + 30 * i))
        for i in (1, 2)
    ]
    response = await progress.BatchRecordTime(
        pb.BatchRecordTimeRequest(requests=[later[0], first, later[1]])
    )
    assert [r.credited_seconds for r in response.entry_results] == [30, 30, 30]
    assert await stored(progress, user, course) == 90


async def test_one_batch_of_several_learners_applies_the_rule_to_each(
    progress: progress_service_pb2_grpc.ProgressServiceStub, make_course: object
) -> None:
    course = await make_course(2)  # type: ignore[operator]
    honest, greedy, replaying = new_id(), new_id(), new_id()
    t = int(time.time()) - 2 * 3600
    earlier = beat(replaying, course, "l1", 40, request_id=new_id(), occurred_at=at(t))
    assert (await progress.RecordTime(earlier)).credited_seconds == 40
    # Interleaved: three disjoint heartbeats of one learner (each in full), three of 300 s
    # at one moment of another ([t - 600, t) holds 600 s: 300, 300, then nothing), and a
    # replay of the third learner's earlier call next to a new heartbeat of theirs.
    entries = [
        beat(honest, course, "l1", 30, occurred_at=at(t + 30)),
        beat(greedy, course, "l2", 300, occurred_at=at(t)),
        earlier,
        beat(honest, course, "l2", 30, occurred_at=at(t + 60)),
        beat(greedy, course, "l2", 300, occurred_at=at(t)),
        beat(replaying, course, "l1", 20, occurred_at=at(t + 20)),
        beat(honest, course, "l1", 30, occurred_at=at(t + 90)),
        beat(greedy, course, "l2", 300, occurred_at=at(t)),
    ]
    response = await progress.BatchRecordTime(pb.BatchRecordTimeRequest(requests=entries))
    credits = [r.credited_seconds for r in response.entry_results]
    assert credits == [30, 300, 40, 30, 300, 20, 30, 0]
    assert await stored(progress, honest, course) == 90
    assert await stored(progress, greedy, course) == 600
    assert await stored(progress, replaying, course) == 60


async def test_heartbeats_faster_than_time_get_what_passed(
    progress: progress_service_pb2_grpc.ProgressServiceStub, make_course: object
) -> None:
    course = await make_course(1)  # type: ignore[operator]
    user = new_id()
    started = time.time()
    credits = []
    for _ in range(4):
        response = await progress.RecordTime(beat(user, course, "l1", MAX_HEARTBEAT))
        credits.append(response.credited_seconds)
    elapsed = time.time() - started
    # The first heartbeat in full, the second the allowance, the rest what passed.
    assert credits[:2] == [MAX_HEARTBEAT, ALLOWANCE]
    assert sum(credits[2:]) <= elapsed + 2
    assert response.lesson.time_spent_seconds == sum(credits)


async def test_refused_seconds_are_counted(
    budget_server: server.RunningServer,
    progress: progress_service_pb2_grpc.ProgressServiceStub,
    make_course: object,
) -> None:
    course = await make_course(1)  # type: ignore[operator]
    user = new_id()
    name = "lesson_progress_heartbeat_refused_seconds_total"
    registry = budget_server.metrics.registry
    before = registry.get_sample_value(name) or 0.0
    t = at(int(time.time()) - 7200)
    batch = pb.BatchRecordTimeRequest(
        requests=[beat(user, course, "l1", 300, request_id=new_id(), occurred_at=t)] + [
            beat(user, course, "l1", 200, request_id=new_id(), occurred_at=t) for _ in range(3)
        ]
    )  # fmt: skip
    response = await progress.BatchRecordTime(batch)
    # 300 s take [t - 300, t); the window of a 200 s entry, [t - 500, t), has 200 s left.
    assert [r.credited_seconds for r in response.entry_results] == [300, 200, 0, 0]
    assert registry.get_sample_value(name) == before + 400
    await progress.BatchRecordTime(batch)  # a replay refuses nothing more
    assert registry.get_sample_value(name) == before + 400


async def test_occurred_at_must_be_recent_and_not_ahead(
    progress: progress_service_pb2_grpc.ProgressServiceStub, make_course: object
) -> None:
    course = await make_course(1)  # type: ignore[operator]
    user = new_id()
    now = int(time.time())
    batch = pb.BatchRecordTimeRequest(
        requests=[
            beat(user, course, "l1", 10, occurred_at=at(now - 8 * 86400)),  # too old
            beat(user, course, "l1", 10, occurred_at=at(now + 600)),  # too far ahead
            beat(user, course, "l1", 10, occurred_at=at(now + 5)),  # within the skew
            beat(user, course, "l1", 10, occurred_at=at(now - 6 * 86400)),
            # beyond what a datetime can hold, either way, and nanos out of range
            beat(user, course, "l1", 10, occurred_at=at(2**62)),
            beat(user, course, "l1", 10, occurred_at=at(-(2**62))),
            beat(user, course, "l1", 10, occurred_at=Timestamp(seconds=now, nanos=-1)),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await progress.BatchRecordTime(batch)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == {f"requests[{i}].occurred_at" for i in (0, 1, 4, 5, 6)}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await progress.RecordTime(beat(user, course, "l1", 10, occurred_at=at(now + 600)))
    assert bad_fields(raised.value) == {"occurred_at"}
    assert await stored(progress, user, course) == 0  # nothing of the refused batch


def test_occurred_at_keeps_its_microseconds() -> None:
    moment = datetime.now(UTC).replace(microsecond=123456) - timedelta(hours=1)
    stamp = Timestamp(seconds=int(moment.timestamp()), nanos=123_456_789)
    check = Validator()
    assert check.recent_time("occurred_at", stamp, ahead=60, behind=86400) == moment
    check.done()
