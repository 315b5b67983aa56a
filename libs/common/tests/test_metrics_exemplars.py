"""Exemplars (issue 13, R-OPS-4): a latency observed inside a span carries its trace id, shown to a
scraper that asks for OpenMetrics on the real ops server; the text format and untraced
observations carry none. (tests/e2e/test_prometheus_e2e.py: a real Prometheus stores the edge's
and imap-pop's exemplars.)"""

from __future__ import annotations

import asyncio
import re

import pytest

from rempart.common import metrics, tracing
from rempart.common.ops import OpsServer
from rempart.common.testing.traces import captured_spans

pytestmark = pytest.mark.timeout(30)

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


async def scrape(port: int, accept: str | None) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = f"Accept: {accept}\r\n" if accept else ""
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200 "), head
    ctype = next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("content-type:"))
    return ctype, body


def exemplars(body: str, series: str) -> list[dict[str, str]]:
    found = []
    for line in body.splitlines():
        if line.startswith(series + "{") and " # {" in line:
            labels = line.split(" # {", 1)[1].split("}", 1)[0]
            found.append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    return found


async def test_a_traced_stage_latency_shows_its_trace_id_as_an_exemplar_in_openmetrics() -> None:
    ops = OpsServer("127.0.0.1", 0)
    await ops.start()
    try:
        with captured_spans():
            with tracing.span("SMTP XEXEMPLAR", parent=tracing.NEW_TRACE) as span:
                with metrics.timed(metrics.SMTP_STAGE_SECONDS.labels("XEXEMPLAR")):
                    await asyncio.sleep(0.002)
            trace_id = format(span.get_span_context().trace_id, "032x")
            span_id = format(span.get_span_context().span_id, "016x")
        ctype, body = await scrape(ops.port, OPENMETRICS)
        assert ctype.startswith("application/openmetrics-text"), ctype
        assert body.rstrip().endswith("# EOF")
        found = exemplars(body, "rempart_smtp_stage_seconds_bucket")
        assert {"trace_id": trace_id, "span_id": span_id} in found, body[:2000]

        # The classic text format (no Accept) has no exemplars: old scrapers parse it as before.
        ctype, text = await scrape(ops.port, None)
        assert ctype.startswith("text/plain; version=0.0.4"), ctype
        assert 'rempart_smtp_stage_seconds_count{stage="XEXEMPLAR"} 1.0' in text
        assert " # {" not in text
    finally:
        await ops.stop()


async def test_an_untraced_command_latency_is_counted_without_an_exemplar() -> None:
    ops = OpsServer("127.0.0.1", 0)
    await ops.start()
    try:
        assert not tracing.enabled()
        with metrics.timed(metrics.IMAP_COMMAND_SECONDS.labels("XNOTRACE")):
            pass
        _, body = await scrape(ops.port, OPENMETRICS)
        assert 'rempart_imap_command_seconds_count{command="XNOTRACE"} 1' in body, body[:2000]
        assert not [line for line in body.splitlines() if 'command="XNOTRACE"' in line and " # {" in line]
    finally:
        await ops.stop()


def test_exemplar_is_none_outside_a_span_and_ids_inside_one() -> None:
    assert metrics.exemplar() is None
    with captured_spans(), tracing.span("x", parent=tracing.NEW_TRACE) as span:
        assert metrics.exemplar() == {"trace_id": format(span.get_span_context().trace_id, "032x"),
                                      "span_id": format(span.get_span_context().span_id, "016x")}
