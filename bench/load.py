"""Load generator processes and the loops they run.

The parent starts ``workers`` processes (multiprocessing, spawn: no gRPC state is ever
forked) once per run. For each phase it sends every process a ``Job``; each process
connects its clients off the clock, answers "ready", waits for "go" (a shared
``time.monotonic()`` instant), then drives the load:

* closed loop: ``concurrency`` coroutines, each issuing its next call as soon as the
  previous one returns (throughput at a fixed concurrency);
* open loop: calls start at Poisson arrival times at ``rate`` per second whatever the
  responses do, latency counted from the scheduled start (latency at a given load, free
  of coordinated omission).

A call counts if it ends inside the measurement window (after the warm-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.backends import Call, LoadBackend, Window
from bench.baselines import NaiveBackend, RawBackend
from bench.dataset import Dataset
from bench.keys import Planner, share
from bench.operations import Backend, Op
from bench.service_client import ServiceBackend

START_DELAY = 0.05
MAX_IN_FLIGHT = 2000
# A process connects its clients and builds its requests within this time.
STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Setup:
    """What every load generator process gets once."""

    address: str
    floor_address: str
    database_url: str
    dataset: Dataset
    batch_size: int
    connections_per_client: bool = False
    """The service's clients each on a connection of their own (for ``--workers``: the
    kernel spreads connections, not calls, over the workers), not one shared channel."""


@dataclass(frozen=True)
class Job:
    """One phase, as one process runs it."""

    op: Op
    backend: Backend
    concurrency: int
    warmup: float
    duration: float
    rate: float | None = None
    """Open-loop arrivals per second for this process; None for closed loop."""
    seed: int = 0


@dataclass
class WorkerResult:
    """What one process measured in the window."""

    ops: int = 0
    rows: int = 0
    errors: int = 0
    first_error: str | None = None
    latencies: list[float] = field(default_factory=list)
    dropped: int = 0
    cpu_seconds: float = 0.0


def _backend(setup: Setup, backend: Backend) -> LoadBackend:
    if backend is Backend.SERVICE:
        return ServiceBackend(setup.address, setup.connections_per_client)
    if backend is Backend.FLOOR:
        return ServiceBackend(setup.floor_address)
    if backend is Backend.RAW:
        return RawBackend(setup.database_url)
    return NaiveBackend(setup.database_url)


class _Recorder:
    """Collects the outcome of each call."""

    def __init__(self, windowed_rows: bool, window: Window) -> None:
        self.window = window
        self.windowed_rows = windowed_rows
        """Whether calls count their rows inside the window themselves (long calls)."""
        self.result = WorkerResult()

    def done(self, started: float, rows: int, complete: bool) -> None:
        """Records a call that returned; latency runs from ``started`` to now."""
        ended = time.monotonic()
        inside = self.window.start <= ended < self.window.end
        if self.windowed_rows or inside:
            self.result.rows += rows
        if inside and complete:
            self.result.ops += 1
            self.result.latencies.append(ended - started)

    def failed(self, exc: BaseException) -> None:
        """Records a call that raised (the first error is kept for the report)."""
        self.result.errors += 1
        if self.result.first_error is None:
            self.result.first_error = f"{type(exc).__name__}: {exc}"[:500]


async def _closed_loop(call: Call, slot: int, items: Iterator[object], recorder: _Recorder) -> None:
    """One client: the next call as soon as the previous one returns, until the window ends."""
    end = recorder.window.end
    while (started := time.monotonic()) < end:
        try:
            rows, complete = await call(slot, next(items), recorder.window)
        except Exception as exc:
            recorder.failed(exc)
            await asyncio.sleep(0.001)
            continue
        recorder.done(started, rows, complete)


async def _open_loop(
    call: Call, job: Job, items: Iterator[object], recorder: _Recorder, go: float
) -> None:
    """Calls started at Poisson arrival times from ``go`` on, whatever the responses do."""
    assert job.rate is not None
    rng = random.Random(job.seed)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(slot: int, scheduled: float) -> None:
        try:
            rows, complete = await call(slot, next(items), recorder.window)
        except Exception as exc:
            recorder.failed(exc)
            return
        recorder.done(scheduled, rows, complete)

    scheduled = go
    slots = itertools.cycle(range(max(job.concurrency, 1)))
    while True:
        scheduled += rng.expovariate(job.rate)
        if scheduled >= recorder.window.end:
            break
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= MAX_IN_FLIGHT:
            recorder.result.dropped += 1
            continue
        task = asyncio.create_task(one(next(slots), scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)


def _failure(exc: BaseException) -> WorkerResult:
    return WorkerResult(errors=1, first_error=f"{type(exc).__name__}: {exc}"[:500])


async def _run(pipe: Connection, setup: Setup, job: Job, worker: int, workers: int) -> None:
    """Prepares off the clock, says "ready" (or sends a failed result), runs, sends the result."""
    backend = _backend(setup, job.backend)
    try:
        planner = Planner(
            setup.dataset, share(setup.dataset, job.backend, worker, workers), job.seed
        )
        await backend.open(job.concurrency)
        items = itertools.cycle(backend.prepare(job.op, planner.plan(job.op, setup.batch_size)))
        call = backend.call(job.op)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await backend.close()
        pipe.send(_failure(exc))
        return
    try:
        pipe.send("ready")
        go: float = await asyncio.to_thread(pipe.recv)
        await asyncio.sleep(max(0.0, go - time.monotonic()))
        window = Window(go + job.warmup, go + job.warmup + job.duration)
        recorder = _Recorder(backend.counts_rows_in_window(job.op), window)
        cpu_before = sum(os.times()[:2])
        if job.rate is None:
            await asyncio.gather(
                *(_closed_loop(call, slot, items, recorder) for slot in range(job.concurrency))
            )
        else:
            await _open_loop(call, job, items, recorder, go)
        recorder.result.cpu_seconds = sum(os.times()[:2]) - cpu_before
        result = recorder.result
    except Exception as exc:
        result = _failure(exc)
    pipe.send(result)
    # Connections stay open until the parent has read the CPU time of their server
    # processes: a PostgreSQL backend that exits takes its CPU time with it.
    await asyncio.to_thread(pipe.recv)
    with contextlib.suppress(Exception):
        await backend.close()


def worker_main(pipe: Connection, setup: Setup, worker: int, workers: int) -> None:
    """Entry point of a load generator process: runs jobs until told to stop."""
    while (job := pipe.recv()) is not None:
        asyncio.run(_run(pipe, setup, job, worker, workers))


class LoadGenerators:
    """The load generator processes of a run."""

    def __init__(self, setup: Setup, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=worker_main, args=(child, setup, index, count), daemon=True,
                name=f"bench-load-{index}",
            )  # fmt: skip
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        """Process ids of the load generators."""
        return [p.pid for p in self.processes if p.pid is not None]

    def split(self, total: int) -> list[int]:
        """``total`` concurrent clients spread over the processes."""
        count = len(self.pipes)
        return [total // count + (i < total % count) for i in range(count)]

    def dispatch(self, jobs: list[Job | None]) -> tuple[list[Connection], list[WorkerResult]]:
        """Sends each process its job (None: sits this phase out) and waits until each is
        ready; returns the ready ones and the results of those that failed to prepare."""
        sent = []
        for pipe, job in zip(self.pipes, jobs, strict=True):
            if job is not None:
                pipe.send(job)
                sent.append(pipe)
        ready, failed = [], []
        for pipe in sent:
            message = self._receive(pipe, STARTUP_TIMEOUT)
            if message == "ready":
                ready.append(pipe)
            else:
                failed.append(message)
        return ready, failed

    @staticmethod
    def go(busy: list[Connection]) -> float:
        """Starts the ready processes together; returns the shared start instant."""
        start = time.monotonic() + START_DELAY
        for pipe in busy:
            pipe.send(start)
        return start

    def collect(self, busy: list[Connection], timeout: float) -> list[WorkerResult]:
        """Waits (at most ``timeout`` seconds each) for every busy process's result."""
        return [self._receive(pipe, timeout) for pipe in busy]

    @staticmethod
    def release(busy: list[Connection]) -> None:
        """Lets the processes close their connections (after the CPU time was read)."""
        for pipe in busy:
            pipe.send("release")

    def _receive(self, pipe: Connection, timeout: float) -> Any:
        """The next message of a process; raises if it died or stays silent too long."""
        process = self.processes[self.pipes.index(pipe)]
        deadline = time.monotonic() + timeout
        while not pipe.poll(0.5):
            if not process.is_alive():
                raise RuntimeError(f"{process.name} died (exit code {process.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} did not answer within {timeout:.0f}s")
        return pipe.recv()

    def close(self) -> None:
        """Stops the processes."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
