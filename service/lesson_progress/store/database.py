"""The connection pool, and the translation of PostgreSQL errors into domain errors.

``Database`` owns the pool and everything about it: its size, its figures for metrics and
every way of taking a connection (``run``, ``read_snapshot``, ``acquire``). Nothing outside
this module touches the asyncpg pool. Every store call runs through ``Database.run``: it
retries serialization failures and deadlocks a few times (then ABORTED) and reports an
unreachable database as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import asyncpg

from lesson_progress import errors
from lesson_progress.store import type_cache

log = logging.getLogger(__name__)

T = TypeVar("T")
Record = asyncpg.Record
# What work receives: a pooled connection (a proxy with the Connection interface).
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[Record]"

MAX_ATTEMPTS = 5
# Longest wait for a pooled connection (bounded further by the caller's deadline): a pool
# held by stuck work answers UNAVAILABLE instead of queueing callers for ever.
ACQUIRE_TIMEOUT = 5.0
# How long closing a connection may take before it is terminated (a stalled database
# never answers the goodbye).
CLOSE_TIMEOUT = 1.0
# How long a stream waits for a connection of the streams' pool before RESOURCE_EXHAUSTED.
STREAM_QUEUE_SECONDS = 1.0

# When the current call's caller stops waiting (``loop.time()``), None for never: set per
# call by rpc.py from the gRPC deadline, read by ``Database.run`` (the heartbeat writer sets
# it for the statements it runs on behalf of several callers).
call_deadline: ContextVar[float | None] = ContextVar("call_deadline", default=None)


def remaining_seconds() -> float | None:
    """Seconds left before the current call's deadline (None: no deadline)."""
    deadline = call_deadline.get()
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


# How the service's connections name themselves in pg_stat_activity (pool and LISTEN alike).
APPLICATION_NAME = "lesson-progress"

# Errors after which the same transaction, run again, may well succeed.
_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
# Errors that mean the database is not reachable (or not accepting work) right now.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ReadOnlySQLTransactionError,
    # What asyncpg raises when PostgreSQL closed a pooled connection under a statement
    # ("cannot switch to state 12; another operation (2) is in progress"): the statement
    # was not sent, so the call is safe to retry.
    asyncpg.InternalClientError,
)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The pool's connections at one moment."""

    size: int
    """Connections open."""
    in_use: int
    """Connections lent out."""
    max_size: int
    """Most connections the pool opens."""


class Database:
    """An asyncpg pool plus the one policy for running work on it."""

    def __init__(
        self,
        pool: asyncpg.Pool[Record],
        url: str = "",
        streams: asyncpg.Pool[Record] | None = None,
    ) -> None:
        self._pool = pool
        self._streams = streams or pool
        self._url = url
        self.reachable = True
        """Whether the latest database call reached the database."""
        self._reachability: list[Callable[[bool, str], None]] = []

    def on_reachability(self, listener: Callable[[bool, str], None]) -> None:
        """Calls ``listener(reachable, why)`` whenever a call's outcome flips
        ``reachable``: the first call that finds the database gone, the first that
        reaches it again."""
        self._reachability.append(listener)

    def _reached(self, reachable: bool, why: str = "") -> None:
        if reachable != self.reachable:
            self.reachable = reachable
            for listener in self._reachability:
                listener(reachable, why)

    async def connect_dedicated(self, *, within: float) -> asyncpg.Connection[Record]:
        """A connection of its own, outside the pool (for health checks)."""
        return await asyncpg.connect(
            self._url, timeout=within, server_settings={"application_name": APPLICATION_NAME}
        )

    @property
    def max_size(self) -> int:
        """Most connections the pool opens."""
        return self._pool.get_max_size()

    @property
    def stream_connections(self) -> int:
        """Most connections streams hold at once."""
        return self._streams.get_max_size()

    def stats(self) -> PoolStats:
        """The pool's connections now (for metrics)."""
        return _stats(self._pool)

    def stream_stats(self) -> PoolStats:
        """The connections of the streams' pool now."""
        return _stats(self._streams)

    def acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A pooled connection for work outside ``run`` (errors are not translated); waits
        for one at most ACQUIRE_TIMEOUT (or the caller's deadline): then TimeoutError."""
        return self._pool.acquire(timeout=_acquire_timeout())

    @classmethod
    async def connect(cls, url: str, *, pool_size: int, stream_connections: int = 0) -> Database:
        """Opens a pool of at most ``pool_size`` connections to ``url``, and one of at most
        ``stream_connections`` for streams (0: streams use the first pool)."""
        settings = {"application_name": APPLICATION_NAME}
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min(2, pool_size),
                max_size=pool_size,
                server_settings=settings,
                reset=_keep_session,
                connection_class=type_cache.Connection,
            )
            # Built-in types introspected once for the process, before any call needs them.
            await pool.fetchrow(type_cache.WARM_UP)
            streams = None
            if stream_connections:
                streams = await asyncpg.create_pool(
                    url,
                    min_size=0,
                    max_size=stream_connections,
                    server_settings=settings,
                    reset=_keep_session,
                    connection_class=type_cache.Connection,
                )
        except _UNAVAILABLE as exc:
            raise errors.Unavailable(f"cannot connect to the database: {_reason(exc)}") from None
        return cls(pool, url, streams)

    async def close(self, within: float = CLOSE_TIMEOUT) -> None:
        """Closes every connection, waiting at most ``within`` seconds for those in use to
        be released and for the database to answer; then terminates what is left."""
        pools = {self._pool, self._streams}
        try:
            await asyncio.wait_for(asyncio.gather(*(p.close() for p in pools)), within)
        except (TimeoutError, *_UNAVAILABLE):
            log.warning("the database did not close its connections in %.0fs; cut off", within)
            for pool in pools:
                pool.terminate()

    async def run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Runs ``work`` on a pooled connection, retrying it after a lost race.

        With a caller's deadline (``call_deadline``), ``work`` runs in a transaction whose
        ``statement_timeout`` and ``lock_timeout`` are the time left, and which is rolled
        back instead of committed once the deadline has passed: PostgreSQL aborts the work
        of a caller that has gone, and applies nothing of it (only a COMMIT already on its
        way when the caller gave up may still take effect). A lock wait that times out
        (the deadline's, or a function's own: migration 0010) raises errors.LockTimeout,
        nothing applied.
        """
        try:
            result = await self._run(work)
        except errors.Unavailable as exc:
            self._reached(False, exc.message)
            raise
        self._reached(True)
        return result

    async def _run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                left = remaining_seconds()
                if left is None:
                    async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as connection:
                        return await work(connection)
                return await self._run_bounded(work, left)
            except _RETRYABLE as exc:
                if attempt == MAX_ATTEMPTS:
                    raise errors.Aborted(
                        f"the write conflicted with concurrent writes {attempt} times "
                        f"({exc.sqlstate}); retry it"
                    ) from None
                await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
            except asyncpg.PostgresError as exc:
                raise _translate(exc) from None
            except _UNAVAILABLE as exc:
                raise errors.Unavailable(f"the database is unavailable: {_reason(exc)}") from None
        raise AssertionError("unreachable")

    async def _run_bounded(self, work: Callable[[Connection], Awaitable[T]], left: float) -> T:
        """``work`` in a transaction bounded by the caller's deadline (``left`` seconds)."""
        if left <= 0:
            raise errors.DeadlineExceeded("the call's deadline passed; nothing was done")
        timeout_ms = max(1, int(left * 1000))
        async with self._pool.acquire(timeout=_acquire_timeout()) as connection:
            # One round trip opens the transaction and bounds it (a simple query of three
            # statements); asyncpg's transaction() would send BEGIN on its own.
            await connection.execute(
                f"BEGIN; SET LOCAL statement_timeout = {timeout_ms};"
                f" SET LOCAL lock_timeout = {timeout_ms}"
            )
            try:
                result = await work(connection)
                after = remaining_seconds()
                if after is not None and after <= 0:
                    raise errors.DeadlineExceeded("the call's deadline passed; rolled back")
            except asyncio.CancelledError:
                raise  # the pool's release rolls back (or drops) the connection
            except BaseException:
                # Fails only when the connection is gone, which rolled back already.
                with contextlib.suppress(Exception):
                    await connection.execute("ROLLBACK")
                raise
            await connection.execute("COMMIT")
            return result

    async def delete_in_slices(self, statement: str, *args: object, batch: int) -> int:
        """Runs a slice-deleting ``statement`` (returning the count it deleted, taking
        ``batch`` as its last parameter) until a slice comes back short; returns the total.
        Each slice is its own short transaction, so a purge never holds locks for long."""
        total = 0
        while True:
            deleted = int(await self.run(lambda c: c.fetchval(statement, *args, batch)))
            total += deleted
            if deleted < batch:
                return total

    @contextlib.asynccontextmanager
    async def read_snapshot(self) -> AsyncIterator[Connection]:
        """A connection of the streams' pool inside a read-only REPEATABLE READ transaction.

        For streams: one consistent snapshot however long the caller takes to read. The
        transaction ends (and the connection returns to the pool) when the block exits,
        including when the stream is cancelled or ended for a reader that stopped reading.
        Streams have a pool of their own, so they never take the connections unary calls
        need; when all of it is in use, a stream waits STREAM_QUEUE_SECONDS, then gets
        RESOURCE_EXHAUSTED.
        """
        try:
            try:
                connection = await self._streams.acquire(timeout=STREAM_QUEUE_SECONDS)
            except TimeoutError:
                raise errors.ResourceExhausted(
                    "every database connection for streams is in use "
                    "(LESSON_PROGRESS_STREAM_CONNECTIONS); retry later",
                    reason="STREAM_CONNECTIONS_EXHAUSTED",
                ) from None
            try:
                async with connection.transaction(isolation="repeatable_read", readonly=True):
                    yield connection
            finally:
                await self._streams.release(connection)
        except asyncpg.PostgresError as exc:
            raise _translate(exc) from None
        except _UNAVAILABLE as exc:
            raise errors.Unavailable(f"the database is unavailable: {_reason(exc)}") from None


def atomically(connection: Connection) -> contextlib.AbstractAsyncContextManager[object]:
    """A transaction around work of several statements, unless ``Database.run`` runs the
    work in one already (a call with a deadline)."""
    if connection.is_in_transaction():
        return contextlib.nullcontext()
    return connection.transaction()


def _stats(pool: asyncpg.Pool[Record]) -> PoolStats:
    size = pool.get_size()
    return PoolStats(size, size - pool.get_idle_size(), pool.get_max_size())


async def _keep_session(connection: asyncpg.Connection[Record]) -> None:
    """Releases a connection to the pool without asyncpg's reset query.

    asyncpg still rolls back an open transaction first; the reset query itself (RESET ALL,
    UNLISTEN *, advisory unlock, CLOSE ALL) would cost a round trip on every call, and the
    service never changes session state on pooled connections: its advisory locks are
    transaction-scoped, its cursors live in transactions, and LISTEN has its own
    connection.
    """


def _acquire_timeout() -> float:
    """How long to wait for a pooled connection: ACQUIRE_TIMEOUT, or less if the caller's
    deadline comes first."""
    left = remaining_seconds()
    return ACQUIRE_TIMEOUT if left is None else max(0.001, min(left, ACQUIRE_TIMEOUT))


async def close_connection(connection: asyncpg.Connection[Record]) -> None:
    """Closes a connection of its own, terminating it if the database does not answer."""
    try:
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
    except Exception:
        connection.terminate()


def _translate(exc: asyncpg.PostgresError) -> Exception:
    """The domain error for a PostgreSQL error that a request can legitimately cause."""
    if isinstance(exc, _UNAVAILABLE):
        return errors.Unavailable(f"the database is unavailable: {_reason(exc)}")
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return errors.LockTimeout("a row of the call stayed locked by another transaction")
    if isinstance(exc, asyncpg.QueryCanceledError):
        return errors.DeadlineExceeded("the call's deadline passed during its statement")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        # A course or lesson deleted between the existence check and the write.
        return errors.NotFound("the course or lesson no longer exists", reason="LESSON_NOT_FOUND")
    if isinstance(exc, asyncpg.NumericValueOutOfRangeError | asyncpg.CheckViolationError):
        return errors.OutOfRange(
            "the write would take a counter past its maximum (2,147,483,647)",
            reason="COUNTER_OVERFLOW",
        )
    return exc


def _reason(exc: BaseException) -> str:
    """The text of a connection failure; a bare timeout (no pooled connection came free,
    or no answer came in time) has none of its own."""
    if text := str(exc):
        return text
    if isinstance(exc, TimeoutError):
        return "no connection or answer within the time allowed"
    return type(exc).__name__
