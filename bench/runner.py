"""Runs one phase (an operation on a backend) and measures the processes around it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import asyncpg
import psutil

from bench import postgres
from bench.load import Job, LoadGenerators, WorkerResult
from bench.operations import SPECS, Backend, Concurrency, Op
from bench.results import PhaseResult
from bench.service import ServiceProcess
from bench.settings import Settings

RSS_INTERVAL = 0.02
# After the window, calls in flight finish (a stream is cancelled) within this time.
COLLECT_TIMEOUT = 120.0


def _cpu_of(processes: list[psutil.Process]) -> dict[int, float]:
    times = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
    return times


class DatabaseCpu:
    """CPU time of the PostgreSQL server processes (those running on this machine).

    One PostgreSQL is one node; a Citus cluster has a node named "coordinator" and its
    workers, so that the coordinator's share can be told apart.
    """

    def __init__(self, postmasters: dict[str, psutil.Process]) -> None:
        self.postmasters = postmasters

    def snapshot(self) -> dict[tuple[str, int], float] | None:
        """CPU seconds per (node, server process) now."""
        if not self.postmasters:
            return None
        times: dict[tuple[str, int], float] = {}
        for node, postmaster in self.postmasters.items():
            with contextlib.suppress(psutil.Error):
                processes = [postmaster, *postmaster.children()]
                times.update(((node, pid), cpu) for pid, cpu in _cpu_of(processes).items())
        return times or None

    @staticmethod
    def delta(
        before: dict[tuple[str, int], float] | None,
        after: dict[tuple[str, int], float] | None,
        node: str | None = None,
    ) -> float | None:
        """CPU seconds used between two snapshots (by processes alive at the second), by
        every node or by ``node`` alone."""
        if before is None or after is None:
            return None
        return sum(
            seconds - before.get(key, 0.0)
            for key, seconds in after.items()
            if node is None or key[0] == node
        )

    @property
    def coordinator(self) -> str | None:
        """The coordinator's node name on a Citus cluster; None on one PostgreSQL."""
        return "coordinator" if "coordinator" in self.postmasters else None


@dataclass
class _Rss:
    low: int | None = None
    high: int | None = None


async def _sample_rss(service: ServiceProcess, until: float, into: _Rss) -> None:
    while (now := time.monotonic()) < until:
        with contextlib.suppress(psutil.Error):
            rss = service.rss()
            into.low = rss if into.low is None else min(into.low, rss)
            into.high = rss if into.high is None else max(into.high, rss)
        await asyncio.sleep(min(RSS_INTERVAL, until - now))


async def _sleep_until(instant: float) -> None:
    await asyncio.sleep(max(0.0, instant - time.monotonic()))


class PhaseRunner:
    """Drives phases through the load generators and measures each."""

    def __init__(
        self,
        settings: Settings,
        generators: LoadGenerators,
        service: ServiceProcess,
        stats: asyncpg.Connection,
        database_cpu: DatabaseCpu,
        floor: ServiceProcess | None = None,
    ) -> None:
        self.settings = settings
        self.generators = generators
        self.service = service
        self.floor = floor
        self.stats = stats
        self.database_cpu = database_cpu
        self._phase = 0

    def concurrency(self, op: Op) -> int:
        """Total concurrent clients for ``op``."""
        match SPECS[op].concurrency:
            case Concurrency.DEFAULT:
                return self.settings.concurrency
            case Concurrency.MANY:
                return self.settings.many_concurrency
            case Concurrency.BATCH:
                return self.settings.batch_concurrency
        return 1

    def _jobs(
        self, op: Op, backend: Backend, rate: float | None, duration: float
    ) -> list[Job | None]:
        self._phase += 1
        total = self.concurrency(op)
        split = self.generators.split(total)
        if rate is not None:  # open loop: every process takes a share of the arrivals
            split = [max(c, 1) for c in split]
        active = sum(1 for c in split if c > 0)
        return [
            Job(
                op, backend, count, self.settings.warmup, duration,
                rate=None if rate is None else rate / active,
                seed=self.settings.seed * 100_003 + self._phase * 101 + index,
            )
            if count > 0
            else None
            for index, count in enumerate(split)
        ]  # fmt: skip

    async def run(
        self, op: Op, backend: Backend, *, rate: float | None = None,
        duration: float | None = None, stage: str = "",
    ) -> PhaseResult:  # fmt: skip
        """Runs ``op`` on ``backend`` (open loop at ``rate`` per second if given)."""
        duration = duration or self.settings.duration
        write = SPECS[op].write
        jobs = self._jobs(op, backend, rate, duration)
        before = await postgres.table_stats(self.stats)
        ready, failed = await asyncio.to_thread(self.generators.dispatch, jobs)
        go = self.generators.go(ready)
        start, end = go + self.settings.warmup, go + self.settings.warmup + duration
        server = self.floor if backend is Backend.FLOOR else self.service
        await _sleep_until(start)
        cpu_before = server.cpu_seconds() if server is not None else 0.0
        db_before = self.database_cpu.snapshot()
        rss = _Rss()
        if server is not None:
            await _sample_rss(server, end, rss)
        else:
            await _sleep_until(end)
        cpu_after = server.cpu_seconds() if server is not None else 0.0
        db_after = self.database_cpu.snapshot()
        results: list[WorkerResult] = failed + await asyncio.to_thread(
            self.generators.collect, ready, COLLECT_TIMEOUT
        )
        self.generators.release(ready)
        if write:  # let backends flush their statistics (at most once a second)
            await asyncio.sleep(1.2 if not self.settings.quick else 0.3)
        after = await postgres.table_stats(self.stats)
        errors = sum(r.errors for r in results)
        return PhaseResult(
            op=op,
            backend=backend,
            open_loop=rate is not None,
            concurrency=self.concurrency(op),
            duration=duration,
            ops=sum(r.ops for r in results),
            rows=sum(r.rows for r in results),
            errors=errors,
            first_error=next((r.first_error for r in results if r.first_error), None),
            latencies=[x for r in results for x in r.latencies],
            server_cpu=(
                cpu_after - cpu_before if backend in (Backend.SERVICE, Backend.FLOOR) else None
            ),
            database_cpu=DatabaseCpu.delta(db_before, db_after),
            coordinator_cpu=(
                None
                if (coordinator := self.database_cpu.coordinator) is None
                else DatabaseCpu.delta(db_before, db_after, coordinator)
            ),
            client_cpu=sum(r.cpu_seconds for r in results),
            rss_min=rss.low,
            rss_max=rss.high,
            updates=after.updates - before.updates,
            hot_updates=after.hot_updates - before.hot_updates,
            target_rate=rate,
            dropped=sum(r.dropped for r in results),
            stage=stage,
        )
