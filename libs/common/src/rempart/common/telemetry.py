"""Logging and tracing, configured once per process.

Logs are one JSON object per line in containers (``REMPART_LOG_FORMAT=json``), with the
session id and decision fields passed through ``extra=``. Tracing follows the standard
``OTEL_*`` variables (spans: :mod:`rempart.common.tracing`); an exporter that fails never
breaks mail flow.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from rempart.common import tracing

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# Never let these reach a log line, whatever a caller passes in ``extra``.
_SECRET_FIELDS = {"password", "secret", "token", "totp_code", "authorization"}
# What the exporter still holds at shutdown is sent within this: inside the SIGTERM budget.
TRACE_FLUSH_SECONDS = 1.0
_provider: TracerProvider | None = None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            payload[key] = "***" if key.lower() in _SECRET_FIELDS else value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {
            k: ("***" if k.lower() in _SECRET_FIELDS else v)
            for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd's "mail.log" names the TCP peer, which behind a load balancer is the balancer,
    # not the client (R-OPS-2); the edge logs its own decisions with the real client IP.
    for noisy in ("nats", "asyncio", "grpc", "uvicorn.access", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_tracing(service: str) -> bool:
    """Turn tracing on per the standard OTEL_* variables; True when it is on.

    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set: spans go
    by OTLP/gRPC in batches (``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*``: headers, timeout,
    insecure; a protocol other than ``grpc`` is refused, loudly);
    ``OTEL_TRACES_EXPORTER=console``: to stderr; ``none``, ``OTEL_SDK_DISABLED=true`` or no
    endpoint: off. Off installs no tracer provider at all (not even one without a
    processor): the spans of :mod:`rempart.common.tracing` then cost one ``is None`` test.
    An exporter runs in its own thread and drops what it cannot send; its failures never reach
    mail flow and are logged once (then once when it works again).
    """
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    exporter: SpanExporter
    if exporter_name == "console":
        exporter, where = ConsoleSpanExporter(), "stderr"
    elif exporter_name == "otlp" and (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        if protocol.strip().lower() != "grpc":
            logging.getLogger(__name__).error(
                "OTEL_EXPORTER_OTLP_PROTOCOL=%s: this build exports OTLP over gRPC only; traces are off", protocol)
            return False
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        where = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
        exporter = OTLPSpanExporter()
        # Its own messages repeat at every failed batch; _ReportedExporter says it once.
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)
    else:
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", f"rempart-{service}")})
    # Flushed by shutdown_tracing within the service's own shutdown budget, not at exit.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_ReportedExporter(exporter, where)))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)  # settable once per process: for anything else using the API
    _provider = provider
    tracing.enable(provider)
    logging.getLogger(__name__).info("tracing on", extra={"exporter": exporter_name, "endpoint": where})
    return True


def shutdown_tracing(timeout: float = TRACE_FLUSH_SECONDS) -> None:
    """Send the spans still queued, for at most ``timeout`` seconds (a SIGTERM must end the
    process within its grace period even when the collector is gone)."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    tracing.disable()
    flusher = threading.Thread(target=provider.shutdown, name="trace-flush", daemon=True)
    flusher.start()
    flusher.join(timeout)


class _ReportedExporter(SpanExporter):
    """The exporter, with its failures logged once each time it starts failing."""

    def __init__(self, inner: SpanExporter, where: str) -> None:
        self._inner = inner
        self._where = where
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        if result is SpanExportResult.FAILURE and not self._failing:
            self._failing = True
            logging.getLogger(__name__).error(
                "trace export to %s is failing: spans are dropped until it works again", self._where)
        elif result is SpanExportResult.SUCCESS and self._failing:
            self._failing = False
            logging.getLogger(__name__).warning("trace export to %s works again", self._where)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
