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

from lesson_progress import errors
from lesson_progress.store.checks import (
    LESSON_CTE,
    PROGRESS_COLUMNS,
    claim_cte,
    ensure_lesson,
    explain_empty_write,
    in_outline,
)
from lesson_progress.store.database import Connection, Database, Record
from lesson_progress.values import Heartbeat

METHOD = "RecordTime"

# One heartbeat: $1 user, $2 course, $3 lesson, $4 seconds, $5 request id (or NULL).
RECORD_TIME = f"""
WITH {LESSON_CTE}, {claim_cte(METHOD)}
INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id, time_spent_seconds)
SELECT $1::uuid, $2::uuid, $3::varchar, $4::integer FROM proceed
ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
    last_accessed_at = clock_timestamp()
RETURNING {PROGRESS_COLUMNS}
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
    JOIN processed_requests r ON r.user_id = i.user_id AND r.request_id = i.request_id
    WHERE (r.method, r.course_id, r.lesson_id)
          IS DISTINCT FROM ('{METHOD}', i.course_id, i.lesson_id)
),
valid AS (
    SELECT i.* FROM input i WHERE {{valid}}
),
first_use AS (
    SELECT DISTINCT ON (user_id, request_id) idx, user_id, request_id, course_id, lesson_id
    FROM valid WHERE request_id IS NOT NULL
    ORDER BY user_id, request_id, idx
),
claimed AS (
    INSERT INTO processed_requests (user_id, request_id, method, course_id, lesson_id)
    SELECT user_id, request_id, '{METHOD}', course_id, lesson_id FROM first_use
    ORDER BY user_id, request_id
    ON CONFLICT DO NOTHING
    RETURNING user_id, request_id
),
accepted AS (
    SELECT v.user_id, v.course_id, v.lesson_id, v.seconds FROM valid v
    WHERE v.request_id IS NULL
       OR v.idx IN (SELECT f.idx FROM first_use f JOIN claimed c USING (user_id, request_id))
),
summed AS (
    SELECT user_id, course_id, lesson_id, sum(seconds) AS seconds FROM accepted
    GROUP BY user_id, course_id, lesson_id
),
upserted AS (
    INSERT INTO lesson_progress AS lp (user_id, course_id, lesson_id, time_spent_seconds)
    SELECT user_id, course_id, lesson_id, seconds FROM summed
    ORDER BY user_id, course_id, lesson_id
    ON CONFLICT (user_id, course_id, lesson_id) DO UPDATE
    SET time_spent_seconds = lp.time_spent_seconds + EXCLUDED.time_spent_seconds,
        last_accessed_at = clock_timestamp()
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


class HeartbeatStore:
    """Adds heartbeat seconds to lesson rows, at most ``slots`` statements at once."""

    def __init__(
        self, database: Database, *, slots: int | None = None, max_batch: int = 500
    ) -> None:
        self.database = database
        # Leave some connections for everything else while heartbeats are merged.
        self._slots = slots or max(1, database.max_size // 2)
        self._max_batch = max_batch
        self._busy = 0
        self._queue: list[tuple[Heartbeat, asyncio.Future[Record]]] = []

    # --- RecordTime ------------------------------------------------------------------

    async def record_time(self, heartbeat: Heartbeat) -> Record:
        """Adds one heartbeat (possibly together with concurrent ones); returns its row."""
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

    async def _flush(self, batch: list[tuple[Heartbeat, asyncio.Future[Record]]]) -> None:
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

        return await self.database.run(work)

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

        return await self.database.run(work)

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
