"""Assembles and runs the gRPC server: database, migrations, servicers, background work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lesson_progress import embedded, migrate, rpc
from lesson_progress.addresses import bare_host, host_port
from lesson_progress.auth import Authenticator, load_callers
from lesson_progress.config import Config, is_loopback
from lesson_progress.health import HealthReporter
from lesson_progress.observability import Metrics
from lesson_progress.page_tokens import PageTokens
from lesson_progress.rpc import RpcPolicy
from lesson_progress.servicers import AnalyticsServicer, CatalogServicer, ProgressServicer
from lesson_progress.shutdown import Shutdown
from lesson_progress.store import CatalogStore, Database, ProgressStore
from lesson_progress.store.analytics import AnalyticsStore
from lesson_progress.store.events import EventListener, EventNotifier, EventStore
from lesson_progress.store.heartbeats import HeartbeatStore
from lesson_progress.store.lesson_stats import LessonStatsSummaries
from lesson_progress.token_reload import reloading
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


class StartupError(Exception):
    """The server cannot start (a port in use, a database that cannot be reached)."""


# The key that signs page tokens, shared by every replica (created by migration 0001).
PAGE_TOKEN_KEY = "SELECT value FROM service_secrets WHERE name = 'page_token_key'"


# Of the shutdown grace, what is kept for closing (RpcPolicy.close: at most 1 s) and
# gRPC's own stop (GRPC_STOP_GRACE).
STOP_SLACK = 1.5
GRPC_STOP_GRACE = 0.25


@dataclass
class RunningServer:
    """A started server; ``stop()`` shuts it down gracefully."""

    server: grpc.aio.Server
    database: Database
    port: int
    listener: EventListener
    event_store: EventStore
    health: HealthReporter
    policy: RpcPolicy
    metrics: Metrics
    metrics_port: int | None
    shutdown: Shutdown
    resources: contextlib.AsyncExitStack

    async def stop(self, grace: float | None) -> None:
        """Graceful shutdown: health goes NOT_SERVING, watch streams end with UNAVAILABLE,
        new RPCs are refused with UNAVAILABLE (SHUTTING_DOWN) while in-flight RPCs get
        ``grace`` seconds (None: as long as they take); those still running then end with
        the same UNAVAILABLE. Then gRPC stops, and the pool and everything else close (in
        the reverse order of their start)."""
        self.shutdown.begin()
        await self.health.update()
        await self.policy.drain(math.inf if grace is None else grace - STOP_SLACK)
        await self.policy.close(lambda: self.server.stop(GRPC_STOP_GRACE))
        await self.resources.aclose()


def _server_credentials(config: Config) -> grpc.ServerCredentials | None:
    if not config.tls:
        return None
    assert config.tls_cert_file is not None
    assert config.tls_key_file is not None
    client_ca = config.tls_client_ca_file.read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _server_options(config: Config) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping every 10 s; more often is answered with GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # A port already in use is an error, not a second server sharing it (unless this is
        # one of a supervisor's workers: they share it on purpose).
        ("grpc.so_reuseport", int(config.share_port)),
    ]


async def start(config: Config) -> RunningServer:
    """Starts serving with ``config``: migrates if asked, then listens. Whatever was
    started is stopped again if a later step fails."""
    async with contextlib.AsyncExitStack() as resources:
        return await _start(config, resources)


async def _start(config: Config, resources: contextlib.AsyncExitStack) -> RunningServer:
    url, embedded_db = resolve_database_url(config)
    if embedded_db is not None:
        resources.callback(embedded_db.stop)
    if config.migrate_on_start:
        applied = await run_migrations(url, config)
        log.info("migrations applied: %s", ", ".join(applied) or "none pending")
    database = await Database.connect(
        url, pool_size=config.pool_size, stream_connections=config.stream_connections
    )
    resources.push_async_callback(database.close)
    try:
        key = await database.run(lambda connection: connection.fetchval(PAGE_TOKEN_KEY))
    except asyncpg.UndefinedTableError:
        raise StartupError(
            "the database has no lesson-progress schema yet: run `lesson-progress migrate` "
            "or start without --no-migrate"
        ) from None
    metrics = Metrics(database.stats)
    resources.callback(metrics.close)
    listener = EventListener(url)
    listener.start()
    resources.push_async_callback(listener.stop)

    shutdown = Shutdown()
    notifier = EventNotifier(database)
    event_store = EventStore(database, listener, shutdown, poll_seconds=config.watch_poll_seconds)
    authenticator = None
    if config.auth_tokens_file is not None:
        # load() read the file already; a Config built in code may leave that to here.
        authenticator = Authenticator(config.callers or load_callers(config.auth_tokens_file))
        await resources.enter_async_context(reloading(authenticator, config.auth_tokens_file))
    elif not is_loopback(config.host):
        log.warning(
            "INSECURE: serving an unauthenticated API on %s (--insecure); anyone who can "
            "reach this port can read and erase learners' progress",
            config.host,
        )
    policy = RpcPolicy(
        authenticator=authenticator,
        metrics=metrics,
        max_streams=config.max_streams,
        stream_idle_seconds=config.stream_idle_seconds,
        shutdown=shutdown,
    )

    server = grpc.aio.server(
        options=_server_options(config), maximum_concurrent_rpcs=config.max_concurrent_rpcs
    )
    catalog, progress, analytics = SERVICES
    rpc.add_servicer(server, CatalogServicer(CatalogStore(database, notifier)), catalog, policy)
    progress_store = ProgressStore(database, notifier)
    rpc.add_servicer(
        server,
        ProgressServicer(
            progress_store,
            HeartbeatStore(database, allowance_seconds=config.time_allowance_seconds),
            event_store,
            PageTokens(bytes(key)),
            max_heartbeat_seconds=config.max_heartbeat_seconds,
            max_response_bytes=config.max_message_bytes,
            refused_seconds=metrics.refused_seconds.inc,
        ),
        progress,
        policy,
    )
    summaries = LessonStatsSummaries(database)
    rpc.add_servicer(
        server, AnalyticsServicer(AnalyticsStore(database, summaries)), analytics, policy
    )

    health = HealthReporter(
        database,
        config.migrations_dir,
        [service.full_name for service in SERVICES],
        shutdown,
        interval=config.health_check_interval_seconds,
    )
    resources.push_async_callback(health.close)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            *(service.full_name for service in SERVICES),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    await health.start()

    port, metrics_port = await _listen(server, metrics, config)
    log.info(
        "serving lessonprogress.v1 on %s:%d (%s, %s); metrics %s",
        config.host,
        port,
        "TLS" if config.tls else "plaintext",
        "token auth" if authenticator else "no auth",
        f"on port {metrics_port}" if metrics_port is not None else "off",
    )
    _background(resources, health.run())
    _background(resources, summaries.refresh_forever())
    _background(
        resources,
        _every(
            "forget request ids",
            lambda: progress_store.purge_request_ids(config.request_id_retention_seconds),
            config.request_id_retention_seconds,
        ),
    )
    _background(
        resources,
        _every(
            "purge progress events",
            lambda: event_store.purge(config.event_retention_seconds),
            config.event_retention_seconds,
        ),
    )
    return RunningServer(
        server, database, port, listener, event_store, health, policy, metrics, metrics_port,
        shutdown, resources.pop_all(),
    )  # fmt: skip


def _background(resources: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None]) -> None:
    """Runs ``work`` as a task that is cancelled (and awaited) when ``resources`` close."""
    task = asyncio.create_task(work)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    resources.push_async_callback(cancel)


async def _listen(
    server: grpc.aio.Server, metrics: Metrics, config: Config
) -> tuple[int, int | None]:
    """Binds the metrics endpoint and the gRPC port, then starts serving."""
    metrics_port = None
    if config.metrics_port is not None:
        metrics_host = config.metrics_host or config.host
        try:
            metrics_port = metrics.serve(bare_host(metrics_host), config.metrics_port)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {metrics_host}:{config.metrics_port}: {exc.strerror} "
                "(set LESSON_PROGRESS_METRICS_PORT to another port, or to off)"
            ) from None
    address = host_port(config.host, config.port)
    credentials = _server_credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    return port, metrics_port


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
