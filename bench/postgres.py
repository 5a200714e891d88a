"""The PostgreSQL a run uses: a fresh, migrated database, and what it reports about itself.

``BENCH_DATABASE_URL`` names a server to use (a database is created on it and dropped at the
end; on a Citus coordinator also on every worker); otherwise, for ``--engine postgres``, an
embedded PostgreSQL is started in a temporary directory and removed, and for ``--engine
citus`` a local 1-coordinator + 2-worker cluster (``bench/citus.py``). The tests create their
databases with the same ``create_database``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from bench import citus
from lesson_progress import migrate
from lesson_progress.config import DEFAULT_MIGRATIONS_DIR

ENV_URL = "BENCH_DATABASE_URL"


@dataclass(frozen=True)
class Provisioned:
    """A fresh migrated database: its URL and where the server came from."""

    url: str
    origin: str
    engine: str = "postgres"


class WrongEngine(RuntimeError):
    """``BENCH_DATABASE_URL`` names a server of the other engine than the one asked for."""


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def with_host(url: str, host: str, port: int) -> str:
    """``url`` pointing at another server, with the same user and password."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _workers(admin: asyncpg.Connection) -> list[tuple[str, int]]:
    """The primary workers of a Citus coordinator; none on plain PostgreSQL."""
    if not await is_citus(admin):
        return []
    rows = await admin.fetch(
        "SELECT nodename, nodeport FROM pg_dist_node"
        " WHERE groupid <> 0 AND noderole = 'primary' AND isactive ORDER BY nodeid"
    )
    return [(row["nodename"], row["nodeport"]) for row in rows]


async def _execute_on(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def create_database(server_url: str, name: str, *, workers: int | None = None) -> str:
    """Creates database ``name`` on the server of ``server_url``; returns its URL.

    On a Citus coordinator the database is created on every worker too, with the citus
    extension, and the first ``workers`` workers (default: all) are registered in it: Citus
    keeps its cluster metadata per database.
    """
    admin = await asyncpg.connect(server_url)
    try:
        nodes = await _workers(admin)
        await admin.execute(f'CREATE DATABASE "{name}"')
        coordinator = None
        if nodes:
            coordinator = await admin.fetchrow(
                "SELECT nodename, nodeport FROM pg_dist_node WHERE groupid = 0"
            )
    finally:
        await admin.close()
    url = with_database(server_url, name)
    if not nodes:
        return url
    for host, port in nodes:
        await _execute_on(with_host(server_url, host, port), f'CREATE DATABASE "{name}"')
        await _execute_on(with_database(with_host(server_url, host, port), name),
                          "CREATE EXTENSION citus")  # fmt: skip
    register = ["CREATE EXTENSION citus"]
    if coordinator is not None:
        register.append(
            f"SELECT citus_set_coordinator_host('{coordinator['nodename']}', "
            f"{coordinator['nodeport']})"
        )
    register += [f"SELECT citus_add_node('{h}', {p})" for h, p in nodes[:workers]]
    await _execute_on(url, *register)
    return url


async def drop_database(server_url: str, name: str) -> None:
    """Drops database ``name`` (and on Citus its copies on the workers), if it exists."""
    admin = await asyncpg.connect(server_url)
    try:
        nodes = await _workers(admin)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    for host, port in nodes:
        await _execute_on(
            with_host(server_url, host, port), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        )


_HAS_CITUS = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"


async def is_citus(connection: asyncpg.Connection) -> bool:
    """Whether the database of ``connection`` has the citus extension."""
    return bool(await connection.fetchval(_HAS_CITUS))


@contextlib.asynccontextmanager
async def _server(engine: str) -> AsyncIterator[tuple[str, str]]:
    if url := os.environ.get(ENV_URL):
        yield url, ENV_URL
        return
    if engine == "citus":
        with citus.local_cluster(durable=True) as cluster:
            yield (
                cluster.coordinator_url,
                f"local Citus cluster of 1 coordinator + {citus.WORKERS} workers in "
                f"{cluster.directory}",
            )
        return
    from lesson_progress.embedded import EmbeddedPostgres

    directory = Path(tempfile.mkdtemp(prefix="lesson-progress-bench-"))
    server = EmbeddedPostgres(directory)
    try:
        yield server.url, f"embedded PostgreSQL in {directory}"
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def fresh_database(engine: str | None = None) -> AsyncIterator[Provisioned]:
    """A new database with every migration applied; dropped (or its server removed) after.

    ``engine`` "citus": a local cluster unless ``BENCH_DATABASE_URL`` names a coordinator;
    None: whatever ``BENCH_DATABASE_URL`` names, else the embedded PostgreSQL. On a
    coordinator the database gets the citus extension and the workers registered before
    the migrations run, so that they distribute the tables.
    """
    async with _server(engine or "postgres") as (server_url, origin):
        name = f"lesson_progress_bench_{uuid.uuid4().hex[:10]}"
        url = await create_database(server_url, name)
        try:
            connection = await asyncpg.connect(url)
            try:
                found = "citus" if await is_citus(connection) else "postgres"
                if engine is not None and found != engine:
                    raise WrongEngine(
                        f"--engine {engine}, but {ENV_URL} names "
                        + ("a Citus coordinator" if found == "citus" else "a server without Citus")
                    )
                await migrate.migrate(connection, DEFAULT_MIGRATIONS_DIR)
            finally:
                await connection.close()
            yield Provisioned(url, origin, found)
        finally:
            await drop_database(server_url, name)


@dataclass(frozen=True)
class TableStats:
    """Cumulative counters of pg_stat_user_tables / pg_statio_user_indexes."""

    updates: int
    hot_updates: int
    index_hits: int
    index_reads: int
    progress_index_hits: int
    progress_index_reads: int


def _table_stats_query(progress: str) -> str:
    """The counters, ``progress`` selecting lesson_progress's relations by name."""
    return f"""
SELECT
    (SELECT COALESCE(sum(n_tup_upd), 0) FROM pg_stat_user_tables WHERE {progress}) AS upd,
    (SELECT COALESCE(sum(n_tup_hot_upd), 0) FROM pg_stat_user_tables WHERE {progress}) AS hot,
    (SELECT COALESCE(sum(idx_blks_hit), 0) FROM pg_statio_user_indexes) AS hits,
    (SELECT COALESCE(sum(idx_blks_read), 0) FROM pg_statio_user_indexes) AS reads,
    (SELECT COALESCE(sum(idx_blks_hit), 0) FROM pg_statio_user_indexes
     WHERE {progress}) AS lp_hits,
    (SELECT COALESCE(sum(idx_blks_read), 0) FROM pg_statio_user_indexes
     WHERE {progress}) AS lp_reads
"""


_TABLE_STATS = _table_stats_query("relname = 'lesson_progress'")
# On Citus the counters live on the workers, one relation per shard (lesson_progress_102008).
_SHARD_STATS = f"""
SELECT success, result FROM run_command_on_workers($$
    SELECT concat_ws(',', upd, hot, hits, reads, lp_hits, lp_reads) FROM (
        {_table_stats_query("relname ~ '^lesson_progress_[0-9]+$'")}
    ) AS counters
$$)
"""


async def table_stats(connection: asyncpg.Connection) -> TableStats:
    """The counters now, summed over the workers on Citus (snapshots are cleared first)."""
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    row = await connection.fetchrow(_TABLE_STATS)
    assert row is not None
    totals = [int(row[name]) for name in ("upd", "hot", "hits", "reads", "lp_hits", "lp_reads")]
    if await is_citus(connection):
        for worker in await connection.fetch(_SHARD_STATS):
            if not worker["success"]:
                raise RuntimeError(f"reading a worker's statistics failed: {worker['result']}")
            totals = [a + int(b) for a, b in zip(totals, worker["result"].split(","), strict=True)]
    return TableStats(*totals)


@dataclass(frozen=True)
class SizeStats:
    """On-disk size of lesson_progress."""

    rows: int
    total_bytes: int
    heap_bytes: int
    index_bytes: int

    @property
    def bytes_per_row(self) -> float:
        """Total relation size (heap, TOAST, indexes) per row."""
        return self.total_bytes / max(self.rows, 1)


_SIZES = """
SELECT (SELECT count(*) FROM lesson_progress) AS rows,
       pg_total_relation_size('lesson_progress') AS total,
       pg_relation_size('lesson_progress') AS heap,
       pg_indexes_size('lesson_progress') AS indexes
"""
# On Citus: the sums over every shard placement of the distributed table.
_CITUS_SIZES = """
SELECT (SELECT count(*) FROM lesson_progress) AS rows,
       citus_total_relation_size('lesson_progress') AS total,
       citus_relation_size('lesson_progress') AS heap,
       citus_total_relation_size('lesson_progress') - citus_table_size('lesson_progress')
           AS indexes
"""


async def size_stats(connection: asyncpg.Connection) -> SizeStats:
    """Sizes of lesson_progress (all shards on Citus) and its exact row count."""
    row = await connection.fetchrow(_CITUS_SIZES if await is_citus(connection) else _SIZES)
    assert row is not None
    return SizeStats(int(row["rows"]), int(row["total"]), int(row["heap"]), int(row["indexes"]))


async def server_settings(connection: asyncpg.Connection) -> dict[str, str]:
    """Version and the settings that shape the figures."""
    names = ("server_version", "shared_buffers", "synchronous_commit", "fsync", "max_connections")
    found = {name: str(await connection.fetchval(f"SHOW {name}")) for name in names}
    if await is_citus(connection):
        found["citus"] = str(await connection.fetchval("SELECT citus_version()")).split(" on ")[0]
        found["citus.shard_count"] = str(await connection.fetchval("SHOW citus.shard_count"))
        found["workers"] = str(len(await _workers(connection)))
    return found


async def postmasters(connection: asyncpg.Connection, url: str) -> dict[str, psutil.Process]:
    """The server process of each node running on this machine, by node name.

    Plain PostgreSQL: {"postgres": ...}. Citus: "coordinator" and each worker's host:port,
    found through a connection to that node (its backend's parent), whatever its port or
    data directory.
    """
    found: dict[str, psutil.Process] = {}
    citus_nodes = await _workers(connection)
    if (own := await postmaster(connection)) is not None:
        found["coordinator" if citus_nodes else "postgres"] = own
    for host, port in citus_nodes:
        worker = await asyncpg.connect(with_host(url, host, port))
        try:
            if (process := await postmaster(worker)) is not None:
                found[f"worker {host}:{port}"] = process
        finally:
            await worker.close()
    return found


async def postmaster(connection: asyncpg.Connection) -> psutil.Process | None:
    """The PostgreSQL server process, if it runs on this machine (to read its CPU time)."""
    pid = await connection.fetchval("SELECT pg_backend_pid()")
    with contextlib.suppress(psutil.Error):
        backend = psutil.Process(pid)
        parent = backend.parent()
        if parent is not None and parent.name() in ("postgres", "postmaster"):
            return parent
    return None
