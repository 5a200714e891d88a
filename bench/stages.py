"""When the open-loop latency checks run.

They run twice: on the seeded, vacuumed database (before any write phase), and after the
write phases, whose bursts leave autovacuum and checkpoint work behind.
"""

from __future__ import annotations

QUIET = "quiet database"
AFTER_WRITES = "after the write phases"
STAGES = (QUIET, AFTER_WRITES)
