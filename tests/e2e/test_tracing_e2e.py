"""The trace of one message through the suite as processes (issue 13, DESIGN "Contracts": "A
test asserts the call graph of one message").

The services export by OTLP/gRPC to a receiver in this test (``OTEL_EXPORTER_OTLP_ENDPOINT``,
a short ``OTEL_BSP_SCHEDULE_DELAY``); a message goes in on submission with smtplib; the spans
must make one trace: the edge's session and its stages, the policy service's stream and its
decisions, the auth service's Authenticate under AUTH, the durable write under DATA, and the
imap-pop indexer continuing from the record's NATS headers. No span holds the password or the
message.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rempart.common.testing.devstack import Stack, bootstrap_demo
from rempart.common.testing.polling import wait_until
from rempart.common.testing.traces import OtlpReceiver, ReceivedSpan, attribute_text

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, OtlpReceiver]]:
    receiver = OtlpReceiver().start()
    workdir: Path = tmp_path_factory.mktemp("traced-stack")
    stack = Stack(workdir=workdir, extra_env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    try:
        stack.start()
        yield stack, receiver
    finally:
        stack.stop()
        receiver.stop()


def test_one_message_is_one_trace_from_the_edge_to_the_index(traced_stack: tuple[Stack, OtlpReceiver]) -> None:
    stack, receiver = traced_stack
    demo = bootstrap_demo(stack)
    user, password, peer = demo["user"], demo["user_password"], demo["peer"]
    body_line = f"traced body {uuid.uuid4().hex}"
    ctx = ssl.create_default_context(cafile=stack.cert_file)
    ctx.check_hostname = False
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=20) as client:
        client.starttls(context=ctx)
        client.login(user, password)
        client.mail(user)
        assert client.rcpt(peer)[0] == 250
        code, reply = client.data(f"From: {user}\r\nTo: {peer}\r\nSubject: traced\r\n\r\n{body_line}\r\n".encode())
        assert code == 250, reply

    queue_id = reply.decode().rsplit(" ", 1)[1]

    def trace_of_message() -> list[ReceivedSpan]:
        """The trace of the store write that named ``queue_id``, once the spans that end last
        are in: the indexer's, the policy stream's (at DISCONNECT), the session's."""
        spans = receiver.spans()
        stores = [s for s in spans if s.name == "publish rempart.mail.accepted"
                  and s.attributes.get("messaging.message.id") == queue_id]
        if not stores:
            return []
        mine = [s for s in spans if s.trace_id == stores[0].trace_id]
        names = {(s.service, s.name) for s in mine}
        wanted = {("rempart-imap-pop", "process rempart.mail.accepted"), ("rempart-smtp-edge", "SMTP session"),
                  ("rempart-policy", "rempart.policy.v1.PolicyService/Session")}
        return mine if wanted <= names else []

    mine = wait_until(trace_of_message, timeout=30, what="the message's spans from every service")
    by_id = {s.span_id: s for s in mine}

    def parent(child: ReceivedSpan) -> ReceivedSpan:
        assert child.parent_id in by_id, f"{child.name} ({child.service}): parent not in the trace"
        return by_id[child.parent_id]

    def one(service: str, name: str, kind: str) -> ReceivedSpan:
        found = [s for s in mine if (s.service, s.name, s.kind) == (service, name, kind)]
        assert len(found) == 1, f"{service} {name} {kind}: {len(found)} spans; trace: {sorted((s.service, s.name) for s in mine)}"
        return found[0]

    # The edge: one root per session, a span per stage under it.
    [root] = [s for s in mine if not s.parent_id]
    assert (root.service, root.name, root.kind) == ("rempart-smtp-edge", "SMTP session", "SERVER")
    data = one("rempart-smtp-edge", "SMTP DATA", "INTERNAL")
    auth_stage = one("rempart-smtp-edge", "SMTP AUTH", "INTERNAL")
    connect = one("rempart-smtp-edge", "SMTP CONNECT", "INTERNAL")
    for stage in (connect, auth_stage, data):
        assert parent(stage) is root
    assert data.attributes["rempart.smtp.reply_code"] == 250
    assert data.attributes["client.address"] == "127.0.0.1"

    # Auth: the edge's client span under AUTH, the auth service's server span under it.
    auth_server = one("rempart-auth", "rempart.auth.v1.AuthService/Authenticate", "SERVER")
    auth_client = parent(auth_server)
    assert (auth_client.service, auth_client.kind) == ("rempart-smtp-edge", "CLIENT")
    assert parent(auth_client) is auth_stage
    assert auth_server.attributes["rempart.auth.status"] == "AUTH_STATUS_OK"

    # Policy: the session's stream (opened at CONNECT) and a decision span per stage under it.
    stream_server = one("rempart-policy", "rempart.policy.v1.PolicyService/Session", "SERVER")
    stream_client = parent(stream_server)
    assert (stream_client.service, stream_client.kind) == ("rempart-smtp-edge", "CLIENT")
    assert parent(stream_client) is connect
    decisions = {s.name: s for s in mine if s.service == "rempart-policy" and parent(s) is stream_server}
    assert {"policy STAGE_CONNECT", "policy STAGE_AUTH", "policy STAGE_RCPT"} <= set(decisions)
    assert decisions["policy STAGE_RCPT"].attributes["rempart.policy.action"] == "ACTION_ACCEPT"
    # Issue 11: a message within the bounds its recipient's verdict gave costs no DATA decision.
    assert "policy STAGE_DATA" not in decisions

    # The durable write under DATA; the indexer continues from the record's NATS headers.
    store = one("rempart-smtp-edge", "publish rempart.mail.accepted", "PRODUCER")
    assert parent(store) is data
    index = one("rempart-imap-pop", "process rempart.mail.accepted", "CONSUMER")
    assert parent(index) is store
    # What the indexer writes (the UID in the change log) is in the same trace, under it.
    assert any(s.name == "publish MBXLOG" and s.service == "rempart-imap-pop" and parent(s) is index for s in mine)

    # Every span's parent is in the trace: one tree.
    for span in mine:
        if span.parent_id:
            parent(span)

    text = attribute_text(receiver.spans())
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    for secret in (password, plain, body_line):
        assert secret not in text
