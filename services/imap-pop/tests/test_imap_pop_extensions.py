"""IMAP extensions clients use to save round trips (R-MBX-4): ESEARCH (RFC 4731), LIST-EXTENDED
(RFC 5258) with LIST-STATUS (RFC 5819), and CREATE-SPECIAL-USE (RFC 6154), on the wire."""

from __future__ import annotations

import asyncio
import imaplib

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, simple_message
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
