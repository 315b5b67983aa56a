"""The MIME tree behind FETCH sections and BODYSTRUCTURE: exact bytes by offset, encapsulated
messages, malformed multiparts, and bounds against hostile nesting."""

from __future__ import annotations

import base64
import time

from rempart.common import mime as M

INNER = (b"From: Carol <carol@example.net>\r\nSubject: Inner\r\n\r\nInner body\r\n")
FORWARD = (
    b"From: Alice <alice@example.net>\r\nSubject: Fwd\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
    b"--b1  \r\nContent-Type: message/rfc822\r\n\r\n" + INNER +
    b"--b1--\r\nepilogue\r\n"
)


def test_sections_of_an_encapsulated_message() -> None:
    assert M.section_bytes(FORWARD, (1,), "", ()) == b"See below."
    assert M.section_bytes(FORWARD, (2,), "", ()) == INNER[:-2]  # the CRLF before "--b1--" is the delimiter's
    assert M.section_bytes(FORWARD, (2,), "HEADER", ()) == b"From: Carol <carol@example.net>\r\nSubject: Inner\r\n\r\n"
    assert M.section_bytes(FORWARD, (2,), "HEADER.FIELDS", ("SUBJECT",)) == b"Subject: Inner\r\n\r\n"
    assert M.section_bytes(FORWARD, (2,), "TEXT", ()) == b"Inner body"
    assert M.section_bytes(FORWARD, (2, 1), "", ()) == b"Inner body"
    assert M.section_bytes(FORWARD, (2,), "MIME", ()) == b"Content-Type: message/rfc822\r\n\r\n"
    assert M.section_bytes(FORWARD, (1, 1), "", ()) == b""  # a text part has no parts
    assert M.section_bytes(FORWARD, (3,), "", ()) == b""


def test_bodystructure_of_message_rfc822_carries_envelope_and_inner_structure() -> None:
    structure = M.bodystructure(FORWARD, extensible=False)
    assert structure == (
        '(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 10 1)'
        f'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" {len(INNER) - 2} (NIL "Inner" (("Carol" NIL "carol" "example.net")) '
        '(("Carol" NIL "carol" "example.net")) (("Carol" NIL "carol" "example.net")) NIL NIL NIL NIL NIL) '
        '("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 10 1) 4) "MIXED")'
    )


def test_multipart_without_close_delimiter_and_lookalike_boundaries() -> None:
    data = (b'Content-Type: multipart/mixed; boundary="ab"\r\n\r\n'
            b"--ab\r\n\r\nfirst\r\n--abc\r\nnot a delimiter\r\n--ab\r\n\r\nlast, never closed\r\n")
    root = M.structure(data)
    assert len(root.children) == 2
    assert M.section_bytes(data, (1,), "", ()) == b"first\r\n--abc\r\nnot a delimiter"
    assert M.section_bytes(data, (2,), "", ()) == b"last, never closed\r\n"
    empty = b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\nno parts at all\r\n'
    assert '("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "MIXED"' in M.bodystructure(empty)


def test_nesting_and_part_bombs_stay_bounded() -> None:
    deep = b""
    for level in range(1000):
        deep += b'Content-Type: multipart/mixed; boundary="d%d"\r\n\r\n--d%d\r\n' % (level, level)
    deep += b"\r\nbottom\r\n"
    wide = b'Content-Type: multipart/mixed; boundary="w"\r\n\r\n' + b"--w\r\n\r\nx\r\n" * 20000 + b"--w--\r\n"
    started = time.monotonic()
    deep_root, wide_root = M.structure(deep), M.structure(wide)
    M.bodystructure(deep)
    M.bodystructure(wide)
    assert time.monotonic() - started < 2.0

    def depth(part: M.MimePart) -> int:
        return 1 + max((depth(c) for c in part.children), default=0)

    assert depth(deep_root) <= M.MAX_MIME_DEPTH + 1
    assert len(wide_root.children) < M.MAX_MIME_PARTS


def test_search_text_decodes_quoted_printable_and_charsets() -> None:
    data = (b"Subject: QP\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=E9 cr=E8me\r\n")
    assert "café crème" in M.text_for_search(data, body_only=True).casefold()
    assert "subject: qp" in M.text_for_search(data, body_only=False).casefold()


def test_r_mbx_7_envelope_shows_raw_utf8_headers_and_replaces_only_invalid_bytes() -> None:
    data = "From: José <jose@example.org>\r\nSubject: Café crème\r\n\r\nbody\r\n".encode()
    envelope = M.summarize(data).envelope
    assert '{12}\r\nCafé crème' in envelope and "{5}\r\nJosé NIL" in envelope
    broken = M.summarize(b"Subject: x\xffy\r\n\r\nbody\r\n").envelope
    assert "{5}\r\nx\ufffdy" in broken  # one bad byte, one U+FFFD; the rest intact


def test_r_mbx_7_encoded_words_decoded_for_matching() -> None:
    assert M.decode_words("=?iso-8859-1?q?Caf=E9?= et =?utf-8?b?Y3LDqG1l?=") == "Café et crème"
    assert M.decode_words("=?x-unknown?q?abc?=") == "abc"
    assert M.decode_words("plain") == "plain"


def test_search_text_is_linear_for_hostile_content_type_parameters() -> None:
    """A Content-Type with 20,000 ";" inside an open quote took the email package's parameter
    parser 0.8 s (quadratic), at every SEARCH of the mailbox; the text must still be found."""
    body = base64.b64encode(b"the zebra crossing\r\n").decode()
    hostile = ('Content-Type: text/plain; charset=utf-8; a="' + ";" * 20_000 + '"\r\n'
               "Content-Transfer-Encoding: base64\r\n\r\n" + body[:-1].rstrip("=") + "\r\n").encode()
    small = hostile.replace(b";" * 20_000, b";" * 2_000)
    timings = []
    for data in (small, hostile):
        started = time.perf_counter()
        for _ in range(3):
            text = M.text_for_search(data, body_only=True)
        timings.append(time.perf_counter() - started)
        assert "zebra crossing" in text  # base64 without its padding still decodes
    assert timings[1] < 0.3 and timings[1] < 30 * max(timings[0], 1e-4), timings  # 10x the input


def test_search_text_walks_nested_parts_and_skips_what_is_not_text() -> None:
    data = (b"Subject: nest\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain; charset=\"iso-8859-1\"\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nfirst caf=E9\r\n"
            b"--b1\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode(b"hidden png words") + b"\r\n"
            b"--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner words\r\n"
            b"--b1--\r\n")
    text = M.text_for_search(data, body_only=True)
    assert "first café" in text and "inner words" in text and "hidden png" not in text
    assert text.index("first") < text.index("inner")
    assert "Subject: nest" in M.text_for_search(data, body_only=False)
