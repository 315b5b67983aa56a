"""Logging and tracing, configured once per process.

Logs are one JSON object per line in containers (``REMPART_LOG_FORMAT=json``), with the
session id and decision fields passed through ``extra=``. Tracing follows the standard
``OTEL_*`` variables; an exporter that fails never breaks mail flow.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# Never let these reach a log line, whatever a caller passes in ``extra``.
_SECRET_FIELDS = {"password", "secret", "token", "totp_code", "authorization"}


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


def setup_tracing(service: str) -> None:
    """A tracer provider per the OTEL_* variables: OTLP when an endpoint is set and the
    exporter package is installed, console when OTEL_TRACES_EXPORTER=console, else none."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", f"rempart-{service}")})
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name == "otlp" and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        except ImportError:
            logging.getLogger(__name__).error(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed; traces are off"
            )
    trace.set_tracer_provider(provider)
