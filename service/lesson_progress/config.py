"""Service configuration: one typed dataclass, built from flags and the environment.

A flag wins over its environment variable, which wins over the default. Every value is
validated once, at start-up; ``ConfigError`` lists every bad value with what is expected.
"""

from __future__ import annotations

import argparse
import ipaddress
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

    log_format: str = "json"
    """``json`` (one object per line) or ``text`` (``LESSON_PROGRESS_LOG_FORMAT``)."""

    access_log: bool = True
    """Whether every RPC is logged (``LESSON_PROGRESS_ACCESS_LOG``)."""

    metrics_port: int | None = 9464
    """Port of the Prometheus /metrics endpoint; None disables it, 0 picks any
    (``LESSON_PROGRESS_METRICS_PORT``, ``off`` to disable)."""

    metrics_host: str | None = None
    """Address of the metrics endpoint; defaults to ``host`` (``LESSON_PROGRESS_METRICS_HOST``)."""

    tls_cert_file: Path | None = None
    """PEM server certificate chain; with ``tls_key_file`` turns TLS on (``..._TLS_CERT``)."""

    tls_key_file: Path | None = None
    """PEM private key of the server certificate (``LESSON_PROGRESS_TLS_KEY``)."""

    tls_client_ca_file: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)
    (``LESSON_PROGRESS_TLS_CLIENT_CA``)."""

    auth_tokens_file: Path | None = None
    """Callers' hashed bearer tokens and scopes (``LESSON_PROGRESS_AUTH_TOKENS_FILE``);
    unset leaves the API open, which is only allowed on loopback or with ``insecure``."""

    insecure: bool = False
    """Allows listening beyond loopback without authentication (``LESSON_PROGRESS_INSECURE``)."""

    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request or response message (``LESSON_PROGRESS_MAX_MESSAGE_BYTES``)."""

    max_concurrent_rpcs: int = 1000
    """RPCs handled at once; more get RESOURCE_EXHAUSTED (``..._MAX_CONCURRENT_RPCS``)."""

    max_streams: int = 200
    """Server streams open at once; more get RESOURCE_EXHAUSTED (``..._MAX_STREAMS``)."""

    keepalive_seconds: int = 60
    """Interval of the server's keepalive pings on idle connections (``..._KEEPALIVE``)."""

    watch_poll_seconds: float = 5.0
    """How often a watcher re-reads the outbox without a notification: the bound on the
    delay while the LISTEN connection is being re-established (``..._WATCH_POLL``)."""

    health_check_interval_seconds: float = 5.0
    """How often health re-checks the database and migrations (``..._HEALTH_INTERVAL``)."""

    @property
    def tls(self) -> bool:
        """Whether the server listens with TLS."""
        return self.tls_cert_file is not None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"24h"``, ``"1d"`` or ``"500ms"``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m or 24h")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host in ("localhost", "localhost6"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    parser.add_argument("--log-format", help="json or text (env ..._LOG_FORMAT)")
    parser.add_argument("--metrics-port", help="Prometheus port, 'off' to disable (env ...)")
    parser.add_argument("--metrics-host", help="Prometheus address (env ..._METRICS_HOST)")
    parser.add_argument("--tls-cert", help="PEM certificate chain (env ..._TLS_CERT)")
    parser.add_argument("--tls-key", help="PEM private key (env ..._TLS_KEY)")
    parser.add_argument("--tls-client-ca", help="CA for client certificates (env ...)")
    parser.add_argument("--auth-tokens-file", help="hashed tokens and scopes (env ...)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow listening beyond loopback without authentication (env ..._INSECURE)",
    )
    parser.add_argument("--max-message-bytes", help="largest message (env ...)")
    parser.add_argument("--max-concurrent-rpcs", help="RPCs at once (env ...)")
    parser.add_argument("--max-streams", help="server streams at once (env ...)")


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

    def boolean(flag: str | None, env: str, default: bool) -> bool:
        if flag is not None and getattr(args, flag, None):
            return True
        value = environ.get(env)
        if value is None or value == "":
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        problems.append(f"{env}: {value!r} is not true or false")
        return default

    migrate = not getattr(args, "no_migrate", None) and boolean(
        None, ENV_PREFIX + "MIGRATE", defaults.migrate_on_start
    )

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

    def path(flag: str, env: str) -> Path | None:
        value = raw(flag, env)
        if value is None:
            return None
        if not Path(value).is_file():
            problems.append(f"{env} (--{flag.replace('_', '-')}): {value} is not a readable file")
        return Path(value)

    log_format = (raw("log_format", ENV_PREFIX + "LOG_FORMAT") or defaults.log_format).lower()
    if log_format not in ("json", "text"):
        problems.append(f"{ENV_PREFIX}LOG_FORMAT (--log-format): {log_format!r} is not json/text")

    metrics_port: int | None = defaults.metrics_port
    metrics_raw = raw("metrics_port", ENV_PREFIX + "METRICS_PORT")
    if metrics_raw is not None and metrics_raw.lower() in ("off", "none", "disabled"):
        metrics_port = None
    else:
        metrics_port = integer("metrics_port", ENV_PREFIX + "METRICS_PORT", 9464, 0, 65535)

    tls_cert = path("tls_cert", ENV_PREFIX + "TLS_CERT")
    tls_key = path("tls_key", ENV_PREFIX + "TLS_KEY")
    tls_client_ca = path("tls_client_ca", ENV_PREFIX + "TLS_CLIENT_CA")
    if (tls_cert is None) != (tls_key is None):
        problems.append(f"{ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY go together")
    if tls_client_ca is not None and tls_cert is None:
        problems.append(f"{ENV_PREFIX}TLS_CLIENT_CA (mutual TLS) needs TLS_CERT and TLS_KEY")

    auth_tokens_file = path("auth_tokens_file", ENV_PREFIX + "AUTH_TOKENS_FILE")
    if auth_tokens_file is not None and auth_tokens_file.is_file():
        from lesson_progress.auth import TokenFileError, load_callers

        try:
            load_callers(auth_tokens_file)
        except TokenFileError as exc:
            problems.append(f"{ENV_PREFIX}AUTH_TOKENS_FILE: {exc}")

    host = raw("host", ENV_PREFIX + "HOST") or defaults.host
    insecure = boolean("insecure", ENV_PREFIX + "INSECURE", defaults.insecure)
    serving = getattr(args, "command", "serve") == "serve"
    if serving and auth_tokens_file is None and not insecure and not is_loopback(host):
        problems.append(
            f"{ENV_PREFIX}HOST (--host): refusing to listen on {host} without authentication; "
            f"configure {ENV_PREFIX}AUTH_TOKENS_FILE, or pass --insecure "
            f"({ENV_PREFIX}INSECURE=true) to serve an open API on purpose"
        )

    config = Config(
        database_url=database_url,
        host=host,
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
        log_format=log_format,
        access_log=boolean("access_log", ENV_PREFIX + "ACCESS_LOG", defaults.access_log),
        metrics_port=metrics_port,
        metrics_host=raw("metrics_host", ENV_PREFIX + "METRICS_HOST"),
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        tls_client_ca_file=tls_client_ca,
        auth_tokens_file=auth_tokens_file,
        insecure=insecure,
        max_message_bytes=integer(
            "max_message_bytes",
            ENV_PREFIX + "MAX_MESSAGE_BYTES",
            defaults.max_message_bytes,
            1024,
            1024**3,
        ),
        max_concurrent_rpcs=integer(
            "max_concurrent_rpcs",
            ENV_PREFIX + "MAX_CONCURRENT_RPCS",
            defaults.max_concurrent_rpcs,
            1,
            1_000_000,
        ),
        max_streams=integer(
            "max_streams", ENV_PREFIX + "MAX_STREAMS", defaults.max_streams, 1, 1_000_000
        ),
        keepalive_seconds=integer(
            "keepalive", ENV_PREFIX + "KEEPALIVE", defaults.keepalive_seconds, 1, 86400
        ),
        watch_poll_seconds=duration(
            "watch_poll", ENV_PREFIX + "WATCH_POLL", defaults.watch_poll_seconds, 0.01
        ),
        health_check_interval_seconds=duration(
            "health_interval",
            ENV_PREFIX + "HEALTH_INTERVAL",
            defaults.health_check_interval_seconds,
            0.1,
        ),
    )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config
