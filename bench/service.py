"""The service under test, started in its own process exactly as a user starts it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServiceProcess:
    """``python -m lesson_progress serve --database-url URL --port N --no-migrate``, or
    with ``floor=True`` the bare server of ``bench/floor.py``, in a process of its own.

    Default settings otherwise, except that the Prometheus endpoint (on, as by default)
    takes any free port instead of the fixed default one, which another server on the
    machine may hold, and ``workers`` (``--workers``). CPU and memory are those of the
    process and its children (the supervisor and its workers). ``source``: run the service
    from that copy of the repository's ``service`` and ``clients/python/src`` (an older
    revision, bench/time_budget.py) instead of the installed one.
    """

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *,
        floor: bool = False,
        workers: int = 1,
        source: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.name = "the floor server" if floor else "the service"
        self.command = (
            [sys.executable, "-m", "bench.floor", "--database-url", database_url,
             "--port", str(self.port)]
            if floor
            else [
                sys.executable, "-m", "lesson_progress", "serve",
                "--database-url", database_url, "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-port", "0", "--no-migrate",
                # Only when asked: the revisions before --workers (``source``) lack it.
                *(["--workers", str(workers)] if workers != 1 else []),
            ]
        )  # fmt: skip
        env = None
        if source is not None:
            paths = (source / "service", source / "clients" / "python" / "src")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=source
            )
        self.process = psutil.Process(self.popen.pid)
        self._wait_ready()
        self.workers = workers
        self.processes = [self.process]
        if workers > 1:
            self.processes += self._wait_for_workers()

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.popen.pid

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        with grpc.insecure_channel(self.address) as channel:
            while True:
                if self.popen.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.popen.returncode}; "
                        f"its output:\n{self.log_path.read_text()[-3000:]}"
                    )
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} did not start listening") from None

    def _wait_for_workers(self) -> list[psutil.Process]:
        """The workers, once all of them listen (the first to listen made it ready)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            listening = [
                child
                for child in self.process.children()
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                       for c in child.net_connections(kind="tcp"))
            ]  # fmt: skip
            if len(listening) == self.workers:
                return listening
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {len(listening)} of {self.workers} workers")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server has used so far (all its threads; with
        workers, the supervisor's and theirs)."""
        total = 0.0
        for process in self.processes:
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def rss(self) -> int:
        """Resident memory now, in bytes (with workers: all the processes together)."""
        return sum(int(process.memory_info().rss) for process in self.processes)

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL if it takes too long."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
