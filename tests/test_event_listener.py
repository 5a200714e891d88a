"""The LISTEN connection behind WatchProgress comes back by itself after it drops."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import grpc

from lesson_progress import server
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc, resources_pb2
from tests.conftest import new_id, server_config

LISTEN_PIDS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()
"""


async def listen_pids(db: asyncpg.Pool) -> set[int]:
    """Backends of this database that ran LISTEN last."""
    return {r["pid"] for r in await db.fetch(LISTEN_PIDS)}


async def test_watchers_hear_writes_after_the_listen_connection_drops(
    database_url: str, db: asyncpg.Pool, make_course
) -> None:
    # Watchers re-read only once an hour here: a waiting watcher hears of a write only
    # through a notification on the (re-established) LISTEN connection.
    running = await server.start(server_config(database_url, watch_poll_seconds=3600))
    try:
        await asyncio.wait_for(running.listener.connected.wait(), 30)
        before = await listen_pids(db)
        assert before, "the server holds a LISTEN connection"
        await db.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", before)
        for _ in range(600):  # hang guard: 30 s
            if await listen_pids(db) - before:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the server did not LISTEN again")

        course = await make_course(1)
        user = new_id()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = progress_service_pb2_grpc.ProgressServiceStub(channel)

            async def bookmark(position: str) -> None:
                request = pb.SaveBookmarkRequest(
                    user_id=user, course_id=course.course_id, lesson_id="l1", position=position
                )
                await stub.SaveBookmark(request)

            watch = stub.WatchProgress(pb.WatchProgressRequest(course_id=course.course_id))
            events: asyncio.Queue[resources_pb2.ProgressEvent] = asyncio.Queue()

            async def read_all() -> None:
                async for response in watch:
                    events.put_nowait(response.event)

            reader = asyncio.create_task(read_all())
            # Until the watch is registered, writes may fall before its start: repeat one
            # until the watch delivers something.
            first = None
            for attempt in range(30):
                await bookmark(f"warm-up {attempt}")
                with contextlib.suppress(TimeoutError):
                    first = await asyncio.wait_for(events.get(), 1)
                    break
            assert first is not None, "the watch delivered nothing"
            while not events.empty():
                events.get_nowait()
            # The watch now waits for a wake-up: only a notification can deliver this.
            await bookmark("after reconnect")
            event = await asyncio.wait_for(events.get(), 30)
            while event.lesson.bookmark.startswith("warm-up"):  # late warm-ups, if any
                event = await asyncio.wait_for(events.get(), 30)
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
        assert event.kind == resources_pb2.PROGRESS_EVENT_KIND_BOOKMARKED
        assert event.user_id == user
        assert event.lesson.bookmark == "after reconnect"
    finally:
        await running.stop(grace=1)
