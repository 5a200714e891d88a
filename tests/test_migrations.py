"""The migration runner, on fresh databases of the test server.

Each test gets its own empty database and, where it edits migrations, its own copy of the
migrations directory under tmp_path, so nothing here touches the session database or the
repository's migrations.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from lesson_progress import migrate
from lesson_progress.config import Config
from lesson_progress.migrate import MigrationError

MIGRATIONS_DIR = Config().migrations_dir


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    """The migration files of ``directory`` in version order."""
    return sorted(directory.glob("*.sql"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_text().encode()).hexdigest()


@pytest.fixture
async def connection(fresh_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the fresh database."""
    connection = await asyncpg.connect(fresh_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the repository's migrations directory."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


def next_version(directory: Path) -> int:
    """A version number after every file of ``directory``."""
    return max(int(p.name[:4]) for p in migration_files(directory)) + 1


def add_file(directory: Path, description: str, sql: str, *, version: int | None = None) -> str:
    """Writes a new migration file; returns its name."""
    name = f"{version or next_version(directory):04d}_{description}.sql"
    (directory / name).write_text(sql)
    return name


async def recorded(connection: asyncpg.Connection) -> list[tuple[int, str, str]]:
    """The (version, name, checksum) rows of schema_migrations, in version order."""
    rows = await connection.fetch(
        "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    )
    return [(r["version"], r["name"], r["checksum"]) for r in rows]


def expected_records(directory: Path) -> list[tuple[int, str, str]]:
    """What schema_migrations should hold once every file of ``directory`` is applied."""
    return [(int(p.name[:4]), p.name, sha256_of(p)) for p in migration_files(directory)]


async def table_exists(connection: asyncpg.Connection, name: str) -> bool:
    return bool(await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def advisory_locks_held(connection: asyncpg.Connection) -> int:
    """Advisory locks held by anyone on this database (the runner must release its own)."""
    count = await connection.fetchval(
        """
        SELECT count(*) FROM pg_locks
        WHERE locktype = 'advisory' AND granted
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
        """
    )
    return int(count)


# --- applying --------------------------------------------------------------------------


async def test_migrate_applies_every_file_and_records_checksums(
    connection: asyncpg.Connection,
) -> None:
    files = migration_files()
    assert files, "the repository has migrations"
    for path in files:
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", path.name), path.name

    applied = await migrate.migrate(connection, MIGRATIONS_DIR)

    assert applied == [p.name for p in files]
    assert await recorded(connection) == expected_records(MIGRATIONS_DIR)
    for table in ("courses", "lessons", "lesson_progress", "course_progress", "lesson_attempts"):
        assert await table_exists(connection, table), table
    assert await advisory_locks_held(connection) == 0


async def test_second_run_applies_nothing(connection: asyncpg.Connection) -> None:
    await migrate.migrate(connection, MIGRATIONS_DIR)
    before = await connection.fetch("SELECT * FROM schema_migrations ORDER BY version")

    assert await migrate.migrate(connection, MIGRATIONS_DIR) == []

    after = await connection.fetch("SELECT * FROM schema_migrations ORDER BY version")
    assert [dict(r) for r in after] == [dict(r) for r in before]


async def test_pending_migrations_lists_what_is_pending(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    every = [p.name for p in migration_files(migrations_copy)]
    # Nothing applied yet, not even the bookkeeping table.
    pending = await migrate.pending_migrations(connection, migrations_copy)
    assert [m.name for m in pending] == every
    assert [m.version for m in pending] == [int(name[:4]) for name in every]
    assert not await table_exists(connection, "schema_migrations")

    await migrate.migrate(connection, migrations_copy)
    assert await migrate.pending_migrations(connection, migrations_copy) == []

    added = add_file(migrations_copy, "add_notes", "CREATE TABLE notes (id integer);")
    pending = await migrate.pending_migrations(connection, migrations_copy)
    assert [m.name for m in pending] == [added]
    assert pending[0].checksum == sha256_of(migrations_copy / added)
    # Listing applies nothing.
    assert not await table_exists(connection, "notes")

    assert await migrate.migrate(connection, migrations_copy) == [added]
    assert await table_exists(connection, "notes")
    assert await recorded(connection) == expected_records(migrations_copy)


# --- refusing ----------------------------------------------------------------------------


async def test_changed_applied_file_is_refused(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    await migrate.migrate(connection, migrations_copy)
    edited = migration_files(migrations_copy)[0]
    edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
    added = add_file(migrations_copy, "after_edit", "CREATE TABLE after_edit (id integer);")
    before = await recorded(connection)

    with pytest.raises(MigrationError) as raised:
        await migrate.migrate(connection, migrations_copy)
    message = str(raised.value)
    assert edited.name in message
    assert "changed" in message

    with pytest.raises(MigrationError, match=re.escape(edited.name)):
        await migrate.pending_migrations(connection, migrations_copy)

    # Nothing after the refusal was applied, and the lock was released.
    assert not await table_exists(connection, "after_edit")
    assert await recorded(connection) == before
    assert added not in {name for _, name, _ in before}
    assert await advisory_locks_held(connection) == 0


async def test_missing_applied_file_is_refused(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    added = add_file(migrations_copy, "soon_gone", "CREATE TABLE soon_gone (id integer);")
    await migrate.migrate(connection, migrations_copy)
    (migrations_copy / added).unlink()

    with pytest.raises(MigrationError) as raised:
        await migrate.migrate(connection, migrations_copy)
    assert added in str(raised.value)
    assert "missing" in str(raised.value)

    # A file missing but newer than every file on disk was applied by a newer build:
    # replicas of this build keep serving during a rolling deploy.
    assert await migrate.pending_migrations(connection, migrations_copy) == []


async def test_missing_older_applied_file_is_refused_by_health_check_too(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    gone = add_file(migrations_copy, "gone_middle", "CREATE TABLE gone_middle (id integer);")
    await migrate.migrate(connection, migrations_copy)
    add_file(migrations_copy, "after_gone", "CREATE TABLE after_gone (id integer);")
    (migrations_copy / gone).unlink()

    with pytest.raises(MigrationError, match=re.escape(gone)):
        await migrate.pending_migrations(connection, migrations_copy)
    assert await advisory_locks_held(connection) == 0


@pytest.mark.parametrize(
    "bad_name",
    ["2_short_version.sql", "0002-dashes.sql", "0002_UpperCase.sql", "0002_.sql", "add_x.sql"],
)
async def test_badly_named_file_is_refused(
    connection: asyncpg.Connection, migrations_copy: Path, bad_name: str
) -> None:
    (migrations_copy / bad_name).write_text("CREATE TABLE badly_named (id integer);")

    with pytest.raises(MigrationError) as raised:
        await migrate.migrate(connection, migrations_copy)
    assert bad_name in str(raised.value)

    # Refused before anything ran.
    assert not await table_exists(connection, "schema_migrations")
    assert not await table_exists(connection, "badly_named")
    assert not await table_exists(connection, "lesson_progress")


async def test_two_files_with_one_version_are_refused(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    version = next_version(migrations_copy)
    add_file(migrations_copy, "first", "CREATE TABLE first_one (id integer);", version=version)
    add_file(migrations_copy, "second", "CREATE TABLE second_one (id integer);", version=version)

    with pytest.raises(MigrationError, match="version"):
        await migrate.migrate(connection, migrations_copy)
    assert not await table_exists(connection, "schema_migrations")


# --- concurrency and transactions --------------------------------------------------------


async def test_concurrent_runs_apply_each_file_once(fresh_url: str, migrations_copy: Path) -> None:
    # A file that would fail if it ran twice, whatever the interleaving.
    added = add_file(migrations_copy, "counter", "CREATE TABLE counter (id integer);")
    connections = [await asyncpg.connect(fresh_url) for _ in range(3)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(migrate.migrate(c, migrations_copy) for c in connections)),
            timeout=120,
        )
        every = [p.name for p in migration_files(migrations_copy)]
        assert added in every
        # One run applied everything (in order), the others found nothing pending.
        assert sorted(results, key=len) == [[], [], every]
        assert await recorded(connections[0]) == expected_records(migrations_copy)
        for c in connections:
            assert await advisory_locks_held(c) == 0
    finally:
        for c in connections:
            await c.close()


async def test_no_transaction_file_runs_create_index_concurrently(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    added = add_file(
        migrations_copy,
        "concurrent_index",
        "-- migrate: no-transaction\n"
        "CREATE INDEX CONCURRENTLY lesson_progress_test_concurrent_idx\n"
        "    ON lesson_progress (lesson_id);\n",
    )

    applied = await migrate.migrate(connection, migrations_copy)

    assert applied[-1] == added
    valid = await connection.fetchval(
        "SELECT indisvalid FROM pg_index "
        "WHERE indexrelid = to_regclass('lesson_progress_test_concurrent_idx')"
    )
    assert valid is True
    assert await recorded(connection) == expected_records(migrations_copy)


async def test_concurrent_index_without_the_marker_fails_and_is_not_recorded(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    added = add_file(
        migrations_copy,
        "unmarked_concurrent_index",
        "CREATE INDEX CONCURRENTLY lesson_progress_unmarked_idx ON lesson_progress (lesson_id);",
    )

    with pytest.raises(asyncpg.ActiveSQLTransactionError):
        await migrate.migrate(connection, migrations_copy)

    assert await connection.fetchval("SELECT to_regclass('lesson_progress_unmarked_idx')") is None
    assert added not in {name for _, name, _ in await recorded(connection)}
    assert await advisory_locks_held(connection) == 0


async def test_failing_file_rolls_back_and_is_not_recorded(
    connection: asyncpg.Connection, migrations_copy: Path
) -> None:
    failing = add_file(
        migrations_copy,
        "half_done",
        "CREATE TABLE half_done (id integer);\nINSERT INTO half_done VALUES (1);\nSELECT 1 / 0;\n",
    )
    later = add_file(migrations_copy, "later", "CREATE TABLE later (id integer);")
    earlier = [p.name for p in migration_files(migrations_copy)][:-2]

    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate.migrate(connection, migrations_copy)

    # The files before it are applied (each in its own transaction); it and later are not.
    assert [name for _, name, _ in await recorded(connection)] == earlier
    assert not await table_exists(connection, "half_done")
    assert not await table_exists(connection, "later")
    assert await table_exists(connection, "lesson_progress")
    assert await advisory_locks_held(connection) == 0
    pending = await migrate.pending_migrations(connection, migrations_copy)
    assert [m.name for m in pending] == [failing, later]

    # Fixed (it was never recorded, so editing it is fine), it applies on the next run.
    (migrations_copy / failing).write_text("CREATE TABLE half_done (id integer);\n")
    assert await migrate.migrate(connection, migrations_copy) == [failing, later]
    assert await table_exists(connection, "half_done")
    assert await recorded(connection) == expected_records(migrations_copy)


async def test_0004_continues_each_courses_event_ids_and_keys_request_ids_by_course(
    connection: asyncpg.Connection, tmp_path: Path
) -> None:
    # Events written with the one identity sequence before 0004 keep their ids; after it,
    # each course counts up from its own highest id (or purge mark), so a watcher's
    # after_event_id stays valid.
    before = tmp_path / "before"
    before.mkdir()
    for path in migration_files():
        if int(path.name[:4]) < 4:
            shutil.copy(path, before / path.name)
    await migrate.migrate(connection, before)
    course, other, purged = (str(uuid.uuid4()) for _ in range(3))
    await connection.execute(
        "INSERT INTO courses (course_id) SELECT unnest($1::uuid[])", [course, other, purged]
    )
    await connection.execute(
        "INSERT INTO lessons (course_id, lesson_id, position) VALUES ($1, 'l1', 0)", course
    )
    user = str(uuid.uuid4())
    for course_id in (course, other, course, other, other):
        await connection.execute(
            "INSERT INTO progress_events (course_id, user_id, kind) VALUES ($1, $2, 1)",
            course_id,
            user,
        )
    highest = await connection.fetchval(
        "SELECT max(event_id) FROM progress_events WHERE course_id = $1", course
    )
    await connection.execute(
        "INSERT INTO progress_event_purges (course_id, purged_through) VALUES ($1, 1000)", purged
    )

    await migrate.migrate(connection, MIGRATIONS_DIR)
    heads = dict(
        await connection.fetch("SELECT course_id::text, last_event_id FROM course_event_heads")
    )
    assert heads[course] == highest
    assert heads[purged] == 1000
    await connection.fetchrow("SELECT * FROM lp_start_lesson($1, $2, 'l1')", user, course)
    ids = [
        r[0]
        for r in await connection.fetch(
            "SELECT event_id FROM progress_events WHERE course_id = $1 ORDER BY event_id", course
        )
    ]
    assert ids[-1] == highest + 1
    assert len(ids) == 3
    key = await connection.fetchval(
        "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_constraint c,"
        " unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)"
        " JOIN pg_attribute a ON a.attnum = k.attnum"
        " WHERE c.conname = 'processed_requests_pkey'"
        " AND a.attrelid = 'processed_requests'::regclass"
    )
    assert key == ["user_id", "request_id", "course_id"]
