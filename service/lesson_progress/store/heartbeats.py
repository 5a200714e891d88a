"""Merges concurrent RecordTime calls into shared array statements.

Heartbeats are the bulk of the traffic, and one statement (and one commit) per heartbeat
costs PostgreSQL and the driver far more than the row itself. The writer sends a heartbeat
at once when a statement slot is free, so a lone call waits for nothing; while every slot
is busy, newly arriving heartbeats queue and leave together in the next statement, each
caller getting back its own row or its own error. The statement treats entries
independently (one caller's unknown lesson or reused request id does not fail the
others); if it fails as a whole (an overflowing counter, a course deleted meanwhile), each
of its entries is retried alone, so every caller gets the outcome a solo call would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from lesson_progress import errors
from lesson_progress.store.database import Record

H = TypeVar("H")


class HeartbeatWriter(Generic[H]):
    """Runs ``write_many`` over queued heartbeats, at most ``slots`` statements at once.

    ``write_one(h)`` writes a single heartbeat; ``write_many(hs)`` writes several and
    returns, per heartbeat, its row or the error that heartbeat alone would get.
    """

    def __init__(
        self,
        write_one: Callable[[H], Awaitable[Record]],
        write_many: Callable[[list[H]], Awaitable[list[Record | errors.ServiceError]]],
        *,
        slots: int,
        max_batch: int = 500,
    ) -> None:
        self._write_one = write_one
        self._write_many = write_many
        self._slots = slots
        self._max_batch = max_batch
        self._busy = 0
        self._queue: list[tuple[H, asyncio.Future[Record]]] = []

    async def write(self, heartbeat: H) -> Record:
        """Writes one heartbeat (possibly together with others); returns its row."""
        if self._busy < self._slots and not self._queue:
            self._busy += 1
            try:
                return await self._write_one(heartbeat)
            finally:
                self._busy -= 1
                self._drain()
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._queue.append((heartbeat, future))
        self._drain()
        return await future

    def _drain(self) -> None:
        while self._queue and self._busy < self._slots:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._busy += 1
            asyncio.get_running_loop().create_task(self._flush(batch))

    async def _flush(self, batch: list[tuple[H, asyncio.Future[Record]]]) -> None:
        try:
            heartbeats = [heartbeat for heartbeat, _ in batch]
            try:
                if len(batch) == 1:
                    outcomes: list[Record | BaseException] = [await self._write_one(heartbeats[0])]
                else:
                    outcomes = list(await self._write_many(heartbeats))
            except Exception:
                outcomes = list(await asyncio.gather(
                    *(self._write_one(h) for h in heartbeats), return_exceptions=True
                ))  # fmt: skip
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the caller went away (cancelled)
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._busy -= 1
            self._drain()
