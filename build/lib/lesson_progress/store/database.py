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
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import asyncpg

from lesson_progress import errors

log = logging.getLogger(__name__)

T = TypeVar("T")
Record = asyncpg.Record
# What work receives: a pooled connection (a proxy with the Connection interface).
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[Record]"

MAX_ATTEMPTS = 5
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

    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    @property
    def max_size(self) -> int:
        """Most connections the pool opens."""
        return self._pool.get_max_size()

    def stats(self) -> PoolStats:
        """The pool's connections now (for metrics)."""
        size = self._pool.get_size()
        return PoolStats(size, size - self._pool.get_idle_size(), self._pool.get_max_size())

    def acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A pooled connection for work outside ``run`` (errors are not translated)."""
        return self._pool.acquire()

    @classmethod
    async def connect(cls, url: str, *, pool_size: int) -> Database:
        """Opens a pool of at most ``pool_size`` connections to ``url``."""
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min(2, pool_size),
                max_size=pool_size,
                server_settings={"application_name": APPLICATION_NAME},
                reset=_keep_session,
            )
        except _UNAVAILABLE as exc:
            raise errors.Unavailable(f"cannot connect to the database: {exc}") from None
        return cls(pool)

    async def close(self) -> None:
        """Closes every connection, waiting for those in use to be released."""
        await self._pool.close()

    async def run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Runs ``work`` on a pooled connection, retrying it after a lost race."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self._pool.acquire() as connection:
                    return await work(connection)
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
                raise errors.Unavailable(f"the database is unavailable: {exc}") from None
        raise AssertionError("unreachable")

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
        """A pooled connection inside a read-only REPEATABLE READ transaction.

        For streams: one consistent snapshot however long the caller takes to read. The
        transaction ends (and the connection returns to the pool) when the block exits,
        including when the stream is cancelled.
        """
        try:
            async with (
                self._pool.acquire() as connection,
                connection.transaction(isolation="repeatable_read", readonly=True),
            ):
                yield connection
        except asyncpg.PostgresError as exc:
            raise _translate(exc) from None
        except _UNAVAILABLE as exc:
            raise errors.Unavailable(f"the database is unavailable: {exc}") from None


async def _keep_session(connection: asyncpg.Connection[Record]) -> None:
    """Releases a connection to the pool without asyncpg's reset query.

    asyncpg still rolls back an open transaction first; the reset query itself (RESET ALL,
    UNLISTEN *, advisory unlock, CLOSE ALL) would cost a round trip on every call, and the
    service never changes session state on pooled connections: its advisory locks are
    transaction-scoped, its cursors live in transactions, and LISTEN has its own
    connection.
    """


def _translate(exc: asyncpg.PostgresError) -> Exception:
    """The domain error for a PostgreSQL error that a request can legitimately cause."""
    if isinstance(exc, _UNAVAILABLE):
        return errors.Unavailable(f"the database is unavailable: {exc}")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        # A course or lesson deleted between the existence check and the write.
        return errors.NotFound("the course or lesson no longer exists", reason="LESSON_NOT_FOUND")
    if isinstance(exc, asyncpg.NumericValueOutOfRangeError | asyncpg.CheckViolationError):
        return errors.OutOfRange(
            "the write would take a counter past its maximum (2,147,483,647)",
            reason="COUNTER_OVERFLOW",
        )
    return exc
