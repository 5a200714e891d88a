"""Re-reads the tokens file while the server runs, so that rotating a token needs no restart.

The file is checked every ``POLL_SECONDS`` (its inode, size and modification time; a
Kubernetes Secret volume swaps a symlink, which changes the inode) and at once on SIGHUP.
A file that reads well replaces the callers in one assignment, between calls: no call is
refused or dropped by the swap. A file that is missing or malformed is logged and ignored:
the callers read last stay in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from lesson_progress.auth import Authenticator, TokenFileError, load_callers

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0

_Signature = tuple[int, int, int]


def _signature(path: Path) -> _Signature | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


class TokenReloader:
    """Keeps ``authenticator``'s callers in step with the tokens file at ``path``."""

    def __init__(self, authenticator: Authenticator, path: Path) -> None:
        self.authenticator = authenticator
        self.path = path
        self._seen = _signature(path)

    def reload(self, reason: str) -> bool:
        """Reads the file now; returns whether the callers were replaced."""
        self._seen = _signature(self.path)
        try:
            callers = load_callers(self.path)
        except (OSError, TokenFileError) as exc:
            log.error("tokens file not reloaded (%s), the previous tokens stay: %s", reason, exc)
            return False
        self.authenticator.replace(callers)
        log.info("tokens file reloaded (%s): %d callers", reason, len(callers))
        return True

    async def watch(self) -> None:
        """Reloads whenever the file's signature changes; runs until cancelled."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if _signature(self.path) != self._seen:
                self.reload("file changed")


@contextlib.asynccontextmanager
async def reloading(authenticator: Authenticator, path: Path) -> AsyncIterator[TokenReloader]:
    """Watches the tokens file (and SIGHUP, in the main thread) until the block ends."""
    reloader = TokenReloader(authenticator, path)
    loop = asyncio.get_running_loop()
    on_sighup = threading.current_thread() is threading.main_thread()
    if on_sighup:
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
    task = asyncio.create_task(reloader.watch(), name="tokens-file-watch")
    try:
        yield reloader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if on_sighup:
            loop.remove_signal_handler(signal.SIGHUP)
