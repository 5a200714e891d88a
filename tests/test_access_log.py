"""The access log's direct writer gives the very line the JSON formatter gives."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from lesson_progress import observability
from lesson_progress.observability import JsonFormatter, configure_logging, log_rpc

RPC_FIELDS = ("method", "code", "duration_ms", "peer", "request_id")
METHOD = "/lessonprogress.v1.ProgressService/RecordTime"
# Request ids are the caller's: quotes, backslashes, control characters, non-ASCII.
AWKWARD = [
    "",
    "6f1c0a3e-8a5e-4f4e-9a53-3f1e4b0c2d11",
    'a"b',
    "back\\slash",
    "tab\there",
    "new\nline",
    "\x00\x1f\x7f",
    "élève-日本-\U0001f600",
    "\u2028\u2029",
]


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """JSON logging configured on a captured standard error; logging restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, observability.access_log.disabled)
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    configure_logging("INFO", "json", True)
    yield captured
    root.handlers[:], level, observability.access_log.disabled = saved
    root.setLevel(level)
    observability._fast_access_log = None


def expected_line(written: dict[str, object]) -> str:
    """What JsonFormatter makes of the same call, at the time the line carries."""
    created = datetime.fromisoformat(str(written["time"])).timestamp()
    record = logging.makeLogRecord(
        {
            "name": "lesson_progress.access",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "rpc",
            "created": created,
            "rpc": {key: written[key] for key in RPC_FIELDS},
        }
    )
    return JsonFormatter().format(record)


@pytest.mark.parametrize("request_id", AWKWARD)
def test_direct_line_equals_the_formatter_line(stderr: io.StringIO, request_id: str) -> None:
    log_rpc(METHOD, "OK", time.perf_counter() - 0.0123, "ipv6:[::1]:5555", request_id)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1
    written = json.loads(lines[0])
    assert written["request_id"] == request_id
    assert written["peer"] == "ipv6:[::1]:5555"
    assert written["method"] == METHOD
    assert written["code"] == "OK"
    assert isinstance(written["duration_ms"], float)
    assert written["duration_ms"] >= 12.3
    assert lines[0] == expected_line(written)


def test_an_added_handler_gets_every_line_through_logging(stderr: io.StringIO) -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    observability.access_log.addHandler(keep)
    try:
        log_rpc(METHOD, "NOT_FOUND", time.perf_counter(), "ipv4:127.0.0.1:1", "r-1")
    finally:
        observability.access_log.removeHandler(keep)
    assert [record.rpc["request_id"] for record in seen] == ["r-1"]  # type: ignore[attr-defined]
    written = json.loads(stderr.getvalue())
    assert written["code"] == "NOT_FOUND"
    assert stderr.getvalue().rstrip("\n") == expected_line(written)


def test_disabled_access_log_writes_nothing(stderr: io.StringIO) -> None:
    configure_logging("INFO", "json", False)
    log_rpc(METHOD, "OK", time.perf_counter(), "ipv4:127.0.0.1:1", "r-1")
    assert stderr.getvalue() == ""


def test_a_level_above_info_writes_nothing(stderr: io.StringIO) -> None:
    configure_logging("WARNING", "json", True)
    log_rpc(METHOD, "OK", time.perf_counter(), "ipv4:127.0.0.1:1", "r-1")
    assert stderr.getvalue() == ""
