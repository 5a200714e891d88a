"""Assembles and runs the gRPC server: database, migrations, servicers, background work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import asyncpg
import grpc

from lesson_progress import embedded, migrate, rpc
from lesson_progress.config import Config
from lesson_progress.page_tokens import PageTokens
from lesson_progress.servicers import CatalogServicer, ProgressServicer
from lesson_progress.store import CatalogStore, Database, ProgressStore
from lessonprogress.v1 import catalog_service_pb2, progress_service_pb2

log = logging.getLogger(__name__)

SERVICES = (
    catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"],
    progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"],
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
    embedded_db: embedded.EmbeddedPostgres | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float | None) -> None:
        """Finishes in-flight RPCs within ``grace`` seconds, then closes everything."""
        await self.server.stop(grace)
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

    server = grpc.aio.server()
    rpc.add_servicer(server, CatalogServicer(CatalogStore(database)), SERVICES[0])
    rpc.add_servicer(
        server,
        ProgressServicer(
            progress_store,
            PageTokens(bytes(key)),
            max_heartbeat_seconds=config.max_heartbeat_seconds,
        ),
        SERVICES[1],
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    log.info("serving lessonprogress.v1 on %s:%d", config.host, port)
    running = RunningServer(server, database, port, embedded_db)
    running.tasks.append(
        asyncio.create_task(_purge_request_ids(progress_store, config.request_id_retention_seconds))
    )
    return running


async def _purge_request_ids(store: ProgressStore, retention_seconds: int) -> None:
    """Forgets request ids past the retention window, every few minutes."""
    interval = max(1.0, min(300.0, retention_seconds / 10))
    while True:
        try:
            purged = await store.purge_request_ids(retention_seconds)
            if purged:
                log.info("forgot %d request ids older than %ds", purged, retention_seconds)
        except Exception:
            log.exception("purging request ids failed; will try again")
        await asyncio.sleep(interval)
