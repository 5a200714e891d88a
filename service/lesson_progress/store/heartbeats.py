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
from lesson_progress.store.checks import (
    PROGRESS_COLUMNS,
    ensure_lesson,
    explain_empty_write,
    in_outline,
)
from lesson_progress.store.database import Connection, Database, Record, call_deadline
from lesson_progress.values import Heartbeat

H = TypeVar("H")

METHOD = "RecordTime"

# One heartbeat: $1 user, $2 course, $3 lesson, $4 seconds, $5 request id (or NULL); the
# function of migration 0004 (on Citus it runs on the course's worker in one round trip).
RECORD_TIME = f"""
SELECT {PROGRESS_COLUMNS}
FROM lp_record_time($1::uuid, $2::uuid, $3::varchar, $4::integer, $5::uuid)
"""

# Heartbeats as five parallel arrays, summed per lesson, in one statement. Entries are
# numbered by their place in the request; a request id counts for its first entry only.
# Rows are upserted in key order so that concurrent statements lock them in the same order
# and cannot deadlock. {valid} decides what an entry naming a lesson outside its outline,
# or reusing a request id of another call, does to the others: all-or-nothing for
# BatchRecordTime, nothing for independent heartbeats merged by ``record_time``. An entry
# reusing a request id comes back with where that id was first used.
_HEARTBEATS = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::varchar[], $4::integer[], $5::uuid[])
        WITH ORDINALITY AS t(user_id, course_id, lesson_id, seconds, request_id, idx)
),
missing AS (
    SELECT i.idx FROM input i
    WHERE NOT {in_outline("i.course_id", "i.lesson_id")}
),
reused AS (
    SELECT i.idx, r.method AS first_method, r.course_id::text AS first_course_id,
           r.lesson_id AS first_lesson_id
    FROM input i
    JOIN processed_requests r
      ON r.user_id = i.user_id AND r.request_id = i.request_id AND r.course_id = i.course_id
    WHERE (r.method, r.lesson_id) IS DISTINCT FROM ('{METHOD}', i.lesson_id)
),
valid AS (
    SELECT i.* FROM input i WHERE {{valid}}
),
first_use AS (
    SELECT DISTINCT ON (user_id, request_id, course_id)
           idx, user_id, request_id, course_id, lesson_id
    FROM valid WHERE request_id IS NOT NULL
    ORDER BY user_id, request_id, course_id, idx
),
claimed AS (
    INSERT INTO processed_requests (user_id, request_id, method, course_id, lesson_id)
    SELECT user_id, request_id, '{METHOD}', course_id, lesson_id FROM first_use
    ORDER BY user_id, request_id, course_id
    ON CONFLICT DO NOTHING
    RETURNING user_id, request_id, course_id
),
accepted AS (
    SELECT v.user_id, v.course_id, v.lesson_id, v.seconds FROM valid v
    WHERE v.request_id IS NULL
       OR v.idx IN (
           SELECT f.idx FROM first_use f JOIN claimed c USING (user_id, request_id, course_id)
       )
),
summed AS (
    SELECT user_id, course_id, lesson_id, sum(seconds) AS seconds FROM accepted
    GROUP BY user_id, course_id, lesson_id
),
upserted AS (
    INSERT INTO lesson_progress AS lp
        (user_id, course_id, lesson_id, time_spent_seconds, last_accessed_at)
    SELECT user_id, course_id, lesson_id, seconds, clock_timestamp() FROM summed
    ORDER BY user_id, course_id, lesson_id
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
        last_accessed_at = GREATEST(lp.last_accessed_at, EXCLUDED.last_accessed_at)
    RETURNING {PROGRESS_COLUMNS}
),
result AS (
    SELECT * FROM upserted
    UNION ALL
    SELECT {PROGRESS_COLUMNS} FROM lesson_progress p
    WHERE (p.user_id, p.course_id, p.lesson_id) IN (
        SELECT user_id, course_id, lesson_id FROM valid
        EXCEPT SELECT user_id, course_id, lesson_id FROM summed
    )
)
SELECT i.idx, i.idx IN (SELECT idx FROM missing) AS missing,
       u.first_method AS reused_method, u.first_course_id AS reused_course_id,
       u.first_lesson_id AS reused_lesson_id, r.*
FROM input i
LEFT JOIN reused u USING (idx)
LEFT JOIN result r USING (user_id, course_id, lesson_id)
ORDER BY i.idx
"""

BATCH_RECORD_TIME = _HEARTBEATS.format(
    valid="NOT EXISTS (SELECT FROM missing) AND NOT EXISTS (SELECT FROM reused)"
)
INDEPENDENT_HEARTBEATS = _HEARTBEATS.format(
    valid="i.idx NOT IN (SELECT idx FROM missing UNION ALL SELECT idx FROM reused)"
)


def _reuse(field: str, row: Record) -> errors.RequestIdUse:
    """Where the request id of a heartbeat statement's row was first used."""
    return errors.RequestIdUse(
        field, row["reused_method"], row["reused_course_id"], row["reused_lesson_id"]
    )


def _columns(heartbeats: list[Heartbeat]) -> tuple[list[object], ...]:
    """The heartbeats as the five parallel arrays the heartbeat statements take."""
    return (
        [h.user_id for h in heartbeats],
        [h.course_id for h in heartbeats],
        [h.lesson_id for h in heartbeats],
        [h.seconds for h in heartbeats],
        [h.request_id for h in heartbeats],
    )


# How long a heartbeat statement may wait for a row lock before it is rolled back and its
# heartbeats retried (apart from each other): a row locked by someone else then delays
# only the heartbeats on that row, never a slot for long.
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
        self, database: Database, *, slots: int | None = None, max_batch: int = 500
    ) -> None:
        self.database = database
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
        """One heartbeat in one statement; explains an empty result with a second query."""

        async def work(connection: Connection) -> Record:
            row = await connection.fetchrow(
                RECORD_TIME, h.user_id, h.course_id, h.lesson_id, h.seconds, h.request_id
            )
            if row is not None:
                return row
            return await explain_empty_write(
                connection, METHOD, h.user_id, h.course_id, h.lesson_id, h.request_id
            )

        return await self.database.run(work, lock_timeout=LOCK_WAIT)

    async def _write_many(self, heartbeats: list[Heartbeat]) -> list[Record | errors.ServiceError]:
        """Independent heartbeats in one statement; per entry its row or its own error."""

        async def work(connection: Connection) -> list[Record | errors.ServiceError]:
            rows = await connection.fetch(INDEPENDENT_HEARTBEATS, *_columns(heartbeats))
            outcomes: list[Record | errors.ServiceError] = []
            for heartbeat, row in zip(heartbeats, rows, strict=True):
                if row["missing"]:
                    try:
                        await ensure_lesson(connection, heartbeat.course_id, heartbeat.lesson_id)
                        outcomes.append(errors.Aborted("the outline changed; retry the call"))
                    except errors.NotFound as exc:
                        outcomes.append(exc)
                elif row["reused_method"] is not None:
                    outcomes.append(
                        errors.InvalidArgument.request_id_reused([_reuse("request_id", row)])
                    )
                elif row["user_id"] is None:  # a replay whose row was deleted meanwhile
                    outcomes.append(errors.NotFound("the lesson progress no longer exists"))
                else:
                    outcomes.append(row)
            return outcomes

        return await self.database.run(work, lock_timeout=LOCK_WAIT)

    # --- BatchRecordTime ---------------------------------------------------------------

    async def batch_record_time(self, heartbeats: list[Heartbeat]) -> list[Record]:
        """Adds every heartbeat atomically; returns one row per entry, in order."""
        columns = _columns(heartbeats)

        async def work(connection: Connection) -> list[Record]:
            rows = await connection.fetch(BATCH_RECORD_TIME, *columns)
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
