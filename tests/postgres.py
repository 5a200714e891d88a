"""Where the tests' PostgreSQL comes from.

In order: ``TEST_DATABASE_URL`` if set; a testcontainers ``PostgresContainer`` when a Docker
engine answers; else the embedded PostgreSQL wheel the service itself uses. Never a skip.
With ``LESSON_PROGRESS_TEST_ENGINE=citus`` (``./dev test-citus``) it is a Citus coordinator
instead (see ``tests/citus.py``). Each test session gets a fresh database on that server,
made by ``create_database`` (``bench/postgres.py``, shared with the benchmark), which on
Citus also creates it on every worker.
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

from bench.postgres import create_database, drop_database, with_database, with_host
from tests import citus

log = logging.getLogger(__name__)

__all__ = [
    "create_database", "drop_database", "engine", "fresh_database_name", "postgres_server",
    "with_database", "with_host",
]  # fmt: skip


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


def fresh_database_name() -> str:
    """A database name no other test session uses."""
    return f"lesson_progress_test_{uuid.uuid4().hex[:12]}"
