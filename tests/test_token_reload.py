"""Rotating a token under a running server: the tokens file is re-read on change and on
SIGHUP, and no call fails during the swap."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import grpc

from lesson_progress.auth import hash_token
from lessonprogress.v1 import catalog_service_pb2, catalog_service_pb2_grpc
from tests.test_operations import SERVING, START_TIMEOUT, Serve

SCOPES = "progress:read"


def line(name: str, token: str) -> str:
    return f"{name} {hash_token(token)} {SCOPES}\n"


def replace_file(path: Path, text: str) -> None:
    """Writes a new file beside ``path`` and renames it over it (as a Secret volume does)."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


async def call(channel: grpc.aio.Channel, token: str) -> grpc.StatusCode:
    """GetCourse of an unknown course: NOT_FOUND once the token is accepted."""
    stub = catalog_service_pb2_grpc.CatalogServiceStub(channel)
    try:
        await stub.GetCourse(
            catalog_service_pb2.GetCourseRequest(course_id=str(uuid.uuid4())),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def until(channel: grpc.aio.Channel, token: str, code: grpc.StatusCode) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while (got := await call(channel, token)) != code:
        assert loop.time() < deadline, f"{token}: still {got}, never {code}"
        await asyncio.sleep(0.05)


class Hammer:
    """Calls with one token back to back until stopped; counts what came back."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.codes: list[grpc.StatusCode] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(channel, token))

    async def _run(self, channel: grpc.aio.Channel, token: str) -> None:
        while not self._stop.is_set():
            self.codes.append(await call(channel, token))

    async def stop(self) -> list[grpc.StatusCode]:
        self._stop.set()
        await self._task
        return self.codes


async def test_rotating_a_token_without_a_restart(tmp_path: Path, database_url: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(line("old", "token-old"))
    with Serve(tmp_path, database_url, "--auth-tokens-file", str(tokens), metrics=False) as served:
        await served.wait_health(SERVING)
        async with served.channel() as channel:
            assert await call(channel, "token-old") == grpc.StatusCode.NOT_FOUND
            assert await call(channel, "token-new") == grpc.StatusCode.UNAUTHENTICATED

            # Step 1: add the new token; calls with the old one go on meanwhile.
            hammer = Hammer(channel, "token-old")
            await asyncio.sleep(0.2)
            replace_file(tokens, line("old", "token-old") + line("new", "token-new"))
            await until(channel, "token-new", grpc.StatusCode.NOT_FOUND)
            codes = await hammer.stop()
            assert len(codes) > 1
            assert set(codes) == {grpc.StatusCode.NOT_FOUND}, codes

            # Step 2: retire the old token; calls with the new one go on meanwhile.
            hammer = Hammer(channel, "token-new")
            await asyncio.sleep(0.2)
            replace_file(tokens, line("new", "token-new"))
            await until(channel, "token-old", grpc.StatusCode.UNAUTHENTICATED)
            codes = await hammer.stop()
            assert set(codes) == {grpc.StatusCode.NOT_FOUND}, codes

            # A broken file is refused: the tokens in force stay.
            replace_file(tokens, "not a tokens file\n")
            await asyncio.sleep(2.5)
            assert await call(channel, "token-new") == grpc.StatusCode.NOT_FOUND
            await until_logged(served, "tokens file not reloaded")

            # SIGHUP re-reads at once, even a change the file's signature does not show: the
            # same inode, size and modification time.
            replace_file(tokens, line("new", "token-new"))
            await asyncio.sleep(2.5)
            before = tokens.stat()
            with tokens.open("r+") as rewritten:
                rewritten.write(line("new", "token-hup"))
            os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))
            await asyncio.sleep(2.5)
            assert await call(channel, "token-hup") == grpc.StatusCode.UNAUTHENTICATED
            served.send(signal.SIGHUP)
            await until(channel, "token-hup", grpc.StatusCode.NOT_FOUND)
            assert await call(channel, "token-new") == grpc.StatusCode.UNAUTHENTICATED
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()


async def until_logged(served: Serve, text: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while text not in served.log():
        assert loop.time() < deadline, served.log_tail()
        await asyncio.sleep(0.1)
