"""``serve --workers N``: N server processes on one port, under a supervisor.

Each worker is today's single server (``lesson-progress serve`` started again with
``--workers 1``), listening with SO_REUSEPORT so that the kernel spreads new connections
over them. The supervisor is the parent process and never uses gRPC itself (gRPC does not
survive a fork, so the workers are started with ``subprocess`` as new programs):

- before the workers start, it starts the embedded PostgreSQL when no DATABASE_URL is
  set and applies the migrations once; workers run with ``--no-migrate``;
- each worker gets an equal share of the pools (``share``), so the connections of the
  whole group stay what the operator set;
- it serves the workers' metrics added up (prometheus-client's multiprocess mode, in a
  private temporary directory) on the metrics port; workers serve none;
- SIGTERM and SIGINT go on to every worker (once; workers run in sessions of their own,
  so a terminal's Ctrl-C reaches only the supervisor), which shuts down as a single
  server does;
  the supervisor waits for them the grace period plus STOP_SLACK_SECONDS (then kills
  what is left) and exits 0 when every worker did. SIGHUP goes on too (the workers
  re-read the tokens file) when there is a tokens file to re-read;
- a worker that dies is replaced after a back-off that doubles with each death in a row;
  one that fails MAX_START_FAILURES times in a row before serving stops the group (exit 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lesson_progress import server
from lesson_progress.addresses import bare_host
from lesson_progress.config import Config
from lesson_progress.observability import MULTIPROC_ENV, AggregatedMetrics

log = logging.getLogger(__name__)

#: Set in a worker's environment: the supervisor's private directory (ready files).
WORKER_DIR_ENV = "LESSON_PROGRESS_SUPERVISOR_DIR"
#: Set in a worker's environment: which worker it is (0..N-1), for its log lines.
WORKER_SLOT_ENV = "LESSON_PROGRESS_WORKER_SLOT"

STOP_SLACK_SECONDS = 15.0
"""How long past the grace period workers may take to exit before they are killed."""
MAX_START_FAILURES = 3
"""Workers of one slot that may exit in a row before serving; then the group stops."""
BACKOFF_SECONDS = 0.5
"""Wait before the first replacement; doubled for each further death in a row."""
MAX_BACKOFF_SECONDS = 10.0
STABLE_SECONDS = 30.0
"""A worker that served this long before dying starts the back-off afresh."""
POLL_SECONDS = 0.1


class SupervisorError(Exception):
    """The group cannot start or cannot go on (the message says why)."""


def share(total: int, workers: int) -> int:
    """One worker's part of ``total`` connections: an equal share, at least one."""
    return max(1, total // workers)


def ready_file(directory: Path, pid: int) -> Path:
    """The file a worker creates once it serves."""
    return directory / f"ready-{pid}"


# --- the worker's side -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What a worker learns from its environment: where to say it is ready, its slot,
    and its supervisor (whose exit ends the worker too)."""

    directory: Path
    slot: int
    supervisor_pid: int

    @classmethod
    def from_environment(cls) -> WorkerRole | None:
        """The role of this process, None when it is not a supervisor's worker."""
        directory = os.environ.get(WORKER_DIR_ENV)
        if not directory:
            return None
        return cls(Path(directory), int(os.environ.get(WORKER_SLOT_ENV, "0")), os.getppid())

    def announce_ready(self) -> None:
        """Tells the supervisor this worker serves."""
        ready_file(self.directory, os.getpid()).touch()

    async def supervisor_gone(self) -> None:
        """Returns once the supervisor has gone (killed): the worker then shuts down
        rather than serve on unsupervised."""
        while os.getppid() == self.supervisor_pid:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(1.0)


# --- the supervisor's side ----------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    slot: int
    process: subprocess.Popen[bytes]
    started: float
    ready: bool = False


@dataclasses.dataclass
class _Slot:
    deaths_in_a_row: int = 0
    start_failures_in_a_row: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``config.workers`` workers until a signal stops them; ``run()`` returns the
    exit code. ``serve_flags``: the flags ``serve`` was given (the workers get them too)."""

    def __init__(self, config: Config, serve_flags: list[str]) -> None:
        self.config = config
        self.serve_flags = serve_flags
        self.directory = Path(tempfile.mkdtemp(prefix="lesson-progress-workers-"))
        self.metrics_dir = self.directory / "metrics"
        self.metrics_dir.mkdir()
        self.metrics = AggregatedMetrics(str(self.metrics_dir))
        self.workers: dict[int, _Worker] = {}
        self.slots = [_Slot() for _ in range(config.workers)]
        self.signals: list[int] = []
        self.exit_codes: list[int] = []
        self._port_holder: socket.socket | None = None

    def run(self) -> int:
        """Starts the group and supervises it until it has stopped; the exit code."""
        embedded_db = None
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            url, embedded_db = server.resolve_database_url(self.config)
            if self.config.migrate_on_start:
                applied = asyncio.run(server.run_migrations(url, self.config))
                log.info("migrations applied: %s", ", ".join(applied) or "none pending")
            port = self._reserve_port()
            metrics_port = self._serve_metrics()
            worker_argv = self._worker_argv(url if embedded_db is not None else None, port)
            log.info(
                "starting %d workers on %s:%d (each: pool %d, stream connections %d); "
                "metrics %s",
                self.config.workers, self.config.host, port,
                share(self.config.pool_size, self.config.workers),
                share(self.config.stream_connections, self.config.workers),
                f"on port {metrics_port}" if metrics_port is not None else "off",
            )  # fmt: skip
            for slot in range(self.config.workers):
                self._start(slot, worker_argv)
            return self._supervise(worker_argv)
        finally:
            self._stop_all(signal.SIGKILL)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.metrics.close()
            if self._port_holder is not None:
                self._port_holder.close()
            if embedded_db is not None:
                embedded_db.stop()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _reserve_port(self) -> int:
        """Checks that the port is free and holds it (bound, never listening, so the kernel
        hands it no connection) for the workers to share, also when it was 0 (any)."""
        host = bare_host(self.config.host)
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, self.config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        probe = socket.socket(family, kind, proto)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(address)  # without SO_REUSEPORT: fails if anything holds the port
            port = int(probe.getsockname()[1])
        except OSError as exc:
            raise SupervisorError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}"
            ) from None
        finally:
            probe.close()
        holder = socket.socket(family, kind, proto)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((*address[:1], port, *address[2:]))
        self._port_holder = holder
        return port

    def _serve_metrics(self) -> int | None:
        if self.config.metrics_port is None:
            return None
        metrics_host = self.config.metrics_host or self.config.host
        try:
            return self.metrics.serve(bare_host(metrics_host), self.config.metrics_port)
        except OSError as exc:
            raise SupervisorError(
                f"cannot serve metrics on {metrics_host}:{self.config.metrics_port}: "
                f"{exc.strerror} (set LESSON_PROGRESS_METRICS_PORT to another port, or to off)"
            ) from None

    def _worker_argv(self, embedded_url: str | None, port: int) -> list[str]:
        """``serve`` with the operator's flags, then what makes it a worker (later flags
        win): one process, its share of the pools, no migrations, no metrics port."""
        workers = self.config.workers
        argv = [
            sys.executable, "-m", "lesson_progress", "serve", *self.serve_flags,
            "--workers", "1",
            "--port", str(port),
            "--pool-size", str(share(self.config.pool_size, workers)),
            "--stream-connections", str(share(self.config.stream_connections, workers)),
            "--no-migrate",
            "--metrics-port", "off",
        ]  # fmt: skip
        if embedded_url is not None:
            argv += ["--database-url", embedded_url]
        return argv

    def _start(self, slot: int, argv: list[str]) -> None:
        env = {
            **os.environ,
            WORKER_DIR_ENV: str(self.directory),
            WORKER_SLOT_ENV: str(slot),
            MULTIPROC_ENV: str(self.metrics_dir),
        }
        # A session of its own: a terminal's Ctrl-C (or `timeout`) signals the group it
        # started, and a worker must get each signal once, from the supervisor (a second
        # one could arrive after its handler is gone and kill it mid-exit).
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.workers[process.pid] = _Worker(slot, process, time.monotonic())
        self.slots[slot].restart_at = None

    def _supervise(self, argv: list[str]) -> int:
        stop_by: float | None = None
        while True:
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    self._forward_hangup()
                    continue
                if stop_by is None:  # the first stop signal; workers get it once
                    log.info(
                        "%s: stopping %d workers (grace %.1fs)",
                        signal.Signals(signum).name, len(self.workers),
                        self.config.shutdown_grace_seconds,
                    )  # fmt: skip
                    stop_by = (
                        time.monotonic() + self.config.shutdown_grace_seconds + STOP_SLACK_SECONDS
                    )
                    self._stop_all(signum)
            self._reap(stopping=stop_by is not None)
            if stop_by is None:
                self._restart_due(argv)
            elif not self.workers:
                failed = [code for code in self.exit_codes if code != 0]
                if failed:
                    log.error("stopped; workers exited with %s", failed)
                    return 1
                log.info("stopped")
                return 0
            elif time.monotonic() > stop_by:
                log.error("%d workers did not exit in time: killed", len(self.workers))
                self._stop_all(signal.SIGKILL)
                return 1
            time.sleep(POLL_SECONDS)

    def _forward_hangup(self) -> None:
        if self.config.auth_tokens_file is None:
            log.info("SIGHUP: no tokens file to re-read; ignored")
            return
        self._stop_all(signal.SIGHUP)

    def _stop_all(self, signum: int) -> None:
        """Sends ``signum`` to every worker still running."""
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signum)
        if signum == signal.SIGKILL:
            for worker in self.workers.values():
                worker.process.wait()

    def _reap(self, *, stopping: bool) -> None:
        """Notes workers that became ready, and those that exited."""
        for pid, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None:
                if not worker.ready and ready_file(self.directory, pid).exists():
                    worker.ready = True
                    self.slots[worker.slot].start_failures_in_a_row = 0
                    log.info("worker %d (pid %d) serving", worker.slot, pid)
                continue
            del self.workers[pid]
            ready_file(self.directory, pid).unlink(missing_ok=True)
            self.metrics.process_dead(pid)
            if stopping:
                self.exit_codes.append(code)
                continue
            self._schedule_replacement(worker, code)

    def _schedule_replacement(self, worker: _Worker, code: int) -> None:
        slot = self.slots[worker.slot]
        how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
        if not worker.ready:
            slot.start_failures_in_a_row += 1
            if slot.start_failures_in_a_row >= MAX_START_FAILURES:
                raise SupervisorError(
                    f"worker {worker.slot} {how} before serving, {MAX_START_FAILURES} times "
                    "in a row (its error is above)"
                )
        ran = time.monotonic() - worker.started
        slot.deaths_in_a_row = 1 if ran >= STABLE_SECONDS else slot.deaths_in_a_row + 1
        delay = min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2 ** (slot.deaths_in_a_row - 1))
        slot.restart_at = time.monotonic() + delay
        log.error(
            "worker %d (pid %d) %s; replacing it in %.1fs",
            worker.slot, worker.process.pid, how, delay,
        )  # fmt: skip

    def _restart_due(self, argv: list[str]) -> None:
        now = time.monotonic()
        for number, slot in enumerate(self.slots):
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(number, argv)


def run(config: Config, serve_flags: list[str]) -> int:
    """Runs ``serve`` as a supervised group of ``config.workers`` workers; the exit code."""
    return Supervisor(config, serve_flags).run()
