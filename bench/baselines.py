"""The two baselines, run by the load generators over plain asyncpg connections.

* ``RawBackend``, the ceiling: the very SQL statements the service runs (imported from
  its store modules), with the same follow-up queries when a statement returns no row,
  over one dedicated connection per client: no gRPC, no pool, no protobuf.
* ``NaiveBackend``, the peer: the seed note's data flow ("Data Flow" in
  shared/seed/lesson-progress-table.md): SELECT the row, then INSERT or UPDATE it, then
  a separate ``course_progress`` UPDATE on completion, each statement committed on its own.
  It writes no attempt history and no events, i.e. less than the service does.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from bench.backends import Call, Outcome, Window, unsupported
from bench.keys import CourseKey, Heartbeat, Key, Params, Scored
from bench.operations import Op
from lesson_progress.store.analytics import COURSE_LEARNERS, LESSON_STATS
from lesson_progress.store.checks import COURSE_EXISTS, GET_LESSON_PROGRESS, LOOKUP_LESSON
from lesson_progress.store.heartbeats import (
    HEARTBEAT,
    HEARTBEATS,
    array_arguments,
    heartbeat_arguments,
)
from lesson_progress.store.progress import (
    COMPLETE_LESSON,
    GET_COURSE_PROGRESS,
    LIST_LESSON_PROGRESS,
    RECORD_ATTEMPT,
    START_LESSON,
)

# Page size the service uses when a request leaves it unset (it fetches one row more).
LIST_LIMIT = 50 + 1
LESSON_STATS_PREFETCH = 100
LEARNERS_PREFETCH = 1000


class _Connections:
    """One asyncpg connection per client slot."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connections: list[asyncpg.Connection] = []

    async def open(self, slots: int) -> None:
        """Connects every slot."""
        self.connections = [await asyncpg.connect(self.url) for _ in range(slots)]

    def prepare(self, op: Op, params: list[Params]) -> list[object]:
        """Parameters are used as they are."""
        return list(params)

    async def close(self) -> None:
        """Closes every connection."""
        for connection in self.connections:
            await connection.close()


class RawBackend(_Connections):
    """The service's own statements, straight over asyncpg."""

    def counts_rows_in_window(self, op: Op) -> bool:
        """Cursor rows are counted as they arrive."""
        return op is Op.STREAM_COURSE_LEARNERS

    async def _write(self, connection: asyncpg.Connection, statement: str, key: Key,
                     *args: object) -> None:  # fmt: skip
        """A write as ProgressStore._write runs it: the statement, and if it returns no
        row, the queries that explain why and read the current row."""
        row = await connection.fetchrow(statement, key.user_id, key.course_id, key.lesson_id, *args)
        if row is None:
            await connection.fetchrow(LOOKUP_LESSON, key.course_id, key.lesson_id)
            await connection.fetchrow(
                GET_LESSON_PROGRESS, key.user_id, key.course_id, key.lesson_id
            )

    def call(self, op: Op) -> Call:
        """The statements of ``op``."""
        calls: dict[Op, Call] = {
            Op.RECORD_TIME: self._record_time,
            Op.BATCH_RECORD_TIME: self._batch,
            Op.START_LESSON: self._start,
            Op.RECORD_ATTEMPT: self._attempt,
            Op.COMPLETE_LESSON: self._complete,
            Op.GET_LESSON_PROGRESS: self._get_lesson,
            Op.LIST_LESSON_PROGRESS: self._list,
            Op.GET_COURSE_PROGRESS: self._course,
            Op.STREAM_LESSON_STATS: self._lesson_stats,
            Op.STREAM_LESSON_STATS_LARGEST: self._lesson_stats,
            Op.STREAM_COURSE_LEARNERS: self._learners,
        }
        return calls.get(op) or unsupported(op, "raw")

    async def _record_time(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Heartbeat)
        await self.connections[slot].fetch(HEARTBEAT, *heartbeat_arguments(item.value(), 300))
        return 1, True

    async def _batch(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, tuple)
        rows = await self.connections[slot].fetch(HEARTBEATS, *_arguments(list(item)))
        return len(rows), True

    async def _start(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Key)
        await self._write(self.connections[slot], START_LESSON, item)
        return 1, True

    async def _attempt(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Scored)
        await self._write(self.connections[slot], RECORD_ATTEMPT, item.key, item.score, None)
        return 1, True

    async def _complete(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Scored)
        connection = self.connections[slot]
        key = item.key
        await self._write(connection, COMPLETE_LESSON, key, item.score, None)
        await connection.fetchrow(GET_COURSE_PROGRESS, key.user_id, key.course_id)
        return 1, True

    async def _get_lesson(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Key)
        connection = self.connections[slot]
        row = await connection.fetchrow(
            GET_LESSON_PROGRESS, item.user_id, item.course_id, item.lesson_id
        )
        if row is None:
            await connection.fetchrow(LOOKUP_LESSON, item.course_id, item.lesson_id)
        return 1, True

    async def _list(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, CourseKey)
        connection = self.connections[slot]
        rows = await connection.fetch(
            LIST_LESSON_PROGRESS, item.user_id, item.course_id, False, None, None, LIST_LIMIT
        )
        if not rows:
            await connection.fetchval(COURSE_EXISTS, item.course_id)
        return 1, True

    async def _course(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, CourseKey)
        await self.connections[slot].fetchrow(GET_COURSE_PROGRESS, item.user_id, item.course_id)
        return 1, True

    async def _cursor(
        self, slot: int, query: str, course_id: str, prefetch: int, window: Window
    ) -> Outcome:
        """A report as AnalyticsStore streams it: one read-only snapshot, a cursor."""
        connection = self.connections[slot]
        rows = 0
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            await connection.fetchval(COURSE_EXISTS, course_id)
            async for _ in connection.cursor(query, course_id, prefetch=prefetch):
                inside, past = window.rows_now()
                if past:
                    return rows, False
                rows += inside
        return rows, True

    async def _lesson_stats(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, str)
        return await self._cursor(slot, LESSON_STATS, item, LESSON_STATS_PREFETCH, window)

    async def _learners(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, str)
        return await self._cursor(slot, COURSE_LEARNERS, item, LEARNERS_PREFETCH, window)


_WHERE = "WHERE user_id = $1 AND course_id = $2 AND lesson_id = $3"
NAIVE_SELECT = f"SELECT * FROM lesson_progress {_WHERE}"
NAIVE_INSERT = """
INSERT INTO lesson_progress (user_id, course_id, lesson_id) VALUES ($1, $2, $3) RETURNING *
"""
NAIVE_TOUCH = f"UPDATE lesson_progress SET last_accessed_at = NOW() {_WHERE} RETURNING *"
NAIVE_INSERT_TIME = """
INSERT INTO lesson_progress (user_id, course_id, lesson_id, time_spent_seconds)
VALUES ($1, $2, $3, $4) RETURNING *
"""
NAIVE_ADD_TIME = f"""
UPDATE lesson_progress
SET time_spent_seconds = time_spent_seconds + $4, last_accessed_at = NOW()
{_WHERE} RETURNING *
"""
NAIVE_INSERT_ATTEMPT = """
INSERT INTO lesson_progress
    (user_id, course_id, lesson_id, attempts, score, completed, completed_at)
VALUES ($1, $2, $3, 1, $4, $5, $6) RETURNING *
"""
NAIVE_ATTEMPT = f"""
UPDATE lesson_progress
SET attempts = attempts + 1, score = GREATEST(score, $4), completed = completed OR $5,
    completed_at = COALESCE(completed_at, $6),
    last_accessed_at = NOW()
{_WHERE} RETURNING *
"""
NAIVE_INSERT_COMPLETE = """
INSERT INTO lesson_progress (user_id, course_id, lesson_id, completed, completed_at, score)
VALUES ($1, $2, $3, true, NOW(), $4) RETURNING *
"""
NAIVE_COMPLETE = f"""
UPDATE lesson_progress
SET completed = true, completed_at = NOW(), score = $4, last_accessed_at = NOW()
{_WHERE} RETURNING *
"""
NAIVE_SYNC_COURSE = """
UPDATE course_progress SET completed_lessons = completed_lessons || to_jsonb($3::text)
WHERE user_id = $1 AND course_id = $2
"""


class NaiveBackend(_Connections):
    """The seed note's data flow for the writes."""

    def counts_rows_in_window(self, op: Op) -> bool:
        """A batch, done one heartbeat after the other, can outlast the window."""
        return op is Op.BATCH_RECORD_TIME

    def call(self, op: Op) -> Call:
        """The statements of ``op``."""
        calls: dict[Op, Call] = {
            Op.RECORD_TIME: self._record_time,
            Op.BATCH_RECORD_TIME: self._batch,
            Op.START_LESSON: self._start,
            Op.RECORD_ATTEMPT: self._attempt,
            Op.COMPLETE_LESSON: self._complete,
        }
        return calls.get(op) or unsupported(op, "naive")

    @staticmethod
    async def _upsert(
        connection: asyncpg.Connection, key: Key, insert: str, update: str, *args: object
    ) -> asyncpg.Record | None:
        """SELECT the row; INSERT it if missing, else UPDATE it. Returns the old row."""
        params = (key.user_id, key.course_id, key.lesson_id, *args)
        existing = await connection.fetchrow(NAIVE_SELECT, *params[:3])
        await connection.fetchrow(update if existing is not None else insert, *params)
        return existing

    async def _heartbeat(self, connection: asyncpg.Connection, beat: Heartbeat) -> None:
        await self._upsert(connection, beat.key, NAIVE_INSERT_TIME, NAIVE_ADD_TIME, beat.seconds)

    async def _record_time(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Heartbeat)
        await self._heartbeat(self.connections[slot], item)
        return 1, True

    async def _batch(self, slot: int, item: object, window: Window) -> Outcome:
        """No batch in the seed's flow: one heartbeat after the other."""
        assert isinstance(item, tuple)
        connection = self.connections[slot]
        rows = 0
        for beat in item:
            await self._heartbeat(connection, beat)
            inside, past = window.rows_now()
            if past:
                return rows, False
            rows += inside
        return rows, True

    async def _start(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Key)
        await self._upsert(self.connections[slot], item, NAIVE_INSERT, NAIVE_TOUCH)
        return 1, True

    async def _sync_course(self, connection: asyncpg.Connection, key: Key) -> None:
        await connection.execute(NAIVE_SYNC_COURSE, key.user_id, key.course_id, key.lesson_id)

    async def _attempt(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Scored)
        connection = self.connections[slot]
        # The completion time comes from the client: Citus refuses NOW() inside CASE or
        # COALESCE in a distributed UPDATE, and the seed's flow is measured on both engines.
        completed_at = datetime.now(UTC) if item.passes else None
        old = await self._upsert(
            connection,
            item.key,
            NAIVE_INSERT_ATTEMPT,
            NAIVE_ATTEMPT,
            item.score,
            item.passes,
            completed_at,
        )
        if item.passes and (old is None or not old["completed"]):
            await self._sync_course(connection, item.key)
        return 1, True

    async def _complete(self, slot: int, item: object, window: Window) -> Outcome:
        assert isinstance(item, Scored)
        connection = self.connections[slot]
        await self._upsert(connection, item.key, NAIVE_INSERT_COMPLETE, NAIVE_COMPLETE, item.score)
        await self._sync_course(connection, item.key)
        return 1, True


def _arguments(beats: list[Heartbeat]) -> tuple[object, ...]:
    """The service's heartbeat statement's arguments (default allowance, no request ids)."""
    return array_arguments([b.value() for b in beats], 300)
