"""A Citus cluster (distributed PostgreSQL) for the tests: ``./dev test-citus``.

``TEST_CITUS_URL`` names a running coordinator if set. Otherwise a 1-coordinator + 2-worker
cluster is started from the installed PostgreSQL and Citus (``bench/citus.py``, which the
benchmark shares), with fsync off, and stopped and removed after the session. Without Citus
the session fails with a message saying how to install it; it never skips.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from bench.citus import WORKERS, CitusNotAvailable, local_cluster

__all__ = ["WORKERS", "CitusNotAvailable", "citus_server"]


@contextlib.contextmanager
def citus_server() -> Iterator[tuple[str, str]]:
    """Yields (coordinator URL, where it came from) for the whole test session."""
    if url := os.environ.get("TEST_CITUS_URL"):
        yield url, "TEST_CITUS_URL (Citus)"
        return
    with local_cluster() as cluster:
        yield cluster.coordinator_url, f"a local Citus cluster (1 coordinator + {WORKERS} workers)"
