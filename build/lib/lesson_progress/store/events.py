"""The progress event outbox: writing events, reading them back (``EventStore.watch``),
purging them, and hearing about them.

Writers append events in the same statement as the change (``outbox_ctes``); once it has
committed, the writing process ``pg_notify``s the course id (``EventNotifier``). Each
server process keeps one dedicated connection LISTENing on that channel
(``EventListener``); a notification only wakes the watchers of that course, which then
read what they have not seen from the table. So a watcher that reads slowly holds no queue
in memory (it reads from its last position when it is ready), and a missed notification
costs at most one poll interval, never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import asyncpg

from lesson_progress import errors
from lesson_progress.shutdown import Shutdown
from lesson_progress.store.database import APPLICATION_NAME, Connection, Database, Record

log = logging.getLogger(__name__)

EVENT_CHANNEL = "lesson_progress_events"
# First key of the two-key advisory lock that orders a course's events (see migration 0002).
EVENT_LOCK_NAMESPACE = 0x4C50  # "LP"
# Events read from the outbox per query by one watcher: its bounded window.
WATCH_BATCH = 256
# The lesson row as the event carries it (a snapshot after the change).
_SNAPSHOT = (
    "lesson_id", "completed", "time_spent_seconds", "attempts", "score", "first_started_at",
    "last_accessed_at", "completed_at", "created_at", "updated_at", "bookmark", "bookmarked_at",
)  # fmt: skip
EVENT_COLUMNS = ", ".join(("course_id", "user_id", "kind", *_SNAPSHOT))


class EventKind(enum.IntEnum):
    """Event kinds as stored; the values match ``ProgressEventKind`` of the API."""

    STARTED = 1
    ATTEMPTED = 2
    COMPLETED = 3
    COURSE_COMPLETED = 4
    BOOKMARKED = 5


def outbox_ctes(source: str, kinds: str, *, snapshot: bool = True) -> str:
    """CTEs that append one event per row of the CTE ``source`` and per kind yielded by the
    SQL ``kinds`` (the caller then tells the EventNotifier). ``source`` has ``course_id``
    and ``user_id`` columns, and with ``snapshot`` the lesson row's columns too.

    The per-course advisory lock is taken before event ids are drawn and held until commit,
    so that a course's events become visible in id order (see migration 0002).
    """
    columns = EVENT_COLUMNS if snapshot else "course_id, user_id, kind"
    values = "s.course_id, s.user_id, k.kind" + "".join(
        f", s.{column}" for column in (_SNAPSHOT if snapshot else ())
    )
    return f"""
course_lock AS MATERIALIZED (
    SELECT pg_advisory_xact_lock({EVENT_LOCK_NAMESPACE}, hashtext(course_id::text))
    FROM (SELECT DISTINCT course_id FROM {source}) AS locked
),
events AS (
    INSERT INTO progress_events ({columns})
    SELECT {values}
    FROM {source} s CROSS JOIN ({kinds}) AS k(kind)
    WHERE EXISTS (SELECT FROM course_lock)
    ORDER BY s.user_id, k.kind
)"""


# The position a new watch starts from: everything committed so far counts as seen.
EVENT_HEAD = """
SELECT EXISTS (SELECT FROM courses WHERE course_id = $1::uuid) AS course_exists,
       GREATEST(
           (SELECT max(event_id) FROM progress_events WHERE course_id = $1::uuid),
           (SELECT purged_through FROM progress_event_purges WHERE course_id = $1::uuid),
           0
       ) AS head,
       COALESCE(
           (SELECT purged_through FROM progress_event_purges WHERE course_id = $1::uuid), 0
       ) AS purged_through
"""

EVENTS_AFTER = f"""
SELECT event_id, occurred_at, {EVENT_COLUMNS} FROM progress_events
WHERE course_id = $1::uuid AND event_id > $2::bigint
ORDER BY event_id
LIMIT $3
"""

PURGED_THROUGH = """
SELECT COALESCE(
    (SELECT purged_through FROM progress_event_purges WHERE course_id = $1::uuid), 0
)
"""

# Deletes a bounded slice of expired events and records, per course, how far it went.
PURGE_EVENTS = """
WITH gone AS (
    DELETE FROM progress_events
    WHERE event_id = ANY (ARRAY(
        SELECT event_id FROM progress_events
        WHERE occurred_at < now() - make_interval(secs => $1::double precision)
        ORDER BY occurred_at
        LIMIT $2
    ))
    RETURNING course_id, event_id
),
marks AS (
    INSERT INTO progress_event_purges AS m (course_id, purged_through)
    SELECT course_id, max(event_id) FROM gone
    WHERE EXISTS (SELECT FROM courses c WHERE c.course_id = gone.course_id)
    GROUP BY course_id
    ON CONFLICT (course_id) DO UPDATE
    SET purged_through = GREATEST(m.purged_through, EXCLUDED.purged_through)
)
SELECT count(*) FROM gone
"""


def _purged(course_id: str, position: int) -> errors.OutOfRange:
    return errors.OutOfRange(
        f"events of course {course_id} after event {position} were removed by the retention "
        "window; start a new watch and reload the state with GetCourseProgress",
        reason="EVENTS_PURGED",
    )


class EventStore:
    """Reads the event outbox."""

    def __init__(
        self,
        database: Database,
        listener: EventListener,
        shutdown: Shutdown,
        *,
        poll_seconds: float = 5.0,
        batch: int = WATCH_BATCH,
    ) -> None:
        self.database = database
        self.listener = listener
        self.shutdown = shutdown
        self.poll_seconds = poll_seconds
        self.batch = batch

    async def watch(
        self, course_id: str, user_id: str | None, after_event_id: int
    ) -> AsyncIterator[Record]:
        """The course's events after ``after_event_id`` (0: committed after the call), of
        one learner or of all; runs until cancelled, or until shutdown (UNAVAILABLE)."""
        # Subscribe before reading the start position, so no commit falls in between.
        wake = self.listener.subscribe(course_id)
        try:
            position = await self.start_position(course_id, after_event_id)
            while True:
                wake.clear()
                rows = await self.events_after(course_id, position, self.batch)
                for row in rows:
                    position = row["event_id"]
                    if user_id is None or str(row["user_id"]) == user_id:
                        yield row
                if len(rows) == self.batch:
                    continue
                # A notification wakes us; the timeout only covers a lost LISTEN connection.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await _first(wake.wait(), self.shutdown.wait())
                if self.shutdown.started:
                    raise errors.Unavailable(
                        f"the server is shutting down; watch again with after_event_id={position}",
                        reason="SHUTTING_DOWN",
                    )
        finally:
            self.listener.unsubscribe(course_id, wake)

    async def start_position(self, course_id: str, after_event_id: int) -> int:
        """Where a watch starts: ``after_event_id`` if still replayable, else the head."""

        async def work(connection: Connection) -> int:
            row = await connection.fetchrow(EVENT_HEAD, course_id)
            assert row is not None
            if not row["course_exists"]:
                raise errors.NotFound.course(course_id)
            if after_event_id == 0:
                return int(row["head"])
            if after_event_id < row["purged_through"]:
                raise _purged(course_id, after_event_id)
            return after_event_id

        return await self.database.run(work)

    async def events_after(self, course_id: str, position: int, limit: int) -> list[Record]:
        """Up to ``limit`` events of the course after ``position``, in id order.

        Raises OutOfRange if events after ``position`` were purged meanwhile.
        """

        async def work(connection: Connection) -> list[Record]:
            rows = await connection.fetch(EVENTS_AFTER, course_id, position, limit)
            if position < await connection.fetchval(PURGED_THROUGH, course_id):
                raise _purged(course_id, position)
            return rows

        return await self.database.run(work)

    async def purge(self, older_than_seconds: float, *, batch: int = 10_000) -> int:
        """Removes events older than the retention window; returns how many."""
        return await self.database.delete_in_slices(PURGE_EVENTS, older_than_seconds, batch=batch)


async def _first(*waits: Coroutine[Any, Any, object]) -> None:
    """Waits until the first of ``waits`` finishes, then cancels the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


NOTIFY_COURSES = f"""
SELECT pg_notify('{EVENT_CHANNEL}', course) FROM unnest($1::text[]) AS course
"""


class EventNotifier:
    """Tells every replica's watchers that courses have new events, after the writes commit.

    NOTIFY inside the write transaction would serialise the commits of all event-writing
    transactions of the database: PostgreSQL takes one database-wide lock for NOTIFY at
    commit and holds it while the commit is flushed to disk. Measured, that held StartLesson,
    RecordAttempt and CompleteLesson to about a third of what their statements allow. So a
    write only marks its course here, and one notification statement at a time carries every
    course marked meanwhile. If the process dies between the commit and the notification,
    watchers still find the events at their next poll.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def changed(self, course_id: str) -> None:
        """Notes that ``course_id`` has committed new events."""
        self._pending.add(course_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            courses = sorted(self._pending)
            self._pending.clear()
            try:
                await self._notify(courses)
            except errors.ServiceError as exc:
                log.warning("cannot notify watchers (%s); they will poll", exc)

    async def _notify(self, courses: list[str]) -> None:
        async def work(connection: Connection) -> None:
            await connection.execute(NOTIFY_COURSES, courses)

        await self.database.run(work)


class EventListener:
    """One LISTEN connection per process that wakes the watchers of a notified course.

    When the connection drops it reconnects (with backoff) and wakes every watcher, which
    then catch up from the table: nothing is lost while it was away.
    """

    def __init__(self, url: str, *, reconnect_delay: float = 1.0) -> None:
        self.url = url
        self.reconnect_delay = reconnect_delay
        self._watchers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        """Starts listening in the background."""
        self._task = asyncio.create_task(self._run(), name="event-listener")

    async def stop(self) -> None:
        """Stops listening and closes the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, course_id: str) -> asyncio.Event:
        """An event that is set whenever the course may have new events."""
        wake = asyncio.Event()
        self._watchers[course_id].add(wake)
        return wake

    def unsubscribe(self, course_id: str, wake: asyncio.Event) -> None:
        """Stops waking ``wake``."""
        watchers = self._watchers.get(course_id)
        if watchers is not None:
            watchers.discard(wake)
            if not watchers:
                del self._watchers[course_id]

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        for wake in self._watchers.get(str(payload), ()):
            wake.set()

    def _wake_all(self) -> None:
        for watchers in self._watchers.values():
            for wake in watchers:
                wake.set()

    async def _run(self) -> None:
        while True:
            lost = asyncio.Event()
            connection: asyncpg.Connection[Record] | None = None
            try:
                connection = await asyncpg.connect(
                    self.url, server_settings={"application_name": APPLICATION_NAME}
                )
                connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                await connection.add_listener(EVENT_CHANNEL, self._notified)
                self.connected.set()
                self._wake_all()  # catch up on anything committed while not listening
                await lost.wait()
                log.warning("event listener connection lost; reconnecting")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("event listener cannot connect (%s); retrying", exc)
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    with contextlib.suppress(Exception):
                        await connection.close()
            await asyncio.sleep(self.reconnect_delay)
