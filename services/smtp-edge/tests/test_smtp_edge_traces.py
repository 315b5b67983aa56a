"""The SMTP edge's traces (issue 13, DESIGN "Contracts"): one trace per session, a span per
stage with its reply code, the gRPC calls and the store write inside the stage that made them,
the relay continuing the trace from the record's headers, and never a password or the message
in a span. Real Redis, NATS, gRPC and DNS (the in-test servicers of test_smtp_edge, the
loopback MX of test_relay)."""

from __future__ import annotations

import asyncio
import base64
import smtplib

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from opentelemetry.trace import SpanKind
from test_relay import MESSAGE, configure, running_relay, server_tls, sink, zone
from test_smtp_edge import PASSWORD, client_tls, running_edge

from rempart.common import tracing
from rempart.common.mailstore import MessageStore
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.polling import eventually
from rempart.common.testing.traces import attribute_text, captured_spans

pytestmark = pytest.mark.timeout(60)

SECRET_LINE = "the body line no span may carry 7f3a"


async def test_smtp_session_trace_has_a_span_per_stage_and_the_store_write_under_data(
    redis_url: str, nats_url: str, tls_files: tuple[str, str]
) -> None:
    with captured_spans() as exporter:
        async with running_edge(redis_url, nats_url, tls_files) as edge:
            def send() -> tuple[int, bytes]:
                with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as client:
                    client.starttls(context=client_tls(tls_files))
                    client.login("alice@example.org", PASSWORD)
                    client.mail("alice@example.org")
                    client.rcpt("bob@example.org")
                    return client.data(f"Subject: traced\r\n\r\n{SECRET_LINE}\r\n".encode())

            code, _ = await asyncio.to_thread(send)
            assert code == 250
            await eventually(lambda: any(s.name == "SMTP session" for s in exporter.get_finished_spans()),
                             what="the session's span, ended after DISCONNECT")
        spans = exporter.get_finished_spans()

    [session] = [s for s in spans if s.name == "SMTP session"]
    assert session.parent is None, "a session starts its own trace"
    trace_id = session.context.trace_id
    mine = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in mine}
    stages = [s for s in mine if s.parent is not None and s.parent.span_id == session.context.span_id]
    names = [s.name for s in sorted(stages, key=lambda s: s.start_time or 0)]
    # EHLO twice: smtplib says it again after STARTTLS (RFC 3207 4.2); STARTTLS and QUIT are no stage.
    assert names == ["SMTP CONNECT", "SMTP EHLO", "SMTP EHLO", "SMTP AUTH", "SMTP MAIL", "SMTP RCPT", "SMTP DATA",
                     "SMTP DISCONNECT"]
    stage = {s.name: s for s in stages}
    assert stage["SMTP CONNECT"].attributes["rempart.smtp.reply_code"] == 220
    assert stage["SMTP AUTH"].attributes["rempart.smtp.reply_code"] == 235
    assert stage["SMTP AUTH"].attributes["rempart.auth.mechanism"] == "PLAIN"
    assert stage["SMTP RCPT"].attributes["rempart.smtp.reply_code"] == 250
    data = stage["SMTP DATA"]
    assert (data.attributes["rempart.smtp.reply_code"], data.attributes["rempart.smtp.enhanced_code"]) == (250, "2.0.0")
    assert data.attributes["client.address"] == "127.0.0.1"

    # The durable write before the 250, inside DATA; its context travels in the record's headers.
    [store] = [s for s in mine if s.name == "publish rempart.mail.accepted"]
    assert store.parent is not None and store.parent.span_id == data.context.span_id
    assert store.attributes["messaging.system"] == "nats" and store.attributes["messaging.message.id"]

    # gRPC client spans under the stage that called: auth in AUTH, the policy stream in CONNECT.
    [auth_call] = [s for s in mine if s.name == "rempart.auth.v1.AuthService/Authenticate"]
    assert auth_call.parent is not None and by_id[auth_call.parent.span_id].name == "SMTP AUTH"
    assert auth_call.attributes["rpc.grpc.status_code"] == 0
    [stream] = [s for s in mine if s.name == "rempart.policy.v1.PolicyService/Session"]
    assert stream.parent is not None and by_id[stream.parent.span_id].name == "SMTP CONNECT"

    text = attribute_text(spans)
    plain = base64.b64encode(f"\0alice@example.org\0{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, plain, SECRET_LINE):
        assert secret not in text


async def test_no_span_and_no_interceptor_without_an_exporter(
    redis_url: str, nats_url: str, tls_files: tuple[str, str]
) -> None:
    """The default (and the benchmarks'): tracing off costs no span and no intercepted call."""
    async with running_edge(redis_url, nats_url, tls_files) as edge:
        assert edge.edge.policy.channel._unary_unary_interceptors == []  # grpc.aio keeps them here
        def send() -> int:
            with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as client:
                client.starttls(context=client_tls(tls_files))
                client.login("alice@example.org", PASSWORD)
                client.mail("alice@example.org")
                client.rcpt("bob@example.org")
                return client.data(b"Subject: untraced\r\n\r\nHi.\r\n")[0]

        assert await asyncio.to_thread(send) == 250


async def test_the_relay_continues_the_trace_of_the_accepted_message(
    redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS, tls_files: tuple[str, str]
) -> None:
    await configure(redis)
    store = await MessageStore.open(nats_conn.jetstream())

    def relayed() -> bool:
        return any(s.name == "process rempart.mail.accepted" and (s.attributes or {}).get("rempart.step") == "relay"
                   for s in exporter.get_finished_spans())

    with captured_spans() as exporter:
        async with LoopbackDnsServer(zone("remote.test")) as dns, sink(tls=server_tls(tls_files)) as remote:
            async with running_relay(redis_url, nats_url, dns, remote.port):
                with tracing.span("SMTP DATA", parent=tracing.NEW_TRACE) as data:
                    record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                                   remote_recipients=["bob@remote.test"])
                await eventually(lambda: bool(remote.handler.received), what="delivery")
                await eventually(relayed, what="the relay's span")
        spans = exporter.get_finished_spans()
    [published] = [s for s in spans if s.name == "publish rempart.mail.accepted"
                   and s.attributes.get("messaging.message.id") == record.transaction_id]
    [attempt] = [s for s in spans if s.name == "process rempart.mail.accepted"
                 and s.attributes.get("rempart.step") == "relay"]
    assert attempt.kind == SpanKind.CONSUMER
    assert attempt.parent is not None and attempt.parent.span_id == published.context.span_id
    assert attempt.context.trace_id == data.get_span_context().trace_id
    assert attempt.attributes["messaging.consumer.group.name"]
