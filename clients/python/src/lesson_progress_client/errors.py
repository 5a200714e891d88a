"""What a failed call raises: :class:`ProgressError`, decoded from the rich status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2, status_pb2

#: The ``google.rpc.ErrorInfo`` domain of every error the service reports.
DOMAIN: Final = "lessonprogress.v1"

#: Status codes that the client retries: every other code is raised at once.
RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})

_STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (``google.rpc.BadRequest``): its path and what is wrong."""

    field: str
    description: str


class ProgressError(Exception):
    """A call that failed, with what the service said about it.

    ``code`` is the gRPC status code; ``reason`` the ``google.rpc.ErrorInfo`` reason
    (``LESSON_NOT_FOUND``, ``DATABASE_UNAVAILABLE``, ...; ``None`` when the failure did not
    come from the service, e.g. a connection that could not be made); ``field_violations``
    the bad fields of an ``INVALID_ARGUMENT``; ``attempts`` how many times the call was
    sent, retries included.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        attempts: int = 1,
    ) -> None:
        text = f"{code.name}: {message}"
        if reason:
            text += f" (reason {reason})"
        super().__init__(text)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.attempts = attempts

    @property
    def fields(self) -> frozenset[str]:
        """The names of the bad fields (empty unless the code is INVALID_ARGUMENT)."""
        return frozenset(violation.field for violation in self.field_violations)

    @property
    def retryable(self) -> bool:
        """Whether the client would retry this code (UNAVAILABLE or ABORTED)."""
        return self.code in RETRYABLE_CODES

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError, *, attempts: int = 1) -> ProgressError:
        """Builds the error from a failed call and its ``grpc-status-details-bin`` trailer."""
        code = error.code()
        message = error.details() or ""
        reason: str | None = None
        domain: str | None = None
        metadata: dict[str, str] = {}
        violations: list[FieldViolation] = []
        status = _rich_status(error)
        if status is not None:
            message = str(status.message) or message
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                bad_request = error_details_pb2.BadRequest()
                if detail.Unpack(info):
                    reason = str(info.reason)
                    domain = str(info.domain)
                    metadata = {str(k): str(v) for k, v in info.metadata.items()}
                elif detail.Unpack(bad_request):
                    violations.extend(
                        FieldViolation(str(v.field), str(v.description))
                        for v in bad_request.field_violations
                    )
        return cls(
            code,
            message,
            reason=reason,
            domain=domain,
            metadata=metadata,
            field_violations=violations,
            attempts=attempts,
        )


def _rich_status(error: grpc.aio.AioRpcError) -> Any:
    """The ``google.rpc.Status`` of a failed call, or None when there is none (or garbage)."""
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except protobuf_message.DecodeError:
                return None
    return None
