"""Helpers shared by the test modules: ports, environments, request keys, server processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# How a test module run as a child process (``run_in_child``) learns the database URL.
CHILD_DATABASE_URL = "LESSON_PROGRESS_TEST_CHILD_DATABASE_URL"


async def run_in_child(module: str, database_url: str, *args: object, hang_guard: float) -> None:
    """Runs ``python -m module *args`` (a test module's ``__main__`` part) and asserts it
    exits with 0: a server crash there fails the test instead of ending the session."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "faulthandler", "-m", module, *(str(a) for a in args),
        cwd=PROJECT_ROOT,
        env={**os.environ, CHILD_DATABASE_URL: database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(child.communicate(), hang_guard)
    crashed = f" (killed by signal {-child.returncode})" if (child.returncode or 0) < 0 else ""
    assert child.returncode == 0, (
        f"server process exited with {child.returncode}{crashed}\n"
        f"{out.decode(errors='replace')[-3000:]}\n{err.decode(errors='replace')[-6000:]}"
    )


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Flags for a server whose tests add up more time than passes: the time budget has its own
#: tests (test_time_budget.py) with the default allowance.
GENEROUS_TIME_BUDGET = ("--time-allowance", "30d")


def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any service setting, plus ``overrides``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith("LESSON_PROGRESS_")
    }
    env.update(overrides)
    return env


def key(user_id: str, course_id: str, lesson_id: str) -> dict[str, str]:
    """The (user_id, course_id, lesson_id) fields of a progress request."""
    return {"user_id": user_id, "course_id": course_id, "lesson_id": lesson_id}


def micros(timestamp: Any) -> int:
    """A protobuf Timestamp in microseconds since the epoch."""
    return int(timestamp.ToMicroseconds())


class ServerProcess:
    """One ``python -m lesson_progress serve *flags`` child process, logging to a file;
    ``address`` is where it will listen."""

    def __init__(
        self,
        flags: list[str],
        log_path: Path,
        address: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.log_path = log_path
        self.address = address
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lesson_progress", "serve", *flags],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def wait_ready(self) -> None:
        """Waits until the server accepts gRPC connections (or fails if it exits)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        async with grpc.aio.insecure_channel(self.address) as channel:
            while True:
                code = self.process.poll()
                assert code is None, f"serve exited with {code}:\n{self.log_tail()}"
                try:
                    await asyncio.wait_for(channel.channel_ready(), timeout=1)
                    return
                except TimeoutError:
                    assert loop.time() < deadline, f"serve not ready:\n{self.log_tail()}"

    async def terminate(self) -> int | None:
        """Sends SIGTERM and waits for the exit code (None if it did not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, self.stop_timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Makes sure the process is gone and its log file closed."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=self.stop_timeout)
        self._log.close()


def lost_response() -> grpc.aio.AioRpcError:
    """The UNAVAILABLE a client sees when a committed call's response is lost (injected by
    a test's interceptor after the server answered)."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="response lost (injected by the test)",
    )
