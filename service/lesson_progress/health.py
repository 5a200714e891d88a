"""Standard gRPC health checking, kept in step with the database.

The overall status ("") and each service's status are SERVING only while the database
answers and no migration is pending; a background task re-checks every few seconds on a
connection of its own (never one of the pool, which callers may hold), and every call's
outcome counts too: health goes NOT_SERVING on the first call that finds the database
unreachable and SERVING again on the first that reaches it. The extra name "liveness" is
SERVING as long as the process runs (for liveness probes, which must not restart a replica
because its database is down). Once the process's shutdown has begun, everything is
NOT_SERVING for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

import asyncpg
from grpc_health.v1 import health, health_pb2

from lesson_progress.migrate import MigrationError, pending_migrations
from lesson_progress.shutdown import Shutdown
from lesson_progress.store import Database
from lesson_progress.store.database import Record, close_connection

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"


class HealthReporter:
    """Owns the health servicer and the task that keeps it current."""

    def __init__(
        self,
        database: Database,
        migrations_dir: Path,
        services: Iterable[str],
        shutdown: Shutdown,
        *,
        interval: float,
        timeout: float = 2.0,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self.database = database
        self.migrations_dir = migrations_dir
        self.services = ["", *services]
        self.shutdown = shutdown
        self.interval = interval
        self.timeout = timeout
        self.serving: bool | None = None
        self._connection: asyncpg.Connection[Record] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        database.on_reachability(self._reachability_changed)

    def _reachability_changed(self, reachable: bool, why: str) -> None:
        """A call found the database gone, or reached it again: publish that now."""
        if self.shutdown.started:
            return
        task = asyncio.get_running_loop().create_task(
            self._publish(None if reachable else f"database unreachable: {why}")
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check(self) -> str | None:
        """Why the service cannot serve right now, or None if it can."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._connection is None or self._connection.is_closed():
                    self._connection = await self.database.connect_dedicated(within=self.timeout)
                pending = await pending_migrations(self._connection, self.migrations_dir)
        except MigrationError as exc:
            return f"migrations disagree with the database: {exc}"
        except Exception as exc:
            await self.close()
            return f"database unreachable: {exc!r}"
        if pending:
            return "migrations pending: " + ", ".join(m.name for m in pending)
        return None

    async def start(self) -> None:
        """Publishes the liveness status and the first readiness check."""
        await self.servicer.set(LIVENESS, SERVING)
        await self.update()

    async def close(self) -> None:
        """Closes the health check's connection (terminated if the database hangs)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await close_connection(connection)

    async def update(self) -> None:
        """Checks once and publishes the result (NOT_SERVING for good once shutting down)."""
        if self.shutdown.started:
            await self.servicer.enter_graceful_shutdown()
            return
        await self._publish(await self.check())

    async def _publish(self, problem: str | None) -> None:
        if self.shutdown.started:
            return
        serving = problem is None
        if serving != self.serving:
            if serving:
                log.info("health: SERVING")
            else:
                log.warning("health: NOT_SERVING (%s)", problem)
            self.serving = serving
        for service in self.services:
            await self.servicer.set(service, SERVING if serving else NOT_SERVING)

    async def run(self) -> None:
        """Re-checks every interval until shutdown begins (cancel to stop earlier)."""
        while not self.shutdown.started:
            await self.update()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.shutdown.wait()
        await self.update()
