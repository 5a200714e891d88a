"""What every backend of a load generator provides, and the measurement window."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from bench.keys import Params
from bench.operations import Op


@dataclass(frozen=True, slots=True)
class Window:
    """The measured interval, in ``time.monotonic()`` seconds (system-wide on Linux)."""

    start: float
    end: float

    def rows_now(self) -> tuple[bool, bool]:
        """(inside the window, past its end) for a row arriving now."""
        now = time.monotonic()
        return self.start <= now < self.end, now >= self.end


Outcome = tuple[int, bool]
"""Rows handled inside the window, and whether the call ran to its end."""

Call = Callable[[int, object, Window], Awaitable[Outcome]]
"""One call: (client slot, prepared item, window) -> outcome."""


class LoadBackend(Protocol):
    """A way to run the operations: the gRPC service or asyncpg baselines."""

    async def open(self, slots: int) -> None:
        """Connects ``slots`` concurrent clients."""

    def prepare(self, op: Op, params: list[Params]) -> list[object]:
        """Turns parameters into ready-to-send items (requests), off the clock."""

    def call(self, op: Op) -> Call:
        """The coroutine function that performs ``op`` once."""

    def counts_rows_in_window(self, op: Op) -> bool:
        """Whether a call of ``op`` counts its own rows inside the window: calls that can
        outlast the window (a stream, a batch done row by row). Otherwise a call's rows
        count when it ends inside the window."""

    async def close(self) -> None:
        """Disconnects."""


def unsupported(op: Op, backend: str) -> Call:
    """A Call for an operation a backend has no counterpart for."""

    async def fail(slot: int, item: object, window: Window) -> Outcome:
        raise NotImplementedError(f"{op} has no {backend} counterpart")

    return fail
