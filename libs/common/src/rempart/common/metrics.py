"""Latency metrics with exemplars (issue 13, R-OPS-4): a histogram observation made while a span
is current carries its trace id, so a dashboard's slow bucket links to the trace that made it.

prometheus_client keeps an exemplar per bucket and shows it only in the OpenMetrics exposition
(``Accept: application/openmetrics-text``, which Prometheus sends; the ops server negotiates it,
rempart.common.ops). Without tracing (no exporter configured) there is no current span and the
observation carries no exemplar, at no extra cost beyond the clock reads.

Label values are bounded by the callers: SMTP stage names and IMAP command names are fixed sets
(an unknown command is ``UNKNOWN``), never client text.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from opentelemetry import trace
from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

# Buckets from 1 ms (a cached FETCH, a HELO) to 30 s (a DATA of a large message on a slow link).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SMTP_STAGE_SECONDS = Histogram(
    "rempart_smtp_stage_seconds",
    "Time the SMTP edge takes for a session stage, from the command to the reply (CONNECT: to the greeting)",
    ["stage"], buckets=LATENCY_BUCKETS)
IMAP_COMMAND_SECONDS = Histogram(
    "rempart_imap_command_seconds",
    "Time imap-pop takes for an IMAP command, from the command line to its tagged reply",
    ["command"], buckets=LATENCY_BUCKETS)


@functools.cache
def child(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, looked up once: prometheus_client's ``labels`` validates and
    locks on every call, which showed in the edge's per-message profile (issue 11). Only for
    label values from a small fixed set (listener names, reply classes, stage names): every
    combination is kept for the life of the process."""
    return metric.labels(*values)


class Observer(Protocol):
    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None: ...


def exemplar() -> dict[str, str] | None:
    """The current span's trace and span ids as an exemplar's labels, when a sampled span is
    current; else None."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def observe(histogram: Observer, seconds: float) -> None:
    """One observation, with the current span's exemplar if there is one."""
    histogram.observe(seconds, exemplar())


@contextmanager
def timed(histogram: Observer) -> Iterator[None]:
    """Observe the time the ``with`` block takes (also when it raises), with the exemplar of the
    span current at its end: enter it inside the span it should point to."""
    started = time.perf_counter()
    try:
        yield
    finally:
        observe(histogram, time.perf_counter() - started)
