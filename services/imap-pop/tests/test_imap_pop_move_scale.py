"""MOVE and COPY at scale (R-MBX-5, issue 9): 50,000 messages move in one command, by reference
(no message read or stored again), and the change log records it in records under NATS's
payload limit."""

from __future__ import annotations

import asyncio
import re
import time

from imappop_helpers import BOB, BOB_PASSWORD, SourceIMAP, simple_message

from rempart.common.events import MAIL_STREAM, MAILBOX_LOG_STREAM, mailbox_log_subject
from rempart.common.mailstore import INBOX, RestoredMessage

COUNT = 50_000


async def test_r_mbx_5_move_of_50000_messages_by_reference(service, nats_conn) -> None:  # type: ignore[no-untyped-def]
    # A folder of 50,000 messages, set up as a rebuild would write it: copies of one delivery.
    backend = service.backend
    record, seq = await backend.store.accept(simple_message("Many"), mail_from="", local_mailboxes=[BOB],
                                             remote_recipients=[])
    uidvalidity = await backend.index.new_uidvalidity()
    await backend.index.restore_folder(BOB, INBOX, uidvalidity, COUNT + 1, COUNT + 1, [
        RestoredMessage(uid, record, seq, frozenset({"\\Seen"} if uid % 2 else set()), f"{record.transaction_id}/{uid}")
        for uid in range(1, COUNT + 1)])
    await backend.mailboxes.create_folder(BOB, "Archive")
    js = nats_conn.jetstream()
    mail_before = (await js.stream_info(MAIL_STREAM)).state.messages

    def run() -> tuple[str, list[bytes], float, list[bytes], list[bytes]]:
        imap = SourceIMAP(service.ports["imap"])
        imap.login(BOB, BOB_PASSWORD)
        imap.select("INBOX")
        started = time.monotonic()
        typ, _ = imap.uid("MOVE", "1:*", "Archive")
        took = time.monotonic() - started
        copyuid = [line for line in imap.untagged_responses.get("OK", []) if b"COPYUID" in line]
        inbox = imap.status("INBOX", "(MESSAGES)")[1]
        archive = imap.status("Archive", "(MESSAGES UNSEEN)")[1]
        imap.logout()
        return typ, copyuid, took, inbox, archive

    typ, copyuid, took, inbox, archive = await asyncio.to_thread(run)
    assert typ == "OK"
    assert re.search(rb"COPYUID \d+ 1:50000 1:50000", copyuid[-1])
    assert inbox == [b'"INBOX" (MESSAGES 0)']
    assert archive == [b'"Archive" (MESSAGES 50000 UNSEEN 25000)']
    print(f"UID MOVE of {COUNT} messages: {took:.1f} s")
    # Nothing stored again; the log has it in a few records (each far under 1 MiB).
    assert (await js.stream_info(MAIL_STREAM)).state.messages == mail_before
    info = await js.stream_info(MAILBOX_LOG_STREAM, subjects_filter=mailbox_log_subject(BOB))
    assert info.state.messages < 40  # folders, reservations, then filings, flags and expunges by 10,000
    moved = await backend.index.messages(BOB, "Archive")
    assert await backend.store.read_message(moved[-1]) == simple_message("Many")
