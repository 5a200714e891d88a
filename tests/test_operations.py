"""Operations: health, reflection, metrics, access logs, graceful shutdown and limits.

Behaviour that is about processes runs against real ``python -m lesson_progress serve``
children, stopped with real signals. Each child listens on ports that were free a moment
ago, writes its output to a file in tmp_path, runs with an environment stripped of every
service setting, and is killed in a ``finally`` whatever happens. Timeouts here are hang
guards only, never assertions about speed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from lesson_progress import migrate
from lesson_progress.auth import hash_token
from lesson_progress.config import Config
from lesson_progress.embedded import EmbeddedPostgres
from lessonprogress.v1 import (
    catalog_service_pb2,
    catalog_service_pb2_grpc,
    progress_service_pb2,
    progress_service_pb2_grpc,
    resources_pb2,
)
from tests import postgres
from tests.conftest import new_id
from tests.errors import error_info
from tests.support import clean_env, free_port

START_TIMEOUT = 60.0  # seconds until a child must answer health checks (hang guard)
CALL_TIMEOUT = 30.0  # seconds before a call counts as hung
STOP_TIMEOUT = 60.0  # seconds a child may take to exit after a signal
POLL_TIMEOUT = 60.0  # seconds a polled condition (health flip, gauge) may take
POLL_INTERVAL = 0.1
MIGRATIONS_DIR = Config().migrations_dir

SERVICE_NAMES = (
    "lessonprogress.v1.CatalogService",
    "lessonprogress.v1.ProgressService",
    "lessonprogress.v1.AnalyticsService",
)
HEALTH_NAMES = ("", *SERVICE_NAMES)  # "" is the overall status
LIVENESS = "liveness"  # SERVING while the process runs, whatever the database does
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

PROGRESS = "/lessonprogress.v1.ProgressService/"
CATALOG = "/lessonprogress.v1.CatalogService/"
WATCH = PROGRESS + "WatchProgress"


# --- child processes ------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Runs ``python -m lesson_progress *args`` to completion (blocking: use a thread when a
    server of this process must keep answering meanwhile)."""
    return subprocess.run(
        [sys.executable, "-m", "lesson_progress", *args],
        env=clean_env(),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


async def health_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``lesson-progress health *args``, run in a thread."""
    return await asyncio.to_thread(run_cli, ["health", "--timeout", "10", *args], cwd)


async def check_health(address: str, service: str = "") -> int:
    """The health status the server at ``address`` reports for ``service``."""
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
        )
    return int(response.status)


async def health_of_all(address: str) -> dict[str, int]:
    """Overall and per-service health."""
    return {name: await check_health(address, name) for name in HEALTH_NAMES}


class Serve:
    """A ``python -m lesson_progress serve`` child; ``with`` kills it if it is still there.

    Listens on 127.0.0.1 (or ``host``) with ``--no-migrate``; stdout and stderr go to
    ``<name>.log`` in ``directory``. ``credentials``: how to reach a TLS server.
    """

    def __init__(
        self,
        directory: Path,
        database_url: str,
        *flags: str,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        metrics: bool = True,
        name: str = "serve",
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.credentials = credentials
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = directory / f"{name}.log"
        argv = [
            sys.executable, "-m", "lesson_progress", "serve",
            "--database-url", database_url,
            "--host", host,
            "--port", str(self.port),
            "--metrics-port", str(self.metrics_port) if metrics else "off",
            "--no-migrate",
            *flags,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                argv,
                env=clean_env(**(env or {})),
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def __enter__(self) -> Serve:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def channel(self) -> grpc.aio.Channel:
        """A new client channel to the server."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address)
        return grpc.aio.secure_channel(self.address, self.credentials)

    def kill(self) -> None:
        """Kills the child if it still runs, and reaps it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log()[-4000:]

    def assert_running(self) -> None:
        code = self.process.poll()
        assert code is None, f"serve exited with {code}:\n{self.log_tail()}"

    async def wait_health(self, wanted: int | None = SERVING, service: str = "") -> int:
        """Polls the health service until it reports ``wanted`` (None: any answer)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        last: object = None
        async with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self.assert_running()
                try:
                    response = await stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=5
                    )
                    last = response.status
                    if wanted is None or response.status == wanted:
                        return int(response.status)
                except grpc.aio.AioRpcError as exc:
                    last = exc.code()
                assert loop.time() < deadline, f"health stayed {last}:\n{self.log_tail()}"
                await asyncio.sleep(POLL_INTERVAL)

    def send(self, signum: int) -> None:
        self.assert_running()
        self.process.send_signal(signum)

    async def wait_exit(self) -> int:
        """The child's exit code (fails if it does not exit in time)."""
        try:
            return await asyncio.to_thread(self.process.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit after the signal:\n{self.log_tail()}")

    async def scrape(self) -> dict[str, list[Any]]:
        """The /metrics samples, by sample name."""
        assert self.metrics_port is not None

        def get() -> str:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as response:
                assert response.status == 200
                return str(response.read().decode())

        samples: dict[str, list[Any]] = {}
        for family in text_string_to_metric_families(await asyncio.to_thread(get)):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        return samples

    async def gauge(self, name: str, **labels: str) -> float | None:
        """The value of one labelled sample, None if absent."""
        for sample in (await self.scrape()).get(name, []):
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        return None

    async def wait_gauge(self, name: str, value: float, **labels: str) -> None:
        """Polls /metrics until the sample shows ``value``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_TIMEOUT
        while (current := await self.gauge(name, **labels)) != value:
            self.assert_running()
            assert loop.time() < deadline, f"{name}{labels} stayed {current}, wanted {value}"
            await asyncio.sleep(POLL_INTERVAL)


async def poll_health(address: str, wanted: int) -> None:
    """Polls overall and per-service health until every one reports ``wanted``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_TIMEOUT
    while (statuses := await health_of_all(address)) != dict.fromkeys(HEALTH_NAMES, wanted):
        assert loop.time() < deadline, f"health stayed {statuses}, wanted {wanted}"
        await asyncio.sleep(POLL_INTERVAL)


async def upsert_course(channel: grpc.aio.Channel, lessons: int = 2, **kwargs: Any) -> str:
    """Registers a course with lessons l1, l2, ... through ``channel``; returns its id."""
    course_id = new_id()
    await catalog_service_pb2_grpc.CatalogServiceStub(channel).UpsertCourse(
        catalog_service_pb2.UpsertCourseRequest(
            course_id=course_id,
            title="ops course",
            lessons=[
                resources_pb2.Lesson(lesson_id=f"l{i + 1}", title=f"lesson {i + 1}")
                for i in range(lessons)
            ],
        ),
        timeout=CALL_TIMEOUT,
        **kwargs,
    )
    return course_id


async def fresh_database(postgres_url: str) -> str:
    """Creates an empty database on the session's server; returns its URL."""
    return await postgres.create_database(postgres_url, postgres.fresh_database_name())


async def drop_database(postgres_url: str, url: str) -> None:
    await postgres.drop_database(postgres_url, url.rsplit("/", 1)[1].split("?", 1)[0])


async def migrate_url(url: str, directory: Path) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        return await migrate.migrate(connection, directory)
    finally:
        await connection.close()


# --- health ------------------------------------------------------------------------------------


@pytest.fixture
async def private_postgres() -> AsyncIterator[tuple[Path, list[EmbeddedPostgres]]]:
    """A PostgreSQL server of this test alone (so that it can be stopped).

    Yields its directory and a list holding the running instance; the test may stop it and
    start another on the same directory. Whatever is in the list at the end is stopped.
    The directory is a fresh one under the system temp directory, not in tmp_path: as root
    the embedded server runs as another user, who cannot enter pytest's private tmp tree.
    """
    directory = Path(tempfile.mkdtemp(prefix="lesson-progress-ops-"))
    instances: list[EmbeddedPostgres] = []
    try:
        instances.append(await asyncio.to_thread(EmbeddedPostgres, directory))
        yield directory, instances
    finally:
        for instance in instances:
            await asyncio.to_thread(instance.stop)
        shutil.rmtree(directory, ignore_errors=True)


async def test_health_follows_the_database_down_and_back(
    tmp_path: Path, private_postgres: tuple[Path, list[EmbeddedPostgres]]
) -> None:
    directory, instances = private_postgres
    server_url = instances[0].url
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute('CREATE DATABASE "lp"')
    finally:
        await admin.close()
    url = postgres.with_database(server_url, "lp")
    await migrate_url(url, MIGRATIONS_DIR)

    with Serve(tmp_path, url, env={"LESSON_PROGRESS_HEALTH_INTERVAL": "0.5"}) as served:
        await served.wait_health(SERVING)
        assert await health_of_all(served.address) == dict.fromkeys(HEALTH_NAMES, SERVING)

        # The database goes away: health says so, overall and for every service.
        stopped = instances.pop()
        await asyncio.to_thread(stopped.stop)
        await poll_health(served.address, NOT_SERVING)
        served.assert_running()
        # Liveness stays SERVING: a probe must not restart a replica for its database.
        assert await check_health(served.address, LIVENESS) == SERVING
        live = await health_cli(tmp_path, "--address", served.address, "--service", LIVENESS)
        assert live.returncode == 0, live.stdout + live.stderr
        assert (await health_cli(tmp_path, "--address", served.address)).returncode == 1

        # It comes back on the same directory: health recovers by itself.
        instances.append(await asyncio.to_thread(EmbeddedPostgres, directory))
        assert instances[0].url == server_url
        await poll_health(served.address, SERVING)
        assert (await health_cli(tmp_path, "--address", served.address)).returncode == 0

        # And the service works again.
        async with grpc.aio.insecure_channel(served.address) as channel:
            course_id = await upsert_course(channel)
            progress = progress_service_pb2_grpc.ProgressServiceStub(channel)
            response = await progress.RecordTime(
                progress_service_pb2.RecordTimeRequest(
                    user_id=new_id(), course_id=course_id, lesson_id="l1", seconds=7
                ),
                timeout=CALL_TIMEOUT,
            )
            assert response.lesson.time_spent_seconds == 7

        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()


async def test_health_not_serving_while_a_migration_is_pending(
    tmp_path: Path, postgres_url: str
) -> None:
    files = sorted(MIGRATIONS_DIR.glob("*.sql"))
    assert len(files) >= 2
    partial = tmp_path / "partial-migrations"
    partial.mkdir()
    for path in files[:-1]:
        shutil.copy(path, partial / path.name)

    url = await fresh_database(postgres_url)
    try:
        await migrate_url(url, partial)
        with Serve(
            tmp_path,
            url,
            "--migrations-dir",
            str(MIGRATIONS_DIR),
            env={"LESSON_PROGRESS_HEALTH_INTERVAL": "0.5"},
        ) as served:
            # Health answers, and says NOT_SERVING overall and for every service.
            await served.wait_health(None)
            assert await health_of_all(served.address) == dict.fromkeys(HEALTH_NAMES, NOT_SERVING)
            assert await check_health(served.address, LIVENESS) == SERVING
            result = await health_cli(tmp_path, "--address", served.address)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "NOT_SERVING" in result.stdout

            # Once the missing migration is applied, health goes SERVING by itself.
            assert await migrate_url(url, MIGRATIONS_DIR) == [files[-1].name]
            await poll_health(served.address, SERVING)

            served.send(signal.SIGTERM)
            assert await served.wait_exit() == 0, served.log_tail()
    finally:
        await drop_database(postgres_url, url)


async def test_health_cli_exit_codes(tmp_path: Path, database_url: str) -> None:
    with Serve(tmp_path, database_url, metrics=False) as served:
        await served.wait_health(SERVING)
        overall = await health_cli(tmp_path, "--address", served.address)
        assert overall.returncode == 0, overall.stdout + overall.stderr
        assert "SERVING" in overall.stdout
        for name in SERVICE_NAMES:
            result = await health_cli(tmp_path, "--address", served.address, "--service", name)
            assert result.returncode == 0, (name, result.stdout, result.stderr)
        unknown = await health_cli(
            tmp_path, "--address", served.address, "--service", "no.such.Service"
        )
        assert unknown.returncode == 1
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()

    dead = await health_cli(tmp_path, "--address", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert dead.returncode == 1
    assert "Traceback" not in dead.stderr


# --- graceful shutdown ------------------------------------------------------------------------


async def test_sigterm_finishes_in_flight_calls_and_exits_zero(
    tmp_path: Path,
    database_url: str,
    progress: progress_service_pb2_grpc.ProgressServiceStub,
) -> None:
    calls = 300
    signal_after = 30
    user_id = new_id()
    # Two connections make the calls queue inside the server, so many are in flight at the
    # signal; a generous grace lets every one of them finish.
    with Serve(tmp_path, database_url, "--pool-size", "2", "--shutdown-grace", "60s") as served:
        await served.wait_health(SERVING)
        async with grpc.aio.insecure_channel(served.address) as channel:
            course_id = await upsert_course(channel, lessons=1)
            stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
            done = 0
            enough = asyncio.Event()
            signalled = False

            async def record(index: int) -> tuple[str, int, bool]:
                """(status code name, seconds credited (sent, if it failed), whether it ended
                after the signal)"""
                nonlocal done
                seconds = index % 7 + 1
                try:
                    response = await stub.RecordTime(
                        progress_service_pb2.RecordTimeRequest(
                            user_id=user_id,
                            course_id=course_id,
                            lesson_id="l1",
                            seconds=seconds,
                            request_id=new_id(),
                        ),
                        timeout=CALL_TIMEOUT * 2,
                    )
                    return "OK", response.credited_seconds, signalled
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, seconds, signalled
                finally:
                    done += 1
                    if done >= signal_after:
                        enough.set()

            tasks = [asyncio.create_task(record(i)) for i in range(calls)]
            try:
                await asyncio.wait_for(enough.wait(), CALL_TIMEOUT)
                served.send(signal.SIGTERM)
                signalled = True
                outcomes = await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        assert await served.wait_exit() == 0, served.log_tail()
        log = served.log()

    ok_seconds = sum(seconds for code, seconds, _ in outcomes if code == "OK")
    assert ok_seconds > 0
    # Calls already in flight when the signal came were allowed to finish.
    assert any(code == "OK" and after for code, _, after in outcomes), outcomes
    # Exactly the calls that answered OK were written.
    stored = await progress.GetLessonProgress(
        progress_service_pb2.GetLessonProgressRequest(
            user_id=user_id, course_id=course_id, lesson_id="l1"
        ),
        timeout=CALL_TIMEOUT,
    )
    assert stored.lesson.time_spent_seconds == ok_seconds
    # Every other call was refused with UNAVAILABLE, which a client may safely retry.
    codes = Counter(code for code, _, _ in outcomes)
    handled = Counter(
        entry["code"] for entry in access_entries(log) if entry["method"] == PROGRESS + "RecordTime"
    )
    assert set(codes) <= {"OK", "UNAVAILABLE"}, (
        f"outcomes of {calls} calls: {dict(codes)}; "
        f"RecordTime calls the server's handlers ran (access log): {dict(handled)}"
    )


async def test_sigterm_ends_an_open_watch_stream_with_unavailable(
    tmp_path: Path, database_url: str
) -> None:
    with Serve(tmp_path, database_url) as served:
        await served.wait_health(SERVING)
        async with grpc.aio.insecure_channel(served.address) as channel:
            course_id = await upsert_course(channel)
            stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
            call = stub.WatchProgress(
                progress_service_pb2.WatchProgressRequest(course_id=course_id),
                timeout=CALL_TIMEOUT,
            )
            reading = asyncio.create_task(call.read())
            try:
                await served.wait_gauge("lesson_progress_streams_open", 1, method=WATCH)
                served.send(signal.SIGTERM)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await reading
            finally:
                call.cancel()
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()
        assert error_info(raised.value).reason == "SHUTTING_DOWN"
        assert await served.wait_exit() == 0, served.log_tail()


async def test_sigint_exits_zero(tmp_path: Path, database_url: str) -> None:
    with Serve(tmp_path, database_url, metrics=False) as served:
        await served.wait_health(SERVING)
        served.send(signal.SIGINT)
        assert await served.wait_exit() == 0, served.log_tail()
        assert "Traceback" not in served.log()


# --- metrics -------------------------------------------------------------------------------


async def test_metrics_scrape_sees_the_rpcs_just_made(tmp_path: Path, database_url: str) -> None:
    with Serve(tmp_path, database_url, "--pool-size", "3") as served:
        await served.wait_health(SERVING)
        async with grpc.aio.insecure_channel(served.address) as channel:
            course_id = await upsert_course(channel)
            progress = progress_service_pb2_grpc.ProgressServiceStub(channel)
            catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
            user_id = new_id()
            await progress.StartLesson(
                progress_service_pb2.StartLessonRequest(
                    user_id=user_id, course_id=course_id, lesson_id="l1"
                ),
                timeout=CALL_TIMEOUT,
            )
            for seconds in (5, 9):
                await progress.RecordTime(
                    progress_service_pb2.RecordTimeRequest(
                        user_id=user_id, course_id=course_id, lesson_id="l1", seconds=seconds
                    ),
                    timeout=CALL_TIMEOUT,
                )
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await progress.RecordTime(
                    progress_service_pb2.RecordTimeRequest(
                        user_id=user_id, course_id=course_id, lesson_id="l1", seconds=0
                    ),
                    timeout=CALL_TIMEOUT,
                )
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await catalog.GetCourse(
                    catalog_service_pb2.GetCourseRequest(course_id=new_id()),
                    timeout=CALL_TIMEOUT,
                )
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        samples = await served.scrape()
        requests = {
            (s.labels["method"], s.labels["code"]): s.value
            for s in samples["lesson_progress_rpc_requests_total"]
        }
        assert requests == {
            (CATALOG + "UpsertCourse", "OK"): 1,
            (PROGRESS + "StartLesson", "OK"): 1,
            (PROGRESS + "RecordTime", "OK"): 2,
            (PROGRESS + "RecordTime", "INVALID_ARGUMENT"): 1,
            (CATALOG + "GetCourse", "NOT_FOUND"): 1,
        }
        # Every method's series exists from the start (at 0), so rate() works at once.
        counts = {
            s.labels["method"]: s.value
            for s in samples["lesson_progress_rpc_duration_seconds_count"]
            if s.value
        }
        assert counts == {
            CATALOG + "UpsertCourse": 1,
            PROGRESS + "StartLesson": 1,
            PROGRESS + "RecordTime": 3,
            CATALOG + "GetCourse": 1,
        }
        infinite = {
            s.labels["method"]: s.value
            for s in samples["lesson_progress_rpc_duration_seconds_bucket"]
            if s.labels["le"] == "+Inf" and s.value
        }
        assert infinite == counts
        assert all(s.value == 0 for s in samples.get("lesson_progress_rpc_in_flight", [])), (
            samples.get("lesson_progress_rpc_in_flight")
        )
        assert all(s.value == 0 for s in samples.get("lesson_progress_streams_open", []))

        (max_size,) = samples["lesson_progress_db_pool_max_size"]
        (size,) = samples["lesson_progress_db_pool_size"]
        (in_use,) = samples["lesson_progress_db_pool_in_use"]
        assert max_size.value == 3
        assert 1 <= size.value <= 3
        assert 0 <= in_use.value <= size.value

        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()


# --- reflection ----------------------------------------------------------------------------


async def reflect(
    channel: grpc.aio.Channel, requests: Iterable[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Sends ``requests`` on one reflection stream; returns the responses."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter(list(requests)), timeout=CALL_TIMEOUT)
    return [response async for response in call]


async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel) -> None:
    listed, described = await reflect(
        channel,
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="lessonprogress.v1.ProgressService"
            ),
        ],
    )
    names = {service.name for service in listed.list_services_response.service}
    assert {*SERVICE_NAMES, "grpc.health.v1.Health"} <= names

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in described.file_descriptor_response.file_descriptor_proto
    ]
    progress_file = next(f for f in files if any(s.name == "ProgressService" for s in f.service))
    assert progress_file.package == "lessonprogress.v1"
    (service,) = [s for s in progress_file.service if s.name == "ProgressService"]
    methods = {m.name for m in service.method}
    assert {"RecordTime", "SaveBookmark", "WatchProgress", "DeleteUserProgress"} <= methods


# --- access log --------------------------------------------------------------------------------


def access_entries(log: str) -> list[dict[str, Any]]:
    """The JSON lines of the access logger."""
    entries = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("logger") == "lesson_progress.access":
            entries.append(entry)
    return entries


async def test_access_log_has_one_json_line_per_rpc_and_no_secrets(
    tmp_path: Path, database_url: str
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    admin_token = f"adm-{uuid.uuid4().hex}"
    unknown_token = f"unk-{uuid.uuid4().hex}"
    bookmark = f"secret-page-{uuid.uuid4().hex}"
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        f"lms {hash_token(token)} progress:write,progress:read\n"
        f"admin {hash_token(admin_token)} catalog:admin\n"
    )
    request_id = new_id()
    user_id = new_id()

    with Serve(
        tmp_path, database_url, "--auth-tokens-file", str(tokens_file), metrics=False
    ) as served:
        await served.wait_health(SERVING)
        async with grpc.aio.insecure_channel(served.address) as channel:
            course_id = await upsert_course(
                channel, metadata=(("authorization", f"Bearer {admin_token}"),)
            )
            progress = progress_service_pb2_grpc.ProgressServiceStub(channel)
            auth = (("authorization", f"Bearer {token}"),)
            await progress.RecordTime(
                progress_service_pb2.RecordTimeRequest(
                    user_id=user_id,
                    course_id=course_id,
                    lesson_id="l1",
                    seconds=3,
                    request_id=request_id,
                ),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            saved = await progress.SaveBookmark(
                progress_service_pb2.SaveBookmarkRequest(
                    user_id=user_id, course_id=course_id, lesson_id="l1", position=bookmark
                ),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            assert saved.lesson.bookmark == bookmark
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await progress.SaveBookmark(
                    progress_service_pb2.SaveBookmarkRequest(
                        user_id=user_id, course_id=course_id, lesson_id="l1", position=bookmark
                    ),
                    metadata=(("authorization", f"Bearer {unknown_token}"),),
                    timeout=CALL_TIMEOUT,
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()
        log = served.log()

    entries = access_entries(log)
    for entry in entries:
        assert {"method", "code", "duration_ms", "peer", "request_id"} <= entry.keys(), entry
        assert isinstance(entry["duration_ms"], int | float)
        assert entry["duration_ms"] >= 0
        assert "127.0.0.1" in entry["peer"], entry
    by_call = [(e["method"], e["code"], e["request_id"]) for e in entries]
    assert by_call == [
        (CATALOG + "UpsertCourse", "OK", ""),
        (PROGRESS + "RecordTime", "OK", request_id),
        (PROGRESS + "SaveBookmark", "OK", ""),
        (PROGRESS + "SaveBookmark", "UNAUTHENTICATED", ""),
    ]
    for secret in (token, admin_token, unknown_token, bookmark):
        assert secret not in log


# --- limits ------------------------------------------------------------------------------------


async def test_max_streams_refuses_a_stream_beyond_the_limit(
    tmp_path: Path, database_url: str
) -> None:
    with Serve(tmp_path, database_url, "--max-streams", "1") as served:
        await served.wait_health(SERVING)
        async with grpc.aio.insecure_channel(served.address) as channel:
            course_id = await upsert_course(channel)
            stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
            request = progress_service_pb2.WatchProgressRequest(course_id=course_id)

            first = stub.WatchProgress(request, timeout=CALL_TIMEOUT)
            reading = asyncio.create_task(first.read())
            try:
                await served.wait_gauge("lesson_progress_streams_open", 1, method=WATCH)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in stub.WatchProgress(request, timeout=CALL_TIMEOUT):
                        pass
                assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_info(raised.value).reason == "TOO_MANY_STREAMS"
            finally:
                first.cancel()
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)

            # The slot is given back when the stream ends: another stream opens.
            await served.wait_gauge("lesson_progress_streams_open", 0, method=WATCH)
            again = stub.WatchProgress(request, timeout=CALL_TIMEOUT)
            reading = asyncio.create_task(again.read())
            try:
                await served.wait_gauge("lesson_progress_streams_open", 1, method=WATCH)
                assert not reading.done()
            finally:
                again.cancel()
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)

        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()


async def test_oversized_message_is_resource_exhausted(tmp_path: Path, database_url: str) -> None:
    with Serve(tmp_path, database_url, "--max-message-bytes", "2048") as served:
        await served.wait_health(SERVING)
        async with grpc.aio.insecure_channel(served.address) as channel:
            catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
            lessons = [resources_pb2.Lesson(lesson_id="l1", title="one")]
            small = catalog_service_pb2.UpsertCourseRequest(
                course_id=new_id(), title="small", lessons=lessons
            )
            await catalog.UpsertCourse(small, timeout=CALL_TIMEOUT)

            big = catalog_service_pb2.UpsertCourseRequest(course_id=new_id(), title="big")
            big.lessons.extend(
                resources_pb2.Lesson(lesson_id=f"l{i}", title="t" * 100) for i in range(40)
            )
            assert big.ByteSize() > 2048
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await catalog.UpsertCourse(big, timeout=CALL_TIMEOUT)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # The server is fine afterwards.
            await catalog.GetCourse(
                catalog_service_pb2.GetCourseRequest(course_id=small.course_id),
                timeout=CALL_TIMEOUT,
            )
        samples = await served.scrape()
        codes = {s.labels["code"] for s in samples.get("lesson_progress_rpc_requests_total", [])}
        assert "INTERNAL" not in codes
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()
