"""Lesson progress service: a gRPC service that tracks learners' progress through courses."""

from __future__ import annotations

__version__ = "0.1.0"
