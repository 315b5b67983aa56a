"""Spans and trace context (DESIGN.md "Contracts": one trace per SMTP session and per IMAP/POP
command, carried through gRPC metadata to policy and auth and through NATS headers to the
store, the indexer and the relay).

Tracing is on only in a process where :func:`rempart.common.telemetry.setup_tracing` found an
exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``, or ``OTEL_TRACES_EXPORTER=console``). Off, the
default and the benchmarks' case, every helper here returns at once without touching
OpenTelemetry (one ``is None`` test), and channels and servers get no interceptors: grpc.aio's
intercepted calls cost an extra task each.

What a span never holds: passwords, SASL responses, tokens, message content, the arguments of
LOGIN/AUTHENTICATE/USER/PASS/AUTH. Spans name commands and stages, reply codes and results,
sizes, and the client's address (``client.address``, as in the OpenTelemetry semantic
conventions).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeAlias

import grpc
from nats.aio.msg import Msg
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

Attributes: TypeAlias = Mapping[str, AttributeValue]

# None: tracing is off in this process (no exporter configured).
_tracer: trace.Tracer | None = None
_NO_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)
# The parent of a span that starts a trace of its own (an IMAP command, an SMTP session).
NEW_TRACE = Context()
# Calls made by readiness probes and the channels' own health checking: not worth a span.
_UNTRACED_METHODS = ("/grpc.health.v1.",)


def enable(provider: trace.TracerProvider) -> None:
    """Make spans from now on with ``provider`` (setup_tracing; tests with an in-memory one).
    Channels and servers built from now on carry the tracing interceptors."""
    global _tracer
    _tracer = provider.get_tracer("rempart")


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes | None = None,
         parent: Context | None = None) -> AbstractContextManager[Span]:
    """A span, current inside the ``with``; its parent is ``parent``, else the current span."""
    tracer = _tracer
    if tracer is None:
        return _NO_SPAN
    return _current_span(tracer, name, kind, attributes, parent)


@contextmanager
def _current_span(tracer: trace.Tracer, name: str, kind: SpanKind, attributes: Attributes | None,
                  parent: Context | None) -> Iterator[Span]:
    # An exception's text may quote what the client sent: a failed span keeps only its type.
    with tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes,
                                      record_exception=False, set_status_on_exception=False) as one:
        try:
            yield one
        except Exception as exc:
            one.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def start_span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes | None = None,
               parent: Context | None = None) -> Span:
    """A span that is not made current; the caller ends it (a session's span)."""
    tracer = _tracer
    if tracer is None:
        return trace.INVALID_SPAN
    return tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def context_with(parent: Span) -> Context:
    """The context whose current span is ``parent``: give it as ``parent=`` to child spans."""
    return trace.set_span_in_context(parent)


def annotate(attributes: Attributes) -> None:
    """Add attributes to the current span (a decision's outcome), when tracing."""
    if _tracer is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(attributes)


# --- NATS --------------------------------------------------------------------------------------
def with_trace_context(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` for a NATS publish, plus the current span's W3C ``traceparent`` (and
    ``tracestate``) when tracing: a consumer continues the trace from them."""
    if _tracer is not None:
        propagate.inject(headers)
    return headers


def context_from(headers: Mapping[str, str] | None) -> Context | None:
    """The trace a message's headers continue, or None (no trace context in them)."""
    if not headers or "traceparent" not in headers:
        return None
    return propagate.extract(headers)


def store_write(stream: str, subject: str = "", *, message_id: str = "", size: int = 0,
                count: int = 1) -> AbstractContextManager[Span]:
    """A write to JetStream acknowledged before anything is promised (a delivery record, a
    mailbox change log record): a PRODUCER span named after the subject (or the stream when
    the subject names an account); none for an empty write."""
    if _tracer is None or not count:
        return _NO_SPAN
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": subject or stream,
        "rempart.stream": stream,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if size:
        attributes["messaging.message.body.size"] = size
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    return span(f"publish {subject or stream}", kind=SpanKind.PRODUCER, attributes=attributes)


def blob_write(bucket: str, size: int) -> AbstractContextManager[Span]:
    """A message too large for its record, stored in the object store first."""
    if _tracer is None:
        return _NO_SPAN
    return span(f"put {bucket}", kind=SpanKind.CLIENT, attributes={
        "messaging.system": "nats", "rempart.bucket": bucket, "messaging.message.body.size": size})


@contextmanager
def consuming(messages: Sequence[Msg], what: str, consumer: str) -> Iterator[None]:
    """Processing a batch of JetStream messages: one CONSUMER span per message, continuing the
    trace its headers carry (the edge's DATA and store write), for as long as the batch takes;
    the first one is current meanwhile, so that what the batch writes joins its trace."""
    tracer = _tracer
    if tracer is None or not messages:
        yield
        return
    spans = [
        tracer.start_span(
            f"process {msg.subject}", context=context_from(msg.headers), kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "nats", "messaging.operation.type": "process",
                        "messaging.destination.name": msg.subject, "messaging.consumer.group.name": consumer,
                        "messaging.batch.message_count": len(messages), "rempart.step": what},
        )
        for msg in messages
    ]
    try:
        with trace.use_span(spans[0], end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield
    except Exception as exc:
        for one in spans:
            one.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        for one in spans:
            one.end()


# --- gRPC --------------------------------------------------------------------------------------
def _rpc_name(method: str | bytes) -> tuple[str, dict[str, AttributeValue]]:
    text = method.decode() if isinstance(method, bytes) else method
    service, _, name = text.lstrip("/").partition("/")
    return f"{service}/{name}", {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _as_status(code: object) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    return _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN) if isinstance(code, int) else grpc.StatusCode.UNKNOWN


def _end_rpc(one: Span, code: object, server: bool) -> None:
    status = _as_status(code)
    one.set_attribute("rpc.grpc.status_code", int(status.value[0]))
    # Semantic conventions: a client span fails on any status but OK; a server span only on
    # the codes that mean the server failed (answering NOT_FOUND is not a server error).
    if (status != grpc.StatusCode.OK) if not server else (status in _SERVER_ERRORS):
        one.set_status(Status(StatusCode.ERROR, status.name))
    one.end()


_SERVER_ERRORS = {
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
}


class _ClientTracing:
    """A CLIENT span per call, and its context in the call's metadata (``traceparent``)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[Span, grpc.aio.ClientCallDetails]:
        name, attributes = _rpc_name(details.method)
        one = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(one))
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        for key, value in carrier.items():
            metadata.add(key, value)
        return one, details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call type it implements: one class per type.
class _UnaryClientTracing(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        if _untraced(client_call_details.method):
            return await continuation(client_call_details, request)
        one, details = self._start(client_call_details)
        code: object = grpc.StatusCode.UNKNOWN
        try:
            call = await continuation(details, request)
            code = await call.code()
            return call
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            _end_rpc(one, code, server=False)


class _StreamClientTracing(_ClientTracing, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, tracer: trace.Tracer) -> None:
        super().__init__(tracer)
        self._watching: set[asyncio.Task[None]] = set()

    async def intercept_stream_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        if _untraced(client_call_details.method):
            return await continuation(client_call_details, request_iterator)
        one, details = self._start(client_call_details)
        try:
            call = await continuation(details, request_iterator)
        except BaseException:
            _end_rpc(one, grpc.StatusCode.UNKNOWN, server=False)
            raise
        # A stream lives as long as its SMTP session: the span ends with the call.
        watcher = asyncio.ensure_future(self._end_with(one, call))
        self._watching.add(watcher)
        watcher.add_done_callback(self._watching.discard)
        return call

    @staticmethod
    async def _end_with(one: Span, call: Any) -> None:
        code: object = grpc.StatusCode.UNKNOWN
        try:
            code = await call.code()
        finally:
            _end_rpc(one, code, server=False)


def _untraced(method: str | bytes) -> bool:
    text = method.decode() if isinstance(method, bytes) else method
    return text.startswith(_UNTRACED_METHODS)


class _ServerTracing(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A SERVER span per call, continuing the caller's trace from the call's metadata."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or _untraced(method):
            return handler
        name, attributes = _rpc_name(method)
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        parent = propagate.extract({str(k): v for k, v in (metadata or ()) if isinstance(v, str)})
        tracer = self._tracer
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def traced_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                with _server_rpc(tracer, name, parent, attributes, context):
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                traced_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            streaming = handler.stream_stream

            async def traced_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                with _server_rpc(tracer, name, parent, attributes, context):
                    answers = streaming(requests, context)
                    if inspect.isasyncgen(answers):
                        async for answer in answers:
                            yield answer
                    else:
                        await answers  # a servicer that writes with context.write()

            return grpc.stream_stream_rpc_method_handler(
                traced_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


@contextmanager
def _server_rpc(tracer: trace.Tracer, name: str, parent: Context, attributes: dict[str, Any],
                context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
    """The server span of one call, unary or streaming, ended with the call's status code: the
    servicer's (OK when it set none), CANCELLED when the call or its stream was abandoned."""
    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
                                      end_on_exit=False, record_exception=False,
                                      set_status_on_exception=False) as one:
        code: object = grpc.StatusCode.UNKNOWN
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            _end_rpc(one, code, server=True)


def client_interceptors() -> list[grpc.aio.ClientInterceptor] | None:
    """For a channel built now: the tracing interceptor when tracing, else None (plain calls)."""
    if _tracer is None:
        return None
    return [_UnaryClientTracing(_tracer), _StreamClientTracing(_tracer)]


def server_interceptors() -> list[grpc.aio.ServerInterceptor] | None:
    return [_ServerTracing(_tracer)] if _tracer is not None else None
