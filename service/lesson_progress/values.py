"""Plain values shared by the client, the servicers and the store (no gRPC, no SQL)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Seconds spent in one lesson: a RecordTime call, or one entry of a batch.

    ``request_id`` is the entry's idempotency key. The client generates one when it is
    None; by the time the store sees a heartbeat, None means the caller sent none.
    ``occurred_at`` is when the time was spent (its end), for clients that sync later;
    None means now. The time budget credits the heartbeat against that time.
    """

    user_id: str
    course_id: str
    lesson_id: str
    seconds: int
    request_id: str | None = None
    occurred_at: datetime | None = None
