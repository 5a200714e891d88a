"""The migration runner: applies ``migrations/NNNN_description.sql`` files in order.

* ``schema_migrations`` records each applied file's version, name and SHA-256; a file that
  changed after it was applied, or disappeared, stops the run with a clear error.
* One ``pg_advisory_lock`` is held for the whole run, so replicas that start together
  migrate once: the others wait, then find nothing pending.
* Each file runs in its own transaction, except a file whose first line is
  ``-- migrate: no-transaction`` (for ``CREATE INDEX CONCURRENTLY``), which must hold a
  single statement.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

# Any constant works as long as every replica uses the same: "lessonpr" in ASCII.
ADVISORY_LOCK_KEY = 0x6C6573736F6E7072
NO_TRANSACTION_MARKER = "-- migrate: no-transaction"
_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql\Z")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_SELECT_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
_INSERT_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"


class MigrationError(Exception):
    """The migrations on disk and in the database disagree, or a file is malformed."""


@dataclass(frozen=True)
class Migration:
    """One SQL file of the migrations directory."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, as recorded when it was applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        """False for files marked ``-- migrate: no-transaction``."""
        return not self.sql.lstrip().startswith(NO_TRANSACTION_MARKER)


def load_migrations(directory: Path) -> list[Migration]:
    """Reads every migration file of ``directory``, ordered by version."""
    migrations: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_description.sql")
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migration files share a version number")
    return migrations


async def _verify_applied(
    connection: asyncpg.Connection | PoolConnectionProxy,
    migrations: list[Migration],
    *,
    allow_newer: bool,
) -> list[Migration]:
    """Checks applied files against disk; returns the migrations still pending.

    With ``allow_newer``, migrations applied by a newer build (files this build does not
    have) are accepted: during a rolling deploy the old replicas keep serving while the new
    build's migrations, written to stay compatible, are applied.
    """
    by_version = {m.version: m for m in migrations}
    applied = await connection.fetch(_SELECT_APPLIED)
    for row in applied:
        migration = by_version.get(row["version"])
        if migration is None and allow_newer and row["version"] > max(by_version, default=0):
            continue
        if migration is None:
            raise MigrationError(
                f"migration {row['name']} was applied to this database but is missing from "
                "the migrations directory; this build is older than the database"
            )
        if migration.checksum != row["checksum"]:
            raise MigrationError(
                f"migration {migration.name} changed after it was applied (checksum "
                f"{row['checksum'][:12]}... in the database, {migration.checksum[:12]}... on "
                "disk); applied migrations are never edited: add a new file instead"
            )
    done = {row["version"] for row in applied}
    return [m for m in migrations if m.version not in done]


async def pending_migrations(
    connection: asyncpg.Connection | PoolConnectionProxy, directory: Path
) -> list[Migration]:
    """The migrations not yet applied.

    Raises MigrationError if an applied file changed or is missing, except for files newer
    than every file of this build (see ``_verify_applied``).
    """
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    migrations = load_migrations(directory)
    if not exists:
        return migrations
    return await _verify_applied(connection, migrations, allow_newer=True)


async def migrate(connection: asyncpg.Connection, directory: Path) -> list[str]:
    """Applies every pending migration under one advisory lock; returns the applied names."""
    migrations = load_migrations(directory)
    await connection.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await connection.execute(_CREATE_TABLE)
        pending = await _verify_applied(connection, migrations, allow_newer=False)
        for migration in pending:
            log.info("applying migration %s", migration.name)
            if migration.transactional:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        _INSERT_APPLIED, migration.version, migration.name, migration.checksum
                    )
            else:
                await connection.execute(migration.sql)
                await connection.execute(
                    _INSERT_APPLIED, migration.version, migration.name, migration.checksum
                )
        return [m.name for m in pending]
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
