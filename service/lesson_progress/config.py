"""Service configuration: one typed dataclass, built from flags and the environment.

A flag wins over its environment variable, which wins over the default. Every value is
validated once, at start-up; ``ConfigError`` lists every bad value with what is expected.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "LESSON_PROGRESS_"
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class ConfigError(Exception):
    """One or more configuration values are invalid; the message names each."""


@dataclass(frozen=True)
class Config:
    """Settings of one server process."""

    database_url: str | None = None
    """PostgreSQL URL (``DATABASE_URL``). Unset: an embedded PostgreSQL in ``data_dir``."""

    host: str = "127.0.0.1"
    """Address the gRPC server listens on (``LESSON_PROGRESS_HOST``)."""

    port: int = 50051
    """Port the gRPC server listens on, 0 for any free port (``LESSON_PROGRESS_PORT``)."""

    pool_size: int = 10
    """Maximum PostgreSQL connections of this process (``LESSON_PROGRESS_POOL_SIZE``)."""

    max_heartbeat_seconds: int = 300
    """Most seconds one RecordTime entry may add (``LESSON_PROGRESS_MAX_HEARTBEAT_SECONDS``)."""

    request_id_retention_seconds: int = 24 * 3600
    """How long request ids are remembered (``LESSON_PROGRESS_REQUEST_ID_RETENTION``)."""

    event_retention_seconds: int = 24 * 3600
    """How long progress events stay replayable (``LESSON_PROGRESS_EVENT_RETENTION``)."""

    shutdown_grace_seconds: float = 10.0
    """How long in-flight RPCs may run after SIGTERM (``LESSON_PROGRESS_SHUTDOWN_GRACE``)."""

    migrate_on_start: bool = True
    """Whether ``serve`` applies pending migrations first (``LESSON_PROGRESS_MIGRATE``)."""

    data_dir: Path = field(default_factory=lambda: Path(".lesson-progress"))
    """Where the embedded PostgreSQL keeps its data (``LESSON_PROGRESS_DATA_DIR``)."""

    migrations_dir: Path = DEFAULT_MIGRATIONS_DIR
    """Directory of the SQL migrations (``LESSON_PROGRESS_MIGRATIONS_DIR``)."""

    log_level: str = "INFO"
    """Python logging level name (``LESSON_PROGRESS_LOG_LEVEL``)."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"24h"``, ``"1d"`` or ``"500ms"``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m or 24h")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags that override the environment to a command's parser."""
    parser.add_argument("--database-url", help="PostgreSQL URL (env DATABASE_URL)")
    parser.add_argument("--host", help="listen address (env LESSON_PROGRESS_HOST)")
    parser.add_argument("--port", help="listen port, 0 for any (env LESSON_PROGRESS_PORT)")
    parser.add_argument("--pool-size", help="database connections (env LESSON_PROGRESS_POOL_SIZE)")
    parser.add_argument(
        "--max-heartbeat-seconds",
        help="most seconds one RecordTime may add (env LESSON_PROGRESS_MAX_HEARTBEAT_SECONDS)",
    )
    parser.add_argument(
        "--request-id-retention",
        help="how long request ids are remembered, e.g. 24h (env ..._REQUEST_ID_RETENTION)",
    )
    parser.add_argument(
        "--event-retention",
        help="how long progress events stay replayable, e.g. 24h (env ..._EVENT_RETENTION)",
    )
    parser.add_argument(
        "--shutdown-grace", help="grace for in-flight RPCs, e.g. 10s (env ..._SHUTDOWN_GRACE)"
    )
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        default=None,
        help="do not apply pending migrations at start (env LESSON_PROGRESS_MIGRATE=false)",
    )
    parser.add_argument("--data-dir", help="embedded PostgreSQL data (env ..._DATA_DIR)")
    parser.add_argument("--migrations-dir", help="SQL migrations (env ..._MIGRATIONS_DIR)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ... (env ..._LOG_LEVEL)")


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Builds and validates the configuration from parsed flags and the environment."""
    problems: list[str] = []

    def raw(flag: str, env: str) -> str | None:
        value = getattr(args, flag, None)
        if value is None:
            value = environ.get(env) or None
        return value

    def integer(flag: str, env: str, default: int, low: int, high: int) -> int:
        value = raw(flag, env)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            problems.append(f"{env} (--{flag.replace('_', '-')}): {value!r} is not an integer")
            return default
        if not low <= number <= high:
            problems.append(
                f"{env} (--{flag.replace('_', '-')}): {number} is outside {low}..{high}"
            )
        return number

    def duration(flag: str, env: str, default: float, low: float) -> float:
        value = raw(flag, env)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            problems.append(f"{env} (--{flag.replace('_', '-')}): {exc}")
            return default
        if seconds < low:
            problems.append(f"{env} (--{flag.replace('_', '-')}): must be at least {low}s")
        return seconds

    defaults = Config()
    database_url = raw("database_url", "DATABASE_URL")
    if database_url is not None and not database_url.startswith(("postgres://", "postgresql://")):
        problems.append("DATABASE_URL (--database-url): must start with postgresql://")

    migrate = defaults.migrate_on_start
    if getattr(args, "no_migrate", None):
        migrate = False
    elif (env_migrate := environ.get(ENV_PREFIX + "MIGRATE")) is not None:
        if env_migrate.lower() in ("1", "true", "yes", "on"):
            migrate = True
        elif env_migrate.lower() in ("0", "false", "no", "off"):
            migrate = False
        else:
            problems.append(f"{ENV_PREFIX}MIGRATE: {env_migrate!r} is not true or false")

    log_level = (raw("log_level", ENV_PREFIX + "LOG_LEVEL") or defaults.log_level).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        problems.append(f"{ENV_PREFIX}LOG_LEVEL (--log-level): {log_level!r} is not a level")

    migrations_dir = Path(
        raw("migrations_dir", ENV_PREFIX + "MIGRATIONS_DIR") or defaults.migrations_dir
    )
    if not migrations_dir.is_dir():
        problems.append(
            f"{ENV_PREFIX}MIGRATIONS_DIR (--migrations-dir): {migrations_dir} is not a directory"
        )

    config = Config(
        database_url=database_url,
        host=raw("host", ENV_PREFIX + "HOST") or defaults.host,
        port=integer("port", ENV_PREFIX + "PORT", defaults.port, 0, 65535),
        pool_size=integer("pool_size", ENV_PREFIX + "POOL_SIZE", defaults.pool_size, 1, 1000),
        max_heartbeat_seconds=integer(
            "max_heartbeat_seconds",
            ENV_PREFIX + "MAX_HEARTBEAT_SECONDS",
            defaults.max_heartbeat_seconds,
            1,
            86400,
        ),
        request_id_retention_seconds=int(
            duration(
                "request_id_retention",
                ENV_PREFIX + "REQUEST_ID_RETENTION",
                defaults.request_id_retention_seconds,
                1,
            )
        ),
        event_retention_seconds=int(
            duration(
                "event_retention",
                ENV_PREFIX + "EVENT_RETENTION",
                defaults.event_retention_seconds,
                1,
            )
        ),
        shutdown_grace_seconds=duration(
            "shutdown_grace", ENV_PREFIX + "SHUTDOWN_GRACE", defaults.shutdown_grace_seconds, 0
        ),
        migrate_on_start=migrate,
        data_dir=Path(raw("data_dir", ENV_PREFIX + "DATA_DIR") or defaults.data_dir),
        migrations_dir=migrations_dir,
        log_level=log_level,
    )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config
