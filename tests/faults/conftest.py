"""Fixtures of the fault suite: one private PostgreSQL cluster for the session (left
running by every test), a fresh migrated database per test, and server children."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.cluster import Cluster, running_cluster
from tests.faults.support import create_database, drop_database, kill_9
from tests.support import GENEROUS_TIME_BUDGET
from tests.test_operations import Serve


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The fault suite's own PostgreSQL on 127.0.0.1 (never the session's shared one)."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
async def database(cluster: Cluster) -> AsyncIterator[str]:
    """A fresh migrated database on the cluster; the cluster runs again afterwards."""
    url = await create_database(cluster)
    try:
        yield url
    finally:
        cluster.resume()
        if not cluster.postmaster_running():
            await asyncio.to_thread(cluster.start)
        await drop_database(cluster, url)


ServeFactory = Callable[..., Serve]


@pytest.fixture
def serve(tmp_path: Path, database: str) -> Iterator[ServeFactory]:
    """Starts ``lesson-progress serve`` children on the test's database (``workers``: with
    ``--workers``, a supervisor and its workers); kills them (all) after."""
    children: list[Serve] = []

    def start(
        *flags: str, env: dict[str, str] | None = None, name: str = "serve", workers: int = 1
    ) -> Serve:
        if workers != 1:
            flags = ("--workers", str(workers), *flags)
        child = Serve(
            tmp_path, database, *GENEROUS_TIME_BUDGET, *flags, env=env, metrics=False, name=name
        )
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            kill_9(child.process)
            child.kill()
