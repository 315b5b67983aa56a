"""IMAP extensions clients use to save round trips (R-MBX-4): ESEARCH (RFC 4731), LIST-EXTENDED
(RFC 5258) with LIST-STATUS (RFC 5819), and CREATE-SPECIAL-USE (RFC 6154), on the wire."""

from __future__ import annotations

import asyncio
import imaplib

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, raw_connect, simple_message
from test_imap_pop_condstore import session

pytestmark = pytest.mark.timeout(60)


def lines_of(reply: list[bytes], prefix: bytes) -> list[bytes]:
    return [line for line in reply if line.startswith(prefix)]


async def test_r_mbx_4_esearch_min_max_count_all(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 8):
        await service.deliver(simple_message(f"m{n}"))
    port = service.ports["imap"]
    caps, _, _, everything, uid_some, empty, default, bad, modseq = await asyncio.to_thread(
        session, port, "CAPABILITY", "SELECT INBOX", "STORE 2,3,5 +FLAGS (\\Seen)",
        "SEARCH RETURN (MIN MAX COUNT ALL) ALL",
        "UID SEARCH RETURN (MIN COUNT) SEEN",
        "SEARCH RETURN (MIN MAX ALL COUNT) SUBJECT nothing-has-this",
        "SEARCH RETURN () UNSEEN",
        "SEARCH RETURN (EVERYTHING) ALL",
        "SEARCH RETURN (MAX) MODSEQ 1",
    )
    assert b"ESEARCH" in caps[0]
    assert lines_of(everything, b"* ESEARCH") == [b'* ESEARCH (TAG "c4") MIN 1 MAX 7 ALL 1:7 COUNT 7']
    assert lines_of(uid_some, b"* ESEARCH") == [b'* ESEARCH (TAG "c5") UID MIN 2 COUNT 3']
    # Nothing matched: MIN, MAX and ALL are left out, COUNT says 0 (RFC 4731 3.1).
    assert lines_of(empty, b"* ESEARCH") == [b'* ESEARCH (TAG "c6") COUNT 0']
    assert lines_of(default, b"* ESEARCH") == [b'* ESEARCH (TAG "c7") ALL 1,4,6:7']  # RETURN () is ALL
    assert bad[-1].startswith(b"c8 BAD")
    # With a MODSEQ key, the highest MODSEQ of what matched (RFC 7162 3.1.5).
    [line] = lines_of(modseq, b"* ESEARCH")
    assert line.startswith(b'* ESEARCH (TAG "c9") MAX 7 MODSEQ ')
    assert not lines_of(everything, b"* SEARCH")


async def test_r_mbx_4_list_status_and_extended_selection(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 4):
        await service.deliver(simple_message(f"m{n}"))
    port = service.ports["imap"]
    _, _, _, _, listed, recursive, unknown, bad_item = await asyncio.to_thread(
        session, port, "SELECT INBOX", "STORE 1 +FLAGS (\\Seen)", "CREATE Work/Reports",
        "SUBSCRIBE Work/Reports",
        'LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN UIDNEXT))',
        'LIST (SUBSCRIBED RECURSIVEMATCH) "" "Work"',
        'LIST (NOSUCHOPTION) "" "*"',
        'LIST "" "*" RETURN (STATUS (BOGUS))',
    )
    # Each selectable folder's LIST line is followed by its STATUS (RFC 5819).
    text = b"\r\n".join(listed)
    assert b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n* STATUS "INBOX" (MESSAGES 3 UNSEEN 2 UIDNEXT 4)' in text
    assert b'"/" "Work/Reports"\r\n* STATUS "Work/Reports" (MESSAGES 0 UNSEEN 0 UIDNEXT 1)' in text
    assert len(lines_of(listed, b"* STATUS")) == len(lines_of(listed, b"* LIST"))
    assert listed[-1].startswith(b"c5 OK")
    # Work is not subscribed, but a child of it is (RFC 5258 3.5).
    assert lines_of(recursive, b"* LIST") == [b'* LIST (\\HasChildren) "/" "Work" ("CHILDINFO" ("SUBSCRIBED"))']
    assert unknown[-1].startswith(b"c7 BAD") and bad_item[-1].startswith(b"c8 BAD")
    assert not lines_of(bad_item, b"* LIST")  # refused before any output


async def test_r_mbx_4_list_status_of_many_folders_costs_a_few_round_trips(service, redis, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """LIST RETURN (STATUS) over 300 folders gives each folder's own figures and reads them with
    a script call a folder, a page of folders a round trip (before: three round trips a folder).
    Round trips are counted where redis-py sends them (every client of this process)."""
    import re

    from redis.asyncio.connection import AbstractConnection

    from rempart.common import keys

    folders = [f"Box{n:03}" for n in range(300)]
    for name in folders:
        assert await service.backend.index.create_folder(BOB, name)
    for n in range(3):
        await service.deliver(simple_message(f"to 7 #{n}"), folder="Box007")
    await service.deliver(simple_message("to 250"), folder="Box250")
    await service.deliver(simple_message("inbox"))
    port = service.ports["imap"]
    await asyncio.to_thread(session, port, "SELECT Box007", "STORE 2 +FLAGS (\\Seen)", "CLOSE")

    sent = AbstractConnection.send_packed_command
    round_trips = 0

    async def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
        nonlocal round_trips
        round_trips += 1
        await sent(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    [listed] = await asyncio.to_thread(
        session, port, 'LIST "" "*" RETURN (STATUS (MESSAGES RECENT UNSEEN UIDNEXT UIDVALIDITY HIGHESTMODSEQ))')
    monkeypatch.undo()
    statuses = {}
    for line in lines_of(listed, b"* STATUS"):
        name, items = re.fullmatch(rb'\* STATUS "([^"]+)" \((.*)\)', line).groups()  # type: ignore[union-attr]
        pairs = items.split()
        statuses[name.decode()] = {pairs[i].decode(): int(pairs[i + 1]) for i in range(0, len(pairs), 2)}
    everyone = await service.backend.index.folders(BOB)
    assert len(everyone) > 300 and len(statuses) == len(lines_of(listed, b"* LIST")) == len(everyone)
    seven = statuses["Box007"]
    # Three messages, one \\Seen; the SELECT above took their \\Recent; the STORE was a change.
    assert {k: seven[k] for k in ("MESSAGES", "RECENT", "UNSEEN", "UIDNEXT")} == {
        "MESSAGES": 3, "RECENT": 0, "UNSEEN": 2, "UIDNEXT": 4}
    assert seven["UIDVALIDITY"] == int(await redis.hget(keys.mailbox_meta(BOB, "Box007"), "uidvalidity"))
    assert seven["HIGHESTMODSEQ"] > statuses["Box250"]["HIGHESTMODSEQ"] >= 1
    for name, messages in (("Box250", 1), ("INBOX", 1), ("Box100", 0)):
        assert {k: statuses[name][k] for k in ("MESSAGES", "RECENT", "UNSEEN", "UIDNEXT")} == {
            "MESSAGES": messages, "RECENT": messages, "UNSEEN": messages, "UIDNEXT": messages + 1}, name
    # Two pages of folders, plus the session's own reads (login, folder list, subscriptions,
    # special uses): not a round trip a folder.
    assert round_trips < 30, round_trips


async def test_r_mbx_4_create_special_use(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[str, list[bytes], str, str, list[bytes]]:
        imap = imaplib.IMAP4("127.0.0.1", service.ports["imap"])
        try:
            imap.login(BOB, BOB_PASSWORD)
            assert b"CREATE-SPECIAL-USE" in imap.capability()[1][0]
            typ, _ = imap._simple_command("CREATE", "Old-Mail", "(USE (\\Archive))")  # type: ignore[attr-defined]
            listed = imap.list('""', "Old-Mail")[1]
            bad_typ, bad = imap._simple_command("CREATE", "Everything", "(USE (\\All))")  # type: ignore[attr-defined]
            special = imap._simple_command("LIST", '(SPECIAL-USE) "" "*"')  # type: ignore[attr-defined]
            return typ, listed, bad_typ, str(bad), imap.untagged_responses.get("LIST", []) if special[0] == "OK" else []
        finally:
            imap.logout()

    typ, listed, bad_typ, bad, special = await asyncio.to_thread(run)
    assert typ == "OK"
    assert listed == [b'(\\HasNoChildren \\Archive) "/" "Old-Mail"']
    assert bad_typ == "NO" and "USEATTR" in bad
    assert any(b"\\Archive" in line and b"Old-Mail" in line for line in special)
    assert not any(b"Everything" in line for line in special)


# --- SELECT from the saved UIDs (R-MBX-2) -------------------------------------------------------
def opened(port: int) -> tuple[list[bytes], list[bytes]]:
    """What a new session is told at SELECT (the untagged lines that describe the folder) and
    what UID FETCH 1:* (FLAGS) gives then."""
    select, fetch = session(port, "SELECT INBOX", "UID FETCH 1:* (FLAGS)")
    told = [line for line in select if b"EXISTS" in line or b"UNSEEN" in line or b"UIDNEXT" in line]
    return told, [line.replace(b" \\Recent", b"").replace(b"\\Recent ", b"").replace(b"\\Recent", b"")
                  for line in fetch]


async def test_r_mbx_2_select_from_saved_uids_matches_a_full_read(service, redis) -> None:  # type: ignore[no-untyped-def]
    """SELECT starts from the UIDs a session saved plus the changes since; after each round of
    changes by another session (flags, \\Seen taken and given, expunges, new mail) a new
    session is told exactly what it is told when the folder is read whole."""
    import random

    from rempart.common import keys

    for n in range(1, 41):
        await service.deliver(simple_message(f"m{n}"))
    port = service.ports["imap"]
    rng = random.Random(9)
    await asyncio.to_thread(session, port, "SELECT INBOX", "STORE 1:10 +FLAGS (\\Seen)")
    for _ in range(8):
        # The saved UIDs are brought up to date by this SELECT...
        cached = await asyncio.to_thread(opened, port)
        assert await redis.exists(keys.mailbox_uid_cache(BOB, "INBOX"))
        # ...and match a read of the whole folder.
        await redis.delete(keys.mailbox_uid_cache(BOB, "INBOX"))
        assert await asyncio.to_thread(opened, port) == cached
        commands = ["SELECT INBOX"]
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(["seen", "unseen", "delete", "flag"])
            seq = rng.randint(1, 30)
            commands.append({"seen": f"STORE 1:{seq} +FLAGS (\\Seen)", "unseen": f"STORE {seq} -FLAGS (\\Seen)",
                             "delete": f"STORE {seq} +FLAGS (\\Deleted)", "flag": f"STORE {seq} +FLAGS ($X)"}[kind])
        commands.append("EXPUNGE")
        await asyncio.to_thread(session, port, *commands)
        for n in range(rng.randint(0, 2)):
            await service.deliver(simple_message(f"new {n}"))
    told, _ = await asyncio.to_thread(opened, port)
    assert any(b"EXISTS" in line for line in told)


async def test_r_mbx_2_fetch_of_a_message_expunged_elsewhere_is_expungeissued(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 6):
        await service.deliver(simple_message(f"m{n}"))

    def run() -> tuple[list[bytes], list[bytes], list[bytes]]:
        watcher = raw_connect(service.ports["imap"])
        watcher.line()
        watcher.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        watcher.until(b"b ")
        session(service.ports["imap"], "SELECT INBOX", "STORE 3 +FLAGS (\\Deleted)", "EXPUNGE")
        # The watcher never loaded message 3: it is gone when it asks, and not yet announced.
        watcher.send(b"c FETCH 2:4 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
        fetched = watcher.until(b"c ")
        watcher.send(b"d NOOP\r\n")
        noop = watcher.until(b"d ")
        watcher.send(b"e FETCH 3 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
        after = watcher.until(b"e ")
        return fetched, noop, after

    fetched, noop, after = await asyncio.to_thread(run)
    assert fetched[-1].startswith(b"c NO [EXPUNGEISSUED]")
    assert sum(1 for line in fetched if b" FETCH (" in line) == 2  # 2 and 4 still served
    assert b"* 3 EXPUNGE" in noop
    assert after[-1].startswith(b"e OK") and any(b"m4" in line for line in after)  # 4 is now number 3


async def test_r_mbx_2_search_with_a_message_expunged_elsewhere_still_answers(service) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 6):
        await service.deliver(simple_message(f"m{n}"))

    def run() -> list[bytes]:
        watcher = raw_connect(service.ports["imap"])
        watcher.line()
        watcher.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        watcher.until(b"b ")
        session(service.ports["imap"], "SELECT INBOX", "STORE 2 +FLAGS (\\Deleted)", "EXPUNGE")
        watcher.send(b"c SEARCH BODY bob\r\n")  # reads every message's text
        return watcher.until(b"c ")

    out = await asyncio.to_thread(run)
    assert out[-1].startswith(b"c OK")
    assert b"* SEARCH 1 3 4 5" in out  # number 2 is still in the session's view, unreadable
