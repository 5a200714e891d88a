"""gRPC servicers: proto to plain values (with validation), store call, values to proto."""

from __future__ import annotations

from lesson_progress.servicers.analytics import AnalyticsServicer
from lesson_progress.servicers.catalog import CatalogServicer
from lesson_progress.servicers.progress import ProgressServicer

__all__ = ["AnalyticsServicer", "CatalogServicer", "ProgressServicer"]
