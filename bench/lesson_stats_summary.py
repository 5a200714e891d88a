"""What the lesson-statistics summary costs and gives, on the harness's seeded data.

    ./dev python -m bench.lesson_stats_summary --rows 10000000

Seeds a fresh database as ``./dev bench`` does, then, for the largest course:

1. the live statement (StreamLessonStats before the summary) and a recomputation;
2. a request served from the summary (the store's read, no gRPC), many times;
3. heartbeats per second (the service's HEARTBEAT statement, raw asyncpg, 16
   connections) with no recomputation running, and with recomputations of the largest
   course back to back: the worst case. At the default policy a watched course is
   recomputed once per ``refresh_after`` seconds, so the cost there is the worst case
   times (recomputation time / refresh_after).

The figures go to standard output; docs/lesson-stats.md records them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import asyncpg

from bench import postgres, seed
from bench.keys import Heartbeat, Planner
from bench.operations import Op
from lesson_progress.store.database import Database
from lesson_progress.store.heartbeats import HEARTBEAT, heartbeat_arguments
from lesson_progress.store.lesson_stats import LESSON_STATS, LessonStatsSummaries, SummaryPolicy

WRITERS = 16


async def _timed(work: object) -> float:
    started = time.perf_counter()
    await work  # type: ignore[misc]
    return time.perf_counter() - started


async def _heartbeats(url: str, beats: list[Heartbeat], seconds: float) -> float:
    """Heartbeats per second over ``seconds`` from WRITERS connections."""
    connections = [await asyncpg.connect(url) for _ in range(WRITERS)]
    done = 0
    end = time.monotonic() + seconds

    async def writer(index: int) -> None:
        nonlocal done
        position = index
        while time.monotonic() < end:
            beat = beats[position % len(beats)]
            position += WRITERS
            await connections[index].fetchrow(HEARTBEAT, *heartbeat_arguments(beat.value(), 300))
            done += 1

    try:
        await asyncio.gather(*(writer(i) for i in range(WRITERS)))
    finally:
        for connection in connections:
            await connection.close()
    return done / seconds


async def measure(rows: int, seconds: float) -> None:
    """Seeds ``rows`` rows and prints the figures."""
    async with postgres.fresh_database() as database:
        connection = await asyncpg.connect(database.url)
        try:
            seeded = await seed.seed(connection, rows)
        finally:
            await connection.close()
        data = seeded.dataset
        course = data.course_ids[data.largest_course]
        print(f"{rows:,} rows; largest course {data.course_rows[data.largest_course]:,} rows")
        pool = await Database.connect(database.url, pool_size=4)
        summaries = LessonStatsSummaries(pool, SummaryPolicy(min_rows=1))
        try:
            async with pool.acquire() as c:
                live = [await _timed(c.fetch(LESSON_STATS, course)) for _ in range(3)]
            print(
                f"live statement: median {1000 * statistics.median(live):.0f} ms "
                f"({', '.join(f'{1000 * t:.0f}' for t in live)} ms)"
            )
            recompute = [await _timed(summaries.recompute(course)) for _ in range(3)]
            print(
                f"recomputation: median {1000 * statistics.median(recompute):.0f} ms "
                f"({', '.join(f'{1000 * t:.0f}' for t in recompute)} ms)"
            )
            served = []
            for _ in range(200):
                started = time.perf_counter()
                _, summarised = await summaries.lesson_stats(course)
                served.append(time.perf_counter() - started)
                assert summarised
            served.sort()
            print(
                f"served from the summary: p50 {1000 * served[100]:.2f} ms, "
                f"p99 {1000 * served[197]:.2f} ms"
            )
            planner = Planner(data, list(data.sample), 1)
            beats = [b for b in planner.plan(Op.RECORD_TIME, 1) if isinstance(b, Heartbeat)]
            quiet = await _heartbeats(database.url, beats, seconds)

            async def recompute_forever() -> None:
                while True:
                    await summaries.recompute(course)

            busy_task = asyncio.create_task(recompute_forever())
            try:
                busy = await _heartbeats(database.url, beats, seconds)
            finally:
                busy_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await busy_task
            quiet_again = await _heartbeats(database.url, beats, seconds)
            base = (quiet + quiet_again) / 2
            worst = 1 - busy / base
            share = statistics.median(recompute) / SummaryPolicy().refresh_after
            print(
                f"heartbeats/s: {quiet:,.0f} and {quiet_again:,.0f} without, {busy:,.0f} with "
                f"recomputations back to back ({100 * worst:.1f}% fewer); at the default "
                f"policy (one per {SummaryPolicy().refresh_after:g} s while watched): "
                f"about {100 * worst * share:.1f}% fewer"
            )
        finally:
            await pool.close()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.lesson_stats_summary")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(measure(args.rows, args.seconds))


if __name__ == "__main__":
    main()
