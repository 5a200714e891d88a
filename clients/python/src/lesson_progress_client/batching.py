"""Coalesces concurrent ``record_time`` calls into ``BatchRecordTime`` calls.

A batch is atomic on the server: one bad entry fails it whole, naming the entry
(``requests[i]...``). The batcher hands that error to the entry's caller alone and sends
the others again without it; an error it cannot pin on one entry is settled by sending each
entry on its own. Retryable errors are retried with the same request ids, so a heartbeat
counts once however often its batch is sent.
"""
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import grpc

from lesson_progress_client.errors import FieldViolation, ProgressError
from lesson_progress_client.settings import HeartbeatBatching
from lessonprogress.v1 import progress_service_pb2, resources_pb2

RecordTimeRequest = progress_service_pb2.RecordTimeRequest
BatchRecordTimeRequest = progress_service_pb2.BatchRecordTimeRequest
BatchRecordTimeResponse = progress_service_pb2.BatchRecordTimeResponse
LessonProgress = resources_pb2.LessonProgress

#: One attempt of BatchRecordTime: (request, timeout in seconds or None) -> response.
Send = Callable[[BatchRecordTimeRequest, float | None], Awaitable[BatchRecordTimeResponse]]
#: The back-off before retrying attempt ``n`` that failed with the error, or None.
RetryDelay = Callable[[ProgressError, int, float | None], float | None]

_ENTRY: Final = re.compile(r"^requests\[(\d+)\]\.?")


@dataclass(slots=True)
class _Entry:
    """One caller's heartbeat, waiting for its outcome."""

    request: RecordTimeRequest
    deadline: float | None
    outcome: asyncio.Future[Credited]


@dataclass(frozen=True, slots=True)
class Credited:
    """The outcome of one heartbeat: its lesson after the call, and the seconds the server's
    time budget credited (0 to the heartbeat's ``seconds``)."""

    lesson: LessonProgress
    credited_seconds: int


def credited_by_entry(
    response: BatchRecordTimeResponse, requests: Sequence[RecordTimeRequest]
) -> list[Credited]:
    """Each entry's outcome, in request order: from ``entry_results`` (each lesson once in
    ``distinct_lessons``), or, from a server before the time budget, one lesson per entry
    with every second credited."""
    if not response.entry_results:
        return [
            Credited(lesson, entry.seconds)
            for lesson, entry in zip(response.lessons, requests, strict=True)
        ]
    lessons = response.distinct_lessons
    return [
        Credited(lessons[result.lesson_index], result.credited_seconds)
        for result in response.entry_results
    ]


def _blamed_entry(error: ProgressError, size: int) -> int | None:
    """The entry a batch's error names (field violations or message), if exactly one."""
    named = {
        int(match.group(1))
        for text in (*error.fields, error.message)
        if (match := _ENTRY.match(text)) is not None
    }
    if len(named) == 1 and (index := named.pop()) < size:
        return index
    return None


def _for_entry(error: ProgressError, index: int) -> ProgressError:
    """The batch's error as the entry's caller sees it: fields of its own request."""
    prefix = f"requests[{index}]"
    violations = [
        FieldViolation(v.field.removeprefix(prefix).removeprefix("."), v.description)
        for v in error.field_violations
        if v.field.startswith(prefix)
    ]
    message = error.message.removeprefix(prefix).removeprefix(": ")
    return ProgressError(
        error.code,
        message,
        reason=error.reason,
        domain=error.domain,
        metadata=error.metadata,
        field_violations=violations,
        attempts=error.attempts,
    )


class HeartbeatBatcher:
    """Collects heartbeats for ``settings.linger`` seconds (or ``max_batch`` of them) and
    sends them as one BatchRecordTime call."""

    def __init__(self, settings: HeartbeatBatching, send: Send, retry_delay: RetryDelay) -> None:
        self.settings = settings
        self._send = send
        self._retry_delay = retry_delay
        self._pending: list[_Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def record_time(self, request: RecordTimeRequest, timeout: float | None) -> Credited:
        """Queues one heartbeat; its outcome once its batch has been written."""
        loop = asyncio.get_running_loop()
        entry = _Entry(
            request, None if timeout is None else loop.time() + timeout, loop.create_future()
        )
        self._pending.append(entry)
        if len(self._pending) >= self.settings.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.settings.linger, self._flush)
        try:
            return await asyncio.wait_for(entry.outcome, timeout)
        except TimeoutError:
            raise ProgressError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded (batched heartbeat)"
            ) from None

    def _flush(self) -> None:
        """Sends everything pending, ``max_batch`` entries a call."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        size = self.settings.max_batch
        for start in range(0, len(pending), size):
            task = asyncio.create_task(self._deliver(pending[start : start + size]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Sends what is pending and waits for every batch in flight."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _deliver(self, entries: list[_Entry]) -> None:
        """Sends a batch until every entry has its outcome (or its caller gave up)."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while entries := [entry for entry in entries if not entry.outcome.done()]:
            deadlines = [entry.deadline for entry in entries]
            deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            requests = [entry.request for entry in entries]
            attempt += 1
            try:
                response = await self._send(BatchRecordTimeRequest(requests=requests), remaining)
            except ProgressError as error:
                error.attempts = attempt
                delay = self._retry_delay(error, attempt, deadline)
                if delay is not None:
                    await asyncio.sleep(delay)
                    continue
                blamed = _blamed_entry(error, len(entries))
                if blamed is not None and not error.retryable:
                    _settle(entries.pop(blamed), _for_entry(error, blamed))
                    attempt = 0
                    continue
                if len(entries) > 1 and not error.retryable:
                    # Not one entry's fault as far as the error says: each on its own.
                    await asyncio.gather(*(self._deliver([entry]) for entry in entries))
                    return
                for entry in entries:
                    _settle(entry, error)
                return
            for entry, credited in zip(entries, credited_by_entry(response, requests), strict=True):
                _settle(entry, credited)
            return


def _settle(entry: _Entry, outcome: Credited | ProgressError) -> None:
    """Hands an entry its outcome, unless its caller has stopped waiting."""
    if entry.outcome.done():
        return
    if isinstance(outcome, ProgressError):
        entry.outcome.set_exception(outcome)
    else:
        entry.outcome.set_result(outcome)
