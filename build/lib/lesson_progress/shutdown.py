"""The one shutdown state of a server process, read by the RPC policy, the watch streams
and health alike."""

from __future__ import annotations

import asyncio


class Shutdown:
    """Set once, when the process starts shutting down; never cleared."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    @property
    def started(self) -> bool:
        """Whether shutdown has begun."""
        return self._event.is_set()

    def begin(self) -> None:
        """Marks the start of shutdown (idempotent)."""
        self._event.set()

    async def wait(self) -> None:
        """Returns once shutdown has begun."""
        await self._event.wait()
