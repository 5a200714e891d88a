"""Registers servicers on a grpc.aio server with the service's error handling around them.

Handlers are built from the service descriptor instead of the generated
``add_*Servicer_to_server`` so that two things hold for every RPC:

* a domain error raised by a handler becomes its gRPC status in one place (``status.py``),
  and an unexpected exception is logged and reported as INTERNAL;
* a request that does not even parse (invalid UTF-8 in a string, a truncated message) is
  INVALID_ARGUMENT, not the INTERNAL that gRPC would report for a failed deserializer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory

from lesson_progress import errors, status

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
UnaryHandler = Callable[[Any, Context], Awaitable[Any]]
StreamHandler = Callable[[Any, Context], AsyncIterator[Any]]


class _MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _deserializer(cls: type[message.Message]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except message.DecodeError as exc:
            return _MalformedRequest(exc)

    return deserialize


def _check_parsed(request: object, method: str) -> None:
    if isinstance(request, _MalformedRequest):
        raise errors.InvalidArgument.of(
            "request",
            f"is not a valid {method} request message ({request.error})",
            reason="MALFORMED_REQUEST",
        )


async def _report(context: Context, method: str, exc: BaseException) -> None:
    if isinstance(exc, errors.ServiceError):
        await status.abort(context, status.to_rich_status(exc))
    else:
        log.exception("unexpected error in %s", method, exc_info=exc)
        await status.abort(context, status.internal_status())


def _wrap_unary(method: str, impl: UnaryHandler) -> UnaryHandler:
    async def handle(request: Any, context: Context) -> Any:
        try:
            _check_parsed(request, method)
            return await impl(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _report(context, method, exc)

    return handle


def _wrap_stream(method: str, impl: StreamHandler) -> StreamHandler:
    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            _check_parsed(request, method)
            async for response in impl(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _report(context, method, exc)

    return handle


def add_servicer(
    server: grpc.aio.Server, servicer: object, service: descriptor.ServiceDescriptor
) -> None:
    """Registers every method of ``service``, implemented by ``servicer``, on ``server``."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method.full_name, impl),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method.full_name, impl),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
