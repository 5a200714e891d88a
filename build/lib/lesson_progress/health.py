"""Standard gRPC health checking, kept in step with the database.

The overall status ("") and each service's status are SERVING only while the database
answers and no migration is pending; a background task re-checks every few seconds, so
health goes NOT_SERVING while the database is unreachable and back by itself when it
returns. The extra name "liveness" is SERVING as long as the process runs (for liveness
probes, which must not restart a replica because its database is down). Once the
process's shutdown has begun, everything is NOT_SERVING for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

from grpc_health.v1 import health, health_pb2

from lesson_progress.migrate import MigrationError, pending_migrations
from lesson_progress.shutdown import Shutdown
from lesson_progress.store import Database

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

    async def check(self) -> str | None:
        """Why the service cannot serve right now, or None if it can."""
        try:
            async with asyncio.timeout(self.timeout), self.database.acquire() as conn:
                pending = await pending_migrations(conn, self.migrations_dir)
        except MigrationError as exc:
            return f"migrations disagree with the database: {exc}"
        except Exception as exc:
            return f"database unreachable: {exc!r}"
        if pending:
            return "migrations pending: " + ", ".join(m.name for m in pending)
        return None

    async def start(self) -> None:
        """Publishes the liveness status and the first readiness check."""
        await self.servicer.set(LIVENESS, SERVING)
        await self.update()

    async def update(self) -> None:
        """Checks once and publishes the result (NOT_SERVING for good once shutting down)."""
        if self.shutdown.started:
            await self.servicer.enter_graceful_shutdown()
            return
        problem = await self.check()
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
