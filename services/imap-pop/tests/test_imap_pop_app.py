"""The service's wiring (app.py) as a process: the change log's compactor runs in the background
(R-MBX-1: replay stays short)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from rempart.common.events import MAILBOX_LOG_STREAM, mailbox_log_subject, subject_counts
from rempart.common.mailbox import Mailboxes, MailboxLog
from rempart.common.mailstore import INBOX, MailboxIndex, MessageStore
from rempart.common.testing.localstack import free_port

ACCOUNT = "bob@example.org"


async def test_r_mbx_1_imap_pop_compacts_a_grown_change_log(
    redis_url: str, nats_url: str, redis: aioredis.Redis, nats_conn: NATS
) -> None:
    js = nats_conn.jetstream()
    mailboxes = Mailboxes(await MessageStore.open(js), MailboxIndex(redis), MailboxLog(js))
    record, seq = await mailboxes.store.accept(b"Subject: m\r\n\r\nx\r\n", mail_from="a@b.example",
                                               local_mailboxes=[ACCOUNT], remote_recipients=[])
    await mailboxes.file([(record, seq)])
    uidvalidity = (await mailboxes.index.status(ACCOUNT, INBOX)).uidvalidity
    for n in range(12):
        await mailboxes.change_flags(ACCOUNT, INBOX, uidvalidity, [1], "add" if n % 2 else "remove", {"\\Seen"})
    subject = mailbox_log_subject(ACCOUNT)
    before = (await subject_counts(js, MAILBOX_LOG_STREAM, subject))[subject]
    env = dict(os.environ) | {
        "REMPART_REDIS_URL": redis_url, "REMPART_NATS_URL": nats_url, "REMPART_LISTEN_HOST": "127.0.0.1",
        "REMPART_IMAP_PORT": str(free_port()), "REMPART_IMAPS_PORT": "-1", "REMPART_POP3_PORT": "-1",
        "REMPART_POP3S_PORT": "-1", "REMPART_OPS_PORT": str(free_port()), "REMPART_OPS_HOST": "127.0.0.1",
        "REMPART_LOG_FORMAT": "text", "REMPART_SHUTDOWN_GRACE_SECONDS": "1",
        "REMPART_MAILBOX_COMPACT_RECORDS": "10", "REMPART_MAILBOX_COMPACT_EVERY_SECONDS": "0.2",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "rempart.imap_pop", env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        left = before
        for _ in range(300):
            left = (await subject_counts(js, MAILBOX_LOG_STREAM, subject)).get(subject, 0)
            if left == 0:
                break
            await asyncio.sleep(0.1)
        assert left == 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    logged = (await proc.stderr.read()).decode()
    # One line per compaction (the catch-up indexer may have filed the delivery once more).
    lines = re.findall(r"mailbox log compacted: (\d+) records before, 0 after", logged)
    assert len(lines) == 1 and int(lines[0]) >= before, logged[-2000:]
