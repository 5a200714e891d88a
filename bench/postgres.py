"""The PostgreSQL a run uses: a fresh, migrated database, and what it reports about itself.

``BENCH_DATABASE_URL`` names a server to use (a database is created on it and dropped at the
end); otherwise an embedded PostgreSQL is started in a temporary directory and removed.
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

from lesson_progress import migrate
from lesson_progress.config import DEFAULT_MIGRATIONS_DIR

ENV_URL = "BENCH_DATABASE_URL"


@dataclass(frozen=True)
class Provisioned:
    """A fresh migrated database: its URL and where the server came from."""

    url: str
    origin: str


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@contextlib.asynccontextmanager
async def _server() -> AsyncIterator[tuple[str, str]]:
    if url := os.environ.get(ENV_URL):
        yield url, ENV_URL
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
async def fresh_database() -> AsyncIterator[Provisioned]:
    """A new database with every migration applied; dropped (or its server removed) after."""
    async with _server() as (server_url, origin):
        name = f"lesson_progress_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
            url = with_database(server_url, name)
            connection = await asyncpg.connect(url)
            try:
                await migrate.migrate(connection, DEFAULT_MIGRATIONS_DIR)
            finally:
                await connection.close()
            try:
                yield Provisioned(url, origin)
            finally:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass(frozen=True)
class TableStats:
    """Cumulative counters of pg_stat_user_tables / pg_statio_user_indexes."""

    updates: int
    hot_updates: int
    index_hits: int
    index_reads: int
    progress_index_hits: int
    progress_index_reads: int


_TABLE_STATS = """
SELECT
    (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'lesson_progress') AS upd,
    (SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'lesson_progress') AS hot,
    (SELECT COALESCE(sum(idx_blks_hit), 0) FROM pg_statio_user_indexes) AS hits,
    (SELECT COALESCE(sum(idx_blks_read), 0) FROM pg_statio_user_indexes) AS reads,
    (SELECT COALESCE(sum(idx_blks_hit), 0) FROM pg_statio_user_indexes
     WHERE relname = 'lesson_progress') AS lp_hits,
    (SELECT COALESCE(sum(idx_blks_read), 0) FROM pg_statio_user_indexes
     WHERE relname = 'lesson_progress') AS lp_reads
"""


async def table_stats(connection: asyncpg.Connection) -> TableStats:
    """The counters now (statistics snapshots are cleared first)."""
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    row = await connection.fetchrow(_TABLE_STATS)
    assert row is not None
    return TableStats(
        int(row["upd"]), int(row["hot"]), int(row["hits"]), int(row["reads"]),
        int(row["lp_hits"]), int(row["lp_reads"]),
    )  # fmt: skip


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


async def size_stats(connection: asyncpg.Connection) -> SizeStats:
    """Sizes of lesson_progress and its exact row count."""
    row = await connection.fetchrow(
        """
        SELECT (SELECT count(*) FROM lesson_progress) AS rows,
               pg_total_relation_size('lesson_progress') AS total,
               pg_relation_size('lesson_progress') AS heap,
               pg_indexes_size('lesson_progress') AS indexes
        """
    )
    assert row is not None
    return SizeStats(int(row["rows"]), int(row["total"]), int(row["heap"]), int(row["indexes"]))


async def server_settings(connection: asyncpg.Connection) -> dict[str, str]:
    """Version and the settings that shape the figures."""
    names = ("server_version", "shared_buffers", "synchronous_commit", "fsync", "max_connections")
    return {name: str(await connection.fetchval(f"SHOW {name}")) for name in names}


async def postmaster(connection: asyncpg.Connection) -> psutil.Process | None:
    """The PostgreSQL server process, if it runs on this machine (to read its CPU time)."""
    pid = await connection.fetchval("SELECT pg_backend_pid()")
    with contextlib.suppress(psutil.Error):
        backend = psutil.Process(pid)
        parent = backend.parent()
        if parent is not None and parent.name() in ("postgres", "postmaster"):
            return parent
    return None
