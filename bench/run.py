"""One benchmark run: database, seed, service, load generators, every phase, in order."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

import asyncpg

from bench import machine, postgres, profiling, seed
from bench.load import LoadGenerators, Setup
from bench.operations import (
    FLOOR_OPS,
    LATENCY_TARGETS_MS,
    SERVICE_ONLY_OPS,
    SPECS,
    Backend,
    Op,
)
from bench.results import RunResult
from bench.runner import DatabaseCpu, PhaseRunner
from bench.service import ServiceProcess
from bench.settings import Settings
from bench.stages import AFTER_WRITES, QUIET

log = logging.getLogger("bench")

WRITES = (
    Op.RECORD_TIME,
    Op.RECORD_TIME_MANY,
    Op.RECORD_TIME_BATCHING,
    Op.BATCH_RECORD_TIME,
    Op.START_LESSON,
    Op.RECORD_ATTEMPT,
    Op.COMPLETE_LESSON,
)
READS = (
    Op.GET_LESSON_PROGRESS,
    Op.LIST_LESSON_PROGRESS,
    Op.GET_COURSE_PROGRESS,
    Op.STREAM_LESSON_STATS,
    Op.STREAM_LESSON_STATS_LARGEST,
    Op.STREAM_COURSE_LEARNERS,
)
ORDER = WRITES + READS
"""The order of the report's tables."""

# Open-loop arrivals at this share of the closed-loop throughput: loaded, not saturated.
OPEN_LOOP_LOAD = 0.5
PROFILED = (Op.RECORD_TIME, Op.GET_LESSON_PROGRESS, Op.STREAM_COURSE_LEARNERS)


def backends_of(op: Op) -> list[Backend]:
    """The backends ``op`` is measured on."""
    if op in SERVICE_ONLY_OPS:
        return [Backend.SERVICE]
    return (
        [Backend.SERVICE]
        + ([Backend.FLOOR] if op in FLOOR_OPS else [])
        + [Backend.RAW]
        + ([Backend.NAIVE] if SPECS[op].naive else [])
    )


async def _closed_loop(runner: PhaseRunner, result: RunResult, ops: tuple[Op, ...]) -> None:
    for op in ops:
        for backend in backends_of(op):
            phase = await runner.run(op, backend)
            result.phases.append(phase)
            log.info(
                "%-36s %-7s %10.1f %s/s  p99 %s ms  errors %d",
                op, backend, phase.throughput(SPECS[op].unit), SPECS[op].unit,
                f"{phase.latency_ms(0.99):.1f}" if phase.latencies else "-", phase.errors,
            )  # fmt: skip


async def _open_loop(runner: PhaseRunner, result: RunResult, stage: str) -> None:
    """The latency targets' operations at half the service's closed-loop throughput; those
    the floor serves too also on the floor, at the same rate (the tail a bare grpc.aio
    server has on this machine)."""
    for op in LATENCY_TARGETS_MS:
        closed = result.phase(op, Backend.SERVICE)
        if closed is None or closed.ops == 0:
            continue
        rate = max(1.0, closed.ops_per_second * OPEN_LOOP_LOAD)
        for backend in [Backend.SERVICE] + ([Backend.FLOOR] if op in FLOOR_OPS else []):
            phase = await runner.run(op, backend, rate=rate, stage=stage)
            result.phases.append(phase)
            log.info("%-36s %-7s open loop at %.0f/s, %s: p99 %s ms", op, backend, rate, stage,
                     f"{phase.latency_ms(0.99):.1f}" if phase.latencies else "-")  # fmt: skip


async def _measure(runner: PhaseRunner, result: RunResult) -> None:
    """Reads first (on the database as seeded), then writes, heartbeats first (the HOT
    share is read on a table no other write has touched), then the latency checks again."""
    await _closed_loop(runner, result, READS)
    await _open_loop(runner, result, QUIET)
    await _closed_loop(runner, result, WRITES)
    await _open_loop(runner, result, AFTER_WRITES)


async def _profile(runner: PhaseRunner, service: ServiceProcess, workdir: Path,
                   result: RunResult, seconds: float) -> None:  # fmt: skip
    if profiling.py_spy() is None:
        result.notes.append("py-spy is not installed: no profile (pip install py-spy).")
        return
    for op in PROFILED:
        output = workdir / f"profile-{op.name.lower()}.txt"
        recording = asyncio.create_task(
            profiling.record(
                service.pid,
                seconds + runner.settings.warmup,
                output,
                subprocesses=service.workers > 1,
            )
        )
        await runner.run(op, Backend.SERVICE, duration=seconds)
        path = await recording
        if path is not None:
            title = f"{op} (service, closed loop, {runner.concurrency(op)} clients)"
            result.profiles[str(op)] = profiling.summarize(title, profiling.parse(path.read_text()))


async def run(settings: Settings) -> RunResult:
    """Performs the whole run and returns what it measured."""
    load_before = machine.load_average()
    async with postgres.fresh_database(settings.engine) as database:
        log.info("database ready (%s); seeding %d rows", database.origin, settings.rows)
        connection = await asyncpg.connect(database.url)
        workdir = Path(tempfile.mkdtemp(prefix="lesson-progress-bench-run-"))
        try:
            seeded = await seed.seed(connection, settings.rows, seed_value=settings.seed)
            log.info("seeded in %.1fs", seeded.seconds)
            description = machine.describe()
            pg = await postgres.server_settings(connection)
            description["PostgreSQL"] = (
                f"{pg.pop('server_version')} ({database.origin.split(' in ')[0]}; "
                + ", ".join(f"{k}={v}" for k, v in pg.items())
                + ")"
            )
            result = RunResult(
                dataset=seeded.dataset,
                seed_seconds=seeded.seconds,
                machine=description,
                size_after_seed=await postgres.size_stats(connection),
                engine=database.engine,
            )
            if not seeded.replication_role_used:
                result.notes.append("Seeded without superuser: foreign keys checked per row.")
            service = ServiceProcess(
                database.url, workdir / "service.log", workers=settings.workers
            )
            try:
                floor = ServiceProcess(database.url, workdir / "floor.log", floor=True)
            except BaseException:
                service.stop()
                raise
            setup = Setup(
                service.address, floor.address, database.url, seeded.dataset,
                settings.batch_size, connections_per_client=settings.workers > 1,
            )  # fmt: skip
            generators = LoadGenerators(setup, settings.clients)
            try:
                runner = PhaseRunner(
                    settings, generators, service, connection,
                    DatabaseCpu(await postgres.postmasters(connection, database.url)), floor,
                )  # fmt: skip
                before = await postgres.table_stats(connection)
                await _measure(runner, result)
                await asyncio.sleep(0 if settings.quick else 1.5)
                after = await postgres.table_stats(connection)
                hits, reads = (
                    after.index_hits - before.index_hits,
                    after.index_reads - before.index_reads,
                )
                if hits + reads:
                    result.index_hit_rate = hits / (hits + reads)
                lp_hits = after.progress_index_hits - before.progress_index_hits
                lp_reads = after.progress_index_reads - before.progress_index_reads
                if lp_hits + lp_reads:
                    result.progress_index_hit_rate = lp_hits / (lp_hits + lp_reads)
                result.size_after_run = await postgres.size_stats(connection)
                if settings.profile:
                    await _profile(runner, service, workdir, result, settings.profile_seconds)
            finally:
                generators.close()
                service.stop()
                floor.stop()
            result.machine["load average before / after"] = (
                f"{load_before} → {machine.load_average()}"
            )
            return result
        finally:
            await connection.close()
            shutil.rmtree(workdir, ignore_errors=True)
