"""Request field validation: collects every bad field of a request before failing.

Validators return the normalized value (lowercase UUIDs) so that servicers pass only
clean, plain values down to the store.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from lesson_progress.errors import FieldViolation, InvalidArgument

MAX_ID_LENGTH = 255
MAX_TITLE_LENGTH = 1000

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
# C0 controls (NUL included), DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Validator:
    """Checks the fields of one request; ``done()`` raises if any was bad.

    ``prefix`` is prepended to field names, e.g. ``requests[3].`` for batch entries.
    """

    __slots__ = ("prefix", "violations")

    def __init__(self, prefix: str = "", violations: list[FieldViolation] | None = None) -> None:
        self.prefix = prefix
        self.violations: list[FieldViolation] = [] if violations is None else violations

    def nested(self, prefix: str) -> Validator:
        """A validator for a sub-message whose violations are collected here too."""
        return Validator(self.prefix + prefix, self.violations)

    def fail(self, field: str, description: str) -> None:
        """Records a violation of ``field``."""
        self.violations.append(FieldViolation(self.prefix + field, description))

    def done(self) -> None:
        """Raises InvalidArgument naming every violation recorded so far."""
        if self.violations:
            raise InvalidArgument(self.violations)

    def uuid(self, field: str, value: str) -> str:
        """A required UUID in 8-4-4-4-12 form, any case; returned in lowercase."""
        if not value:
            self.fail(field, "is required")
        elif not _UUID.match(value):
            self.fail(field, "must be a UUID in 8-4-4-4-12 hexadecimal form")
        return value.lower()

    def optional_uuid(self, field: str, value: str) -> str | None:
        """An optional UUID (empty means unset); returned in lowercase or None."""
        if not value:
            return None
        return self.uuid(field, value)

    def identifier(self, field: str, value: str) -> str:
        """A required lesson id: 1 to 255 characters without control characters."""
        if not value:
            self.fail(field, "is required")
        elif len(value) > MAX_ID_LENGTH:
            self.fail(field, f"must be at most {MAX_ID_LENGTH} characters (got {len(value)})")
        elif _CONTROL.search(value):
            self.fail(field, "must not contain NUL or other control characters")
        return value

    def text(self, field: str, value: str, max_length: int = MAX_TITLE_LENGTH) -> str:
        """Optional free text: at most ``max_length`` characters, no control characters."""
        if len(value) > max_length:
            self.fail(field, f"must be at most {max_length} characters (got {len(value)})")
        elif _CONTROL.search(value):
            self.fail(field, "must not contain NUL or other control characters")
        return value

    def in_range(self, field: str, value: int, low: int, high: int) -> int:
        """An integer within [low, high]."""
        if not low <= value <= high:
            self.fail(field, f"must be between {low} and {high} (got {value})")
        return value

    def recent_time(
        self, field: str, value: Timestamp, *, ahead: float, behind: float
    ) -> datetime | None:
        """A valid Timestamp at most ``ahead`` seconds after now and ``behind`` seconds
        before it (now: this server's clock), as an aware datetime.

        The bounds are checked on plain numbers before any datetime is built: a
        batch validates up to a thousand of these, and this is cheaper than
        ``Timestamp.ToDatetime`` plus datetime arithmetic per entry."""
        seconds, nanos = value.seconds, value.nanos
        if not 0 <= nanos < 1_000_000_000:
            self.fail(field, "must be a valid timestamp (nanos 0..999,999,999)")
            return None
        now = time.time()
        moment = seconds + nanos / 1e9
        if moment > now + ahead:
            self.fail(field, f"must not be more than {ahead:g} s in the future")
            return None
        if moment < now - behind:
            self.fail(field, f"must not be more than {behind / 86400:g} days old")
            return None
        return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
