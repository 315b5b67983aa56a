"""Tracing (issue 13, DESIGN "Contracts"): spans and context through real gRPC (the shared
channel and server setup) and real JetStream headers; what tracing costs when it is off; and an
exporter whose collector is gone neither blocks mail nor a shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
import timeit
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from rempart.common import telemetry, tracing
from rempart.common.events import MAIL_STREAM
from rempart.common.grpcutil import channel_check, client_channel, new_server
from rempart.common.mailbox import Mailboxes, MailboxLog, run_indexer
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc
from rempart.common.testing.localstack import free_port
from rempart.common.testing.polling import eventually
from rempart.common.testing.traces import OtlpReceiver, captured_spans

pytestmark = pytest.mark.timeout(60)


class Policy(policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]
    """Check: accepts, or answers NOT_FOUND for the recipient "missing"; Session: each stage."""

    def __init__(self) -> None:
        self.traceparents: list[str] = []

    async def Check(self, request: policy_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
                    ) -> policy_pb2.Verdict:
        self.traceparents += [v for k, v in context.invocation_metadata() or () if k == "traceparent"]
        if request.recipient == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        with tracing.span("decide"):
            return policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250)

    async def Session(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> AsyncIterator[policy_pb2.Verdict]:
        async for request in requests:
            with tracing.span(f"stage {request.stage}"):
                yield policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250)


async def _serve(servicer: Policy) -> tuple[grpc.aio.Server, int]:
    server, _ = new_server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_grpc_calls_carry_the_trace_from_client_to_server() -> None:
    servicer = Policy()
    with captured_spans() as exporter:
        server, port = await _serve(servicer)
        channel = client_channel(f"127.0.0.1:{port}")
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        try:
            with tracing.span("stage", parent=tracing.NEW_TRACE) as stage:
                await stub.Check(policy_pb2.CheckRequest(stage=policy_pb2.STAGE_RCPT), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Check(policy_pb2.CheckRequest(recipient="missing"), timeout=5)
                # The edge's way with a stream: written and read one stage at a time.
                call = stub.Session()
                for stage_number in (policy_pb2.STAGE_CONNECT, policy_pb2.STAGE_DATA):
                    await call.write(policy_pb2.CheckRequest(stage=stage_number))
                    assert (await call.read()).code == 250
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            await channel_check(channel)()  # readiness: no span
            await eventually(lambda: len(exporter.get_finished_spans()) >= 10, what="every span")
        finally:
            await channel.close()
            await server.stop(None)
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    assert all(s.context.trace_id == stage.get_span_context().trace_id for s in spans)
    assert not any("Health" in s.name for s in spans)
    assert servicer.traceparents and all(p.startswith("00-") for p in servicer.traceparents)

    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert sorted(s.name for s in clients) == sorted(s.name for s in servers) == [
        "rempart.policy.v1.PolicyService/Check", "rempart.policy.v1.PolicyService/Check",
        "rempart.policy.v1.PolicyService/Session"]
    for server_span in servers:
        assert server_span.parent is not None
        client_span = by_id[server_span.parent.span_id]
        assert client_span.kind == SpanKind.CLIENT and client_span.name == server_span.name
        assert client_span.parent is not None and client_span.parent.span_id == stage.get_span_context().span_id
        assert server_span.attributes["rpc.system"] == "grpc"
    codes = sorted((s.kind.name, s.attributes["rpc.grpc.status_code"], s.status.status_code.name)
                   for s in clients + servers if s.name.endswith("/Check"))
    # NOT_FOUND (5): a failed call for the client, a proper answer for the server.
    assert codes == [("CLIENT", 0, "UNSET"), ("CLIENT", 5, "ERROR"), ("SERVER", 0, "UNSET"), ("SERVER", 5, "UNSET")]
    [decide] = [s for s in spans if s.name == "decide"]
    assert decide.parent is not None and by_id[decide.parent.span_id].kind == SpanKind.SERVER
    [stream_server] = [s for s in servers if s.name.endswith("/Session")]
    stages = [s for s in spans if s.name.startswith("stage ")]
    assert len(stages) == 2 and all(s.parent is not None and s.parent.span_id == stream_server.context.span_id
                                    for s in stages)


async def test_the_delivery_record_carries_the_trace_to_the_indexer(redis: aioredis.Redis, nats_conn: NATS) -> None:
    js = nats_conn.jetstream()
    # Written by an edge without tracing: no trace context in its headers.
    store = await MessageStore.open(js, inline_max_bytes=16)
    _, untraced_seq = await store.accept(b"Subject: x\r\n\r\n", mail_from="", local_mailboxes=["bob@example.org"],
                                         remote_recipients=[])
    assert "traceparent" not in ((await js.get_msg(MAIL_STREAM, seq=untraced_seq)).headers or {})
    with captured_spans() as exporter:
        mailboxes = Mailboxes(store, MailboxIndex(redis), MailboxLog(js))
        with tracing.span("SMTP DATA", parent=tracing.NEW_TRACE) as data:
            record, seq = await mailboxes.store.accept(b"Subject: big enough for a blob\r\n\r\nhi\r\n",
                                                       mail_from="", local_mailboxes=["bob@example.org"],
                                                       remote_recipients=[])
        stored = await js.get_msg(MAIL_STREAM, seq=seq)
        assert stored.headers is not None and stored.headers["traceparent"].startswith("00-")
        indexer = asyncio.create_task(run_indexer(js, mailboxes, durable="trace-indexer"))
        try:
            await eventually(lambda: sum(s.name == "process rempart.mail.accepted"
                                         for s in exporter.get_finished_spans()) == 2, what="the indexer's spans")
        finally:
            indexer.cancel()
            await asyncio.gather(indexer, return_exceptions=True)
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    [blob] = [s for s in spans if s.name == "put MAILBLOBS"]
    [store] = [s for s in spans if s.name == "publish rempart.mail.accepted"
               and s.attributes["messaging.message.id"] == record.transaction_id]
    for child in (blob, store):
        assert child.parent is not None and child.parent.span_id == data.get_span_context().span_id
    processed = [s for s in spans if s.name == "process rempart.mail.accepted"]
    [continued] = [s for s in processed if s.parent is not None and s.parent.span_id == store.context.span_id]
    assert continued.kind == SpanKind.CONSUMER and continued.context.trace_id == data.get_span_context().trace_id
    # A record written outside any trace: its processing starts a trace of its own.
    [own] = [s for s in processed if s is not continued]
    assert own.parent is None
    # What the indexer writes (the UIDs, in the change log) is inside its processing span.
    logged = [s for s in spans if s.name == "publish MBXLOG"]
    assert logged and all(s.parent is not None and by_id[s.parent.span_id] in processed for s in logged)


async def test_tracing_off_makes_no_span_no_header_and_no_interceptor() -> None:
    assert not tracing.enabled()
    assert tracing.client_interceptors() is None and tracing.server_interceptors() is None
    with tracing.span("x", attributes={"a": 1}) as span:
        assert not span.is_recording()
    assert tracing.start_span("x") is trace.INVALID_SPAN
    assert tracing.with_trace_context({"Nats-Msg-Id": "1"}) == {"Nats-Msg-Id": "1"}
    with tracing.store_write("MAIL", "rempart.mail.accepted", message_id="1", size=10) as span:
        assert not span.is_recording()


def test_tracing_off_costs_well_under_five_microseconds_a_span() -> None:
    """The no-exporter path (the default and the benchmarks'): a stage span and a store span."""
    def stage() -> None:
        with tracing.span("SMTP DATA", attributes={"rempart.smtp.stage": "DATA", "client.address": "192.0.2.1"}):
            pass

    def store() -> None:
        with tracing.store_write("MAIL", "rempart.mail.accepted", message_id="x", size=100):
            tracing.with_trace_context({"Nats-Msg-Id": "x"})

    for body in (stage, store):
        best = min(timeit.repeat(body, number=20_000, repeat=5)) / 20_000
        assert best < 5e-6, f"{body.__name__}: {best * 1e6:.2f} us a span with tracing off"


async def test_an_unreachable_collector_is_logged_once_and_never_holds_up_shutdown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    caplog.set_level(logging.WARNING, logger="rempart.common.telemetry")
    assert telemetry.setup_tracing("test")
    try:
        for _ in range(3):
            with tracing.span("lost"):
                pass
            await asyncio.sleep(1.2)
        await eventually(lambda: any("trace export" in r.getMessage() for r in caplog.records), timeout=10,
                         what="the export failure in the log")
    finally:
        started = time.monotonic()
        telemetry.shutdown_tracing()
        took = time.monotonic() - started
    assert took < telemetry.TRACE_FLUSH_SECONDS + 0.5
    failures = [r for r in caplog.records if "is failing" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    assert not tracing.enabled()


async def test_spans_reach_an_otlp_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = OtlpReceiver().start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "rempart-test")
        assert telemetry.setup_tracing("test")
        with tracing.span("hello", attributes={"rempart.smtp.stage": "DATA"}):
            pass
        telemetry.shutdown_tracing()  # sends what is queued
        await eventually(lambda: any(s.name == "hello" for s in receiver.spans()), what="the span at the receiver")
        [span] = [s for s in receiver.spans() if s.name == "hello"]
        assert (span.service, span.kind, span.attributes) == ("rempart-test", "INTERNAL", {"rempart.smtp.stage": "DATA"})
    finally:
        receiver.stop()


def test_no_exporter_configured_installs_no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    assert not telemetry.setup_tracing("test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")  # not exported by this build: off, loudly
    assert not telemetry.setup_tracing("test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry.setup_tracing("test")
    assert not tracing.enabled()
