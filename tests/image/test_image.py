"""The container image, built from the Dockerfile and run as the Deployment runs it.

A PostgreSQL of this test alone (the fault suite's cluster, on a free port of 127.0.0.1)
is the database; the containers share the host's network. The server runs with the
Deployment's restrictions: read-only root, every capability dropped, uid 10001, no new
privileges.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lesson_progress.auth import hash_token
from lesson_progress_client import Lesson, ProgressClient, ProgressError, RetryPolicy
from tests.faults.cluster import Cluster, running_cluster
from tests.image.engine import Engine, NoEngine, find_engine
from tests.postgres import create_database, fresh_database_name
from tests.support import PROJECT_ROOT, free_port

TAG = "localhost/lesson-progress:image-test"
RESTRICTIONS = (
    "--read-only", "--cap-drop", "ALL", "--user", "10001:10001",
    "--security-opt", "no-new-privileges", "--network", "host",
)  # fmt: skip
TOKEN = "image-test-token"
SCOPES = "catalog:admin,progress:write,progress:read,analytics:read"


@pytest.fixture(scope="module")
def engine() -> Engine:
    try:
        return find_engine()
    except NoEngine as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    engine.build(PROJECT_ROOT, TAG)
    size = int(engine.run("image", "inspect", "--format", "{{.Size}}", TAG).stdout.strip())
    print(f"\nimage {TAG}: {size / 1e6:.0f} MB")
    return TAG


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
async def database_url(cluster: Cluster) -> str:
    """An empty database: the image's migration step creates the schema."""
    return await create_database(cluster.url, fresh_database_name())


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"image-test {hash_token(TOKEN)} {SCOPES}\n")
    path.chmod(0o644)  # readable by uid 10001
    return path


def _wait_healthy(engine: Engine, container: str, within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if engine.health(container).returncode == 0:
            return
        state = engine.run("inspect", "--format", "{{.State.Status}}", container).stdout
        if state.strip() != "running" or time.monotonic() > deadline:
            logs = engine.run("logs", container, check=False)
            raise AssertionError(f"not healthy ({state.strip()}):\n{logs.stdout}{logs.stderr}")
        time.sleep(1)


def test_without_database_url_the_image_says_it_is_required(engine: Engine, image: str) -> None:
    result = engine.run("run", "--rm", *RESTRICTIONS, image, "migrate", check=False)
    assert result.returncode == 2
    assert "DATABASE_URL (--database-url) is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_image_migrates_serves_and_stops_cleanly(
    engine: Engine, image: str, database_url: str, tokens_file: Path
) -> None:
    migrations = sorted(p.name for p in (PROJECT_ROOT / "migrations").glob("*.sql"))
    migrated = engine.run("run", "--rm", *RESTRICTIONS, "-e", f"DATABASE_URL={database_url}",
                          image, "migrate")  # fmt: skip
    assert migrated.stdout.strip().splitlines()[-1] == "applied: " + ", ".join(migrations)

    port, metrics_port = free_port(), free_port()
    container = f"lesson-progress-test-{uuid.uuid4().hex[:8]}"
    engine.run(
        "run", "--detach", "--name", container, *RESTRICTIONS,
        "-e", f"DATABASE_URL={database_url}",
        "-e", f"LESSON_PROGRESS_PORT={port}",
        "-e", f"LESSON_PROGRESS_METRICS_PORT={metrics_port}",
        "-e", "LESSON_PROGRESS_AUTH_TOKENS_FILE=/run/secrets/tokens",
        "-e", "LESSON_PROGRESS_SHUTDOWN_GRACE=5s",
        "--volume", f"{tokens_file}:/run/secrets/tokens:ro",
        image,
    )  # fmt: skip
    try:
        # The HEALTHCHECK, run as the engine runs it.
        _wait_healthy(engine, container)
        # The server (PID 1) runs as uid 10001, not root.
        status = engine.run("exec", container, "cat", "/proc/1/status").stdout
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()
        assert uids[1:] == ["10001"] * 4, uids
        # Nothing may be written outside the mounts: the root is read-only.
        touched = engine.run("exec", container, "touch", "/app/x", check=False)
        assert touched.returncode != 0
        assert "Read-only file system" in touched.stderr

        asyncio.run(_real_calls(f"127.0.0.1:{port}"))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "lesson_progress_rpc_requests_total{" in metrics
        assert "RecordTime" in metrics

        engine.run("kill", "--signal", "TERM", container)
        code = engine.run("wait", container, timeout=60).stdout.strip().splitlines()[-1]
        logs = engine.run("logs", container, check=False)
        assert code == "0", f"exit {code}:\n{logs.stdout}{logs.stderr}"
        assert '"stopped"' in logs.stdout + logs.stderr
    finally:
        engine.run("rm", "--force", container, check=False)


async def _real_calls(target: str) -> None:
    course, user = str(uuid.uuid4()), str(uuid.uuid4())
    async with ProgressClient(
        target, token=TOKEN, retry=RetryPolicy(retries=2), timeout=30
    ) as client:
        await client.upsert_course(
            course_id=course, lessons=[Lesson(lesson_id="a"), Lesson(lesson_id="b")]
        )
        await client.record_time(user_id=user, course_id=course, lesson_id="a", seconds=12)
        await client.record_time(user_id=user, course_id=course, lesson_id="a", seconds=5)
        done = await client.complete_lesson(user_id=user, course_id=course, lesson_id="a")
        assert done.lesson.time_spent_seconds == 17
        assert done.course.progress_percentage == 50
        stats = [s async for s in client.stream_lesson_stats(course_id=course)]
        assert [(s.lesson_id, s.completion_rate) for s in stats] == [("a", 1.0), ("b", 0.0)]
        async with ProgressClient(target, retry=RetryPolicy(retries=0), timeout=30) as anonymous:
            with pytest.raises(ProgressError) as caught:
                await anonymous.get_course(course_id=course)
            assert caught.value.code.name == "UNAUTHENTICATED"
