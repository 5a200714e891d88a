"""Where the tests' PostgreSQL comes from.

In order: ``TEST_DATABASE_URL`` if set; a testcontainers ``PostgresContainer`` when a Docker
engine answers; else the embedded PostgreSQL wheel the service itself uses. Never a skip.
Each test session gets a fresh database on that server.
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
    if url := os.environ.get("TEST_DATABASE_URL"):
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


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def fresh_database_name() -> str:
    """A database name no other test session uses."""
    return f"lesson_progress_test_{uuid.uuid4().hex[:12]}"
