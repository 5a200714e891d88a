"""Registers servicers on a grpc.aio server with the service's error handling around them.

Handlers are built from the service descriptor instead of the generated
``add_*Servicer_to_server`` so that two things hold for every RPC:

* a domain error raised by a handler becomes its gRPC status in one place (``status.py``),
  and an unexpected exception is logged and reported as INTERNAL;
* a request that does not even parse (invalid UTF-8 in a string, a truncated message) is
  INVALID_ARGUMENT, not the INTERNAL that gRPC would report for a failed deserializer;
* the bearer token and its scope are checked first, and every RPC is counted, timed and
  logged (one JSON line) with its final status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory
from google.rpc import status_pb2

from lesson_progress import errors, status
from lesson_progress.auth import Authenticator
from lesson_progress.observability import MethodMetrics, Metrics, log_rpc
from lesson_progress.shutdown import Shutdown
from lesson_progress.store.database import call_deadline

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


def _shutting_down() -> errors.Unavailable:
    return errors.Unavailable(
        "the server is shutting down; retry the call (on another replica)",
        reason="SHUTTING_DOWN",
    )


@dataclass
class RpcPolicy:
    """What every RPC goes through, besides its handler."""

    authenticator: Authenticator | None = None
    """Checks bearer tokens and scopes; None leaves the service open."""

    metrics: Metrics | None = None
    """Counts and times RPCs; None records nothing."""

    max_streams: int = 0
    """Most server streams open at once (0: no limit); more get RESOURCE_EXHAUSTED."""

    stream_idle_seconds: float = 60.0
    """A stream whose reader takes no message for this long ends with DEADLINE_EXCEEDED
    (and its transaction with it)."""

    shutdown: Shutdown = field(default_factory=Shutdown)
    """Once shutdown has begun, calls that reach a handler get UNAVAILABLE."""

    open_streams: int = field(default=0, init=False)

    last_arrival: float = field(default=0.0, init=False)
    """time.monotonic() of the latest call to reach a handler."""

    def admit(self, method: str, request: object, context: Context, *, stream: bool) -> None:
        """Lets a call through to its handler, or raises what it gets instead: the token
        and scope check, then a malformed request, then (streams) the open-stream limit.
        (At shutdown ``refuse`` comes first.)"""
        self.last_arrival = time.monotonic()
        if self.authenticator is not None:
            self.authenticator.authorize(method, context.invocation_metadata() or ())
        if isinstance(request, _MalformedRequest):
            raise errors.InvalidArgument.of(
                "request",
                f"is not a valid {method} request message ({request.error})",
                reason="MALFORMED_REQUEST",
            )
        if stream and self.max_streams and self.open_streams >= self.max_streams:
            raise errors.ResourceExhausted(
                f"the server has {self.max_streams} streams open; retry later"
            )

    running: set[asyncio.Task[Any]] = field(default_factory=set, init=False)
    """The tasks of the calls in a handler now (admitted or being refused)."""

    cut_off: set[asyncio.Task[Any]] = field(default_factory=set, init=False)
    """Calls ended by ``close`` at the end of the shutdown grace."""

    holding: bool = field(default=False, init=False)
    """Set by ``close`` until gRPC stops: new calls wait (for their UNAVAILABLE) instead
    of being refused at once."""

    async def refuse(self) -> None:
        """Refuses a call that arrived after shutdown began: UNAVAILABLE (SHUTTING_DOWN),
        at once while the server drains, once gRPC has stopped taking calls while it
        closes (see ``close``)."""
        if self.holding:
            await asyncio.Event().wait()  # until ``close`` cuts it off
        raise _shutting_down()

    async def drain(self, within: float, *, quiet: float = 0.1) -> None:
        """Once shutdown has begun: refuses new calls while the running ones finish, for
        at most ``within`` seconds or until no call has run or arrived for ``quiet``
        seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, within)
        while loop.time() < end:
            if not self.running and time.monotonic() - self.last_arrival >= quiet:
                return
            await asyncio.sleep(min(quiet / 2, max(0.0, end - loop.time())))

    async def close(
        self,
        stop: Callable[[], Coroutine[Any, Any, None]],
        *,
        quiet: float = 0.25,
        at_most: float = 0.75,
    ) -> None:
        """After ``drain``: stops gRPC (``stop``) and ends every call still in a handler
        with UNAVAILABLE (SHUTTING_DOWN), so that gRPC has no call left to cancel.

        gRPC answers CANCELLED, which callers do not retry, to the calls it has received
        but not yet handed to a handler when it stops, and to those still in a handler
        when its own grace ends. So until no call has arrived for ``quiet`` seconds (longer
        than the typed client's first back-off after a refusal, 0.1 to 0.2 s; at most
        ``at_most``) new calls wait in their handler instead of being refused at
        once (their callers, waiting, send no more); then gRPC stops taking calls, and
        only then are all of them answered, as is any call gRPC still hands over.
        """
        loop = asyncio.get_running_loop()
        self.holding = True
        end = loop.time() + at_most
        await asyncio.sleep(quiet)
        while loop.time() < end:
            if time.monotonic() - self.last_arrival >= quiet:
                break
            await asyncio.sleep(quiet / 5)
        stopping = asyncio.create_task(stop())
        await asyncio.sleep(quiet)  # gRPC no longer takes calls (GOAWAY sent)
        self.holding = False
        while True:
            for task in self.running - self.cut_off:
                self.cut_off.add(task)
                task.cancel()
            if stopping.done():
                break
            await asyncio.sleep(0.01)
        await stopping


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _status_of(method: str, exc: Exception) -> status_pb2.Status:
    """The status an exception is reported as; unexpected ones are logged as bugs."""
    if isinstance(exc, errors.ServiceError):
        return status.to_rich_status(exc)
    log.exception("unexpected error in %s", method, exc_info=exc)
    return status.internal_status()


def _request_id(request: object) -> str:
    value = getattr(request, "request_id", "")
    return value if isinstance(value, str) else ""


@contextlib.asynccontextmanager
async def _call(
    method: str,
    policy: RpcPolicy,
    metrics: MethodMetrics | None,
    request: object,
    context: Context,
    *,
    stream: bool,
) -> AsyncIterator[None]:
    """Around one call's handler: admission, then (on the way out) the status an error
    becomes, the metrics and the access-log line. Unary calls count as in flight, streams
    as open streams."""
    started = time.perf_counter()
    # Read now: grpcio 1.85 crashes (SIGSEGV) on context.peer() once a call that was
    # waiting to send has been cancelled.
    peer = context.peer()
    code = "OK"
    gauge = None
    opened = False
    task = asyncio.current_task()
    assert task is not None
    policy.running.add(task)
    try:
        remaining = context.time_remaining()
        if remaining is not None:
            # The store bounds its database work by it (statement_timeout, no late commit).
            call_deadline.set(asyncio.get_running_loop().time() + remaining)
        if policy.shutdown.started:
            policy.last_arrival = time.monotonic()
            await policy.refuse()  # UNAVAILABLE: nothing done
        policy.admit(method, request, context, stream=stream)
        if stream:
            policy.open_streams += 1
            opened = True
        if metrics is not None:
            gauge = metrics.open_streams if stream else metrics.in_flight
            gauge.inc()
        yield
    except (asyncio.CancelledError, GeneratorExit):
        if task not in policy.cut_off:
            code = "CANCELLED"
            raise
        task.uncancel()
        code = "UNAVAILABLE"
        await status.abort(context, status.to_rich_status(_shutting_down()))
    except Exception as exc:
        rich = _status_of(method, exc)
        code = _CODE_NAMES[rich.code]
        await status.abort(context, rich)
    finally:
        policy.running.discard(task)
        policy.cut_off.discard(task)
        if opened:
            policy.open_streams -= 1
        if gauge is not None:
            gauge.dec()
        if metrics is not None:
            metrics.finished(code, time.perf_counter() - started)
        log_rpc(method, code, started, peer, _request_id(request))


def _wrap_unary(method: str, impl: UnaryHandler, policy: RpcPolicy) -> UnaryHandler:
    metrics = policy.metrics.for_method(method) if policy.metrics else None

    async def handle(request: Any, context: Context) -> Any:
        async with _call(method, policy, metrics, request, context, stream=False):
            return await impl(request, context)
        raise AssertionError("unreachable: an error aborts the call")

    return handle


def _wrap_stream(
    method: str, impl: StreamHandler, policy: RpcPolicy
) -> Callable[[Any, Context], Awaitable[None]]:
    metrics = policy.metrics.for_method(method) if policy.metrics else None

    async def handle(request: Any, context: Context) -> None:
        async with _call(method, policy, metrics, request, context, stream=True):
            responses = impl(request, context)
            try:
                async for response in responses:
                    # A write waits while the reader's flow-control window is full.
                    try:
                        async with asyncio.timeout(policy.stream_idle_seconds):
                            await context.write(response)
                    except TimeoutError:
                        raise _reader_idle(policy.stream_idle_seconds) from None
                    except Exception:
                        # A write to a call the caller has just cancelled fails inside gRPC
                        # (ExecuteBatchError): that is the caller leaving, not an error.
                        if context.done():
                            raise asyncio.CancelledError from None
                        raise
            finally:
                await responses.aclose()  # type: ignore[attr-defined]

    return handle


def _reader_idle(idle_seconds: float) -> errors.DeadlineExceeded:
    """What a stream whose reader stopped reading ends with."""
    return errors.DeadlineExceeded(
        f"the reader took no message for {idle_seconds:g}s"
        " (LESSON_PROGRESS_STREAM_IDLE_TIMEOUT); the stream ended",
        reason="STREAM_READER_IDLE",
    )


def add_servicer(
    server: grpc.aio.Server,
    servicer: object,
    service: descriptor.ServiceDescriptor,
    policy: RpcPolicy,
) -> None:
    """Registers every method of ``service``, implemented by ``servicer``, on ``server``."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        path = f"/{service.full_name}/{method.name}"
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(path, impl, policy),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(path, impl, policy),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
