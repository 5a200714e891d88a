"""Heartbeats: RecordTime and BatchRecordTime, from the statements to the merging writer.

Heartbeats are the bulk of the traffic, and one statement (and one commit) per heartbeat
costs PostgreSQL and the driver far more than the row itself. ``record_time`` sends a
heartbeat at once when a statement slot is free, so a lone call waits for nothing; while
every slot is busy, newly arriving heartbeats queue and leave together in the next
statement, each caller getting back its own row or its own error. That statement treats
entries independently (one caller's unknown lesson or reused request id does not fail the
others); if it fails as a whole (an overflowing counter, a course deleted meanwhile), each
of its entries is retried alone, so every caller gets the outcome a solo call would have.
``batch_record_time`` runs the same statement all-or-nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from lesson_progress import errors
from lesson_progress.store.checks import ensure_lesson
from lesson_progress.store.database import Connection, Database, Record, call_deadline
from lesson_progress.values import Heartbeat

H = TypeVar("H")

# Heartbeats as parallel arrays, in one call of the function of migrations 0007-0012: outline
# and request-id checks, the time budget (learner clocks locked in user_id order), the
# claims, then the lesson rows upserted with the credited seconds (summed per lesson, in key
# order, so concurrent calls cannot deadlock). One row per entry, in order: `missing`
# (lesson outside its outline), `reused_*` (where a request id of another call was first
# used), `credited_seconds`, `applied` (false: a replay), and the lesson row (NULL fields
# when none). All or nothing: BatchRecordTime's statement (the heartbeats ``record_time``
# merges are independent entries: MERGED_HEARTBEATS).
_ROW = """
SELECT idx, missing, reused_method, reused_course_id, reused_lesson_id, credited_seconds,
       applied, (progress).*
"""
HEARTBEATS = (
    _ROW
    + """FROM lp_record_heartbeats($1::uuid[], $2::uuid[], $3::varchar[], $4::integer[],
                          $5::uuid[], $6::timestamptz[], $7::integer, $8::integer, true)
"""
)
# Heartbeats merged by RecordTime's writer: HEARTBEATS with independent entries, its lock
# waits bounded by the function (LOCK_WAIT, migration 0010).
MERGED_HEARTBEATS = (
    _ROW
    + """FROM lp_record_merged_heartbeats($1::uuid[], $2::uuid[], $3::varchar[], $4::integer[],
                                 $5::uuid[], $6::timestamptz[], $7::integer, $8::integer)
"""
)
# One heartbeat, the same rule and row shape in fewer statements (migration 0009): a
# RecordTime call that finds a statement slot free.
HEARTBEAT = (
    _ROW
    + """FROM lp_record_heartbeat($1::uuid, $2::uuid, $3::varchar, $4::integer, $5::uuid,
                         $6::timestamptz, $7::integer, $8::integer)
"""
)

#: How far back an entry's occurred_at may go (seconds), and so how long a learner's clock
#: keeps the time it credited.
OCCURRED_AT_RETENTION = 7 * 24 * 3600
#: How far ahead of the server's clock an occurred_at may be (seconds): clock skew.
OCCURRED_AT_SKEW = 60


def _reuse(field: str, row: Record) -> errors.RequestIdUse:
    """Where the request id of a heartbeat statement's row was first used."""
    return errors.RequestIdUse(
        field, row["reused_method"], row["reused_course_id"], row["reused_lesson_id"]
    )


async def _outcome(
    connection: Connection, heartbeat: Heartbeat, row: Record
) -> Record | errors.ServiceError:
    """What a heartbeat statement's row means for the caller of an independent heartbeat:
    the lesson row, or the error a call of its own would get."""
    if row["missing"]:
        try:
            await ensure_lesson(connection, heartbeat.course_id, heartbeat.lesson_id)
        except errors.NotFound as exc:
            return exc
        return errors.Aborted("the outline changed; retry the call")
    if row["reused_method"] is not None:
        return errors.InvalidArgument.request_id_reused([_reuse("request_id", row)])
    if row["user_id"] is None:  # a replay whose row was deleted meanwhile
        return errors.NotFound("the lesson progress no longer exists")
    return row


def array_arguments(heartbeats: list[Heartbeat], allowance_seconds: int) -> tuple[object, ...]:
    """The arguments of ``HEARTBEATS`` or ``MERGED_HEARTBEATS`` for these heartbeats."""
    return (*_columns(heartbeats), allowance_seconds, OCCURRED_AT_RETENTION)


def heartbeat_arguments(heartbeat: Heartbeat, allowance_seconds: int) -> tuple[object, ...]:
    """The arguments of ``HEARTBEAT`` for this heartbeat."""
    h = heartbeat
    return (h.user_id, h.course_id, h.lesson_id, h.seconds, h.request_id, h.occurred_at,
            allowance_seconds, OCCURRED_AT_RETENTION)  # fmt: skip


def _columns(heartbeats: list[Heartbeat]) -> tuple[list[object], ...]:
    """The heartbeats as the six parallel arrays the heartbeat statement takes."""
    return (
        [h.user_id for h in heartbeats],
        [h.course_id for h in heartbeats],
        [h.lesson_id for h in heartbeats],
        [h.seconds for h in heartbeats],
        [h.request_id for h in heartbeats],
        [h.occurred_at for h in heartbeats],
    )


# How long a heartbeat statement may wait for a row lock before it is rolled back and its
# heartbeats retried (apart from each other): a row locked by someone else then delays
# only the heartbeats on that row, never a slot for long. The writer's functions carry it
# (migration 0010), so that its statements need no transaction to set it: without a
# caller's deadline each is one autocommit statement, one round trip rather than three.
LOCK_WAIT = 0.2
# Pause of a heartbeat whose row was locked before it tries again (its caller's deadline
# ends the retries).
LOCK_RETRY_DELAY = 0.05


@dataclass(slots=True)
class _Pending(Generic[H]):
    item: H
    future: asyncio.Future[Record]
    deadline: float | None
    """loop.time() when its caller stops waiting (None: never)."""


class HeartbeatWriter(Generic[H]):
    """Writes heartbeats with at most ``slots`` statements at once: one alone when a slot
    is free, else queued and merged with the others that wait (up to ``max_batch``).

    Each heartbeat is written once per attempt: a merged statement that fails as a whole
    has its heartbeats retried one by one (through the slots, like any other); a statement
    of one that fails fails its caller. A heartbeat whose caller has gone (cancelled, or
    its deadline passed) is dropped from the queue, never written. A heartbeat whose row
    was locked too long (errors.LockTimeout, nothing written) is tried again alone, after
    a pause in which it holds no slot, until its caller's deadline; such retries never
    take the last free slot.
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
        self._queue: list[_Pending[H]] = []  # merged into statements of several
        self._alone: list[_Pending[H]] = []  # each written in a statement of its own
        self._locked: list[_Pending[H]] = []  # alone again, after their row was locked
        self._busy_locked = 0  # statements of heartbeats in _locked running now

    async def write(self, item: H) -> Record:
        """Writes ``item`` (possibly together with concurrent ones); returns its row."""
        locked = False
        while True:
            try:
                return await self._attempt(item, locked=locked)
            except errors.LockTimeout:
                locked = True  # never again in a merged statement: it would fail them all
                await asyncio.sleep(LOCK_RETRY_DELAY)

    async def _attempt(self, item: H, *, locked: bool) -> Record:
        if not locked and self._busy < self._slots and not self._queue and not self._alone:
            self._busy += 1
            try:
                return await self._write_one(item)
            finally:
                self._busy -= 1
                self._drain()
        pending = _Pending(item, asyncio.get_running_loop().create_future(), call_deadline.get())
        (self._locked if locked else self._queue).append(pending)
        self._drain()
        return await pending.future

    def _take(self) -> tuple[list[_Pending[H]], bool]:
        """The next statement's heartbeats (callers that have gone are left out), and
        whether they are a retry after a lock wait. Those never take the last free slot:
        heartbeats on rows nobody locks always have one."""
        now = asyncio.get_running_loop().time()
        while True:
            locked = False
            if self._alone:
                source, size = self._alone, 1
            elif self._queue:
                source, size = self._queue, self._max_batch
            elif self._locked and self._busy_locked < max(1, self._slots - 1):
                source, size, locked = self._locked, 1, True
            else:
                return [], False
            batch = source[:size]
            del source[:size]
            taken = []
            for pending in batch:
                if pending.deadline is not None and pending.deadline <= now:
                    pending.future.cancel()  # the caller has its DEADLINE_EXCEEDED already
                if not pending.future.done():
                    taken.append(pending)
            if taken:
                return taken, locked

    def _drain(self) -> None:
        while self._busy < self._slots:
            batch, locked = self._take()
            if not batch:
                return
            self._busy += 1
            self._busy_locked += locked
            asyncio.get_running_loop().create_task(self._flush(batch, locked))

    async def _flush(self, batch: list[_Pending[H]], locked: bool = False) -> None:
        deadlines = [p.deadline for p in batch]
        # The statement may take as long as the first of its callers waits, no longer.
        call_deadline.set(None if None in deadlines else min(d for d in deadlines if d))
        try:
            if len(batch) == 1:
                outcomes: list[Record | BaseException] = []
                try:
                    outcomes.append(await self._write_one(batch[0].item))
                except errors.ServiceError as exc:
                    outcomes.append(exc)
            else:
                try:
                    outcomes = list(await self._write_many([p.item for p in batch]))
                except Exception:
                    # Failed as a whole (nothing applied): each is retried on its own.
                    self._alone.extend(batch)
                    return
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():  # the caller went away (cancelled)
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
        except BaseException as exc:  # an unexpected error: no caller may wait for ever
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            raise
        finally:
            self._busy -= 1
            self._busy_locked -= locked
            self._drain()


class HeartbeatStore:
    """Adds heartbeat seconds to lesson rows, at most ``slots`` statements at once."""

    def __init__(
        self,
        database: Database,
        *,
        slots: int | None = None,
        max_batch: int = 500,
        allowance_seconds: int = 300,
    ) -> None:
        self.database = database
        self.allowance_seconds = allowance_seconds
        # Leave some connections for everything else while heartbeats are merged.
        self._writer: HeartbeatWriter[Heartbeat] = HeartbeatWriter(
            self._write_one,
            self._write_many,
            slots=slots or max(1, database.max_size // 2),
            max_batch=max_batch,
        )

    # --- RecordTime ------------------------------------------------------------------

    async def record_time(self, heartbeat: Heartbeat) -> Record:
        """Adds one heartbeat (possibly together with concurrent ones); returns its row."""
        return await self._writer.write(heartbeat)

    async def _write_one(self, h: Heartbeat) -> Record:
        """One heartbeat in a statement of its own; its row, or its error raised."""

        async def work(connection: Connection) -> Record | errors.ServiceError:
            row = await connection.fetchrow(
                HEARTBEAT, *heartbeat_arguments(h, self.allowance_seconds)
            )
            assert row is not None  # one row per heartbeat
            return await _outcome(connection, h, row)

        outcome = await self.database.run(work)
        if isinstance(outcome, errors.ServiceError):
            raise outcome
        return outcome

    async def _write_many(self, heartbeats: list[Heartbeat]) -> list[Record | errors.ServiceError]:
        """Independent heartbeats in one statement; per entry its row or its own error."""

        async def work(connection: Connection) -> list[Record | errors.ServiceError]:
            rows = await connection.fetch(
                MERGED_HEARTBEATS, *array_arguments(heartbeats, self.allowance_seconds)
            )
            return [
                await _outcome(connection, heartbeat, row)
                for heartbeat, row in zip(heartbeats, rows, strict=True)
            ]

        return await self.database.run(work)

    # --- BatchRecordTime ---------------------------------------------------------------

    async def batch_record_time(self, heartbeats: list[Heartbeat]) -> list[Record]:
        """Adds every heartbeat atomically; returns one row per entry, in order."""
        arguments = array_arguments(heartbeats, self.allowance_seconds)

        async def work(connection: Connection) -> list[Record]:
            rows = await connection.fetch(HEARTBEATS, *arguments)
            missing = [row["idx"] - 1 for row in rows if row["missing"]]
            if missing:
                first = heartbeats[missing[0]]
                try:
                    await ensure_lesson(connection, first.course_id, first.lesson_id)
                except errors.NotFound as exc:
                    raise errors.NotFound(
                        f"requests[{missing[0]}]: {exc.message}", reason=exc.reason
                    ) from None
                raise errors.Aborted("the course outline changed during the call; retry it")
            reused = [
                _reuse(f"requests[{row['idx'] - 1}].request_id", row)
                for row in rows
                if row["reused_method"] is not None
            ]
            if reused:
                raise errors.InvalidArgument.request_id_reused(reused)
            return rows

        return await self.database.run(work)
