"""The SMTP edge driven by real clients (smtplib, raw sockets) against real Redis, NATS and gRPC.

The policy and auth peers here are small in-test gRPC servicers speaking the real contracts, so
that the edge's own behaviour (verdicts applied exactly, durable accept, attacks refused) is
what is under test; tests/e2e runs the same paths against the real services.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import smtplib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from rempart.common.mailbox import run_indexer
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.pb.auth.v1 import auth_pb2, auth_pb2_grpc
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc
from rempart.common.runtime import ServiceRuntime
from rempart.common.testing.polling import eventually, indexed
from rempart.smtp_edge import replies
from rempart.smtp_edge.app import SmtpEdge
from rempart.smtp_edge.settings import SmtpEdgeSettings

BLOCKED_IP = "127.0.0.9"
SLOW_GREETING_IP = "127.0.0.5"
PASSWORD = "correct horse 9!"


class FakePolicy(policy_pb2_grpc.PolicyServiceServicer):
    """Accepts mail for example.org, refuses other domains, blocks BLOCKED_IP at connect."""

    def __init__(self) -> None:
        self.stages: list[int] = []
        # Recipient -> the DATA bounds its verdict carries (issue 11); others carry none.
        self.data_bounds: dict[str, tuple[int, int]] = {}
        # (seconds, max SIZE=) an accepted MAIL verdict may be reused for (issue 11); None: never.
        self.mail_reuse: tuple[int, int] | None = None

    async def Check(self, request: policy_pb2.CheckRequest, context: object) -> policy_pb2.Verdict:
        self.stages.append(request.stage)
        ip = request.session.client_ip
        if request.stage == policy_pb2.STAGE_CONNECT and ip == SLOW_GREETING_IP:
            return policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=220, delay_ms=400)
        if request.stage == policy_pb2.STAGE_CONNECT and ip == BLOCKED_IP:
            return policy_pb2.Verdict(action=policy_pb2.ACTION_CLOSE, code=421, enhanced_code="4.0.0",
                                      text=f"Intrusion prevention active for [{ip}]")
        if request.stage == policy_pb2.STAGE_RCPT:
            if request.recipient.endswith("@example.org"):
                verdict = policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250,
                                             local_mailboxes=[request.recipient.lower()])
                if request.recipient in self.data_bounds:
                    size, hops = self.data_bounds[request.recipient]
                    verdict.data_bounds.CopyFrom(policy_pb2.DataBounds(max_size=size, max_hops=hops))
                return verdict
            return policy_pb2.Verdict(action=policy_pb2.ACTION_REJECT, code=550, enhanced_code="5.7.1",
                                      text=f"<{request.mail_from}>... we do not relay <{request.recipient}>")
        if request.stage == policy_pb2.STAGE_MAIL and self.mail_reuse is not None:
            verdict = policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250, add_headers=[
                policy_pb2.Header(name="Received-SPF", value=f"pass (asked for {request.mail_from})")])
            verdict.reuse.CopyFrom(policy_pb2.VerdictReuse(seconds=self.mail_reuse[0], max_size=self.mail_reuse[1]))
            return verdict
        return policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250)

    async def Session(self, requests: Any, context: object) -> AsyncIterator[policy_pb2.Verdict]:
        # The edge's path: one stream per SMTP session, each stage answered in order.
        async for request in requests:
            yield await self.Check(request, context)


class FakeAuth(auth_pb2_grpc.AuthServiceServicer):
    """Alice with PASSWORD; SCRAM-SHA-256 through scramp's server side."""

    def __init__(self) -> None:
        import scramp

        self._mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
        self._auth_info = self._mechanism.make_auth_info(PASSWORD, iteration_count=4096)
        self._conversations: dict[str, object] = {}

    async def ScramStart(self, request: auth_pb2.ScramStartRequest, context: object) -> auth_pb2.ScramStartResponse:
        server = self._mechanism.make_server(lambda _user: self._auth_info)
        server.set_client_first(request.client_first)
        conversation = f"c{len(self._conversations)}"
        self._conversations[conversation] = server
        return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_OK, conversation_id=conversation,
                                           server_first=server.get_server_first())

    async def ScramFinish(self, request: auth_pb2.ScramFinishRequest, context: object) -> auth_pb2.ScramFinishResponse:
        import scramp

        server = self._conversations.pop(request.conversation_id)
        try:
            server.set_client_final(request.client_final)  # type: ignore[attr-defined]
        except scramp.ScramException:
            return auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        return auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_OK, account="alice@example.org",
                                            server_final=server.get_server_final())  # type: ignore[attr-defined]

    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context: object) -> auth_pb2.AuthenticateResponse:
        if request.login == "alice@example.org" and request.password == PASSWORD:
            return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_OK, account="alice@example.org")
        return auth_pb2.AuthenticateResponse(status=auth_pb2.AUTH_STATUS_INVALID)


@dataclass
class Edge:
    edge: SmtpEdge
    runtime: ServiceRuntime
    policy: FakePolicy
    grpc_server: grpc.aio.Server

    def port(self, name: str) -> int:
        return self.edge.port(name)


@contextlib.asynccontextmanager
async def running_edge(redis_url: str, nats_url: str, tls_files: tuple[str, str], **overrides: object
                       ) -> AsyncIterator[Edge]:
    policy = FakePolicy()
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy, server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(FakeAuth(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    options: dict[str, object] = dict(
        redis_url=redis_url, nats_url=nats_url, smtp_port=0, submission_port=0, smtps_port=0, ops_port=0,
        ops_host="127.0.0.1", listen_host="127.0.0.1", policy_target=f"127.0.0.1:{grpc_port}",
        auth_target=f"127.0.0.1:{grpc_port}", tls_cert_file=tls_files[0], tls_key_file=tls_files[1],
        hostname="mx.test", log_format="text", environment="test",
    )
    options.update(overrides)
    settings = SmtpEdgeSettings(**options)  # type: ignore[arg-type]
    try:
        async with ServiceRuntime("smtp-edge", settings) as runtime:
            smtp_edge = SmtpEdge(runtime, settings)
            await smtp_edge.start()
            # What imap-pop runs beside the edge: the indexer files accepted mail in its mailboxes.
            assert smtp_edge.handler is not None
            indexer = asyncio.create_task(run_indexer(runtime.js, smtp_edge.handler.delivery.mailboxes, nc=runtime.nc))
            try:
                yield Edge(smtp_edge, runtime, policy, server)
                await smtp_edge.drain(1)
            finally:
                indexer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await indexer
    finally:
        await server.stop(0)


@pytest.fixture
async def edge(redis_url: str, nats_url: str, tls_files: tuple[str, str]) -> AsyncIterator[Edge]:
    async with running_edge(redis_url, nats_url, tls_files) as running:
        yield running


def client_tls(tls_files: tuple[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=tls_files[0])
    ctx.check_hostname = False
    return ctx


MESSAGE = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nHi Bob.\r\n"


async def mailbox_bodies(edge: Edge, mailbox: str) -> list[bytes]:
    """What ``mailbox`` holds once the indexer has filed every accepted message."""
    await indexed(edge.runtime.js)
    index = MailboxIndex(edge.runtime.redis)
    store = await MessageStore.open(edge.runtime.js)
    return [await store.read_message(m) for m in await index.messages(mailbox)]


async def test_r_tls_1_submission_starttls_auth_plain_delivers_durably(edge: Edge, tls_files: tuple[str, str]) -> None:
    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as client:
            client.ehlo("client.test")
            assert not client.has_extn("auth"), "AUTH must not be offered before TLS"
            client.starttls(context=client_tls(tls_files))
            client.ehlo("client.test")
            assert "PLAIN" in client.esmtp_features["auth"]
            client.login("alice@example.org", PASSWORD)
            client.mail("alice@example.org")
            client.rcpt("bob@example.org")
            return client.data(MESSAGE)

    code, text = await asyncio.to_thread(send)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    bodies = await mailbox_bodies(edge, "bob@example.org")
    assert len(bodies) == 1
    body = bodies[0]
    assert body.startswith(b"Return-Path: <alice@example.org>\r\nReceived: from client.test (unknown [127.0.0.1])")
    queue_id = text.rsplit(b" ", 1)[1]
    assert b"with ESMTPSA id " + queue_id + b"\r\n" in body, "the Received id is the queue id the client saw"
    assert b"(using TLSv1.3 with cipher" in body and b" +0000\r\n" in body
    assert body.endswith(MESSAGE)


async def test_issue_11_data_is_asked_only_beyond_the_tightest_recipient_bounds(edge: Edge) -> None:
    """Each accepted recipient's verdict may carry the DATA stage's bounds: within the tightest of
    the transaction's, DATA needs no policy call; beyond them, or with a recipient whose
    verdict carried none, DATA is asked as before. Bounds never outlive their transaction."""
    edge.policy.data_bounds = {"big@example.org": (100_000, 5), "small@example.org": (len(MESSAGE) + 300, 5)}

    def send(transactions: list[tuple[list[str], bytes]]) -> list[dict[str, tuple[int, bytes]]]:
        """Each transaction's refused recipients (sendmail raises if DATA is refused)."""
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=10) as client:
            return [client.sendmail("someone@remote.test", recipients, message) for recipients, message in transactions]

    hops = b"".join(b"Received: from h%d.test by mx.test; Sat, 1 Jan 2028 00:00:00 +0000\r\n" % i for i in range(6))
    asked = [  # (recipients, message, whether DATA is asked)
        (["big@example.org"], MESSAGE, False),
        (["big@example.org", "small@example.org"], MESSAGE, False),
        (["big@example.org", "small@example.org"], MESSAGE + b"x" * 400 + b"\r\n", True),  # over small's size
        (["big@example.org"], MESSAGE + b"x" * 400 + b"\r\n", False),  # the last one's bounds are gone
        (["big@example.org"], hops + MESSAGE, True),  # 6 Received headers (the edge's own is added later)
        (["big@example.org", "bob@example.org"], MESSAGE, True),  # bob's verdict has no bounds
        (["big@example.org"], MESSAGE, False),
    ]
    for recipients, message, expected in asked:
        before = edge.policy.stages.count(policy_pb2.STAGE_DATA)
        assert await asyncio.to_thread(send, [(recipients, message)]) == [{}]
        assert edge.policy.stages.count(policy_pb2.STAGE_DATA) - before == int(expected), (recipients, len(message))
    # The same, several transactions in one session.
    before = edge.policy.stages.count(policy_pb2.STAGE_DATA)
    assert await asyncio.to_thread(send, [(r, m) for r, m, _ in asked]) == [{}] * len(asked)
    assert edge.policy.stages.count(policy_pb2.STAGE_DATA) - before == sum(e for _, _, e in asked)
    assert len(await mailbox_bodies(edge, "big@example.org")) == 2 * len(asked)


async def test_issue_11_a_reusable_mail_verdict_is_given_again_only_to_the_same_sender(edge: Edge) -> None:
    """An accepted MAIL verdict with reuse is given again without a call for the same sender in
    the same session, with its headers; a different sender, a larger SIZE=, other session facts
    (a new EHLO name), changed settings, its expiry or a new session ask the policy again."""
    edge.policy.mail_reuse = (30, 10_000)

    def mail_calls() -> int:
        return edge.policy.stages.count(policy_pb2.STAGE_MAIL)

    def session(steps: list[tuple[str, str, list[str]]]) -> list[int]:
        """Each step: (EHLO name, sender, MAIL options), then one message to bob; the MAIL
        calls each step cost."""
        costs = []
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=10) as client:
            for helo, sender, options in steps:
                if client.ehlo_resp is None or helo != client.ehlo_resp.split()[0].decode():
                    client.ehlo(helo)
                before = mail_calls()
                assert client.sendmail(sender, ["bob@example.org"], MESSAGE, mail_options=options) == {}
                costs.append(mail_calls() - before)
        return costs

    a, b = "a@remote.test", "b@remote.test"
    assert await asyncio.to_thread(session, [
        ("c.test", a, []), ("c.test", a, []), ("c.test", a, ["SIZE=10000"]),  # reused
        ("c.test", b, []),  # another sender: asked, and now b's verdict is the one kept
        ("c.test", a, []),  # a again: asked
        ("c.test", a, ["SIZE=10001"]),  # over the verdict's size: asked
        ("c.test", a, []),
    ]) == [1, 0, 0, 1, 1, 1, 0]
    assert await asyncio.to_thread(session, [("c.test", a, []), ("c.test", a, [])]) == [1, 0]  # per session

    def new_ehlo() -> list[int]:
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=10) as client:
            client.ehlo("one.test")
            client.sendmail(a, ["bob@example.org"], MESSAGE)
            before = mail_calls()
            client.ehlo("two.test")  # other session facts
            client.sendmail(a, ["bob@example.org"], MESSAGE)
            return [mail_calls() - before]

    assert await asyncio.to_thread(new_ehlo) == [1]

    def around(action: Any) -> list[int]:
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=10) as client:
            client.sendmail(a, ["bob@example.org"], MESSAGE)
            action()
            before = mail_calls()
            client.sendmail(a, ["bob@example.org"], MESSAGE)
            return [mail_calls() - before]

    loop = asyncio.get_running_loop()

    def settings_change() -> None:
        asyncio.run_coroutine_threadsafe(set_server_settings(edge, {"smtp": {"error_budget": 9}}), loop).result(10)

    assert await asyncio.to_thread(around, settings_change) == [1]
    edge.policy.mail_reuse = (1, 10_000)
    assert await asyncio.to_thread(around, lambda: time.sleep(1.2)) == [1]  # expired
    # Every message, reused verdict or not, carries the verdict's header.
    bodies = await mailbox_bodies(edge, "bob@example.org")
    assert len(bodies) == 7 + 2 + 2 + 2 + 2
    assert all(b"Received-SPF: pass (asked for " in body for body in bodies)


async def test_r_tls_1_submission_refuses_mail_before_tls_and_auth(edge: Edge) -> None:
    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as client:
            client.ehlo("client.test")
            return client.mail("alice@example.org")

    code, text = await asyncio.to_thread(attempt)
    assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")


async def test_r_log_4_wrong_password_gets_535(edge: Edge, tls_files: tuple[str, str]) -> None:
    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as client:
            client.starttls(context=client_tls(tls_files))
            client.ehlo("client.test")
            try:
                client.login("alice@example.org", "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, exc.smtp_error
            return 0, b""

    assert await asyncio.to_thread(attempt) == (535, b"5.7.8 Authentication credentials invalid")


async def test_auth_login_and_plain_through_the_edge_kit(edge: Edge, tls_files: tuple[str, str]) -> None:
    """AUTH LOGIN with and without an initial response, and PLAIN with an authzid: the login
    name itself is accepted, anybody else's is a wrong password (rempart.common.sasl)."""
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def session(commands: list[str]) -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as client:
            client.starttls(context=client_tls(tls_files))
            client.ehlo("client.test")
            return [client.docmd(command) for command in commands]

    login = await asyncio.to_thread(session, ["AUTH LOGIN", b64("alice@example.org"), b64(PASSWORD)])
    assert login == [(334, b"VXNlcm5hbWU6"), (334, b"UGFzc3dvcmQ6"), (235, b"2.7.0 Authentication successful")]
    initial = await asyncio.to_thread(session, [f"AUTH LOGIN {b64('alice@example.org')}", b64(PASSWORD)])
    assert initial == [(334, b"UGFzc3dvcmQ6"), (235, b"2.7.0 Authentication successful")]
    plain = await asyncio.to_thread(session, [
        f"AUTH PLAIN {b64(chr(0).join(['bob@example.org', 'alice@example.org', PASSWORD]))}",
        f"AUTH PLAIN {b64(chr(0).join(['ALICE@example.org', 'alice@example.org', PASSWORD]))}",
    ])
    assert plain == [(535, b"5.7.8 Authentication credentials invalid"), (235, b"2.7.0 Authentication successful")]
    empty = await asyncio.to_thread(session, ["AUTH PLAIN ="])  # RFC 4954 4: "=" is an empty response
    assert empty == [(501, b"5.5.2 Bad PLAIN response")]


async def test_r_tls_1_smtps_implicit_tls(edge: Edge, tls_files: tuple[str, str]) -> None:
    def send() -> tuple[int, bytes]:
        with smtplib.SMTP_SSL("127.0.0.1", edge.port("smtps"), timeout=10, context=client_tls(tls_files)) as client:
            client.login("alice@example.org", PASSWORD)
            client.mail("alice@example.org")
            client.rcpt("bob@example.org")
            return client.data(MESSAGE)

    code, _ = await asyncio.to_thread(send)
    assert code == 250
    assert len(await mailbox_bodies(edge, "bob@example.org")) == 1


async def test_r_rel_1_mx_applies_policy_reply_exactly(edge: Edge) -> None:
    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=10) as client:
            client.ehlo("client.test")
            client.mail("someone@remote.test")
            return client.rcpt("victim@elsewhere.test")

    assert await asyncio.to_thread(attempt) == (
        550, b"5.7.1 <someone@remote.test>... we do not relay <victim@elsewhere.test>")


def raw_session(port: int, lines: list[bytes], source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.settimeout(10)
        out = b""
        for line in lines:
            # The server may have closed after a refusal: what it said before is the result.
            try:
                sock.sendall(line)
                out += sock.recv(65536)
            except (TimeoutError, ConnectionResetError, BrokenPipeError):
                break
        sock.settimeout(1)
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


async def test_r_ips_4_blocked_ip_gets_421_before_any_greeting(edge: Edge) -> None:
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [b""], BLOCKED_IP)
    assert out == b"421 4.0.0 Intrusion prevention active for [127.0.0.9]\r\n"


async def test_handler_exception_answers_421_and_closes(edge: Edge, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken_rset(*_args: object) -> str:
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(edge.edge.handler, "handle_RSET", broken_rset)

    def session() -> tuple[bytes, bool]:
        with socket.create_connection(("127.0.0.1", edge.port("smtp")), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"HELO client.test\r\n")
            reader.readline()
            sock.sendall(b"RSET\r\n")
            reply = reader.readline()
            # A 421 closes the channel (RFC 5321 3.8): the next read is the end of the stream.
            closed = reader.readline() == b""
            return reply, closed

    reply, closed = await asyncio.to_thread(session)
    assert reply == replies.INTERNAL_ERROR.encode() + b"\r\n"
    assert closed


async def test_smuggling_bare_lf_dot_is_refused_and_not_split(edge: Edge) -> None:
    # CVE-2023-51766 class: "<LF>.<CRLF>" must not end DATA, and bare LF is refused with 554.
    payload = (b"From: a@remote.test\r\n\r\nfirst\n.\r\nMAIL FROM:<x@remote.test>\r\n"
               b"RCPT TO:<bob@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n")
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [
        b"", b"EHLO client.test\r\n", b"MAIL FROM:<a@remote.test>\r\n", b"RCPT TO:<bob@example.org>\r\n",
        b"DATA\r\n", payload, b"QUIT\r\n"])
    assert replies.BARE_LINE_ENDING.encode() in out
    assert b"queued as" not in out
    assert await mailbox_bodies(edge, "bob@example.org") == []


async def test_starttls_injection_discards_pipelined_plaintext(edge: Edge, tls_files: tuple[str, str]) -> None:
    # CVE-2011-0411 class: commands sent in the same packet as STARTTLS must never be executed.
    def attack() -> bytes:
        with socket.create_connection(("127.0.0.1", edge.port("smtp")), timeout=10) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            sock.sendall(b"EHLO client.test\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\nRSET\r\n")
            assert reader.readline().startswith(b"220 ")
            tls = client_tls(tls_files).wrap_socket(sock, server_hostname="localhost")
            tls.settimeout(1.5)
            try:
                return tls.recv(1024)
            except TimeoutError:
                return b""

    assert await asyncio.to_thread(attack) == b""


async def test_r_ops_3_policy_down_gives_4xx_never_250(edge: Edge) -> None:
    await edge.grpc_server.stop(0)
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [b"", b"EHLO x\r\n"])
    assert out.startswith(b"451 4.3.0 ")


async def test_r_lim_7_oversized_message_refused(edge: Edge) -> None:
    await edge.runtime.config.refresh(force=True)
    limit = edge.runtime.config.server.limits.max_message_size

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=30) as client:
            client.ehlo("client.test")
            assert int(client.esmtp_features["size"]) == limit
            client.mail("a@remote.test")
            client.rcpt("bob@example.org")
            try:
                return client.data(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (limit // 1000 + 10))
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error

    code, text = await asyncio.to_thread(send)
    assert (code, text) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert await mailbox_bodies(edge, "bob@example.org") == []


async def set_server_settings(edge: Edge, doc: dict[str, object]) -> None:
    from rempart.common.config import SettingsStore

    await SettingsStore(edge.runtime.redis).put_doc("server", doc)
    await edge.runtime.config.refresh()


async def test_dsn_parameters_are_accepted_and_carried(edge: Edge) -> None:
    from rempart.common.events import MAIL_STREAM
    from rempart.common.pb.events.v1 import events_pb2

    def send() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=10) as client:
            client.ehlo("client.test")
            assert client.has_extn("dsn")
            out = [client.mail("a@remote.test", ["RET=HDRS", "ENVID=QQ314159"]),
                   client.rcpt("bob@example.org", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@example.org"]),
                   client.rcpt("carol@example.org", ["NOTIFY=SOMETIMES"])]
            out.append(client.data(MESSAGE))
            return out

    mail, rcpt, bad, data = await asyncio.to_thread(send)
    assert mail[0] == 250 and rcpt[0] == 250 and data[0] == 250
    assert bad == (501, b"5.5.4 Invalid NOTIFY parameter")
    last = await edge.runtime.js.get_last_msg(MAIL_STREAM, "rempart.mail.accepted")
    record = events_pb2.DeliveryRecord.FromString(last.data)
    assert dict(record.dsn) == {"RET": "HDRS", "ENVID": "QQ314159", "NOTIFY:bob@example.org": "SUCCESS,FAILURE",
                                "ORCPT:bob@example.org": "rfc822;bob@example.org"}


async def test_error_budget_closes_with_421(edge: Edge) -> None:
    await edge.runtime.config.refresh(force=True)
    budget = edge.runtime.config.server.smtp.error_budget
    lines = [b"", b"EHLO client.test\r\n"] + [b"RCPT TO:<x@example.org>\r\n"] * budget
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), lines)
    assert out.count(b"503 ") == budget
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")


async def test_r_rel_6_client_talking_before_greeting_is_dropped(edge: Edge) -> None:
    def early() -> bytes:
        with socket.create_connection(("127.0.0.1", edge.port("smtp")), timeout=10,
                                      source_address=(SLOW_GREETING_IP, 0)) as sock:
            sock.sendall(b"EHLO spam.engine\r\nMAIL FROM:<x@y.test>\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return data

    assert await asyncio.to_thread(early) == b"554 5.7.1 Protocol error: talking before the greeting\r\n"


async def test_bare_lf_normalized_when_configured(edge: Edge) -> None:
    await set_server_settings(edge, {"smtp": {"bare_line_endings": "normalize"}})
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [
        b"", b"EHLO client.test\r\n", b"MAIL FROM:<a@remote.test>\r\n", b"RCPT TO:<bob@example.org>\r\n",
        b"DATA\r\n", b"Subject: lf\r\n\r\nline one\nline two\r\n.\r\n", b"QUIT\r\n"])
    assert b"250 2.0.0 Ok: queued as" in out
    (body,) = await mailbox_bodies(edge, "bob@example.org")
    assert body.endswith(b"Subject: lf\r\n\r\nline one\r\nline two\r\n")


async def test_r_tls_2_plaintext_auth_only_for_trusted_clients(edge: Edge) -> None:
    def auth_offered(source: str) -> bool:
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=10, source_address=(source, 0)) as client:
            client.ehlo("client.test")
            return client.has_extn("auth")

    assert await asyncio.to_thread(auth_offered, "127.0.0.1") is True  # trusted by default
    assert await asyncio.to_thread(auth_offered, "127.0.0.2") is False


async def test_sigterm_drain_421_to_new_sessions_while_open_ones_finish(edge: Edge) -> None:
    client = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", edge.port("smtp"), timeout=10)
    await asyncio.to_thread(client.ehlo, "client.test")
    drain = asyncio.create_task(edge.edge.drain(10))
    handler = edge.edge.handler
    assert handler is not None
    await eventually(lambda: handler.draining, timeout=5, what="the edge to start draining")
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [b""])
    assert out == b"421 4.3.2 Service shutting down, try again later\r\n"

    def finish() -> tuple[int, bytes]:
        client.mail("a@remote.test")
        client.rcpt("bob@example.org")
        reply = client.data(MESSAGE)
        client.quit()
        return reply

    code, _ = await asyncio.to_thread(finish)
    assert code == 250
    await asyncio.wait_for(drain, 5)


async def test_r_ops_7_draining_edge_ends_kept_sessions_at_their_next_transaction(edge: Edge) -> None:
    # Two sessions kept after a message (as an MTA's connection cache keeps them): one sends its
    # next MAIL while the edge drains, one stays quiet. Neither holds the edge for its grace
    # period, and each hears 421 4.3.2 between transactions, never in the middle of one.
    def sent_one(client: smtplib.SMTP) -> smtplib.SMTP:
        client.ehlo("client.test")
        code, _ = client.mail("a@remote.test")
        assert code == 250
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.data(MESSAGE)[0] == 250
        return client

    port = edge.port("smtp")
    busy = await asyncio.to_thread(lambda: sent_one(smtplib.SMTP("127.0.0.1", port, timeout=10)))
    quiet = await asyncio.to_thread(lambda: sent_one(smtplib.SMTP("127.0.0.1", port, timeout=10)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    drain = asyncio.create_task(edge.edge.drain(30))
    handler = edge.edge.handler
    assert handler is not None
    await eventually(lambda: handler.draining, timeout=5, what="the edge to start draining")

    def next_mail() -> tuple[int, bytes]:
        reply = busy.mail("a@remote.test")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            busy.noop()
        return reply

    assert await asyncio.to_thread(next_mail) == (421, b"4.3.2 Service shutting down, try again later")

    def told_and_closed() -> bytes:
        assert quiet.sock is not None
        quiet.sock.settimeout(10)
        said = b""
        while chunk := quiet.sock.recv(4096):
            said += chunk
        return said

    assert await asyncio.to_thread(told_and_closed) == b"421 4.3.2 Service shutting down, try again later\r\n"
    await asyncio.wait_for(drain, 10)
    assert loop.time() - started < 10, "the drain waited out its 30 s grace period"


async def test_r_lim_7_ten_times_oversized_message_is_not_buffered(edge: Edge) -> None:
    import tracemalloc

    limit = 1024 * 1024
    await set_server_settings(edge, {"limits": {"max_message_size": limit}})
    line = b"x" * 998 + b"\r\n"

    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", edge.port("smtp")), timeout=30) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"EHLO client.test\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            sock.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            for _ in range(3):
                reader.readline()
            for _ in range(10 * limit // len(line)):
                sock.sendall(line)
            sock.sendall(b".\r\n")
            return reader.readline()

    tracemalloc.start()
    try:
        reply = await asyncio.to_thread(send)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.startswith(b"552 ")
    assert peak < 2 * limit, f"peak {peak} bytes while refusing a 10x oversized message"


@pytest.mark.parametrize("password", [PASSWORD, "wrong"])
async def test_r_tls_2_scram_sha_256_smtp_auth(edge: Edge, tls_files: tuple[str, str], password: str) -> None:
    import base64

    import scramp

    def exchange() -> list[tuple[int, bytes]]:
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice@example.org", password)
        with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as smtp:
            smtp.starttls(context=client_tls(tls_files))
            smtp.ehlo("client.test")
            assert "SCRAM-SHA-256" in smtp.esmtp_features["auth"].split()
            out = [smtp.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(client.get_client_first().encode()).decode())]
            client.set_server_first(base64.b64decode(out[-1][1]).decode())
            out.append(smtp.docmd(base64.b64encode(client.get_client_final().encode()).decode()))
            if out[-1][0] == 334:
                client.set_server_final(base64.b64decode(out[-1][1]).decode())  # verifies the server
                out.append(smtp.docmd(""))
            return out

    replies_seen = await asyncio.to_thread(exchange)
    assert replies_seen[0][0] == 334
    if password == PASSWORD:
        assert replies_seen[-1] == (235, b"2.7.0 Authentication successful")
    else:
        assert replies_seen[-1] == (535, b"5.7.8 Authentication credentials invalid")


def served_common_name(port: int, server_name: str | None) -> str:
    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.rfc4514_string())


async def test_r_tls_3_certificate_per_host_name_and_hot_reload(
        redis_url: str, nats_url: str, tmp_path: Path) -> None:
    from rempart.common.tls import write_self_signed

    default = write_self_signed(tmp_path / "default", ["mx.default.test"])
    write_self_signed(tmp_path / "sni" / "mail.other.test", ["mail.other.test"])
    async with running_edge(redis_url, nats_url, (default.cert_file, default.key_file),
                            tls_sni_dir=str(tmp_path / "sni"), tls_reload_seconds=0.2) as running:
        port = running.port("smtps")
        assert await asyncio.to_thread(served_common_name, port, "mail.other.test") == "CN=mail.other.test"
        assert await asyncio.to_thread(served_common_name, port, "unknown.test") == "CN=mx.default.test"
        # A renewed certificate (a Secret update) is served without restart.
        write_self_signed(tmp_path / "default", ["mx.renewed.test"])
        deadline = asyncio.get_running_loop().time() + 5
        while await asyncio.to_thread(served_common_name, port, None) != "CN=mx.renewed.test":
            assert asyncio.get_running_loop().time() < deadline, "the renewed certificate was not picked up"
            await asyncio.sleep(0.2)


SMUGGLING_VARIANTS = {
    # CVE-2023-51766 and the SEC Consult variants: each is a way another server might end DATA.
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
}


@pytest.mark.parametrize("ending", list(SMUGGLING_VARIANTS), ids=list(SMUGGLING_VARIANTS))
async def test_smuggling_variant_never_splits_a_message(edge: Edge, ending: str) -> None:
    smuggled = (b"Subject: first\r\n\r\nfirst" + SMUGGLING_VARIANTS[ending]
                + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                + b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [
        b"", b"EHLO client.test\r\n", b"MAIL FROM:<a@remote.test>\r\n", b"RCPT TO:<bob@example.org>\r\n",
        b"DATA\r\n", smuggled, b"QUIT\r\n"])
    # One DATA, one answer: refused for its bare line ending; nothing smuggled was delivered.
    assert out.count(b"354 ") == 1, out
    assert replies.BARE_LINE_ENDING.encode() in out
    assert await mailbox_bodies(edge, "bob@example.org") == []


async def test_overlong_command_line_refused_and_session_usable(edge: Edge) -> None:
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [
        b"", b"EHLO " + b"a" * 5000 + b"\r\n", b"NOOP\r\n"])
    assert b"500 5.5.2 Command line too long\r\n" in out
    assert out.endswith(b"250 2.0.0 OK\r\n")


async def test_auth_bad_base64_501_and_star_cancels(edge: Edge, tls_files: tuple[str, str]) -> None:
    def attempt() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", edge.port("submission"), timeout=10) as client:
            client.starttls(context=client_tls(tls_files))
            client.ehlo("client.test")
            bad = client.docmd("AUTH", "PLAIN not-base64!!")
            first = client.docmd("AUTH", "LOGIN")
            cancelled = client.docmd("*")
            still = client.docmd("NOOP")
            return [bad, first, cancelled, still]

    bad, first, cancelled, still = await asyncio.to_thread(attempt)
    assert bad == (501, b"5.5.2 Can't decode base64")
    assert first[0] == 334
    assert cancelled == (501, b"5.7.0 Auth aborted")
    assert still[0] == 250


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_r_tls_3_openssl_starttls_smtp_defaults(edge: Edge, tls_files: tuple[str, str]) -> None:
    async def s_client(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{edge.port('smtp')}",
            "-CAfile", tls_files[0], *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(b"QUIT\r\n"), 30)
        return proc.returncode or 0, out.decode(errors="replace")

    code, out = await s_client("-brief")
    assert code == 0, out
    assert "Protocol version: TLSv1.3" in out and "Verification: OK" in out
    # TLS 1.2 with a forward-secret AEAD suite works; a suite without forward secrecy does not.
    code, out = await s_client("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256", "-brief")
    assert code == 0 and "Protocol version: TLSv1.2" in out, out
    code, out = await s_client("-tls1_2", "-cipher", "AES128-SHA")
    assert code != 0, out
    code, out = await s_client("-tls1_1")
    assert code != 0, out


@pytest.mark.parametrize("forward_matches", [True, False])
async def test_r_tls_5_received_header_carries_confirmed_rdns(
        redis_url: str, nats_url: str, tls_files: tuple[str, str], forward_matches: bool) -> None:
    from rempart.common.testing.dnsserver import LoopbackDnsServer

    zone = {"3.0.0.127.in-addr.arpa": {"PTR": ["client.rdns.test."]},
            "client.rdns.test": {"A": ["127.0.0.3" if forward_matches else "192.0.2.1"]}}
    async with LoopbackDnsServer(zone) as dns_server, running_edge(
            redis_url, nats_url, tls_files, dns_nameservers=dns_server.address) as running:
        out = await asyncio.to_thread(raw_session, running.port("smtp"), [
            b"", b"EHLO client.test\r\n", b"MAIL FROM:<a@remote.test>\r\n", b"RCPT TO:<bob@example.org>\r\n",
            b"DATA\r\n", b"Subject: rdns\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n"], "127.0.0.3")
        assert b"250 2.0.0 Ok: queued as" in out
        (body,) = await mailbox_bodies(running, "bob@example.org")
    expected = b"client.rdns.test" if forward_matches else b"unknown"
    assert b"Received: from client.test (" + expected + b" [127.0.0.3])" in body


async def test_slow_steady_data_survives_the_command_timeout_but_silence_does_not(
        redis_url: str, nats_url: str, tls_files: tuple[str, str]) -> None:
    async with running_edge(redis_url, nats_url, tls_files, command_timeout_seconds=1.0) as running:
        port = running.port("smtp")

        def session(pauses: list[float]) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                reader = sock.makefile("rb")
                reader.readline()
                sock.sendall(b"EHLO client.test\r\n")
                while not reader.readline().startswith(b"250 "):
                    pass
                sock.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
                for _ in range(3):
                    reader.readline()
                sock.sendall(b"Subject: slow\r\n\r\n")
                for pause in pauses:
                    time.sleep(pause)
                    try:
                        sock.sendall(b"still here\r\n")
                    except OSError:
                        return b"closed"
                try:
                    sock.sendall(b".\r\n")
                    return reader.readline()
                except OSError:
                    return b"closed"

        # 3 s of steady data at 0.3 s intervals, three times the 1 s command timeout: accepted.
        steady = await asyncio.to_thread(session, [0.3] * 10)
        assert steady.startswith(b"250 2.0.0 Ok: queued as"), steady
        # Silent for 2.5 s in the middle of DATA: cut (slow-loris).
        silent = await asyncio.to_thread(session, [2.5, 0.1])
        assert not silent.startswith(b"250"), silent


async def test_r_ips_4_r_ips_6_a_block_closes_every_connection_it_covers(
    redis_url: str, nats_url: str, tls_files: tuple[str, str]
) -> None:
    from rempart.common.events import IPS_BLOCKED
    from rempart.common.pb.events.v1 import events_pb2

    async with running_edge(redis_url, nats_url, tls_files, proxy_protocol_cidrs="127.0.0.1/32") as running:
        await set_server_settings(running, {"ips": {"close_all_connections": True}})

        def connect(client_ip: str) -> tuple[socket.socket, object]:
            sock = socket.create_connection(("127.0.0.1", running.port("smtp")), 10)
            family = "TCP6" if ":" in client_ip else "TCP4"
            server_ip = "2001:db8::1" if ":" in client_ip else "192.0.2.1"
            sock.sendall(f"PROXY {family} {client_ip} {server_ip} 40000 25\r\n".encode())
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            return sock, reader

        clients = {ip: await asyncio.to_thread(connect, ip) for ip in
                   ("198.51.100.7", "2001:db8:1:2::10", "2001:db8:1:2:ffff::20", "2001:db8:1:3::10", "198.51.100.8")}
        for ip, prefix in (("198.51.100.7", ""), ("2001:db8:1:2::10", "2001:db8:1:2::/64")):
            event = events_pb2.Event(area="ips", what="blocked", client_ip=ip, attributes={"prefix": prefix})
            await running.runtime.nc.publish(IPS_BLOCKED, event.SerializeToString())

        def last_words(ip: str) -> tuple[bytes, bytes]:
            _sock, reader = clients[ip]
            return reader.readline().strip(), reader.readline()  # the 421, then end of stream

        assert await asyncio.to_thread(last_words, "198.51.100.7") == (
            b"421 4.0.0 Intrusion prevention active for [198.51.100.7]", b"")
        for ip in ("2001:db8:1:2::10", "2001:db8:1:2:ffff::20"):
            assert await asyncio.to_thread(last_words, ip) == (
                b"421 4.0.0 Intrusion prevention active for [2001:db8:1:2::10]", b"")

        def noop(ip: str) -> bytes:
            sock, reader = clients[ip]
            sock.sendall(b"NOOP\r\n")
            line = reader.readline().strip()
            sock.close()
            return line

        for ip in ("2001:db8:1:3::10", "198.51.100.8"):
            assert (await asyncio.to_thread(noop, ip)).startswith(b"250")
