"""Timestamp arithmetic, exact to the microsecond: protobuf Timestamps and page positions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_timestamp(field: Timestamp, value: datetime) -> None:
    """Sets a Timestamp field in place to an aware datetime (cheaper than building one)."""
    delta = value - EPOCH
    field.seconds = delta.days * 86400 + delta.seconds
    field.nanos = delta.microseconds * 1000


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp for an aware datetime, or None."""
    if value is None:
        return None
    message = Timestamp()
    set_timestamp(message, value)
    return message


def to_micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly."""
    delta = value - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    """The inverse of ``to_micros``."""
    return EPOCH + timedelta(microseconds=micros)
