"""What the SMTP edge adds to the cluster's statistics (rempart.common.stats, GET /v1/stats):
each stored message, and the refusals it makes itself, without a policy verdict (aiosmtpd's size
limits, bare line endings, an unanswered policy call). Refusals that policy decides are counted
by the policy service, never a second time here. A real edge over real Redis and NATS, with the
in-test policy service of test_smtp_edge."""

from __future__ import annotations

import asyncio
import smtplib
import time

from test_smtp_edge import Edge, raw_session
from test_smtp_edge import edge as edge  # the fixture

from rempart.common import stats
from rempart.common.testing.polling import eventually


async def totals(edge: Edge) -> stats.StatsBucket:
    now = time.time()
    return (await stats.read_series(edge.runtime.redis, now - 300, now + 60, 60)).totals


async def test_r_adm_stats_edge_counts_stored_messages_and_its_own_refusals(edge: Edge) -> None:
    await edge.runtime.config.refresh(force=True)
    limit = edge.runtime.config.server.limits.max_message_size

    def mail() -> list[str]:
        replies: list[str] = []
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=30) as client:
            client.ehlo("client.test")
            for _ in range(2):
                client.sendmail("a@remote.test", ["bob@example.org"], b"Subject: counted\r\n\r\nhello\r\n")
            code, text = client.docmd(f"MAIL FROM:<a@remote.test> SIZE={limit + 1}")
            replies.append(f"{code} {text.decode()}")
            client.rset()
            client.mail("a@remote.test")
            code, text = client.rcpt("bob@elsewhere.test")  # refused by policy, counted there
            replies.append(f"{code} {text.decode()}")
            client.rcpt("bob@example.org")
            try:
                code, text = client.data(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (limit // 1000 + 10))
            except smtplib.SMTPDataError as exc:
                code, text = exc.smtp_code, exc.smtp_error
            replies.append(f"{code} {text.decode()}")
        return replies

    assert await asyncio.to_thread(mail) == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "550 5.7.1 <a@remote.test>... we do not relay <bob@elsewhere.test>",
        "552 5.3.4 Message size exceeds fixed maximum message size",
    ]
    smuggled = b"From: a@remote.test\r\n\r\nfirst\n.\r\nsecond\r\n.\r\n"
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [
        b"", b"EHLO client.test\r\n", b"MAIL FROM:<a@remote.test>\r\n", b"RCPT TO:<bob@example.org>\r\n",
        b"DATA\r\n", smuggled, b"QUIT\r\n"])
    assert b"554 5.6.11" in out

    async def counted() -> bool:
        now = await totals(edge)
        return now.accepted == 2 and dict(now.refused) == {"message_too_big": 2, "bad_syntax": 1}

    await eventually(counted, timeout=10, what="the edge's counts in Redis")

    # Policy gone: the edge answers 451 itself, and says so in the statistics.
    await edge.grpc_server.stop(0)
    out = await asyncio.to_thread(raw_session, edge.port("smtp"), [b"", b"EHLO x\r\n"])
    assert out.startswith(b"451 4.3.0 ")

    async def tempfail_counted() -> bool:
        return (await totals(edge)).refused.get("temporary_failure") == 1

    await eventually(tempfail_counted, timeout=10, what="the unanswered policy call counted")
    assert (await totals(edge)).accepted == 2


async def test_r_adm_stats_a_draining_edge_writes_its_last_counts(edge: Edge) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", edge.port("smtp"), timeout=30) as client:
            client.sendmail("a@remote.test", ["bob@example.org"], b"Subject: last\r\n\r\nhello\r\n")

    handler = edge.edge.handler
    assert handler is not None and handler.stats is not None
    # Written only when asked: nothing but the drain writes this recorder's counts.
    handler.stats = handler.delivery.stats = stats.StatsRecorder(edge.runtime.redis, flush_seconds=3600)
    await asyncio.to_thread(send)
    assert (await totals(edge)).accepted == 0
    await edge.edge.drain(0)
    assert (await totals(edge)).accepted == 1
