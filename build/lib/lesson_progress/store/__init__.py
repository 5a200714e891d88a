"""The data layer: plain SQL over an asyncpg pool. Knows nothing of protobuf or gRPC."""

from __future__ import annotations

from lesson_progress.store.catalog import CatalogStore
from lesson_progress.store.database import Database
from lesson_progress.store.progress import ProgressStore

__all__ = ["CatalogStore", "Database", "ProgressStore"]
