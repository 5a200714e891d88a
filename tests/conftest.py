"""Shared fixtures: a fresh migrated database, a real server on a random port, stubs."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from lesson_progress import migrate, server
from lesson_progress.config import Config
from lessonprogress.v1 import (
    catalog_service_pb2,
    catalog_service_pb2_grpc,
    progress_service_pb2_grpc,
    resources_pb2,
)
from tests import postgres

# The container image tier runs only as `./dev test-image` (it needs podman or docker).
collect_ignore = [] if os.environ.get("LESSON_PROGRESS_TEST_IMAGE") else ["image"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leaves out the tests of the other engine (see the markers in pyproject.toml).

    A ``citus_only`` test that the command line names explicitly is kept: on plain
    PostgreSQL it then fails, saying it needs ``./dev test-citus``.
    """
    engine = postgres.engine()
    other_marker = "postgres_only" if engine == "citus" else "citus_only"
    named_citus = any("test_citus" in str(arg) for arg in config.args)
    kept: list[pytest.Item] = []
    left_out: list[pytest.Item] = []
    for item in items:
        other = item.get_closest_marker(other_marker) is not None
        if other and not (other_marker == "citus_only" and named_citus):
            left_out.append(item)
        else:
            kept.append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the PostgreSQL server the session runs against."""
    with postgres.postgres_server() as (url, origin):
        print(f"\ntests run against {origin}")
        yield url


@pytest.fixture(scope="session")
async def database_url(postgres_url: str) -> AsyncIterator[str]:
    """A fresh database with every migration applied, dropped after the session."""
    name = postgres.fresh_database_name()
    url = await postgres.create_database(postgres_url, name)
    connection = await asyncpg.connect(url)
    try:
        await migrate.migrate(connection, Config().migrations_dir)
    finally:
        await connection.close()
    try:
        yield url
    finally:
        await postgres.drop_database(postgres_url, name)


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test database, for tests whose subject is the schema itself."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


def server_config(database_url: str, **overrides: object) -> Config:
    """A config for a test server: random port, no migrations (the fixture ran them)."""
    settings: dict[str, object] = {
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": 0,
        "pool_size": 8,
        "migrate_on_start": False,
        "metrics_port": None,
        "log_format": "text",
        # Tests of adding time up send far more time than passes; the time budget has its
        # own tests (test_time_budget.py) with the default allowance.
        "time_allowance_seconds": 30 * 86400,
    }
    settings.update(overrides)
    return Config(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def running_server(database_url: str) -> AsyncIterator[server.RunningServer]:
    """The service, in this process, listening on a random port."""
    running = await server.start(server_config(database_url))
    yield running
    await running.stop(grace=1)


@pytest.fixture(scope="session")
async def channel(running_server: server.RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the test server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running_server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def catalog(channel: grpc.aio.Channel) -> catalog_service_pb2_grpc.CatalogServiceStub:
    """CatalogService stub."""
    return catalog_service_pb2_grpc.CatalogServiceStub(channel)


@pytest.fixture(scope="session")
def progress(channel: grpc.aio.Channel) -> progress_service_pb2_grpc.ProgressServiceStub:
    """ProgressService stub."""
    return progress_service_pb2_grpc.ProgressServiceStub(channel)


@dataclass(frozen=True)
class CourseIds:
    """A registered course: its id and its lesson ids in order."""

    course_id: str
    lesson_ids: list[str]


def new_id() -> str:
    """A fresh UUID string."""
    return str(uuid.uuid4())


@pytest.fixture
def make_course(
    catalog: catalog_service_pb2_grpc.CatalogServiceStub,
) -> object:
    """Registers a course with ``lessons`` lessons (lesson ids l1, l2, ...)."""

    async def make(
        lessons: int = 3, *, passing_score: int | None = None, assessed: bool = False
    ) -> CourseIds:
        course_id = new_id()
        lesson_ids = [f"l{i + 1}" for i in range(lessons)]
        await catalog.UpsertCourse(
            catalog_service_pb2.UpsertCourseRequest(
                course_id=course_id,
                title="course",
                lessons=[
                    resources_pb2.Lesson(
                        lesson_id=lesson_id,
                        title=f"lesson {lesson_id}",
                        assessed=assessed or passing_score is not None,
                        passing_score=passing_score,
                    )
                    for lesson_id in lesson_ids
                ],
            )
        )
        return CourseIds(course_id, lesson_ids)

    return make


@pytest.fixture
async def fresh_url(postgres_url: str) -> AsyncIterator[str]:
    """URL of a new, empty database, dropped after the test."""
    name = postgres.fresh_database_name()
    try:
        yield await postgres.create_database(postgres_url, name)
    finally:
        await postgres.drop_database(postgres_url, name)
