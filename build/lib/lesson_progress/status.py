"""Turns domain errors into gRPC statuses: the one place where status codes are chosen.

Every status carries a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer
with one ``google.rpc.ErrorInfo``; INVALID_ARGUMENT also carries a ``google.rpc.BadRequest``
naming every bad field.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lesson_progress import errors
from lesson_progress.errors import DOMAIN

_CODES: dict[type[errors.ServiceError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.OutOfRange: code_pb2.OUT_OF_RANGE,
    errors.Aborted: code_pb2.ABORTED,
    errors.Unavailable: code_pb2.UNAVAILABLE,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
    errors.ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rich_status(error: errors.ServiceError) -> status_pb2.Status:
    """The google.rpc.Status a domain error is reported as."""
    code = _CODES.get(type(error), code_pb2.INTERNAL)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))]
    if isinstance(error, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    return status_pb2.Status(code=code, message=error.message, details=details)


def internal_status() -> status_pb2.Status:
    """The status of an unexpected failure: a bug, never caused by the request alone."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="internal error",
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
    )


async def abort(context: grpc.aio.ServicerContext[object, object], rich: status_pb2.Status) -> None:
    """Ends the RPC with the given status (raises, as ``context.abort`` does)."""
    status = rpc_status.to_status(rich)
    await context.abort(status.code, status.details, status.trailing_metadata)
