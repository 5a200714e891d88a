"""Where the tests' PostgreSQL comes from.

In order: ``TEST_DATABASE_URL`` if set; a testcontainers ``PostgresContainer`` when a Docker
engine answers; else the embedded PostgreSQL wheel the service itself uses. Never a skip.
With ``LESSON_PROGRESS_TEST_ENGINE=citus`` (``./dev test-citus``) it is a Citus coordinator
instead (see ``tests/citus.py``). Each test session gets a fresh database on that server,
made by ``create_database``, which on Citus also creates it on every worker.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests import citus

log = logging.getLogger(__name__)


def _docker_answers() -> bool:
    """Whether a Docker engine answers a ping (without leaking the probe's socket)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    import docker

    with warnings.catch_warnings():
        # A failed probe leaves its socket to the garbage collector: collect it here.
        warnings.simplefilter("ignore", ResourceWarning)
        client = None
        try:
            client = docker.from_env(timeout=3)
            return bool(client.ping())
        except Exception:
            return False
        finally:
            if client is not None:
                client.close()
            gc.collect()


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, str]]:
    """Yields (server URL, where it came from) for the whole test session."""
    if engine() == "citus":
        with citus.citus_server() as found:
            yield found
    elif url := os.environ.get("TEST_DATABASE_URL"):
        yield url, "TEST_DATABASE_URL"
    elif _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url(), "testcontainers"
    else:
        from lesson_progress.embedded import EmbeddedPostgres

        directory = Path(tempfile.mkdtemp(prefix="lesson-progress-test-"))
        server = EmbeddedPostgres(directory)
        try:
            yield server.url, "embedded PostgreSQL"
        finally:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)


ENGINES = ("postgres", "citus")


def engine() -> str:
    """The engine the session runs on: ``LESSON_PROGRESS_TEST_ENGINE``, default postgres."""
    name = os.environ.get("LESSON_PROGRESS_TEST_ENGINE", "postgres")
    if name not in ENGINES:
        raise ValueError(f"LESSON_PROGRESS_TEST_ENGINE={name!r}: expected one of {ENGINES}")
    return name


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def fresh_database_name() -> str:
    """A database name no other test session uses."""
    return f"lesson_progress_test_{uuid.uuid4().hex[:12]}"


def with_host(url: str, host: str, port: int) -> str:
    """``url`` pointing at another server, with the same user and password."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _workers(admin: asyncpg.Connection) -> list[tuple[str, int]]:
    """The primary workers of a Citus coordinator; none on plain PostgreSQL."""
    if not await admin.fetchval("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"):
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
