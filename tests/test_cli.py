"""The ``lesson-progress`` command: configuration, ``migrate`` and ``serve``.

Commands run as real child processes (``python -m lesson_progress``) with an environment
stripped of every DATABASE_URL and LESSON_PROGRESS_* variable, in tmp_path, so a setting
of the developer's shell cannot leak in and nothing is written outside tmp_path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from lesson_progress import cli, config, server
from lesson_progress.config import Config, ConfigError, parse_duration
from lessonprogress.v1 import catalog_service_pb2, catalog_service_pb2_grpc, resources_pb2
from tests.support import ServerProcess, clean_env, free_port

COMMAND_TIMEOUT = 60.0  # seconds; a command that does not finish by then has hung
EMBEDDED_START_TIMEOUT = 120.0  # initdb + start of the embedded PostgreSQL
STOP_TIMEOUT = 60.0
MIGRATIONS_DIR = Config().migrations_dir


def run_command(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m lesson_progress *args`` to completion (killed after a timeout)."""
    return subprocess.run(
        [sys.executable, "-m", "lesson_progress", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


# --- config.parse_duration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("0s", 0.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        ("2d", 172800.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("0.25s", 0.25),
        (" 30s ", 30.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "   ", "forever", "s", "ms", "-5s", "5x", "5 s s", "five minutes", "24 hours"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_duration(text)


# --- config.load -------------------------------------------------------------------------


def parse_flags(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(list(flags))


def test_settled_collector_ignores_startup_objects() -> None:
    threshold = gc.get_threshold()
    try:
        cli.settle_garbage_collector()
        assert gc.get_freeze_count() > 10_000  # every module, descriptor, ... loaded so far
        assert gc.get_threshold()[0] > threshold[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_load_defaults() -> None:
    loaded = config.load(parse_flags(), {})
    assert loaded == Config()
    assert loaded.database_url is None
    assert (loaded.port, loaded.pool_size, loaded.max_heartbeat_seconds) == (50051, 10, 300)
    assert loaded.request_id_retention_seconds == 24 * 3600
    assert loaded.migrate_on_start is True


def test_workers_auto_is_the_usable_cpus_at_most_the_cap() -> None:
    usable = len(os.sched_getaffinity(0))
    loaded = config.load(parse_flags("--workers", "auto"), {})
    assert 1 <= loaded.workers <= min(usable, config.AUTO_WORKERS_CAP)
    assert config.load(parse_flags(), {"LESSON_PROGRESS_WORKERS": "3"}).workers == 3
    assert Config().workers == 1  # one process unless asked


def test_load_flag_wins_over_environment() -> None:
    env = {
        "DATABASE_URL": "postgresql://env/db",
        "LESSON_PROGRESS_PORT": "1111",
        "LESSON_PROGRESS_POOL_SIZE": "3",
        "LESSON_PROGRESS_REQUEST_ID_RETENTION": "1h",
        "LESSON_PROGRESS_MIGRATE": "true",
    }
    loaded = config.load(
        parse_flags(
            "--database-url",
            "postgres://flag/db",
            "--port",
            "2222",
            "--request-id-retention",
            "90m",
            "--no-migrate",
        ),
        env,
    )
    assert loaded.database_url == "postgres://flag/db"
    assert loaded.port == 2222
    assert loaded.pool_size == 3  # from the environment: no flag given
    assert loaded.request_id_retention_seconds == 90 * 60
    assert loaded.migrate_on_start is False


TRUTHY = ("1", "true", "YES", "on")
FALSY = ("0", "false", "No", "off")


@pytest.mark.parametrize("value", [*TRUTHY, *FALSY])
def test_load_migrate_environment(value: str) -> None:
    loaded = config.load(parse_flags(), {"LESSON_PROGRESS_MIGRATE": value})
    assert loaded.migrate_on_start is (value in TRUTHY)


def test_load_lists_every_problem_at_once() -> None:
    env = {
        "DATABASE_URL": "mysql://x",
        "LESSON_PROGRESS_PORT": "70000",
        "LESSON_PROGRESS_POOL_SIZE": "0",
        "LESSON_PROGRESS_MAX_HEARTBEAT_SECONDS": "abc",
        "LESSON_PROGRESS_REQUEST_ID_RETENTION": "forever",
        "LESSON_PROGRESS_MIGRATE": "maybe",
    }
    with pytest.raises(ConfigError) as raised:
        config.load(parse_flags(), env)
    message = str(raised.value)
    for name in env:
        assert name in message, name
    for value in ("70000", "'abc'", "'forever'", "'maybe'"):
        assert value in message, value


def test_readme_configuration_table_matches_the_declarations() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("| variable | flag | default | meaning |")
    table = readme[start : readme.index("\n\n", start)]
    assert table == config.markdown_table(), (
        "README.md's configuration table differs from lesson_progress/config.py; replace it "
        "with the output of `python -m lesson_progress.config`"
    )


def test_every_setting_has_a_flag_and_a_variable() -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    declared = config.settings()
    internal = ("callers", "share_port")  # set by code, not by the operator
    assert len(declared) == len([f for f in Config.__dataclass_fields__ if f not in internal])
    for _, setting in declared:
        assert f"--{setting.flag}" in flags
        assert setting.env.startswith("LESSON_PROGRESS_") or setting.env == "DATABASE_URL"


# Values that some setting's parser rejects (a setting of free text rejects none).
REJECTED_SOMEWHERE = ("-5", "0", "99999999999", "not a value", "1h2x", "maybe", "mysql://x")


def _serve_flags() -> set[str]:
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return {option for action in serve._actions for option in action.option_strings}


def test_configuration_errors_name_only_flags_that_serve_accepts() -> None:
    accepted = _serve_flags()
    named: dict[str, set[str]] = {}
    for _, setting in config.settings():
        for bad in REJECTED_SOMEWHERE:
            try:
                config.load(parse_flags(), {setting.env: bad})
            except ConfigError as exc:
                problem = next(line for line in str(exc).splitlines() if setting.env in line)
                named.setdefault(setting.env, set()).update(
                    re.findall(r"--[a-z][a-z0-9-]*", problem)
                )
    conflicts = {  # settings that are wrong together, each alone being valid
        "LESSON_PROGRESS_MIGRATIONS_DIR": "/nonexistent/migrations",
        "LESSON_PROGRESS_TLS_CERT": "/nonexistent/cert.pem",
        "LESSON_PROGRESS_TLS_CLIENT_CA": "/nonexistent/ca.pem",
        "LESSON_PROGRESS_HOST": "0.0.0.0",
    }
    with pytest.raises(ConfigError) as raised:
        config.load(parse_flags(), conflicts)
    named["conflicts"] = set(re.findall(r"--[a-z][a-z0-9-]*", str(raised.value)))
    assert len(named) > 10, named  # most settings reject some value
    for setting, flags in named.items():
        assert flags, f"the error of {setting} names no flag"
        assert flags <= accepted, f"{setting}'s error names flags serve lacks: {flags - accepted}"


# --- lesson-progress serve: bad configuration ---------------------------------------------

# (flags, environment, setting that must be named, bad value that must be quoted or None)
BAD_CONFIGS = {
    "port flag": (["--port", "70000"], {}, "LESSON_PROGRESS_PORT", "70000"),
    "port env": ([], {"LESSON_PROGRESS_PORT": "70000"}, "LESSON_PROGRESS_PORT", "70000"),
    "pool size flag": (["--pool-size", "0"], {}, "LESSON_PROGRESS_POOL_SIZE", "0"),
    "pool size env": ([], {"LESSON_PROGRESS_POOL_SIZE": "0"}, "LESSON_PROGRESS_POOL_SIZE", "0"),
    "workers flag": (["--workers", "many"], {}, "LESSON_PROGRESS_WORKERS", "many"),
    "workers env": ([], {"LESSON_PROGRESS_WORKERS": "many"}, "LESSON_PROGRESS_WORKERS", "many"),
    "heartbeat flag": (
        ["--max-heartbeat-seconds", "abc"],
        {},
        "LESSON_PROGRESS_MAX_HEARTBEAT_SECONDS",
        "abc",
    ),
    "heartbeat env": (
        [],
        {"LESSON_PROGRESS_MAX_HEARTBEAT_SECONDS": "abc"},
        "LESSON_PROGRESS_MAX_HEARTBEAT_SECONDS",
        "abc",
    ),
    "retention flag": (
        ["--request-id-retention", "forever"],
        {},
        "LESSON_PROGRESS_REQUEST_ID_RETENTION",
        "forever",
    ),
    "retention env": (
        [],
        {"LESSON_PROGRESS_REQUEST_ID_RETENTION": "forever"},
        "LESSON_PROGRESS_REQUEST_ID_RETENTION",
        "forever",
    ),
    "migrate env": ([], {"LESSON_PROGRESS_MIGRATE": "maybe"}, "LESSON_PROGRESS_MIGRATE", "maybe"),
    # The URL itself is not echoed (a URL may carry a password); the setting is named.
    "database url env": ([], {"DATABASE_URL": "mysql://x"}, "DATABASE_URL", None),
    "database url flag": (["--database-url", "mysql://x"], {}, "DATABASE_URL", None),
}


def assert_names(stderr: str, setting: str, value: str | None) -> None:
    """stderr has a line naming ``setting`` and, if given, the bad ``value`` as a word."""
    lines = [line for line in stderr.splitlines() if re.search(rf"\b{setting}\b", line)]
    assert lines, f"{setting} not named in:\n{stderr}"
    if value is not None:
        assert any(re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", ln) for ln in lines), (
            f"{value!r} not named next to {setting} in:\n{stderr}"
        )


@pytest.mark.parametrize(
    ("flags", "env", "setting", "value"), list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS)
)
def test_serve_refuses_bad_configuration(
    tmp_path: Path, flags: list[str], env: dict[str, str], setting: str, value: str | None
) -> None:
    data_dir = tmp_path / "data"
    result = run_command(
        ["serve", *flags],
        clean_env(LESSON_PROGRESS_DATA_DIR=str(data_dir), **env),
        tmp_path,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert_names(result.stderr, setting, value)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # Refused before anything started: no embedded PostgreSQL was created.
    assert not data_dir.exists()


def test_serve_names_every_bad_value_at_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run_command(
        ["serve", "--port", "70000", "--max-heartbeat-seconds", "abc"],
        clean_env(
            DATABASE_URL="mysql://x",
            LESSON_PROGRESS_POOL_SIZE="0",
            LESSON_PROGRESS_WORKERS="many",
            LESSON_PROGRESS_REQUEST_ID_RETENTION="forever",
            LESSON_PROGRESS_MIGRATE="maybe",
            LESSON_PROGRESS_DATA_DIR=str(data_dir),
        ),
        tmp_path,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    for _, _, setting, value in BAD_CONFIGS.values():
        assert_names(result.stderr, setting, value)
    assert not data_dir.exists()


def test_migrate_refuses_bad_configuration(tmp_path: Path) -> None:
    result = run_command(["migrate", "--database-url", "mysql://x"], clean_env(), tmp_path)
    assert result.returncode == 2
    assert_names(result.stderr, "DATABASE_URL", None)


# --- lesson-progress migrate --------------------------------------------------------------


async def test_migrate_command_applies_then_has_nothing_pending(
    fresh_url: str, tmp_path: Path
) -> None:
    names = [p.name for p in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    assert names

    first = await asyncio.to_thread(
        run_command, ["migrate", "--database-url", fresh_url], clean_env(), tmp_path
    )
    assert first.returncode == 0, first.stderr
    printed = [name for name in names if name in first.stdout]
    assert printed == names, first.stdout
    positions = [first.stdout.index(name) for name in names]
    assert positions == sorted(positions), "names printed in version order"

    connection = await asyncpg.connect(fresh_url)
    try:
        recorded = await connection.fetch("SELECT name FROM schema_migrations ORDER BY version")
        assert [r["name"] for r in recorded] == names
    finally:
        await connection.close()

    # The same database from the environment this time.
    second = await asyncio.to_thread(
        run_command, ["migrate"], clean_env(DATABASE_URL=fresh_url), tmp_path
    )
    assert second.returncode == 0, second.stderr
    assert "nothing pending" in second.stdout
    assert not any(name in second.stdout for name in names)


async def test_migrate_command_refuses_edited_migration(fresh_url: str, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    args = ["migrate", "--database-url", fresh_url, "--migrations-dir", str(migrations)]
    first = await asyncio.to_thread(run_command, args, clean_env(), tmp_path)
    assert first.returncode == 0, first.stderr
    edited = sorted(migrations.glob("*.sql"))[-1]
    edited.write_text(edited.read_text() + "\n-- edited after it was applied\n")

    second = await asyncio.to_thread(run_command, args, clean_env(), tmp_path)
    assert second.returncode == 1
    assert edited.name in second.stderr
    assert "Traceback" not in second.stderr


# --- lesson-progress serve with an embedded PostgreSQL -------------------------------------


async def test_serve_with_embedded_postgres_persists_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = clean_env(
        LESSON_PROGRESS_DATA_DIR=str(data_dir),
        LESSON_PROGRESS_PORT=str(port),
        LESSON_PROGRESS_HOST="127.0.0.1",
        LESSON_PROGRESS_METRICS_PORT="0",  # not the fixed default: it may be taken
    )
    course_id = str(uuid.uuid4())
    lessons = [
        resources_pb2.Lesson(lesson_id="intro", title="Intro", assessed=False),
        resources_pb2.Lesson(lesson_id="quiz", title="Quiz", assessed=True, passing_score=80),
    ]

    for run in ("first", "second"):
        served = ServerProcess(
            [], tmp_path / f"{run}.log", address, env=env, cwd=tmp_path,
            start_timeout=EMBEDDED_START_TIMEOUT, stop_timeout=STOP_TIMEOUT,
        )  # fmt: skip
        try:
            await served.wait_ready()
            async with grpc.aio.insecure_channel(address) as channel:
                catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await catalog.GetCourse(
                        catalog_service_pb2.GetCourseRequest(course_id=str(uuid.uuid4())),
                        timeout=COMMAND_TIMEOUT,
                    )
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND
                if run == "first":
                    await catalog.UpsertCourse(
                        catalog_service_pb2.UpsertCourseRequest(
                            course_id=course_id, title="Persisted", lessons=lessons
                        ),
                        timeout=COMMAND_TIMEOUT,
                    )
                else:
                    course = (
                        await catalog.GetCourse(
                            catalog_service_pb2.GetCourseRequest(course_id=course_id),
                            timeout=COMMAND_TIMEOUT,
                        )
                    ).course
                    assert course.course_id == course_id
                    assert course.title == "Persisted"
                    assert list(course.lessons) == lessons
            assert await served.terminate() == 0, served.log_tail()
        finally:
            served.kill()
        # The data stays, and the embedded PostgreSQL was stopped with the service.
        assert (data_dir / "pgdata" / "PG_VERSION").is_file()
        assert not (data_dir / "pgdata" / "postmaster.pid").exists(), served.log_tail()


def _postgres_processes_of(data_dir: Path) -> list[int]:
    """Pids of processes whose command line names ``data_dir`` (a postgres -D <dir>)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(data_dir).encode() in arg for arg in argv) and b"pytest" not in argv[0]:
            found.append(int(proc.name))
    return found


async def test_embedded_postgres_stops_when_start_up_fails_after_starting_it(
    tmp_path: Path,
) -> None:
    # In the process itself, not a child: a child's exit would stop the embedded server
    # anyway (the library stops it at interpreter exit), hiding a start-up that does not.
    data_dir = tmp_path / "data"
    with socket.socket() as taken:  # the gRPC port is in use: start-up fails after migrating
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Config(data_dir=data_dir, host="127.0.0.1", port=port, metrics_port=None)
        with pytest.raises(server.StartupError, match=f"127.0.0.1:{port}"):
            await server.start(settings)
    assert (data_dir / "pgdata" / "PG_VERSION").exists()  # the embedded server had started
    assert _postgres_processes_of(data_dir) == []
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
