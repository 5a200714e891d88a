"""The floor: a bare grpc.aio server over the service's own protos, SQL and pool.

``python -m bench.floor --database-url URL --port N`` serves RecordTime, GetLessonProgress
and GetCourseProgress with nothing but what any Python gRPC server over this database
needs: the statements (imported from the service's store modules, so they cannot drift),
the service's pool (``Database.connect``, same size, same release policy) and the
service's row-to-protobuf conversion. No validation, authentication, metrics, logs,
request merging or error mapping: what Python gRPC itself allows on these cores, which is
what the service's per-call cost is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

from lesson_progress import convert, values
from lesson_progress.config import Config
from lesson_progress.store.checks import GET_LESSON_PROGRESS
from lesson_progress.store.database import Database
from lesson_progress.store.heartbeats import HEARTBEAT, heartbeat_arguments
from lesson_progress.store.progress import GET_COURSE_PROGRESS
from lessonprogress.v1 import progress_service_pb2 as pb
from lessonprogress.v1 import progress_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

# Operations the floor serves (the rest of ProgressService answers UNIMPLEMENTED).
SERVED = ("RecordTime", "GetLessonProgress", "GetCourseProgress")


class FloorServicer(progress_service_pb2_grpc.ProgressServiceServicer):
    """One statement per call, its row converted, nothing else."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def RecordTime(
        self, request: pb.RecordTimeRequest, context: Context
    ) -> pb.RecordTimeResponse:
        """The heartbeat statement (time budget included), no request id."""
        beat = values.Heartbeat(
            request.user_id, request.course_id, request.lesson_id, request.seconds
        )
        async with self.database.acquire() as connection:
            row = await connection.fetchrow(HEARTBEAT, *heartbeat_arguments(beat, 300))
        assert row is not None
        return pb.RecordTimeResponse(
            lesson=convert.lesson_progress(row), credited_seconds=row["credited_seconds"]
        )

    async def GetLessonProgress(
        self,
        request: pb.GetLessonProgressRequest,
        context: Context,
    ) -> pb.GetLessonProgressResponse:
        """One lesson row."""
        async with self.database.acquire() as connection:
            row = await connection.fetchrow(
                GET_LESSON_PROGRESS, request.user_id, request.course_id, request.lesson_id
            )
        return pb.GetLessonProgressResponse(lesson=convert.lesson_progress(row))

    async def GetCourseProgress(
        self,
        request: pb.GetCourseProgressRequest,
        context: Context,
    ) -> pb.GetCourseProgressResponse:
        """The learner's course aggregate."""
        async with self.database.acquire() as connection:
            row = await connection.fetchrow(GET_COURSE_PROGRESS, request.user_id, request.course_id)
        return pb.GetCourseProgressResponse(
            course=convert.course_progress(request.user_id, request.course_id, row)
        )


async def serve(database_url: str, port: int) -> None:
    """Serves on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    database = await Database.connect(database_url, pool_size=Config().pool_size)
    server = grpc.aio.server()
    progress_service_pb2_grpc.add_ProgressServiceServicer_to_server(FloorServicer(database), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    await database.close()


def main() -> None:
    """Entry point of ``python -m bench.floor``."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.database_url, args.port))


if __name__ == "__main__":
    main()
