"""1 worker against 2, interleaved: ``python -m bench.workers_ab [--rounds N] [--seconds S]``.

A noisy shared machine makes two full ``./dev bench`` runs minutes apart incomparable, so
this alternates short phases instead: for each round and each worker count, the service
is started (``serve --workers N``, the harness's ServiceProcess) on one fresh migrated
database, and ``--clients`` processes of 8 clients each (every client on a connection of
its own) call RecordTime, then GetLessonProgress, closed loop, for ``--seconds`` each.
Reported per phase: calls/s and server CPU-ms per call (supervisor plus workers), and
the ratios of 2 workers over 1 of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from bench import postgres
from bench.service import ServiceProcess
from lessonprogress.v1 import catalog_service_pb2 as cpb
from lessonprogress.v1 import catalog_service_pb2_grpc, progress_service_pb2_grpc, resources_pb2
from lessonprogress.v1 import progress_service_pb2 as pb

CLIENTS_PER_PROCESS = 8
LESSONS = 20


async def _drive(address: str, op: str, course_id: str, seconds: float, process: int) -> int:
    """Closed loop on CLIENTS_PER_PROCESS connections; the calls completed in the window."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(address, options=options) for _ in range(CLIENTS_PER_PROCESS)
    ]
    for channel in channels:
        await channel.channel_ready()
    done = 0
    end = time.monotonic() + seconds

    async def client(index: int, channel: grpc.aio.Channel) -> None:
        nonlocal done
        stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
        # The same learners in both phases: RecordTime creates the rows that
        # GetLessonProgress then reads.
        user = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{course_id}/{process}/{index}"))
        lesson = 0
        while time.monotonic() < end:
            lesson = (lesson + 1) % LESSONS
            key = {"user_id": user, "course_id": course_id, "lesson_id": f"l{lesson}"}
            if op == "RecordTime":
                await stub.RecordTime(pb.RecordTimeRequest(**key, seconds=5), timeout=30)
            else:
                await stub.GetLessonProgress(pb.GetLessonProgressRequest(**key), timeout=30)
            done += 1

    await asyncio.gather(*(client(i, c) for i, c in enumerate(channels)))
    for channel in channels:
        await channel.close()
    return done


def _client_process(address: str, op: str, course_id: str, seconds: float, process: int) -> int:
    return asyncio.run(_drive(address, op, course_id, seconds, process))


async def _course(address: str) -> str:
    course_id = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(address) as channel:
        await catalog_service_pb2_grpc.CatalogServiceStub(channel).UpsertCourse(
            cpb.UpsertCourseRequest(
                course_id=course_id,
                title="ab",
                lessons=[resources_pb2.Lesson(lesson_id=f"l{i}") for i in range(LESSONS)],
            ),
            timeout=30,
        )
    return course_id


def _phase(
    service: ServiceProcess, op: str, course_id: str, seconds: float, clients: int
) -> tuple[float, float]:
    """(calls/s, server CPU-ms per call) of one closed-loop phase."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(clients) as pool:
        pool.apply(_client_process, (service.address, op, course_id, 0.5, 0))  # warm-up
        cpu = service.cpu_seconds()
        calls = sum(
            pool.starmap(
                _client_process,
                [(service.address, op, course_id, seconds, p) for p in range(clients)],
            )
        )
        cpu = service.cpu_seconds() - cpu
    return calls / seconds, 1000 * cpu / max(1, calls)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers_ab")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes (8 each)")
    args = parser.parse_args()
    figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
    async with postgres.fresh_database() as database:
        workdir = Path(tempfile.mkdtemp(prefix="workers-ab-"))
        for round_ in range(args.rounds):
            for workers in (1, 2):
                service = ServiceProcess(
                    database.url, workdir / f"service-{round_}-{workers}.log", workers=workers
                )
                try:
                    course_id = await _course(service.address)
                    for op in ("RecordTime", "GetLessonProgress"):
                        rate, cpu = await asyncio.to_thread(
                            _phase, service, op, course_id, args.seconds, args.clients
                        )
                        figures.setdefault((op, workers), []).append((rate, cpu))
                        print(f"round {round_} workers {workers} {op}: {rate:,.0f}/s, "
                              f"{cpu:.3f} CPU-ms/call", flush=True)  # fmt: skip
                finally:
                    service.stop()
    print("\n| operation | 1 worker /s | 2 workers /s | 2 ÷ 1 (per round) | CPU-ms/call 1 | "
          "CPU-ms/call 2 | 2 ÷ 1 |\n|---|---:|---:|---|---:|---:|---:|")  # fmt: skip
    for op in ("RecordTime", "GetLessonProgress"):
        one, two = figures[(op, 1)], figures[(op, 2)]
        ratios = ", ".join(f"{b[0] / a[0]:.2f}" for a, b in zip(one, two, strict=True))
        cpu1 = statistics.median(c for _, c in one)
        cpu2 = statistics.median(c for _, c in two)
        print(f"| {op} | {statistics.median(r for r, _ in one):,.0f} | "
              f"{statistics.median(r for r, _ in two):,.0f} | {ratios} | {cpu1:.3f} | "
              f"{cpu2:.3f} | {cpu2 / cpu1:.2f} |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
