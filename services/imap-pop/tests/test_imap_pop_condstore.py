"""CONDSTORE and QRESYNC (RFC 7162, R-MBX-4), following the RFC's examples with this server's
MODSEQ values: HIGHESTMODSEQ at SELECT, MODSEQ in FETCH, CHANGEDSINCE, conditional STORE with
[MODIFIED], SEARCH MODSEQ, STATUS HIGHESTMODSEQ, and a client reconnecting with QRESYNC gets
exactly the flag changes and the VANISHED UIDs since its MODSEQ."""

from __future__ import annotations

import asyncio
import re

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, raw_connect, simple_message

pytestmark = pytest.mark.timeout(60)


def session(port: int, *commands: str) -> list[list[bytes]]:
    """Log in, then each command tagged c1, c2...; every command's lines (tagged one last)."""
    raw = raw_connect(port)
    raw.line()
    raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
    assert raw.until(b"a ")[-1].startswith(b"a OK")
    out = []
    for n, text in enumerate(commands, 1):
        raw.send(f"c{n} {text}\r\n".encode())
        out.append(raw.until(f"c{n} ".encode()))
    raw.send(b"z LOGOUT\r\n")
    return out


def modseq_of(lines: list[bytes], uid: int) -> int:
    for line in lines:
        if re.search(rb"\bUID %d\b" % uid, line):
            return int(re.search(rb"MODSEQ \((\d+)\)", line).group(1))  # type: ignore[union-attr]
    raise AssertionError(f"no MODSEQ for UID {uid} in {lines}")


def highest(lines: list[bytes]) -> int:
    return int(re.search(rb"HIGHESTMODSEQ (\d+)", b"\n".join(lines)).group(1))  # type: ignore[union-attr]


async def test_r_mbx_4_condstore_select_fetch_store_search_status(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 10):
        await service.deliver(simple_message(f"m{n}"))
    port = service.ports["imap"]

    caps, select, fetch = await asyncio.to_thread(
        session, port, "CAPABILITY", "SELECT INBOX (CONDSTORE)", "UID FETCH 1:* (FLAGS MODSEQ)")
    assert b"CONDSTORE" in caps[0] and b"QRESYNC" in caps[0]
    top = highest(select)
    modseqs = {uid: modseq_of(fetch, uid) for uid in range(1, 10)}
    assert max(modseqs.values()) == top and len(set(modseqs.values())) == 9  # one change each

    # RFC 7162 3.1.3 example: STORE 7,5,9 (UNCHANGEDSINCE m) +FLAGS.SILENT (\Deleted), where 7 and
    # 9 changed after m (here: another session flagged them).
    await asyncio.to_thread(session, port, "SELECT INBOX", "STORE 7,9 +FLAGS ($Other)")
    store, status, changed, search = (await asyncio.to_thread(
        session, port, "SELECT INBOX",
        f"STORE 7,5,9 (UNCHANGEDSINCE {top}) +FLAGS.SILENT (\\Deleted)",
        "STATUS INBOX (HIGHESTMODSEQ)",
        f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {top})",
        f"SEARCH MODSEQ {top + 1}",
    ))[1:]
    assert store[-1] == b"c2 OK [MODIFIED 7,9] Conditional STORE failed"
    five = [line for line in store if line.startswith(b"* 5 FETCH")]
    assert len(five) == 1 and b"FLAGS" not in five[0] and b"MODSEQ (" in five[0]  # .SILENT: MODSEQ only
    new_top = highest(status)
    assert new_top > top
    # CHANGEDSINCE: only 5, 7 and 9 changed, each with its MODSEQ, FLAGS as asked.
    lines = [line for line in changed if line.startswith(b"* ")]
    assert [int(re.search(rb"UID (\d+)", line).group(1)) for line in lines] == [5, 7, 9]  # type: ignore[union-attr]
    assert all(b"MODSEQ (" in line for line in lines)
    assert b"\\Deleted" in lines[0] and b"$Other" in lines[1] and b"\\Deleted" not in lines[1]
    assert search[0] == f"* SEARCH 5 7 9 (MODSEQ {new_top})".encode()


async def test_r_mbx_4_qresync_reconnect_gets_exactly_the_changes_and_vanished(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 11):
        await service.deliver(simple_message(f"m{n}"))
    port = service.ports["imap"]
    first = await asyncio.to_thread(session, port, "ENABLE QRESYNC", "SELECT INBOX")
    assert first[0][0] == b"* ENABLED QRESYNC"
    uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", b"\n".join(first[1])).group(1))  # type: ignore[union-attr]
    known = highest(first[1])

    # While the client is away: another session flags 2 and 6, expunges 3, 4 and 8; new mail.
    await asyncio.to_thread(session, port, "SELECT INBOX", "UID STORE 2,6 +FLAGS (\\Flagged)",
                            "UID STORE 3,4,8 +FLAGS (\\Deleted)", "EXPUNGE")
    await service.deliver(simple_message("m11"))

    back = await asyncio.to_thread(
        session, port, "ENABLE QRESYNC", f"SELECT INBOX (QRESYNC ({uidvalidity} {known} 1:10))",
        f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)")
    select = back[1]
    assert b"* VANISHED (EARLIER) 3:4,8" in select
    fetched = [line for line in select if b" FETCH " in line]
    # Exactly the changes: 2 and 6 re-flagged, 11 new (its MODSEQ is above the client's too).
    assert [int(re.search(rb"UID (\d+)", line).group(1)) for line in fetched] == [2, 6, 11]  # type: ignore[union-attr]
    assert all(b"MODSEQ (" in line and b"FLAGS (" in line for line in fetched)
    assert b"\\Flagged" in fetched[0] and b"\\Flagged" in fetched[1]
    assert highest(select) > known
    # UID FETCH (CHANGEDSINCE ... VANISHED) says the same (RFC 7162 3.2.6).
    assert back[2][0] == b"* VANISHED (EARLIER) 3:4,8"

    # A wrong UIDVALIDITY gets no resynchronisation (RFC 7162 3.2.5.1: a full one is needed).
    wrong = await asyncio.to_thread(session, port, "ENABLE QRESYNC", f"SELECT INBOX (QRESYNC (1 {known}))")
    assert not any(b"VANISHED" in line or b" FETCH " in line for line in wrong[1])
    # QRESYNC without ENABLE is refused.
    refused = await asyncio.to_thread(session, port, f"SELECT INBOX (QRESYNC ({uidvalidity} {known}))")
    assert refused[0][-1].startswith(b"c1 BAD")


async def test_r_mbx_4_with_qresync_expunges_are_vanished_responses(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 6):
        await service.deliver(simple_message(f"m{n}"))
    out = await asyncio.to_thread(
        session, service.ports["imap"], "ENABLE QRESYNC", "SELECT INBOX", "STORE 2,4 +FLAGS.SILENT (\\Deleted)",
        "EXPUNGE", "SELECT Drafts")
    assert b"* VANISHED 2,4" in out[3] and not any(b"EXPUNGE" in line for line in out[3][:-1])
    # STORE with QRESYNC: UID and MODSEQ in the FETCH responses even for .SILENT (RFC 7162 3.2.4).
    assert all(b"UID " in line and b"MODSEQ (" in line for line in out[2][:-1])
    assert out[4][0] == b"* OK [CLOSED] Previous mailbox closed"



async def test_r_mbx_2_noop_reports_what_another_session_changed_and_reads_only_that(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 301):
        await service.deliver(simple_message(f"m{n}"), publish=False)
    index = service.backend.index
    loaded: list[int] = []
    whole = index.messages

    async def counting(account: str, folder: str = "INBOX"):  # type: ignore[no-untyped-def]
        loaded.append(1)
        return await whole(account, folder)

    index.messages = counting  # a spy: counts whole-folder loads, the real method answers
    uid_reads: list[int] = []
    all_uids = index.uids

    async def counting_uids(account: str, folder: str = "INBOX"):  # type: ignore[no-untyped-def]
        uid_reads.append(1)
        return await all_uids(account, folder)

    index.uids = counting_uids

    def run() -> list[list[bytes]]:
        watcher = raw_connect(service.ports["imap"])
        watcher.line()
        watcher.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        watcher.until(b"b ")
        other = session(service.ports["imap"], "SELECT INBOX", "STORE 5 +FLAGS (\\Flagged)",
                        "STORE 7 +FLAGS (\\Deleted)", "EXPUNGE")
        assert other[-1][-1].startswith(b"c4 OK")
        watcher.send(b"c NOOP\r\n")
        first = watcher.until(b"c ")
        watcher.send(b"d NOOP\r\n")
        second = watcher.until(b"d ")
        return [first, second]

    loads_before = len(loaded)
    first, second = await asyncio.to_thread(run)
    # No SELECT loads the folder's messages (only their UIDs: the first reads them whole, the
    # second starts from what the first saved), and the watcher's NOOPs read only what changed.
    assert len(loaded) - loads_before == 0
    assert len(uid_reads) == 1
    # The watcher selected first: every message is \Recent for it (RFC 3501 2.3.2).
    assert first == [b"* 7 EXPUNGE", b"* 5 FETCH (FLAGS (\\Flagged \\Recent))", b"c OK NOOP completed"]
    assert second == [b"d OK NOOP completed"]


async def test_bad_numbers_in_condstore_commands_are_bad_not_server_errors(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("m"))
    out = await asyncio.to_thread(
        session, service.ports["imap"], "SELECT INBOX", "FETCH 1 (FLAGS) (CHANGEDSINCE ²)",
        "FETCH 1 (FLAGS) (CHANGEDSINCE 99999999999999999999999)", "STORE 1 (UNCHANGEDSINCE x) +FLAGS (a)",
        "SEARCH LARGER ²", "SEARCH MODSEQ 1", "UID FETCH 1 (FLAGS) (CHANGEDSINCE 1 VANISHED)")
    assert [lines[-1].split(b" ")[1] for lines in out[1:6]] == [b"BAD"] * 4 + [b"OK"]
    assert out[6][-1].startswith(b"c7 BAD")  # VANISHED needs ENABLE QRESYNC


async def test_r_mbx_5_quota_getquotaroot_append_and_copy(service, redis) -> None:  # type: ignore[no-untyped-def]
    from rempart.common.config import SettingsStore

    port = service.ports["imap"]
    await service.deliver(simple_message("first", body="x" * 3000 + "\r\n"))
    unlimited = await asyncio.to_thread(session, port, "GETQUOTAROOT INBOX", 'GETQUOTA ""', "SETQUOTA \"\" (STORAGE 1)")
    assert unlimited[0] == [b'* QUOTAROOT "INBOX"', b"c1 OK GETQUOTAROOT completed"]
    assert unlimited[1][-1].startswith(b"c2 NO [NONEXISTENT]") and unlimited[2][-1].startswith(b"c3 NO [NOPERM]")

    await SettingsStore(redis).put_doc(f"account:{BOB}", {"limits": {"mailbox_quota_mb": 1}})
    await service.backend.config.refresh(force=True)
    big = "y" * (600 * 1024)
    out = await asyncio.to_thread(
        session, port, "GETQUOTAROOT INBOX",
        f"APPEND INBOX {{{len(big) + 16}+}}\r\nSubject: big\r\n\r\n{big}",
        "SELECT INBOX", "COPY 1:* INBOX", "GETQUOTA \"\"")
    used_kib = int(re.search(rb"STORAGE (\d+) 1024", out[0][1]).group(1))  # type: ignore[union-attr]
    assert out[0][0] == b'* QUOTAROOT "INBOX" ""' and 3 <= used_kib <= 4
    assert out[1][-1].startswith(b"c2 OK [APPENDUID")  # 600 KiB fits in 1 MiB
    assert out[3][-1] == b"c4 NO [OVERQUOTA] Quota exceeded (mailbox for user is full)"  # copies count
    assert int(re.search(rb"STORAGE (\d+) 1024", out[4][0]).group(1)) >= 600  # type: ignore[union-attr]
    again = await asyncio.to_thread(session, port, f"APPEND INBOX {{{len(big) + 16}+}}\r\nSubject: big\r\n\r\n{big}")
    assert again[0][-1] == b"c1 NO [OVERQUOTA] Quota exceeded (mailbox for user is full)"
