"""Assembles and runs the gRPC server: database, migrations, servicers, background work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import grpc

from lesson_progress import embedded, migrate, rpc
from lesson_progress.config import Config
from lesson_progress.page_tokens import PageTokens
from lesson_progress.servicers import AnalyticsServicer, CatalogServicer, ProgressServicer
from lesson_progress.store import CatalogStore, Database, ProgressStore
from lesson_progress.store.analytics import AnalyticsStore
from lesson_progress.store.events import EventListener, EventStore
from lessonprogress.v1 import analytics_service_pb2, catalog_service_pb2, progress_service_pb2

log = logging.getLogger(__name__)

SERVICES = (
    catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"],
    progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"],
    analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"],
)


def resolve_database_url(config: Config) -> tuple[str, embedded.EmbeddedPostgres | None]:
    """The configured database, or an embedded PostgreSQL when none is configured."""
    if config.database_url:
        return config.database_url, None
    server = embedded.start(config.data_dir)
    return server.url, server


async def run_migrations(url: str, config: Config) -> list[str]:
    """Applies pending migrations on a dedicated connection; returns the applied names."""
    connection = await asyncpg.connect(url)
    try:
        return await migrate.migrate(connection, config.migrations_dir)
    finally:
        await connection.close()


@dataclass
class RunningServer:
    """A started server; ``stop()`` shuts it down gracefully."""

    server: grpc.aio.Server
    database: Database
    port: int
    listener: EventListener
    embedded_db: embedded.EmbeddedPostgres | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float | None) -> None:
        """Finishes in-flight RPCs within ``grace`` seconds, then closes everything."""
        await self.server.stop(grace)
        await self.listener.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.database.close()
        if self.embedded_db is not None:
            self.embedded_db.stop()


async def start(config: Config) -> RunningServer:
    """Starts serving with ``config``: migrates if asked, then listens."""
    url, embedded_db = resolve_database_url(config)
    if config.migrate_on_start:
        applied = await run_migrations(url, config)
        log.info("migrations applied: %s", ", ".join(applied) or "none pending")
    database = await Database.connect(url, pool_size=config.pool_size)
    key = await database.pool.fetchval(
        "SELECT value FROM service_secrets WHERE name = 'page_token_key'"
    )
    progress_store = ProgressStore(database)
    event_store = EventStore(database)
    listener = EventListener(url)
    listener.start()

    server = grpc.aio.server()
    catalog, progress, analytics = SERVICES
    rpc.add_servicer(server, CatalogServicer(CatalogStore(database)), catalog)
    rpc.add_servicer(
        server,
        ProgressServicer(
            progress_store,
            event_store,
            listener,
            PageTokens(bytes(key)),
            max_heartbeat_seconds=config.max_heartbeat_seconds,
        ),
        progress,
    )
    rpc.add_servicer(server, AnalyticsServicer(AnalyticsStore(database)), analytics)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    log.info("serving lessonprogress.v1 on %s:%d", config.host, port)
    running = RunningServer(server, database, port, listener, embedded_db)
    running.tasks.append(
        asyncio.create_task(
            _every(
                "forget request ids",
                lambda: progress_store.purge_request_ids(config.request_id_retention_seconds),
                config.request_id_retention_seconds,
            )
        )
    )
    running.tasks.append(
        asyncio.create_task(
            _every(
                "purge progress events",
                lambda: event_store.purge(config.event_retention_seconds),
                config.event_retention_seconds,
            )
        )
    )
    return running


async def _every(what: str, purge: Callable[[], Awaitable[int]], retention_seconds: int) -> None:
    """Runs a retention purge now and then: a tenth of the window, at most every 5 min."""
    interval = max(1.0, min(300.0, retention_seconds / 10))
    while True:
        try:
            purged = await purge()
            if purged:
                log.info("%s: removed %d rows older than %ds", what, purged, retention_seconds)
        except Exception:
            log.exception("%s failed; will try again", what)
        await asyncio.sleep(interval)
