"""Property-based fuzzing of every RPC of every service with hypothesis.

Requests are drawn from each method's request descriptor: every field set or left unset,
mostly to valid values (a registered course and its lessons, UUIDs, small counts), else
to invalid ones (control characters, huge strings, malformed UUIDs, negative and huge integers,
unknown enum values, nested messages and repeated fields of any of these), plus raw bytes
that need not decode, sent through a generic channel. Whatever arrives, the server
answers with a deliberate status: never UNKNOWN, INTERNAL or CANCELLED; every
INVALID_ARGUMENT carries a google.rpc.BadRequest whose field paths exist in the request
message; and the server stays up (health SERVING afterwards).

The examples are drawn by a derandomized hypothesis run (a fixed, bounded set), then sent
over the test's channel; a failure names the method and the request.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lesson_progress import server
from lessonprogress.v1 import catalog_service_pb2, resources_pb2
from tests.errors import bad_fields, error_info

EXAMPLES = 40  # drawn requests per method
RAW_EXAMPLES = 15  # raw byte strings per method
CALL_TIMEOUT = 10.0
STREAM_READ = 0.5  # seconds a stream that never ends on its own (WatchProgress) is read
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
COURSE_ID = str(uuid.UUID(int=0xF022))
LESSONS = ["l1", "l2", "quiz"]

METHODS = [
    (service, method) for service in server.SERVICES for method in service.methods
]  # fmt: skip
IDS = [f"{service.name}.{method.name}" for service, method in METHODS]

FD = descriptor.FieldDescriptor
INT_BOUNDS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _strings() -> st.SearchStrategy[str]:
    valid = st.sampled_from(
        [COURSE_ID, *LESSONS, str(uuid.UUID(int=1)), str(uuid.UUID(int=2)).upper(), "ok"]
    )
    invalid = st.sampled_from(
        [
            "",
            "not-a-uuid",
            COURSE_ID[:-1],
            COURSE_ID + "0",
            "{" + COURSE_ID + "}",
            "l1\x00",
            "\x07bell",
            "line\nbreak",
            "\u202eright-to-left",
            "\ud7ff\ue000",
            "x" * 256,
            "y" * 5000,
            "z" * 70_000,
            "é" * 300,
            " l1 ",
        ]
    )
    return st.one_of(valid, invalid, st.text(max_size=40))


def _integers(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = [v for v in (low, high, -1, 0, 1, 5, 100, 3600, 86_401, 2**31 - 1) if low <= v <= high]
    return st.one_of(
        st.sampled_from(edges), st.integers(min_value=max(low, -1000), max_value=min(high, 1000))
    )


def _valid(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any] | None:
    """Values a well-behaved caller would send in ``field`` (None: no opinion)."""
    if field.type == FD.TYPE_STRING:
        if field.name == "course_id":
            return st.just(COURSE_ID)
        if field.name == "lesson_id":
            return st.sampled_from(LESSONS)
        if field.name.endswith("_id"):
            return st.uuids().map(str)
        if field.name == "page_token":
            return st.just("")
        return st.text(st.characters(codec="utf-8", categories=["L", "N", "Zs"]), max_size=20)
    if field.type in INT_BOUNDS:
        return st.integers(min_value=0, max_value=100)
    return None


def _value(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Any value of ``field``'s type; mostly a valid one."""
    valid = _valid(field)
    anything = _any(field, depth)
    if valid is None:
        return anything
    return st.integers(0, 7).flatmap(lambda k: anything if k == 0 else valid)


def _any(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_STRING:
        return _strings()
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_ENUM:
        return st.integers(min_value=-3, max_value=40)  # mostly unknown values
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if field.type == FD.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    return _integers(INT_BOUNDS[field.type])


def _message(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[message.Message]:
    """Messages of ``desc`` with most fields set, to mostly valid values."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    fields = {}
    for field in desc.fields:
        value = _value(field, depth)
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            value = st.lists(value, max_size=4 if depth else 6)
        fields[field.name] = st.integers(0, 4).flatmap(
            lambda k, value=value: st.none() if k == 0 else value
        )
    return st.fixed_dictionaries(fields).map(lambda values: _build(cls, values))


def _build(cls: type[message.Message], values: dict[str, Any]) -> message.Message:
    built = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = getattr(built, name)
        if isinstance(value, list):
            field.extend(value)
        elif isinstance(value, message.Message):
            field.CopyFrom(value)
        else:
            setattr(built, name, value)
    return built


def _draw(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` examples of ``strategy`` from a derandomized hypothesis run."""
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


def _field_exists(desc: descriptor.Descriptor, path: str) -> bool:
    """Whether ``path`` (``a.b[3].c``) names a field of ``desc``."""
    for part in path.split("."):
        name = re.sub(r"\[\d+\]$", "", part)
        field = desc.fields_by_name.get(name)
        if field is None:
            return False
        if field.message_type is not None:
            desc = field.message_type
    return True


async def _outcome(
    call: Any, streaming: bool
) -> tuple[grpc.StatusCode, grpc.aio.AioRpcError | None]:
    """The status a call ended with, and its error (a stream still open after
    STREAM_READ: OK)."""
    try:
        if not streaming:
            await call
            return grpc.StatusCode.OK, None
        try:
            async with asyncio.timeout(STREAM_READ):
                async for _ in call:
                    pass
        except TimeoutError:
            call.cancel()
        return grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc


def _check(
    code: grpc.StatusCode, error: grpc.aio.AioRpcError | None, desc: descriptor.Descriptor
) -> None:
    assert code not in FORBIDDEN, code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert error is not None
        fields = bad_fields(error)
        assert fields, "INVALID_ARGUMENT naming no field"
        if error_info(error).reason == "MALFORMED_REQUEST":
            assert fields == {"request"}
        else:
            missing = {f for f in fields if not _field_exists(desc, f)}
            assert not missing, f"BadRequest names fields {desc.name} lacks: {missing}"


async def _send(
    channel: grpc.aio.Channel, service: Any, method: Any, payload: bytes
) -> tuple[grpc.StatusCode, grpc.aio.AioRpcError | None]:
    """Sends serialized request bytes to ``method`` (no serializers: bytes as they are)."""
    path = f"/{service.full_name}/{method.name}"
    if method.server_streaming:
        call = channel.unary_stream(path)(payload, timeout=CALL_TIMEOUT)
    else:
        call = channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT)
    return await _outcome(call, method.server_streaming)


@pytest.fixture
async def fuzz_course(channel: grpc.aio.Channel) -> str:
    """The registered course whose id the drawn requests use (registered again for each
    test: a drawn DeleteCourse deletes it)."""
    await channel.unary_unary(
        "/lessonprogress.v1.CatalogService/UpsertCourse",
        request_serializer=catalog_service_pb2.UpsertCourseRequest.SerializeToString,
        response_deserializer=catalog_service_pb2.UpsertCourseResponse.FromString,
    )(
        catalog_service_pb2.UpsertCourseRequest(
            course_id=COURSE_ID,
            title="fuzz",
            lessons=[resources_pb2.Lesson(lesson_id=lesson, title=lesson) for lesson in LESSONS],
        ),
        timeout=CALL_TIMEOUT,
    )
    return COURSE_ID


async def _serving(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
    )
    return int(response.status)


@pytest.mark.parametrize(("service", "method"), METHODS, ids=IDS)
async def test_drawn_requests_get_deliberate_statuses(
    channel: grpc.aio.Channel, fuzz_course: str, service: Any, method: Any
) -> None:
    requests = _draw(_message(method.input_type), EXAMPLES)
    seen: dict[grpc.StatusCode, int] = {}
    for request in requests:
        code, error = await _send(channel, service, method, request.SerializeToString())
        seen[code] = seen.get(code, 0) + 1
        try:
            _check(code, error, method.input_type)
        except AssertionError as exc:
            raise AssertionError(f"{method.full_name}({request!r:.2000}): {exc}") from None
    assert await _serving(channel) == health_pb2.HealthCheckResponse.SERVING, seen


@pytest.mark.parametrize(("service", "method"), METHODS, ids=IDS)
async def test_raw_bytes_get_deliberate_statuses(
    channel: grpc.aio.Channel, service: Any, method: Any
) -> None:
    payloads = _draw(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from([b"\xff" * 10, b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\x0f", b"\x08"]),
        ),
        RAW_EXAMPLES,
    )
    for payload in payloads:
        code, error = await _send(channel, service, method, payload)
        try:
            _check(code, error, method.input_type)
        except AssertionError as exc:
            raise AssertionError(f"{method.full_name}(raw {payload!r}): {exc}") from None
    assert await _serving(channel) == health_pb2.HealthCheckResponse.SERVING
