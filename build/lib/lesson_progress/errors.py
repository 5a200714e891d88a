"""The domain errors of the service.

Stores and servicers raise these; `status.py` turns them into gRPC status codes with
`google.rpc` details, in one place. Nothing below this module knows about gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The ``google.rpc.ErrorInfo`` domain of every error the service reports.
DOMAIN = "lessonprogress.v1"


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

    @classmethod
    def request_id_reused(cls, uses: list[RequestIdUse]) -> InvalidArgument:
        """Request ids that were first used for a different call (one text on every path)."""
        return cls(
            [FieldViolation(use.field, use.description) for use in uses],
            reason="REQUEST_ID_REUSED",
        )


@dataclass(frozen=True, slots=True)
class RequestIdUse:
    """Where a request id was first used, for the request field that reuses it."""

    field: str
    method: str
    course_id: str
    lesson_id: str
    within: str = ""
    """The field of the same request that used it first, if any (``requests[1]``)."""

    @property
    def description(self) -> str:
        """What is wrong with the field: the one text for a reused request id."""
        where = f" in {self.within}" if self.within else ""
        return (
            f"was already used for a different call (first used for {self.method} on lesson "
            f"{self.lesson_id!r} of course {self.course_id}{where}); use a new request id "
            "for each call"
        )


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
