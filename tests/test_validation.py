"""Input validation of every field of every CatalogService and ProgressService RPC.

A bad value gets INVALID_ARGUMENT whose BadRequest names exactly the bad fields, before any
existence check; good values at the edges of each rule are accepted; no input, not even
bytes that do not parse, produces UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message

from lessonprogress.v1 import catalog_service_pb2 as cpb
from lessonprogress.v1 import progress_service_pb2 as ppb
from lessonprogress.v1 import resources_pb2 as rpb
from tests.conftest import new_id
from tests.errors import bad_fields, error_info

IA = grpc.StatusCode.INVALID_ARGUMENT
BUGS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)

CATALOG_RPCS = ("UpsertCourse", "GetCourse", "DeleteCourse")
PROGRESS_RPCS = (
    "StartLesson",
    "RecordTime",
    "BatchRecordTime",
    "RecordAttempt",
    "CompleteLesson",
    "GetLessonProgress",
    "ListLessonProgress",
    "GetCourseProgress",
    "DeleteUserProgress",
)
ALL_RPCS = CATALOG_RPCS + PROGRESS_RPCS

REQUEST_TYPES: dict[str, type[message.Message]] = {
    "UpsertCourse": cpb.UpsertCourseRequest,
    "GetCourse": cpb.GetCourseRequest,
    "DeleteCourse": cpb.DeleteCourseRequest,
    "StartLesson": ppb.StartLessonRequest,
    "RecordTime": ppb.RecordTimeRequest,
    "BatchRecordTime": ppb.BatchRecordTimeRequest,
    "RecordAttempt": ppb.RecordAttemptRequest,
    "CompleteLesson": ppb.CompleteLessonRequest,
    "GetLessonProgress": ppb.GetLessonProgressRequest,
    "ListLessonProgress": ppb.ListLessonProgressRequest,
    "GetCourseProgress": ppb.GetCourseProgressRequest,
    "DeleteUserProgress": ppb.DeleteUserProgressRequest,
}


def method_path(rpc: str) -> str:
    service = "CatalogService" if rpc in CATALOG_RPCS else "ProgressService"
    return f"/lessonprogress.v1.{service}/{rpc}"


# --- values -----------------------------------------------------------------------------

UNSET = object()  # clears an optional field instead of setting it

GOOD = "0f8fad5b-d9cb-469f-a165-70867728950e"

BAD_UUIDS = [
    ("too-short", GOOD[:-1]),
    ("37-chars", GOOD + "0"),
    ("non-hex", "g" + GOOD[1:]),
    ("non-hex-last", GOOD[:-1] + "z"),
    ("no-dashes", GOOD.replace("-", "")),
    ("braces", "{" + GOOD + "}"),
    ("trailing-newline", GOOD + "\n"),
    ("leading-space", " " + GOOD),
    ("trailing-space", GOOD + " "),
    ("urn-prefix", "urn:uuid:" + GOOD),
    ("dashes-misplaced", "0f8fad5bd-9cb-469f-a165-70867728950e"),
    ("fullwidth-digit", "\uff10" + GOOD[1:]),
    ("nul-inside", GOOD[:8] + "\x00" + GOOD[9:]),
    ("words", "not-a-uuid"),
]
BAD_REQUIRED_UUIDS = [("empty", ""), *BAD_UUIDS]

BAD_LESSON_IDS = [
    ("empty", ""),
    ("256-chars", "x" * 256),
    ("256-multibyte-chars", "\u00e9" * 256),
    ("nul", "l\x001"),
    ("nul-only", "\x00"),
    ("ctrl-x01", "l\x011"),
    ("del-x7f", "l\x7f1"),
    ("c1-x80", "l\x801"),
    ("c1-x9f", "l\x9f1"),
    ("newline", "l1\n"),
    ("tab", "l\t1"),
    ("carriage-return", "l1\r"),
    ("escape", "\x1bl1"),
    ("256-with-nul", "\x00" * 256),
]

BAD_SECONDS = [("zero", 0), ("minus-1", -1), ("301", 301), ("int32-max", 2**31 - 1)]
BAD_SECONDS += [("int32-min", -(2**31))]
BAD_SCORES = [("minus-1", -1), ("101", 101), ("int32-max", 2**31 - 1), ("int32-min", -(2**31))]
BAD_PAGE_SIZES = [("minus-1", -1), ("int32-min", -(2**31))]
BAD_TITLES = [
    ("1001-chars", "t" * 1001),
    ("1001-multibyte", "\u00e9" * 1001),
    ("nul", "a\x00b"),
    ("newline", "a\nb"),
]
BAD_LESSON_TITLES = [("1001-chars", "t" * 1001), ("1001-multibyte", "\u00e9" * 1001)]

BAD_VALUES: dict[str, list[tuple[str, Any]]] = {
    "uuid": BAD_REQUIRED_UUIDS,
    "request_id": BAD_UUIDS,
    "lesson_id": BAD_LESSON_IDS,
    "seconds": BAD_SECONDS,
    "score": BAD_SCORES,
    "required_score": [("missing", UNSET), *BAD_SCORES],
    "page_size": BAD_PAGE_SIZES,
    "title": BAD_TITLES,
    "lesson_title": BAD_LESSON_TITLES,
    "passing_score": BAD_SCORES,
}

_KEY = [("user_id", "uuid"), ("course_id", "uuid"), ("lesson_id", "lesson_id")]
_BEAT = [*_KEY, ("seconds", "seconds"), ("request_id", "request_id")]

# Every validated field of every RPC, as a path into the request, and its kind.
FIELDS: dict[str, list[tuple[str, str]]] = {
    "UpsertCourse": [
        ("course_id", "uuid"),
        ("title", "title"),
        ("lessons[1].lesson_id", "lesson_id"),
        ("lessons[1].title", "lesson_title"),
        ("lessons[1].passing_score", "passing_score"),
    ],
    "GetCourse": [("course_id", "uuid")],
    "DeleteCourse": [("course_id", "uuid")],
    "StartLesson": _KEY,
    "RecordTime": _BEAT,
    "BatchRecordTime": [(f"requests[1].{name}", kind) for name, kind in _BEAT],
    "RecordAttempt": [*_KEY, ("score", "required_score"), ("request_id", "request_id")],
    "CompleteLesson": [*_KEY, ("score", "score"), ("request_id", "request_id")],
    "GetLessonProgress": _KEY,
    "ListLessonProgress": [
        ("user_id", "uuid"),
        ("course_id", "uuid"),
        ("page_size", "page_size"),
    ],
    "GetCourseProgress": [("user_id", "uuid"), ("course_id", "uuid")],
    "DeleteUserProgress": [("user_id", "uuid")],
}

BAD_CASES = [
    pytest.param(rpc, path, value, id=f"{rpc}-{path}-{label}")
    for rpc, fields in FIELDS.items()
    for path, kind in fields
    for label, value in BAD_VALUES[kind]
]


# --- helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A registered course with lessons l1..l3 and a learner who has started l1."""

    user_id: str
    course_id: str
    lesson_id: str
    lesson_ids: list[str]


async def make_target(make_course: Any, progress: Any) -> Target:
    course = await make_course(3)
    user_id = new_id()
    await progress.StartLesson(
        ppb.StartLessonRequest(user_id=user_id, course_id=course.course_id, lesson_id="l1")
    )
    return Target(user_id, course.course_id, "l1", list(course.lesson_ids))


def beat(t: Target, lesson_id: str, seconds: int) -> ppb.RecordTimeRequest:
    return ppb.RecordTimeRequest(
        user_id=t.user_id,
        course_id=t.course_id,
        lesson_id=lesson_id,
        seconds=seconds,
        request_id=new_id(),
    )


def base_request(rpc: str, t: Target) -> message.Message:
    """A valid request for ``rpc`` against ``t``: accepted as it is."""
    key = {"user_id": t.user_id, "course_id": t.course_id, "lesson_id": t.lesson_id}
    if rpc == "UpsertCourse":
        return cpb.UpsertCourseRequest(
            course_id=t.course_id,
            title="course",
            lessons=[
                rpb.Lesson(lesson_id=lesson_id, title=f"lesson {lesson_id}", passing_score=70)
                for lesson_id in t.lesson_ids
            ],
        )
    if rpc in ("GetCourse", "DeleteCourse"):
        return REQUEST_TYPES[rpc](course_id=t.course_id)
    if rpc in ("StartLesson", "GetLessonProgress"):
        return REQUEST_TYPES[rpc](**key)
    if rpc == "RecordTime":
        return ppb.RecordTimeRequest(**key, seconds=30, request_id=new_id())
    if rpc == "BatchRecordTime":
        return ppb.BatchRecordTimeRequest(
            requests=[beat(t, "l1", 10), beat(t, "l2", 20), beat(t, "l1", 30)]
        )
    if rpc in ("RecordAttempt", "CompleteLesson"):
        return REQUEST_TYPES[rpc](**key, score=50, request_id=new_id())
    if rpc == "ListLessonProgress":
        return ppb.ListLessonProgressRequest(user_id=t.user_id, course_id=t.course_id, page_size=10)
    if rpc == "GetCourseProgress":
        return ppb.GetCourseProgressRequest(user_id=t.user_id, course_id=t.course_id)
    assert rpc == "DeleteUserProgress"
    return ppb.DeleteUserProgressRequest(user_id=t.user_id)


_INDEXED = re.compile(r"(\w+)\[(\d+)\]")


def _walk(request: message.Message, path: str) -> tuple[Any, str]:
    """The message holding the field at ``path``, and the field's name."""
    *parents, leaf = path.split(".")
    target: Any = request
    for part in parents:
        match = _INDEXED.fullmatch(part)
        assert match, part
        target = getattr(target, match[1])[int(match[2])]
    return target, leaf


def get_path(request: message.Message, path: str) -> Any:
    target, leaf = _walk(request, path)
    return getattr(target, leaf)


def set_path(request: message.Message, path: str, value: Any) -> None:
    """Sets (or, with UNSET, clears) the field at ``path``, e.g. ``requests[1].seconds``."""
    target, leaf = _walk(request, path)
    if value is UNSET:
        target.ClearField(leaf)
    else:
        setattr(target, leaf, value)


def stub_for(rpc: str, catalog: Any, progress: Any) -> Any:
    return catalog if rpc in CATALOG_RPCS else progress


async def call(rpc: str, request: message.Message, catalog: Any, progress: Any) -> Any:
    return await getattr(stub_for(rpc, catalog, progress), rpc)(request)


async def rejected_fields(
    rpc: str, request: message.Message, catalog: Any, progress: Any
) -> set[str]:
    """The fields named by the INVALID_ARGUMENT that ``request`` must get."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(rpc, request, catalog, progress)
    return bad_fields(caught.value)


async def lesson_time(progress: Any, user_id: str, course_id: str, lesson_id: str) -> int:
    response = await progress.GetLessonProgress(
        ppb.GetLessonProgressRequest(user_id=user_id, course_id=course_id, lesson_id=lesson_id)
    )
    return int(response.lesson.time_spent_seconds)


# --- the valid base requests are accepted -------------------------------------------------


@pytest.mark.parametrize("rpc", ALL_RPCS)
async def test_base_request_is_accepted(rpc: str, make_course: Any, catalog: Any, progress: Any):
    # The bad-value tests below change one field of these; each must be OK as it is.
    t = await make_target(make_course, progress)
    response = await call(rpc, base_request(rpc, t), catalog, progress)
    assert response is not None


# --- one bad field ----------------------------------------------------------------------


@pytest.mark.parametrize(("rpc", "path", "value"), BAD_CASES)
async def test_bad_field_is_named(
    rpc: str, path: str, value: Any, make_course: Any, catalog: Any, progress: Any
):
    t = await make_target(make_course, progress)
    request = base_request(rpc, t)
    set_path(request, path, value)
    assert await rejected_fields(rpc, request, catalog, progress) == {path}


@pytest.mark.parametrize(
    ("rpc", "path", "value"),
    [
        pytest.param("RecordTime", "seconds", 0, id="RecordTime-seconds"),
        pytest.param("BatchRecordTime", "requests[1].seconds", 301, id="Batch-seconds"),
        pytest.param("RecordAttempt", "score", 101, id="RecordAttempt-score"),
        pytest.param("CompleteLesson", "request_id", "nope", id="CompleteLesson-request_id"),
    ],
)
async def test_rejected_write_changes_nothing(
    rpc: str, path: str, value: Any, make_course: Any, catalog: Any, progress: Any
):
    t = await make_target(make_course, progress)
    before = await progress.GetLessonProgress(
        ppb.GetLessonProgressRequest(user_id=t.user_id, course_id=t.course_id, lesson_id="l1")
    )
    request = base_request(rpc, t)
    set_path(request, path, value)
    assert await rejected_fields(rpc, request, catalog, progress) == {path}
    after = await progress.GetLessonProgress(
        ppb.GetLessonProgressRequest(user_id=t.user_id, course_id=t.course_id, lesson_id="l1")
    )
    assert after.lesson == before.lesson
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await progress.GetLessonProgress(
            ppb.GetLessonProgressRequest(user_id=t.user_id, course_id=t.course_id, lesson_id="l2")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_duplicate_lesson_id_in_outline_names_the_later_lesson(catalog: Any):
    course_id = new_id()
    request = cpb.UpsertCourseRequest(
        course_id=course_id,
        lessons=[rpb.Lesson(lesson_id=i) for i in ("a", "b", "c", "a", "d", "b")],
    )
    assert await rejected_fields("UpsertCourse", request, catalog, None) == {
        "lessons[3].lesson_id",
        "lessons[5].lesson_id",
    }
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.GetCourse(cpb.GetCourseRequest(course_id=course_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("count", "ok"), [(10_000, True), (10_001, False)])
async def test_outline_of_at_most_10000_lessons(count: int, ok: bool, catalog: Any):
    course_id = new_id()
    request = cpb.UpsertCourseRequest(
        course_id=course_id, lessons=[rpb.Lesson(lesson_id=f"lesson-{i}") for i in range(count)]
    )
    if not ok:
        assert await rejected_fields("UpsertCourse", request, catalog, None) == {"lessons"}
        return
    await catalog.UpsertCourse(request)
    stored = await catalog.GetCourse(cpb.GetCourseRequest(course_id=course_id))
    assert [lesson.lesson_id for lesson in stored.course.lessons] == [
        f"lesson-{i}" for i in range(count)
    ]


async def test_rejected_upsert_keeps_the_old_outline(make_course: Any, catalog: Any):
    course = await make_course(2)
    request = cpb.UpsertCourseRequest(
        course_id=course.course_id,
        title="new",
        lessons=[rpb.Lesson(lesson_id="n1"), rpb.Lesson(lesson_id="n2", passing_score=101)],
    )
    assert await rejected_fields("UpsertCourse", request, catalog, None) == {
        "lessons[1].passing_score"
    }
    stored = await catalog.GetCourse(cpb.GetCourseRequest(course_id=course.course_id))
    assert [lesson.lesson_id for lesson in stored.course.lessons] == course.lesson_ids
    assert stored.course.title == "course"


# --- every bad field at once --------------------------------------------------------------

MULTI: dict[str, dict[str, Any]] = {
    "UpsertCourse": {
        "course_id": "nope",
        "title": "x" * 1001,
        "lessons[0].lesson_id": "",
        "lessons[1].title": "y" * 1001,
        "lessons[1].passing_score": -1,
        "lessons[2].lesson_id": "l\x00",
        "lessons[2].passing_score": 101,
    },
    "GetCourse": {"course_id": "{" + GOOD + "}"},
    "DeleteCourse": {"course_id": GOOD + "\n"},
    "StartLesson": {"user_id": "", "course_id": "x", "lesson_id": "\x00"},
    "RecordTime": {
        "user_id": "u",
        "course_id": "",
        "lesson_id": "y" * 256,
        "seconds": 0,
        "request_id": "r",
    },
    "BatchRecordTime": {
        "requests[0].user_id": "",
        "requests[0].seconds": -5,
        "requests[1].course_id": GOOD[:-1],
        "requests[1].lesson_id": "\x7f",
        "requests[2].request_id": GOOD.replace("-", ""),
        "requests[2].seconds": 301,
    },
    "RecordAttempt": {
        "user_id": "u",
        "course_id": "c",
        "lesson_id": "",
        "score": UNSET,
        "request_id": "r",
    },
    "CompleteLesson": {
        "user_id": "u",
        "course_id": "c",
        "lesson_id": "\n",
        "score": 101,
        "request_id": "r",
    },
    "GetLessonProgress": {"user_id": "u", "course_id": "c", "lesson_id": ""},
    "ListLessonProgress": {"user_id": "", "course_id": "c", "page_size": -1},
    "GetCourseProgress": {"user_id": "u", "course_id": ""},
    "DeleteUserProgress": {"user_id": " "},
}


@pytest.mark.parametrize("rpc", ALL_RPCS)
async def test_every_bad_field_is_named(rpc: str, make_course: Any, catalog: Any, progress: Any):
    t = await make_target(make_course, progress)
    request = base_request(rpc, t)
    for path, value in MULTI[rpc].items():
        set_path(request, path, value)
    assert await rejected_fields(rpc, request, catalog, progress) == set(MULTI[rpc])


async def test_bad_fields_of_many_batch_entries_are_all_named(make_course: Any, progress: Any):
    t = await make_target(make_course, progress)
    entries = [beat(t, "l1", 5) for _ in range(20)]
    bad = {3: ("user_id", "x"), 7: ("seconds", 0), 11: ("lesson_id", ""), 19: ("request_id", "r")}
    for index, (name, value) in bad.items():
        setattr(entries[index], name, value)
    request = ppb.BatchRecordTimeRequest(requests=entries)
    assert await rejected_fields("BatchRecordTime", request, None, progress) == {
        f"requests[{index}].{name}" for index, (name, _) in bad.items()
    }


# --- validation comes before existence checks ---------------------------------------------

# RPC, a bad field other than the course, and its value; the course is not registered.
BEFORE_EXISTENCE = [
    ("StartLesson", "lesson_id", "\x00"),
    ("RecordTime", "seconds", 0),
    ("RecordTime", "request_id", "r"),
    ("BatchRecordTime", "requests[2].seconds", 301),
    ("RecordAttempt", "score", UNSET),
    ("CompleteLesson", "score", -1),
    ("GetLessonProgress", "user_id", "u"),
    ("ListLessonProgress", "page_size", -1),
    ("GetCourseProgress", "user_id", ""),
]


@pytest.mark.parametrize(
    ("rpc", "path", "value"),
    [pytest.param(*case, id=f"{case[0]}-{case[1]}") for case in BEFORE_EXISTENCE],
)
async def test_validation_precedes_existence_checks(
    rpc: str, path: str, value: Any, catalog: Any, progress: Any
):
    unknown = Target(new_id(), new_id(), "no-such-lesson", ["x", "y", "z"])
    request = base_request(rpc, unknown)
    set_path(request, path, value)
    assert await rejected_fields(rpc, request, catalog, progress) == {path}


@pytest.mark.parametrize("rpc", ["GetCourse", "DeleteCourse", "GetCourseProgress"])
async def test_valid_ids_of_unknown_course_get_not_found(rpc: str, catalog: Any, progress: Any):
    unknown = Target(new_id(), new_id(), "l1", ["l1"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(rpc, base_request(rpc, unknown), catalog, progress)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    error_info(caught.value)


# --- values at the edges that are accepted ------------------------------------------------

GOOD_CASES = [
    ("RecordTime", "seconds", 1),
    ("RecordTime", "seconds", 300),
    ("BatchRecordTime", "requests[1].seconds", 1),
    ("BatchRecordTime", "requests[1].seconds", 300),
    ("RecordAttempt", "score", 0),
    ("RecordAttempt", "score", 100),
    ("CompleteLesson", "score", 0),
    ("CompleteLesson", "score", 100),
    ("CompleteLesson", "score", UNSET),
    ("RecordTime", "request_id", ""),
    ("RecordAttempt", "request_id", ""),
    ("CompleteLesson", "request_id", ""),
    ("BatchRecordTime", "requests[1].request_id", ""),
    ("RecordTime", "request_id", GOOD.upper()),
    ("ListLessonProgress", "page_size", 0),
    ("ListLessonProgress", "page_size", 1),
    ("ListLessonProgress", "page_size", 500),
    ("ListLessonProgress", "page_size", 501),
    ("ListLessonProgress", "page_size", 2**31 - 1),
    ("UpsertCourse", "title", ""),
    ("UpsertCourse", "title", "t" * 1000),
    ("UpsertCourse", "title", "\u00e9" * 1000),
    ("UpsertCourse", "title", "\U0001f4d8" * 1000),
    ("UpsertCourse", "lessons[1].title", "t" * 1000),
    ("UpsertCourse", "lessons[1].title", "\u00e9" * 1000),
    ("UpsertCourse", "lessons[1].passing_score", 0),
    ("UpsertCourse", "lessons[1].passing_score", 100),
    ("UpsertCourse", "lessons[1].passing_score", UNSET),
]


@pytest.mark.parametrize(
    ("rpc", "path", "value"),
    [
        pytest.param(rpc, path, value, id=f"{rpc}-{path}-{i}")
        for i, (rpc, path, value) in enumerate(GOOD_CASES)
    ],
)
async def test_edge_value_is_accepted(
    rpc: str, path: str, value: Any, make_course: Any, catalog: Any, progress: Any
):
    t = await make_target(make_course, progress)
    request = base_request(rpc, t)
    set_path(request, path, value)
    await call(rpc, request, catalog, progress)


async def test_stored_titles_round_trip(catalog: Any):
    course_id = new_id()
    title = "\u00e9" * 1000
    lesson_title = "\U0001f4d8" * 1000
    await catalog.UpsertCourse(
        cpb.UpsertCourseRequest(
            course_id=course_id,
            title=title,
            lessons=[rpb.Lesson(lesson_id="a", title=lesson_title)],
        )
    )
    stored = await catalog.GetCourse(cpb.GetCourseRequest(course_id=course_id))
    assert stored.course.title == title
    assert stored.course.lessons[0].title == lesson_title


UUID_FIELDS = [
    pytest.param(rpc, path, id=f"{rpc}-{path}")
    for rpc, fields in FIELDS.items()
    for path, kind in fields
    if kind in ("uuid", "request_id")
]


@pytest.mark.parametrize(("rpc", "path"), UUID_FIELDS)
async def test_uppercase_uuid_is_accepted(
    rpc: str, path: str, make_course: Any, catalog: Any, progress: Any
):
    t = await make_target(make_course, progress)
    request = base_request(rpc, t)
    set_path(request, path, get_path(request, path).upper())
    await call(rpc, request, catalog, progress)


async def test_uppercase_ids_name_the_same_learner_and_course(make_course: Any, progress: Any):
    course = await make_course(1)
    user_id = new_id()
    upper = {"user_id": user_id.upper(), "course_id": course.course_id.upper()}
    mixed = {"user_id": user_id[:18] + user_id[18:].upper(), "course_id": course.course_id}
    first = await progress.RecordTime(ppb.RecordTimeRequest(**upper, lesson_id="l1", seconds=40))
    assert first.lesson.user_id == user_id
    assert first.lesson.course_id == course.course_id
    await progress.RecordTime(ppb.RecordTimeRequest(**mixed, lesson_id="l1", seconds=2))
    assert await lesson_time(progress, user_id, course.course_id, "l1") == 42
    course_progress = await progress.GetCourseProgress(ppb.GetCourseProgressRequest(**upper))
    assert course_progress.course.total_time_spent_seconds == 42


async def test_uppercase_request_id_is_the_same_request(make_course: Any, progress: Any):
    course = await make_course(1)
    user_id = new_id()
    request_id = new_id()
    for spelling in (request_id, request_id.upper(), request_id):
        await progress.RecordTime(
            ppb.RecordTimeRequest(
                user_id=user_id,
                course_id=course.course_id,
                lesson_id="l1",
                seconds=9,
                request_id=spelling,
            )
        )
    assert await lesson_time(progress, user_id, course.course_id, "l1") == 9


async def test_uppercase_course_id_registers_the_lowercase_course(catalog: Any):
    course_id = new_id()
    created = await catalog.UpsertCourse(
        cpb.UpsertCourseRequest(course_id=course_id.upper(), lessons=[rpb.Lesson(lesson_id="a")])
    )
    assert created.course.course_id == course_id
    stored = await catalog.GetCourse(cpb.GetCourseRequest(course_id=course_id))
    assert stored.course.course_id == course_id


UNUSUAL_LESSON_IDS = [
    "le\u00e7on-1",
    "x" * 255,
    "\u00e9" * 255,
    "\U0001f4d8" * 255,
    "\u8ab2\u7a0b\u4e00",
    "\u05e9\u05d9\u05e2\u05d5\u05e8",
    "with space",
    "nbsp\u00a0after-c1",
    "zero\u200dwidth-joiner",
    "quote'\"\\%_;--",
    " ",
]


async def test_unusual_but_valid_lesson_ids_are_accepted(catalog: Any, progress: Any):
    course_id = new_id()
    user_id = new_id()
    await catalog.UpsertCourse(
        cpb.UpsertCourseRequest(
            course_id=course_id,
            lessons=[rpb.Lesson(lesson_id=lesson_id) for lesson_id in UNUSUAL_LESSON_IDS],
        )
    )
    stored = await catalog.GetCourse(cpb.GetCourseRequest(course_id=course_id))
    assert [lesson.lesson_id for lesson in stored.course.lessons] == UNUSUAL_LESSON_IDS
    for seconds, lesson_id in enumerate(UNUSUAL_LESSON_IDS, start=1):
        key = {"user_id": user_id, "course_id": course_id, "lesson_id": lesson_id}
        started = await progress.StartLesson(ppb.StartLessonRequest(**key))
        assert started.lesson.lesson_id == lesson_id
        await progress.RecordTime(ppb.RecordTimeRequest(**key, seconds=seconds))
        assert await lesson_time(progress, user_id, course_id, lesson_id) == seconds
    done = await progress.CompleteLesson(
        ppb.CompleteLessonRequest(user_id=user_id, course_id=course_id, lesson_id="x" * 255)
    )
    assert list(done.course.completed_lesson_ids) == ["x" * 255]
    course_progress = await progress.GetCourseProgress(
        ppb.GetCourseProgressRequest(user_id=user_id, course_id=course_id)
    )
    n = len(UNUSUAL_LESSON_IDS)
    assert course_progress.course.total_time_spent_seconds == n * (n + 1) // 2


async def test_lesson_id_not_in_outline_is_not_found(make_course: Any, progress: Any):
    course = await make_course(1)
    for lesson_id in ("L1", "l1 ", "l2", "x" * 255):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await progress.StartLesson(
                ppb.StartLessonRequest(
                    user_id=new_id(), course_id=course.course_id, lesson_id=lesson_id
                )
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, lesson_id


# --- page tokens --------------------------------------------------------------------------


async def paged_learner(make_course: Any, progress: Any) -> tuple[Target, str]:
    """A learner with three lessons started, and the token for the second page of one."""
    t = await make_target(make_course, progress)
    for lesson_id in ("l2", "l3"):
        await progress.StartLesson(
            ppb.StartLessonRequest(user_id=t.user_id, course_id=t.course_id, lesson_id=lesson_id)
        )
    first = await progress.ListLessonProgress(
        ppb.ListLessonProgressRequest(user_id=t.user_id, course_id=t.course_id, page_size=1)
    )
    assert first.next_page_token
    return t, first.next_page_token


def _tampered(token: str) -> str:
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


@pytest.mark.parametrize(
    "variant",
    ["garbage", "tampered", "other-user", "other-course", "completed-only", "non-ascii", "nul"],
)
async def test_page_token_not_issued_for_the_query_is_invalid(
    variant: str, make_course: Any, progress: Any
):
    t, token = await paged_learner(make_course, progress)
    other = await make_course(3)
    request = ppb.ListLessonProgressRequest(
        user_id=t.user_id, course_id=t.course_id, page_size=1, page_token=token
    )
    if variant == "garbage":
        request.page_token = "not-a-token"
    elif variant == "tampered":
        request.page_token = _tampered(token)
    elif variant == "other-user":
        request.user_id = new_id()
    elif variant == "other-course":
        request.course_id = other.course_id
    elif variant == "completed-only":
        request.completed_only = True
    elif variant == "non-ascii":
        request.page_token = token + "\u00e9"
    else:
        request.page_token = token[:4] + "\x00" + token[4:]
    assert await rejected_fields("ListLessonProgress", request, None, progress) == {"page_token"}


async def test_page_token_survives_a_page_size_change_and_uppercase_ids(
    make_course: Any, progress: Any
):
    t, token = await paged_learner(make_course, progress)
    rest = await progress.ListLessonProgress(
        ppb.ListLessonProgressRequest(
            user_id=t.user_id.upper(), course_id=t.course_id.upper(), page_size=5, page_token=token
        )
    )
    assert len(rest.lessons) == 2
    assert not rest.next_page_token


async def test_bad_page_size_and_bad_page_token_are_both_named(make_course: Any, progress: Any):
    # The token is not one this service ever issued, so it is bad whatever the other fields.
    t = await make_target(make_course, progress)
    request = ppb.ListLessonProgressRequest(
        user_id=t.user_id, course_id=t.course_id, page_size=-1, page_token="garbage"
    )
    assert await rejected_fields("ListLessonProgress", request, None, progress) == {
        "page_size",
        "page_token",
    }


# --- bytes that do not parse --------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


UNPARSEABLE = [
    ("invalid-utf8-field-1", b"\x0a\x02\xff\xfe"),
    ("truncated-length", b"\x0a\x05ab"),
    ("truncated-varint", b"\x20\xff"),
    ("length-past-end", b"\x0a\x7f"),
    ("tag-zero", b"\x00\x01"),
    ("unterminated-group", b"\x0b"),
    ("overlong-varint", b"\x20" + b"\xff" * 10 + b"\x01"),
    ("utf8-overlong-encoding", b"\x0a\x02\xc0\xaf"),
    ("utf8-surrogate", b"\x0a\x03\xed\xa0\x80"),
    ("utf8-truncated-char", b"\x0a\x01\xc3"),
]
# Invalid UTF-8 inside a nested message: a batch entry's lesson_id, an outline lesson's id.
NESTED_UNPARSEABLE = [
    ("BatchRecordTime", b"\x0a\x04\x1a\x02\xff\xfe"),
    ("BatchRecordTime", b"\x0a\x08\x0a\x02ok\x12\x02\xc3\x28"),
    ("UpsertCourse", b"\x1a\x04\x0a\x02\xff\xfe"),
    ("UpsertCourse", b"\x1a\x04\x12\x02\xc3\x28"),
]


async def raw_call(channel: grpc.aio.Channel, rpc: str, payload: bytes) -> grpc.aio.AioRpcError:
    multicallable = channel.unary_unary(
        method_path(rpc), request_serializer=_identity, response_deserializer=_identity
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await multicallable(payload)
    return caught.value


@pytest.mark.parametrize("rpc", ALL_RPCS)
@pytest.mark.parametrize(("payload"), [pytest.param(p, id=label) for label, p in UNPARSEABLE])
async def test_unparseable_request_is_invalid_argument(
    rpc: str, payload: bytes, channel: grpc.aio.Channel
):
    error = await raw_call(channel, rpc, payload)
    assert error.code() == IA, (error.code(), error.details())
    assert bad_fields(error)


@pytest.mark.parametrize(("rpc", "payload"), NESTED_UNPARSEABLE)
async def test_unparseable_nested_message_is_invalid_argument(
    rpc: str, payload: bytes, channel: grpc.aio.Channel
):
    error = await raw_call(channel, rpc, payload)
    assert error.code() == IA, (error.code(), error.details())
    assert bad_fields(error)


async def test_record_time_with_truncated_valid_message_is_invalid(
    make_course: Any, channel: grpc.aio.Channel, progress: Any
):
    course = await make_course(1)
    user_id = new_id()
    whole = ppb.RecordTimeRequest(
        user_id=user_id, course_id=course.course_id, lesson_id="l1", seconds=5
    ).SerializeToString()
    # Cut inside the course_id string: the length prefix promises more than is sent.
    error = await raw_call(channel, "RecordTime", whole[:50])
    assert error.code() == IA
    assert bad_fields(error)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await progress.GetLessonProgress(
            ppb.GetLessonProgressRequest(
                user_id=user_id, course_id=course.course_id, lesson_id="l1"
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- random and garbage input never produces UNKNOWN or INTERNAL --------------------------

_ALPHABETS = [
    [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)],
    [chr(c) for c in range(0x20, 0x7F)],
    [chr(c) for c in range(0xA0, 0x250)],
    ["\u200b", "\u200d", "\u2028", "\u2029", "\ufeff", "\ufffd", "\uffff", "\U0010ffff"],
    ["\U0001f4d8", "\U0001f600", "\u8ab2", "\u05e9", "\u0645", "\u00e9", "e\u0301"],
]


class Garbage:
    """Random field values, mixing valid ids with every kind of bad one."""

    def __init__(self, rng: random.Random, course_id: str, user_id: str) -> None:
        self.rng = rng
        self.course_id = course_id
        self.user_id = user_id

    def text(self) -> str:
        rng = self.rng
        length = rng.choice([0, 1, 2, rng.randint(0, 40), rng.randint(200, 300), 255, 256])
        alphabets = rng.sample(_ALPHABETS, rng.randint(1, len(_ALPHABETS)))
        pool = [c for alphabet in alphabets for c in alphabet]
        return "".join(rng.choice(pool) for _ in range(length))

    def uuid(self) -> str:
        rng = self.rng
        kind = rng.randrange(8)
        if kind == 0:
            return self.text()
        if kind == 1:
            return new_id().upper()
        if kind == 2:
            value = list(new_id())
            value[rng.randrange(len(value))] = rng.choice("-gG{}\n\x00 \u00e9Z0")
            return "".join(value)
        if kind == 3:
            return self.user_id
        if kind == 4:
            return rng.choice(["", new_id() + "\n", new_id()[:-1], "{" + new_id() + "}"])
        return new_id() if kind == 5 else self.course_id

    def lesson_id(self) -> str:
        return self.rng.choice(["l1", "l2", "l3", self.text(), self.text(), "x" * 255])

    def int32(self) -> int:
        rng = self.rng
        return rng.choice(
            [0, 1, -1, 100, 101, 300, 301, 2**31 - 1, -(2**31), rng.randint(-(2**31), 2**31 - 1)]
        )

    def maybe(self, value: Any) -> Any:
        return value if self.rng.random() < 0.7 else None

    def request(self, rpc: str) -> message.Message:
        key = {"user_id": self.uuid(), "course_id": self.uuid(), "lesson_id": self.lesson_id()}
        if rpc == "UpsertCourse":
            lessons = [
                rpb.Lesson(
                    lesson_id=self.lesson_id(),
                    title=self.text(),
                    assessed=self.rng.random() < 0.5,
                    passing_score=self.maybe(self.int32()),
                )
                for _ in range(self.rng.randint(0, 4))
            ]
            # Never rewrite the shared course: other garbage requests target it.
            course_id = self.uuid()
            if course_id.lower() == self.course_id:
                course_id = new_id()
            return cpb.UpsertCourseRequest(course_id=course_id, title=self.text(), lessons=lessons)
        if rpc in ("GetCourse", "DeleteCourse"):
            course_id = self.uuid()
            if rpc == "DeleteCourse" and course_id.lower() == self.course_id:
                course_id = new_id()
            return REQUEST_TYPES[rpc](course_id=course_id)
        if rpc in ("StartLesson", "GetLessonProgress"):
            return REQUEST_TYPES[rpc](**key)
        if rpc == "RecordTime":
            return ppb.RecordTimeRequest(**key, seconds=self.int32(), request_id=self.uuid())
        if rpc == "BatchRecordTime":
            return ppb.BatchRecordTimeRequest(
                requests=[self.request("RecordTime") for _ in range(self.rng.randint(0, 6))]
            )
        if rpc in ("RecordAttempt", "CompleteLesson"):
            return REQUEST_TYPES[rpc](
                **key, score=self.maybe(self.int32()), request_id=self.maybe(self.uuid())
            )
        if rpc == "ListLessonProgress":
            return ppb.ListLessonProgressRequest(
                user_id=self.uuid(),
                course_id=self.uuid(),
                page_size=self.int32(),
                page_token=self.rng.choice(["", "", self.text()]),
                completed_only=self.rng.random() < 0.5,
            )
        if rpc == "GetCourseProgress":
            return ppb.GetCourseProgressRequest(user_id=self.uuid(), course_id=self.uuid())
        return ppb.DeleteUserProgressRequest(user_id=self.uuid())

    def raw(self, rpc: str) -> bytes:
        """Random bytes, or a valid request's bytes with some of them changed or cut."""
        rng = self.rng
        if rng.random() < 0.3:
            return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        data = bytearray(self.request(rpc).SerializeToString())
        for _ in range(rng.randint(1, 4)):
            if data and rng.random() < 0.7:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                data = data[: rng.randint(0, len(data))]
        return bytes(data)


def _describe_failure(rpc: str, request: object, error: grpc.aio.AioRpcError | None) -> str:
    if error is None:
        return f"{rpc}({request!r}): no status"
    return f"{rpc}({request!r}) -> {error.code()}: {error.details()}"


def _check_details(error: grpc.aio.AioRpcError) -> None:
    """Every error has an ErrorInfo; INVALID_ARGUMENT also a BadRequest naming a field."""
    error_info(error)
    if error.code() == IA:
        assert bad_fields(error)


async def _fuzz_one(
    garbage: Garbage, rpc: str, channel: grpc.aio.Channel, catalog: Any, progress: Any
) -> str | None:
    """Sends one random request; returns a description if its outcome breaks the contract."""
    use_raw = garbage.rng.random() < 0.25
    request: object = garbage.raw(rpc) if use_raw else garbage.request(rpc)
    try:
        if use_raw:
            multicallable = channel.unary_unary(
                method_path(rpc), request_serializer=_identity, response_deserializer=_identity
            )
            await multicallable(request)
        else:
            assert isinstance(request, message.Message)
            await call(rpc, request, catalog, progress)
    except grpc.aio.AioRpcError as error:
        if error.code() in BUGS:
            return _describe_failure(rpc, request, error)
        try:
            _check_details(error)
        except AssertionError as exc:
            return _describe_failure(rpc, request, error) + f" (details: {exc})"
    return None


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_random_garbage_never_gets_unknown_or_internal(
    seed: int, make_course: Any, channel: grpc.aio.Channel, catalog: Any, progress: Any
):
    t = await make_target(make_course, progress)
    garbage = Garbage(random.Random(seed), t.course_id, t.user_id)
    failures: list[str] = []
    for _ in range(10):
        rpcs = [garbage.rng.choice(ALL_RPCS) for _ in range(12)]
        outcomes = await asyncio.gather(
            *(_fuzz_one(garbage, rpc, channel, catalog, progress) for rpc in rpcs)
        )
        failures.extend(outcome for outcome in outcomes if outcome is not None)
    assert not failures, "\n".join(failures[:10])
    # The shared course is still there and still accepts valid writes.
    await progress.RecordTime(
        ppb.RecordTimeRequest(user_id=new_id(), course_id=t.course_id, lesson_id="l1", seconds=1)
    )
