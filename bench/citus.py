"""A local Citus cluster (distributed PostgreSQL): ``./dev test-citus`` and ``./dev bench
--engine citus``.

``local_cluster()`` starts a 1-coordinator + N-worker cluster from the installed PostgreSQL
and Citus, in a temporary directory, on free ports of 127.0.0.1 with trust authentication,
and stops and removes it afterwards.

The PostgreSQL binaries are found, in order, in ``PG_BIN``, in ``pg_config --bindir``, or in
Debian's ``/usr/lib/postgresql/<newest>/bin``; Citus must be installed for that PostgreSQL
(``citus.so`` in its ``pg_config --pkglibdir``). PostgreSQL refuses to run as root: run as
root, the servers are initialised and run as the OS user ``LESSON_PROGRESS_TEST_PG_USER``
(default ``postgres``), which owns the temporary directory. Without Citus the session fails
with a message saying how to install it; it never skips.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "postgres"
WORKERS = 2

INSTALL_HINT = (
    "Install Citus for your PostgreSQL server: the Citus packages for PostgreSQL "
    "(https://docs.citusdata.com/en/stable/installation/single_node.html; on Debian/Ubuntu "
    "the postgresql-<version>-citus-<citus version> package of Citus's repository), or the "
    "install script your machine provides for it. Then run the command again, with PG_BIN "
    "naming that PostgreSQL's bin directory if it is not the one on PATH. Or name a running "
    "Citus coordinator: TEST_CITUS_URL for ./dev test-citus, BENCH_DATABASE_URL for "
    "./dev bench."
)


class CitusNotAvailable(RuntimeError):
    """The PostgreSQL binaries or the Citus extension are not installed."""


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def find_bin_dir() -> Path:
    """The bin directory of the PostgreSQL to run (see the module's docstring)."""
    candidates: list[Path] = []
    if pg_bin := os.environ.get("PG_BIN"):
        candidates.append(Path(pg_bin))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            candidates.append(Path(_run([pg_config, "--bindir"]).stdout.strip()))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise CitusNotAvailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) found in PG_BIN, pg_config --bindir "
        f"or /usr/lib/postgresql/*/bin. {INSTALL_HINT}"
    )


def find_lib_dir(bin_dir: Path) -> Path:
    """Where that PostgreSQL loads extension libraries from."""
    pg_config = bin_dir / "pg_config"
    if pg_config.is_file():
        return Path(_run([str(pg_config), "--pkglibdir"]).stdout.strip())
    return bin_dir.parent / "lib"


def check_citus(bin_dir: Path) -> None:
    """Raises CitusNotAvailable unless Citus is installed for the PostgreSQL in ``bin_dir``."""
    lib_dir = find_lib_dir(bin_dir)
    if not (lib_dir / "citus.so").is_file():
        raise CitusNotAvailable(
            f"Citus is not installed for the PostgreSQL in {bin_dir} (no citus.so in "
            f"{lib_dir}). {INSTALL_HINT}"
        )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LocalCluster:
    """A coordinator and workers started from local binaries in ``directory``."""

    bin_dir: Path
    directory: Path
    os_user: str | None  # who runs the servers when this process is root
    durable: bool = False  # fsync on (the benchmark) or off (the tests)
    nodes: dict[str, int] = field(default_factory=dict)  # name -> port

    def _as_owner(self, command: list[str]) -> list[str]:
        if self.os_user is None:
            return command
        return ["runuser", "-u", self.os_user, "--", *command]

    def url(self, port: int, database: str = "postgres") -> str:
        """The URL of one node."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{database}"

    @property
    def coordinator_url(self) -> str:
        """The coordinator's URL (database ``postgres``)."""
        return self.url(self.nodes["coordinator"])

    def start_node(self, name: str) -> int:
        """Initialises and starts one node with Citus preloaded; returns its port."""
        data = self.directory / name
        port = free_port()
        _run(
            self._as_owner(
                [str(self.bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER,
                 "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"]
            )
        )  # fmt: skip
        settings = {
            "port": str(port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.directory}'",
            "shared_preload_libraries": "'citus'",
            "max_connections": "200",
            "max_prepared_transactions": "200",
            "wal_level": "logical",  # shard moves (rebalancing) use logical replication
            "fsync": "on" if self.durable else "off",
            "logging_collector": "off",
        }
        config = "".join(f"{key} = {value}\n" for key, value in settings.items())
        _run(self._as_owner(["sh", "-c", f"cat >> '{data}/postgresql.conf'"]), input=config)
        _run(
            self._as_owner(
                [str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l", f"{data}.log",
                 "-w", "-t", "60", "start"]
            )
        )  # fmt: skip
        self.nodes[name] = port
        self.psql(port, "CREATE EXTENSION IF NOT EXISTS citus")
        return port

    def psql(self, port: int, sql: str) -> str:
        """Runs ``sql`` on a node's ``postgres`` database; returns its unaligned output."""
        result = _run(
            [str(self.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
             "-d", self.url(port), "-c", sql]
        )  # fmt: skip
        return result.stdout.strip()

    def stop(self) -> None:
        """Stops every node (workers first)."""
        for name in reversed(list(self.nodes)):
            subprocess.run(
                self._as_owner(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.directory / name),
                     "-m", "immediate", "-w", "stop"]
                ),
                capture_output=True,
                check=False,
            )  # fmt: skip


def _os_user() -> str | None:
    """The OS user to run PostgreSQL as: None unless this process is root."""
    if os.geteuid() != 0:
        return None
    return os.environ.get("LESSON_PROGRESS_TEST_PG_USER", "postgres")


@contextlib.contextmanager
def local_cluster(workers: int = WORKERS, *, durable: bool = False) -> Iterator[LocalCluster]:
    """Starts a coordinator and ``workers`` workers; stops and removes them afterwards.

    ``durable`` keeps fsync on, as a production server would (the benchmark); the tests
    turn it off.
    """
    bin_dir = find_bin_dir()
    check_citus(bin_dir)
    directory = Path(tempfile.mkdtemp(prefix="lesson-progress-citus-"))
    os_user = _os_user()
    if os_user is not None:
        entry = pwd.getpwnam(os_user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    cluster = LocalCluster(bin_dir, directory, os_user, durable)
    try:
        coordinator = cluster.start_node("coordinator")
        cluster.psql(coordinator, f"SELECT citus_set_coordinator_host('127.0.0.1', {coordinator})")
        for i in range(1, workers + 1):
            port = cluster.start_node(f"worker{i}")
            cluster.psql(coordinator, f"SELECT citus_add_node('127.0.0.1', {port})")
        yield cluster
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"starting the Citus cluster failed: {' '.join(exc.cmd)}\n{exc.stderr}"
        ) from None
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
