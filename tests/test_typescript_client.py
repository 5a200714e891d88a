"""The TypeScript example client (clients/typescript) against a live server.

The example is built with tsc from the committed generated stubs and run under Node.js with a
plan made here: it registers the course, records one learner's activity, reads it back, reads
the StreamLessonStats stream and decodes the google.rpc.BadRequest of an invalid call, printing
proto3 JSON of everything it read. Every figure is checked against what this test computes from
the plan, and every message against what the Python stubs read for the same rows.
"""

from __future__ import annotations

import asyncio
import json
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from lesson_progress import server
from lessonprogress.v1 import analytics_service_pb2 as an
from lessonprogress.v1 import analytics_service_pb2_grpc
from lessonprogress.v1 import progress_service_pb2 as ps
from tests import nodejs
from tests.conftest import new_id
from tests.errors import bad_fields, error_info

# Only a guard against a hanging build or run; nothing depends on how long either takes.
HANG_GUARD_SECONDS = 300.0


async def run(*command: str, cwd: Path = nodejs.CLIENT_DIR) -> str:
    """Runs a command with the prepared Node.js first on PATH; its stdout. Fails on exit != 0."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=nodejs.environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), HANG_GUARD_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"{command} exited {process.returncode}:\n{err.decode()}"
    return out.decode()


@pytest.fixture(scope="module")
async def example_js() -> Path:
    """The example compiled by tsc (which type-checks it on the way) into dist/."""
    await asyncio.to_thread(nodejs.prepare)
    await run("npx", "tsc")
    built = nodejs.CLIENT_DIR / "dist" / "example.js"
    assert built.is_file()
    return built


def make_plan(rng: random.Random) -> dict[str, Any]:
    """A course of four lessons (two assessed) and one learner's activity in every lesson."""
    lessons = [
        {"lessonId": "intro", "title": "Intro", "assessed": False},
        {"lessonId": "video", "title": "Video", "assessed": False},
        {"lessonId": "quiz", "title": "Quiz", "assessed": True, "passingScore": 70},
        {"lessonId": "exam", "title": "Exam", "assessed": True, "passingScore": 90},
    ]
    heartbeats = [
        {"lessonId": lesson_id, "seconds": rng.randint(1, 300)}
        for lesson_id in ["intro", "video", "video", "quiz", "intro", "video"]
    ]
    attempts = [
        {"lessonId": "quiz", "score": rng.randint(0, 69)},
        {"lessonId": "quiz", "score": rng.randint(70, 100)},
        {"lessonId": "exam", "score": rng.randint(0, 89)},
    ]
    return {
        "courseId": new_id(),
        "userId": new_id(),
        "title": "TypeScript course",
        "lessons": lessons,
        "heartbeats": heartbeats,
        "attempts": attempts,
        "completions": ["intro"],
    }


def expected_lessons(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per lesson: seconds, attempts, best score and completion, from the plan alone."""
    result: dict[str, dict[str, Any]] = {}
    for lesson in plan["lessons"]:
        lesson_id = lesson["lessonId"]
        seconds = sum(h["seconds"] for h in plan["heartbeats"] if h["lessonId"] == lesson_id)
        scores = [a["score"] for a in plan["attempts"] if a["lessonId"] == lesson_id]
        passing = lesson.get("passingScore")
        completed = lesson_id in plan["completions"] or (
            passing is not None and any(score >= passing for score in scores)
        )
        result[lesson_id] = {
            "seconds": seconds,
            "attempts": len(scores),
            "score": max(scores) if scores else None,
            "completed": completed,
        }
    return result


def int64(message: dict[str, Any], field: str) -> int:
    """An int64 field of proto3 JSON (a decimal string; absent when 0)."""
    return int(message.get(field, "0"))


async def test_typescript_example_reads_what_it_wrote_as_python_does(
    example_js: Path, running_server: server.RunningServer, progress: Any, channel: grpc.aio.Channel
) -> None:
    plan = make_plan(random.Random(11))
    plan_file = nodejs.CLIENT_DIR / "dist" / f"plan-{plan['courseId']}.json"
    plan_file.write_text(json.dumps(plan))
    try:
        output = await run(
            "node", str(example_js), f"127.0.0.1:{running_server.port}", str(plan_file)
        )
    finally:
        plan_file.unlink()
    report = json.loads(output)
    expected = expected_lessons(plan)
    outline = [lesson["lessonId"] for lesson in plan["lessons"]]

    # The course as registered: the outline that was sent.
    course = report["course"]
    assert course["courseId"] == plan["courseId"]
    assert course["title"] == plan["title"]
    assert [
        (got["lessonId"], got.get("title", ""), got.get("assessed", False), got.get("passingScore"))
        for got in course["lessons"]
    ] == [
        (sent["lessonId"], sent["title"], sent["assessed"], sent.get("passingScore"))
        for sent in plan["lessons"]
    ]

    # Course progress, computed from the plan.
    course_progress = report["courseProgress"]
    completed_ids = [lesson_id for lesson_id in outline if expected[lesson_id]["completed"]]
    percentage = int(
        (Decimal(100 * len(completed_ids)) / len(outline)).quantize(Decimal(1), ROUND_HALF_UP)
    )
    assert course_progress["userId"] == plan["userId"]
    assert course_progress["completedLessonIds"] == completed_ids
    assert course_progress["completedLessons"] == len(completed_ids)
    assert course_progress["totalLessons"] == len(outline)
    assert course_progress["progressPercentage"] == percentage
    assert int64(course_progress, "totalTimeSpentSeconds") == sum(
        h["seconds"] for h in plan["heartbeats"]
    )
    assert course_progress["lastLessonId"] == plan["completions"][-1]

    # Every lesson row, computed from the plan.
    lessons = {lesson["lessonId"]: lesson for lesson in report["lessons"]}
    assert sorted(lessons) == sorted(outline)
    for lesson_id, want in expected.items():
        row = lessons[lesson_id]
        assert int64(row, "timeSpentSeconds") == want["seconds"], lesson_id
        assert row.get("attempts", 0) == want["attempts"], lesson_id
        assert row.get("score") == want["score"], lesson_id
        assert row.get("completed", False) == want["completed"], lesson_id

    # The statistics stream: one learner, so every mean is that learner's figure.
    stats = report["lessonStats"]
    assert [s["lessonId"] for s in stats] == outline
    for s in stats:
        want = expected[s["lessonId"]]
        assert int64(s, "startedCount") == 1
        assert int64(s, "completedCount") == int(want["completed"])
        assert s.get("avgTimeSpentSeconds", 0) == want["seconds"]
        assert s.get("avgAttempts", 0) == want["attempts"]
        assert int64(s, "scoredCount") == int(want["score"] is not None)
        histogram = [0] * 10
        if want["score"] is not None:
            assert s.get("maxScore", 0) == want["score"]
            histogram[min(want["score"] // 10, 9)] = 1
        assert [int(n) for n in s["scoreHistogram"]] == histogram

    # The same rows read by the Python stubs: the same messages, field for field.
    py_course = await progress.GetCourseProgress(
        ps.GetCourseProgressRequest(user_id=plan["userId"], course_id=plan["courseId"])
    )
    assert json_format.MessageToDict(py_course.course) == course_progress
    py_lessons = await progress.ListLessonProgress(
        ps.ListLessonProgressRequest(
            user_id=plan["userId"], course_id=plan["courseId"], page_size=100
        )
    )
    assert {
        lesson.lesson_id: json_format.MessageToDict(lesson) for lesson in py_lessons.lessons
    } == lessons
    analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)
    py_stats = [
        json_format.MessageToDict(m.lesson_stats)
        async for m in analytics.StreamLessonStats(
            an.StreamLessonStatsRequest(course_id=plan["courseId"]), timeout=60
        )
    ]
    assert py_stats == stats

    # The invalid call: a malformed user id and zero seconds, decoded from the rich status.
    invalid = report["invalidCall"]
    assert invalid["code"] == "InvalidArgument"
    assert invalid["statusCode"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert invalid["errorInfo"]["domain"] == "lessonprogress.v1"
    ts_fields = {v["field"] for v in invalid["fieldViolations"]}
    assert ts_fields == {"user_id", "seconds"}
    assert all(v["description"] for v in invalid["fieldViolations"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await progress.RecordTime(
            ps.RecordTimeRequest(
                user_id="not-a-uuid",
                course_id=plan["courseId"],
                lesson_id=outline[0],
                seconds=0,
            )
        )
    assert bad_fields(caught.value) == ts_fields
    assert error_info(caught.value).reason == invalid["errorInfo"]["reason"]
