"""The domain errors of the service.

Stores and servicers raise these; `status.py` turns them into gRPC status codes with
`google.rpc` details, in one place. Nothing below this module knows about gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (``requests[3].seconds``) and what is wrong."""

    field: str
    description: str


class ServiceError(Exception):
    """Base class of every error the service reports to callers."""

    #: UPPER_SNAKE_CASE reason carried in google.rpc.ErrorInfo.
    reason: str = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


# --- the caller's fault ----------------------------------------------------------------


class InvalidArgument(ServiceError):
    """A request field is malformed; carries every bad field at once."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], *, reason: str | None = None) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(
            f"invalid {fields}: " + "; ".join(_describe(v) for v in violations), reason=reason
        )
        self.violations = violations

    @classmethod
    def of(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """An InvalidArgument for a single field."""
        return cls([FieldViolation(field, description)], reason=reason)


class NotFound(ServiceError):
    """The named course, lesson or progress row does not exist."""

    reason = "NOT_FOUND"

    @classmethod
    def course(cls, course_id: str) -> NotFound:
        """The course is not registered."""
        return cls(f"course {course_id} is not registered", reason="COURSE_NOT_FOUND")


class OutOfRange(ServiceError):
    """The write would push a counter past what the schema can hold."""

    reason = "OUT_OF_RANGE"


class Unauthenticated(ServiceError):
    """The call carries no bearer token, or one the service does not know."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller's token lacks the scope the method needs."""

    reason = "MISSING_SCOPE"


class ResourceExhausted(ServiceError):
    """A server limit (such as the number of open streams) is reached."""

    reason = "TOO_MANY_STREAMS"


# --- the server's and the database's state -----------------------------------


class Aborted(ServiceError):
    """The write lost a race (serialization failure, deadlock) on every retry."""

    reason = "CONCURRENCY_CONFLICT"


class Unavailable(ServiceError):
    """The database cannot be reached, or the server is shutting down."""

    reason = "DATABASE_UNAVAILABLE"


def _describe(violation: FieldViolation) -> str:
    return f"{violation.field} {violation.description}"
