"""Messages in the outbound queue for the admin API's tests: stored on the MAIL stream the way the
edge stores them, and entered in the queue's state the way the relay enters them when it first
sees the record (rempart.common.outqueue), with the recipients' states a test needs."""

from __future__ import annotations

from rempart.admin_api.backend import Backend
from rempart.common.mailstore import MessageStore
from rempart.common.outqueue import OutboundQueue, RecipientState

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@remote.test>\r\n"
    b"Subject: =?utf-8?q?Quarterly_r=C3=A9sum=C3=A9?=\r\nMessage-ID: <q1@example.org>\r\n"
    b"Date: Sat, 05 Dec 2026 10:00:00 +0000\r\n\r\nThe body stays in the queue: SECRET-BODY-TEXT\r\n"
)


async def queued(backend: Backend, sender: str, recipients: list[str], message: bytes = MESSAGE,
                 states: dict[str, RecipientState] | None = None, received_ms: int = 0,
                 transaction_id: str = "") -> str:
    store = await MessageStore.open(backend.js)
    record, seq = await store.accept(message, mail_from=sender, local_mailboxes=[], remote_recipients=recipients,
                                     internal_date_ms=received_ms, transaction_id=transaction_id)
    queue = OutboundQueue(backend.redis)
    await queue.enter(record, seq, {r: RecipientState() for r in recipients})
    if states:
        await queue.save(record.transaction_id, states)
    return record.transaction_id
