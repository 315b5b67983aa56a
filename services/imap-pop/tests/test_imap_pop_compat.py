"""What real clients rely on: default folders with RFC 6154 attributes, RENAME (INBOX too),
\\Recent kept RFC-correct at 0, UNSELECT, STATUS, UID SEARCH keys, multipart sections and
BODYSTRUCTURE, UIDPLUS codes; POP3 CAPA in each state and PIPELINING.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import imaplib
from email.message import EmailMessage

import pytest
from imappop_helpers import BOB, BOB_PASSWORD, UNTRUSTED_IP, SourceIMAP, SourcePOP3, raw_connect, simple_message

from rempart.common.mailbox import rebuild_index

pytestmark = pytest.mark.timeout(60)

PDF = b"%PDF-1.4 not really\x00\x01\x02" * 3


def login(port: int) -> imaplib.IMAP4:
    imap = SourceIMAP(port)
    imap.login(BOB, BOB_PASSWORD)
    return imap


def multipart_message() -> bytes:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.net>"
    message["To"] = BOB
    message["Subject"] = "Report"
    message["Date"] = "Fri, 27 Nov 2026 09:00:00 +0000"
    message.set_content("Hello plain\n")
    message.add_alternative("<p>Hello html</p>\n", subtype="html")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    message.set_boundary("outer-b")
    alternative = message.get_payload()[0]
    assert isinstance(alternative, EmailMessage)
    alternative.set_boundary("inner-b")
    return message.as_bytes().replace(b"\n", b"\r\n")


async def test_rfc_6154_default_folders_with_special_use_on_first_login(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[list[bytes], list[bytes], tuple[str, ...], list[bytes]]:
        imap = login(service.ports["imap"])
        everything = imap.list()[1]
        special = imap._simple_command("LIST", "(SPECIAL-USE)", '""', '"*"')
        special_lines = imap._untagged_response(*special, "LIST")[1]
        returned = imap._simple_command("LIST", '""', '"S*"', "RETURN", "(SPECIAL-USE CHILDREN)")
        special_lines += imap._untagged_response(*returned, "LIST")[1]
        caps = imap.capabilities
        imap.delete("Junk")
        imap.logout()
        again = login(service.ports["imap"])
        after = again.list()[1]
        again.logout()
        return everything, special_lines, caps, after

    everything, special, caps, after = await asyncio.to_thread(run)
    assert everything == [
        b'(\\HasNoChildren) "/" "INBOX"', b'(\\HasNoChildren \\Drafts) "/" "Drafts"',
        b'(\\HasNoChildren \\Junk) "/" "Junk"', b'(\\HasNoChildren \\Sent) "/" "Sent"',
        b'(\\HasNoChildren \\Trash) "/" "Trash"']
    assert [line.split(b" ")[-1] for line in special] == [b'"Drafts"', b'"Junk"', b'"Sent"', b'"Trash"', b'"Sent"']
    assert "SPECIAL-USE" in caps and "CHILDREN" in caps and "UNSELECT" in caps and "UIDPLUS" in caps
    assert b'"Junk"' not in b" ".join(after)  # deleted by the user: not created again


async def test_rename_folder_with_children_keeps_messages_and_special_use(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> dict[str, object]:
        imap = login(service.ports["imap"])
        out: dict[str, object] = {"create": imap.create("Projects/2026")[0]}
        imap.append("Projects/2026", "(\\Flagged)", None, simple_message("Plan"))
        out["list_before"] = imap.list('""', "Projects*")[1]
        out["rename"] = imap.rename("Projects", "Archive/Old")[0]
        out["list_after"] = imap.list('""', "*")[1]
        out["status"] = imap.status("Archive/Old/2026", "(MESSAGES)")[1]
        imap.select("Archive/Old/2026")
        out["flags"] = imap.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1]
        out["trash"] = imap.rename("Trash", "Bin")[0]
        out["exists"] = imap.rename("Sent", "Drafts")
        out["missing"] = imap.rename("Nope", "Other")
        out["into_itself"] = imap.rename("Archive", "Archive/Deeper")
        imap.logout()
        return out

    out = await asyncio.to_thread(run)
    assert out["create"] == "OK"
    assert out["list_before"] == [b'(\\HasChildren) "/" "Projects"', b'(\\HasNoChildren) "/" "Projects/2026"']
    assert out["rename"] == "OK"
    listing = out["list_after"]
    assert isinstance(listing, list)
    assert b'(\\HasChildren) "/" "Archive"' in listing and b'(\\HasChildren) "/" "Archive/Old"' in listing
    assert b'(\\HasNoChildren) "/" "Archive/Old/2026"' in listing
    assert not any(b"Projects" in line for line in listing)
    assert out["status"] == [b'"Archive/Old/2026" (MESSAGES 1)']
    flags = out["flags"]
    assert isinstance(flags, list) and b"\\Flagged" in flags[0][0] and flags[0][1] == b"Subject: Plan\r\n\r\n"
    assert out["trash"] == "OK"
    assert out["exists"] == ("NO", [b"[ALREADYEXISTS] Target mailbox exists"])
    assert out["missing"] == ("NO", [b"[NONEXISTENT] No such mailbox"])
    assert out["into_itself"] == ("NO", [b"[CANNOT] A mailbox cannot be moved into itself"])

    def trash_now() -> list[bytes]:
        imap = login(service.ports["imap"])
        lines = imap.list('""', "Bin")[1]
        imap.logout()
        return lines  # type: ignore[return-value]

    assert await asyncio.to_thread(trash_now) == [b'(\\HasNoChildren \\Trash) "/" "Bin"']


async def test_rename_inbox_moves_its_messages_durably_and_leaves_inbox_empty(service, nats_conn) -> None:  # type: ignore[no-untyped-def]
    for subject in ("One", "Two"):
        await service.deliver(simple_message(subject))

    def run() -> tuple[str, list[bytes], list[bytes]]:
        imap = login(service.ports["imap"])
        typ = imap.rename("INBOX", '"Old mail"')[0]
        inbox = imap.status("INBOX", "(MESSAGES)")[1]
        old = imap.status('"Old mail"', "(MESSAGES)")[1]
        imap.logout()
        return typ, inbox, old

    typ, inbox, old = await asyncio.to_thread(run)
    assert typ == "OK"
    assert inbox == [b'"INBOX" (MESSAGES 0)']
    assert old == [b'"Old mail" (MESSAGES 2)']
    # The rename is in the change log: a rebuilt index shows the same thing.
    await rebuild_index(nats_conn.jetstream(), service.backend.mailboxes)
    assert len(await service.backend.index.messages(BOB, "INBOX")) == 0
    assert len(await service.backend.index.messages(BOB, "Old mail")) == 2


async def test_rfc_3501_recent_for_the_first_session_only_and_unselect_keeps_deleted(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("Fresh"))
    await service.deliver(simple_message("Also fresh"))

    def run() -> dict[str, object]:
        out: dict[str, object] = {}
        imap = login(service.ports["imap"])
        out["status_before"] = imap.status("INBOX", "(RECENT)")[1]
        imap.select("INBOX", readonly=True)  # EXAMINE sees them recent and takes nothing
        out["examine"] = imap.untagged_responses.get("RECENT")
        imap.select("INBOX")
        out["recent"] = imap.untagged_responses.get("RECENT")
        imap.store("1", "+FLAGS", "(\\Seen)")
        out["search"] = [imap.search(None, key)[1] for key in ("RECENT", "NEW", "OLD", "UNSEEN")]
        other = login(service.ports["imap"])  # a second session: not the first to see them
        other.select("INBOX")
        out["other"] = [other.untagged_responses.get("RECENT"), other.search(None, "RECENT")[1]]
        out["status_after"] = other.status("INBOX", "(RECENT)")[1]
        other.logout()
        imap.store("1", "+FLAGS", "(\\Recent \\Deleted)")
        out["flags"] = imap.fetch("1", "(FLAGS)")[1]
        out["unselect"] = imap._simple_command("UNSELECT")[0]
        out["status"] = imap.status("INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)")[1]
        imap.select("INBOX")
        out["still_there"] = imap.search(None, "DELETED")[1]
        imap.close()  # CLOSE, unlike UNSELECT, expunges
        out["after_close"] = imap.status("INBOX", "(MESSAGES)")[1]
        imap.logout()
        return out

    out = await asyncio.to_thread(run)
    assert out["status_before"] == [b'"INBOX" (RECENT 2)'] and out["examine"] == [b"2"]
    assert out["recent"] == [b"2"]
    assert out["search"] == [[b"1 2"], [b"2"], [b""], [b"2"]]  # NEW is RECENT UNSEEN
    assert out["other"] == [[b"0"], [b""]] and out["status_after"] == [b'"INBOX" (RECENT 0)']
    # \Recent is the server's: a client cannot set it, and it shows only to its first session.
    assert out["flags"] == [b"1 (FLAGS (\\Deleted \\Recent \\Seen))"]
    assert out["unselect"] == "OK"
    status = out["status"]
    assert isinstance(status, list)
    uidvalidity = status[0].split(b"UIDVALIDITY ")[1].split(b" ")[0]
    assert status == [b'"INBOX" (MESSAGES 2 RECENT 0 UIDNEXT 3 UIDVALIDITY ' + uidvalidity + b" UNSEEN 1)"]
    assert out["still_there"] == [b"1"]
    assert out["after_close"] == [b'"INBOX" (MESSAGES 1)']  # the \\Deleted one went


async def test_uid_search_dates_sizes_not_or_text_and_decoded_body(service) -> None:  # type: ignore[no-untyped-def]
    small = await service.deliver(simple_message("Small", body="short\r\n"))
    big = await service.deliver(simple_message("Big", body="x" * 3000 + "\r\n"))
    encoded_body = base64.b64encode("Le rendez-vous est confirmé à midi\n".encode()).decode()
    encoded = await service.deliver(
        (f"From: Carol <carol@example.net>\r\nTo: {BOB}\r\nSubject: Base64\r\n"
         "Date: Mon, 02 Mar 2026 08:00:00 +0100\r\nContent-Type: text/plain; charset=utf-8\r\n"
         f"Content-Transfer-Encoding: base64\r\n\r\n{encoded_body}\r\n").encode())
    today = datetime.datetime.now(datetime.UTC).date()
    day = lambda d: d.strftime("%d-%b-%Y")  # noqa: E731

    def run() -> dict[str, list[bytes]]:
        imap = login(service.ports["imap"])
        imap.select("INBOX")
        queries = {
            "since_today": f"SINCE {day(today)}",
            "before_today": f"BEFORE {day(today)}",
            "on_today": f"ON {day(today)}",
            "since_tomorrow": f"SINCE {day(today + datetime.timedelta(days=1))}",
            "larger": "LARGER 1000",
            "smaller": "SMALLER 1000",
            "not_larger": "NOT LARGER 1000",
            "or": "OR SUBJECT Small SUBJECT Big",
            "text_header": "TEXT carol",
            "body_decoded": "BODY rendez-vous",
            "body_not_header": "BODY carol",
            "sent_before": "SENTBEFORE 01-Jan-2027",
            "sent_on": "SENTON 02-Mar-2026",
            "uid_range": f"UID {small}:{big}",
        }
        out = {}
        for name, query in queries.items():
            typ, data = imap.uid("SEARCH", *query.split(" "))
            assert typ == "OK", (name, data)
            out[name] = data
        imap.literal = "confirmé".encode()  # imaplib sends non-ASCII only as a literal
        out["body_accented"] = imap.uid("SEARCH", "CHARSET", "UTF-8", "BODY")[1]
        imap.logout()
        return out

    out = await asyncio.to_thread(run)

    def uids(*values: int) -> list[bytes]:
        return [" ".join(str(v) for v in values).encode()]

    assert out["since_today"] == uids(small, big, encoded)
    assert out["before_today"] == [b""]
    assert out["on_today"] == uids(small, big, encoded)
    assert out["since_tomorrow"] == [b""]
    assert out["larger"] == uids(big)
    assert out["smaller"] == uids(small, encoded)
    assert out["not_larger"] == uids(small, encoded)
    assert out["or"] == uids(small, big)
    assert out["text_header"] == uids(encoded)
    assert out["body_decoded"] == uids(encoded)
    assert out["body_accented"] == uids(encoded)
    assert out["body_not_header"] == [b""]
    assert out["sent_before"] == uids(small, big, encoded)
    assert out["sent_on"] == uids(encoded)
    assert out["uid_range"] == uids(small, big)


async def test_fetch_multipart_sections_and_bodystructure(service) -> None:  # type: ignore[no-untyped-def]
    data = multipart_message()
    await service.deliver(data)

    def run() -> dict[str, object]:
        imap = login(service.ports["imap"])
        imap.select("INBOX")
        out: dict[str, object] = {}
        out["structure"] = imap.fetch("1", "(BODYSTRUCTURE)")[1]
        out["body"] = imap.fetch("1", "(BODY)")[1]
        for section in ("1", "1.MIME", "1.1", "1.2", "2", "2.MIME", "3"):
            out[section] = imap.fetch("1", f"(BODY.PEEK[{section}])")[1]
        out["unseen_after_peek"] = imap.search(None, "UNSEEN")[1]
        imap.fetch("1", "(BODY[1.1])")
        out["flags_after_fetch"] = imap.fetch("1", "(FLAGS)")[1]
        imap.logout()
        return out

    out = await asyncio.to_thread(run)
    plain = b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 13 1 NIL NIL NIL NIL)'
    html = b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 19 1 NIL NIL NIL NIL)'
    attachment_b64 = base64.encodebytes(PDF).replace(b"\n", b"\r\n")
    pdf = (b'("APPLICATION" "PDF" NIL NIL NIL "BASE64" %d NIL ("ATTACHMENT" ("FILENAME" "report.pdf")) NIL NIL)'
           % len(attachment_b64))
    assert out["structure"] == [
        b"1 (BODYSTRUCTURE ((" + plain + html + b' "ALTERNATIVE" ("BOUNDARY" "inner-b") NIL NIL NIL)' + pdf
        + b' "MIXED" ("BOUNDARY" "outer-b") NIL NIL NIL))']
    assert out["body"] == [b'1 (BODY ((("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 13 1)'
                           b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 19 1) "ALTERNATIVE")'
                           b'("APPLICATION" "PDF" NIL NIL NIL "BASE64" %d) "MIXED"))' % len(attachment_b64)]

    def content(section: str) -> bytes:
        value = out[section]
        assert isinstance(value, list) and isinstance(value[0], tuple), value
        return value[0][1]  # type: ignore[no-any-return]

    assert content("1.1") == b"Hello plain\r\n"
    assert content("1.2") == b"<p>Hello html</p>\r\n"
    assert content("1").startswith(b"--inner-b\r\n") and content("1").endswith(b"--inner-b--\r\n")
    mime = content("1.MIME")
    assert mime.startswith(b"Content-Type: multipart/alternative;") and mime.endswith(b'boundary="inner-b"\r\n\r\n')
    assert b"--outer-b\r\n" + mime + b"--inner-b\r\n" in data
    assert base64.b64decode(content("2")) == PDF
    assert b'Content-Disposition: attachment; filename="report.pdf"' in content("2.MIME")
    assert content("3") == b""
    # Every byte of a section is the stored byte: the parts add up to the message.
    assert content("1.1") in data and content("2") in data
    assert out["unseen_after_peek"] == [b"1"]
    assert out["flags_after_fetch"] == [b"1 (FLAGS (\\Recent \\Seen))"]  # BODY[1.1], unlike PEEK, sets \Seen


async def test_rfc_4315_appenduid_and_copyuid_codes(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("A"))
    await service.deliver(simple_message("B"))

    def run() -> tuple[object, ...]:
        imap = login(service.ports["imap"])
        imap.create("Kept")
        appended = imap.append("Kept", None, None, simple_message("C"))
        validity = imap.status("Kept", "(UIDVALIDITY)")[1]
        imap.select("INBOX")
        copied = imap.copy("1:2", "Kept")
        uid_copied = imap._simple_command("UID", "COPY", "2", "Kept")
        imap.logout()
        return appended, validity, copied, uid_copied

    appended, validity, copied, uid_copied = await asyncio.to_thread(run)
    assert isinstance(validity, list)
    v = validity[0].split(b"UIDVALIDITY ")[1].rstrip(b")")
    assert appended == ("OK", [b"[APPENDUID " + v + b" 1] APPEND completed"])
    assert copied == ("OK", [b"[COPYUID " + v + b" 1:2 2:3] COPY completed"])
    assert uid_copied == ("OK", [b"[COPYUID " + v + b" 2 4] UID COPY completed"])


async def test_pop3_capa_in_each_state_before_and_after_tls(service) -> None:  # type: ignore[no-untyped-def]
    def run() -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]]]:
        pop = SourcePOP3(service.ports["pop3"], UNTRUSTED_IP)
        before = pop.capa()
        pop.stls(service.client_tls())
        after_tls = pop.capa()
        pop.user(BOB)
        pop.pass_(BOB_PASSWORD)
        transaction = pop.capa()
        pop.quit()
        return before, after_tls, transaction

    before, after_tls, transaction = await asyncio.to_thread(run)
    common = {"TOP": [], "UIDL": [], "RESP-CODES": [], "AUTH-RESP-CODE": [], "PIPELINING": [],
              "IMPLEMENTATION": ["Rempart"]}
    assert before == common | {"SASL": ["SCRAM-SHA-256"], "STLS": []}
    assert after_tls == common | {"USER": [], "SASL": ["PLAIN", "SCRAM-SHA-256"]}
    assert transaction == common


async def test_pop3_pipelining_answers_every_command_in_order(service) -> None:  # type: ignore[no-untyped-def]
    await service.deliver(simple_message("Piped"))

    def run() -> list[bytes]:
        raw = raw_connect(service.ports["pop3"])
        raw.line()
        raw.send(f"USER {BOB}\r\nPASS {BOB_PASSWORD}\r\nSTAT\r\nLIST\r\nNOOP\r\nQUIT\r\n".encode())
        return raw.until(b"+OK Rempart POP3 signing off")

    lines = await asyncio.to_thread(run)
    size = len(simple_message("Piped"))
    assert lines == [b"+OK", b"+OK Logged in, 1 messages", f"+OK 1 {size}".encode(), b"+OK", f"1 {size}".encode(),
                     b".", b"+OK", b"+OK Rempart POP3 signing off"]


async def test_imapclient_parses_special_use_bodystructure_and_uidplus(service) -> None:  # type: ignore[no-untyped-def]
    """An independent client library's parsers accept what we send (LIST attributes, BODYSTRUCTURE
    with extension data, APPENDUID/COPYUID)."""
    import imapclient

    await service.deliver(multipart_message())

    def run() -> dict[str, object]:
        client = imapclient.IMAPClient("127.0.0.1", port=service.ports["imap"], ssl=False, timeout=10)
        client.login(BOB, BOB_PASSWORD)
        out: dict[str, object] = {"folders": {name: flags for flags, _delim, name in client.list_folders()}}
        client.select_folder("INBOX")
        fetched = client.fetch([1], ["BODYSTRUCTURE", "ENVELOPE"])
        structure = fetched[1][b"BODYSTRUCTURE"]
        out["multipart"] = structure.is_multipart
        out["attachment"] = structure[0][1]  # the second top-level part: the PDF
        out["subject"] = fetched[1][b"ENVELOPE"].subject
        out["append"] = client.append("Drafts", simple_message("Draft"), flags=[imapclient.DELETED])
        client.copy([1], "Trash")  # imapclient's UID COPY hands back imaplib's untagged data only
        out["trash"] = client.folder_status("Trash", ["MESSAGES"])
        client.logout()
        return out

    out = await asyncio.to_thread(run)
    assert out["folders"] == {
        "INBOX": (b"\\HasNoChildren",), "Drafts": (b"\\HasNoChildren", b"\\Drafts"),
        "Junk": (b"\\HasNoChildren", b"\\Junk"), "Sent": (b"\\HasNoChildren", b"\\Sent"),
        "Trash": (b"\\HasNoChildren", b"\\Trash")}
    assert out["multipart"] is True
    attachment = out["attachment"]
    assert isinstance(attachment, tuple)
    assert attachment[:2] == (b"APPLICATION", b"PDF")
    assert attachment[8] == (b"ATTACHMENT", (b"FILENAME", b"report.pdf"))
    assert out["subject"] == b"Report"
    assert isinstance(out["append"], bytes) and out["append"].startswith(b"[APPENDUID ")
    assert out["trash"] == {b"MESSAGES": 1}
