"""Seeing the spans a test made: in this process (:func:`captured_spans`), or sent by the
services as processes to an OTLP/gRPC receiver on a free port (:class:`OtlpReceiver`), the way
a collector receives them with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at it."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rempart.common import tracing
from rempart.common.testing.localstack import free_port

# OTLP's Span.SpanKind numbers (opentelemetry-proto trace.proto).
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@contextmanager
def captured_spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process for the ``with``; every span ends up in the exporter. Build
    the channels and servers inside it: they take the interceptors when built."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a trace's root
    attributes: dict[str, Any] = field(default_factory=dict)
    status: int = 0  # OTLP's StatusCode: 0 unset, 1 ok, 2 error


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which) if which else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, sink: list[ReceivedSpan], lock: threading.Lock) -> None:
        self._sink = sink
        self._lock = lock

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for one in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=str(resource.get("service.name", "")), name=one.name, kind=KINDS.get(one.kind, "?"),
                        trace_id=one.trace_id.hex(), span_id=one.span_id.hex(), parent_id=one.parent_span_id.hex(),
                        attributes={kv.key: _value(kv.value) for kv in one.attributes}, status=one.status.code,
                    ))
        with self._lock:
            self._sink.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC trace receiver (the collector's TraceService/Export) on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self._spans, self._lock), self._server)
        if not self._server.add_insecure_port(f"127.0.0.1:{self.port}"):
            raise RuntimeError(f"cannot listen on 127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (http: plaintext gRPC)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0).wait(5)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)


def attribute_text(spans: Iterable[Any]) -> str:
    """Every name, attribute key and value of ``spans`` (received or SDK spans), as one text:
    what a secret must never be found in."""
    parts: list[str] = []
    for one in spans:
        parts.append(str(one.name))
        for key, value in (one.attributes or {}).items():
            parts += [str(key), str(value)]
        for event in getattr(one, "events", ()) or ():
            parts.append(str(event.name))
            parts += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
    return "\n".join(parts)
