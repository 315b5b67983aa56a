"""Hostile messages against the MIME code that runs on the event loop (the SMTP edge summarises
every accepted message, FETCH renders sections): costs linear in the input, bounded header
parsing, and a summary that never raises. Timing checks are ratios (the input 8 times larger,
best of interleaved repeats): linear code is about 8 times slower, quadratic code about 64."""

from __future__ import annotations

import time
from collections.abc import Callable
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rempart.common import mime as M


def _ratio(make: Callable[[int], bytes], run: Callable[[bytes], object], n: int, repeats: int = 3) -> float:
    """Best time on an input 8 times larger over best time on the small one."""
    small, large = make(n), make(8 * n)
    best_small = best_large = float("inf")
    for _ in range(repeats):
        for data, is_large in ((small, False), (large, True)):
            started = time.perf_counter()
            run(data)
            spent = time.perf_counter() - started
            if is_large:
                best_large = min(best_large, spent)
            else:
                best_small = min(best_small, spent)
    return best_large / max(best_small, 1e-6)


# Finding 1: multipart delimiters are looked for at line starts only.

def test_multipart_split_is_linear_in_a_line_full_of_delimiters() -> None:
    def make(n: int) -> bytes:
        return b'Content-Type: multipart/mixed; boundary="b"\r\n\r\nx' + b"--b" * n + b"\r\n"

    assert _ratio(make, M.summarize, 20_000) < 24


def test_multipart_split_still_finds_delimiters_at_line_starts_only() -> None:
    data = (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\n\r\none --b --b\r\n--bb\r\n--b \t\r\n\r\ntwo\r\n--b--\r\n--b\r\n\r\nafter close\r\n")
    assert M.section_bytes(data, (1,), "", ()) == b"one --b --b\r\n--bb"
    assert M.section_bytes(data, (2,), "", ()) == b"two"
    assert M.section_bytes(data, (3,), "", ()) == b""
    bare = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\nx--b\r\n--b\r\n\r\nonly\r\n'
    assert M.section_bytes(bare, (1,), "", ()) == b"only\r\n"  # "x--b" is no delimiter


# Finding 2: address fields never make a summary fail, and are parsed within bounds.

@pytest.mark.parametrize("field", [b"(" * 500, b"a:" * 5000, b"<" * 20_000, b'"' + b'\\"' * 5000])
def test_hostile_address_field_is_nil_and_the_rest_of_the_envelope_is_right(field: bytes) -> None:
    data = b"Subject: still here\r\nFrom: Alice <alice@example.net>\r\nTo: " + field + b"\r\n\r\nbody\r\n"
    summary = M.summarize(data)
    assert summary.envelope.startswith('(NIL "still here" (("Alice" NIL "alice" "example.net"))')
    assert summary.bodystructure.startswith('("TEXT" "PLAIN"')


def test_long_address_field_keeps_its_first_hundred_addresses() -> None:
    to = b", ".join(b"User %d <user%d@example.com>" % (i, i) for i in range(400))  # over 8 KB
    envelope = M.summarize(b"To: " + to + b"\r\n\r\nx\r\n").envelope
    assert envelope.count("example.com") == 100
    assert '("User 0" NIL "user0" "example.com")' in envelope and '("User 99" NIL "user99" "example.com")' in envelope


def test_the_envelopes_of_a_digest_share_one_address_budget() -> None:
    calls: list[int] = []
    inner = b"From: a@example.net\r\nTo: " + b", ".join([b"b@example.net"] * 500) + b"\r\n\r\nhi\r\n"
    digest = (b'From: top@example.net\r\nContent-Type: multipart/digest; boundary="d"\r\n\r\n'
              + b"".join(b"--d\r\n\r\n" + inner for _ in range(200)) + b"--d--\r\n")
    original = M.email.utils.getaddresses

    def counting(values: list[str]) -> list[tuple[str, str]]:
        calls.append(sum(len(v) for v in values))
        return original(values)

    M.email.utils.getaddresses = counting  # type: ignore[assignment]
    try:
        summary = M.summarize(digest)
    finally:
        M.email.utils.getaddresses = original
    assert sum(calls) <= M.MAX_TREE_ADDRESS_CHARS
    assert summary.envelope.count("top") == 3  # the top envelope first, always whole


def test_hostile_parameters_and_charsets_never_make_a_summary_fail() -> None:
    for field in (b"Content-Type: text/plain; a*=x; a*0=y",
                  b"Content-Type: multipart/mixed; boundary*=x; boundary*0=y",
                  b"Content-Type: text/plain; name*=idna''abc",
                  b"Content-Disposition: attachment; filename*=raw-unicode-escape''%5Cud800x",
                  b"Content-Type: text/plain; a*" + b"1" * 5000 + b"=x",
                  b"Subject: =?idna?q?abc?="):
        data = field + b"\r\n\r\nbody\r\n"
        M.summarize(data)
        M.section_bytes(data, (1,), "", ())
    assert M.decode_words("=?idna?q?abc?=") == "abc"
    assert M.quote("x\ud800y\udcffz") == "{9}\r\nx\ufffdy\ufffdz"
    # Raw UTF-8 and a byte that is not UTF-8 in one field, even Content-Type (compat32's Header
    # for such a field cannot give its text): U+FFFD for the byte, the rest intact.
    mixed = ("Subject: é".encode() + b"\xff\r\n" + "Content-Type: text/plain; name=é".encode()
             + b"\xff\r\n\r\nbody\r\n")
    summary = M.summarize(mixed)
    assert "{5}\r\né\ufffd" in summary.envelope and '"NAME" {5}\r\né\ufffd' in summary.bodystructure
    assert M.section_bytes(mixed, (1,), "", ()) == b"body\r\n"


_HOSTILE = st.lists(st.sampled_from(["(", ")", "<", ">", "@", ":", ";", ",", '"', "\\", "=?utf-8?q?", "?=",
                                     "*", "'", "%", "=", "a", " ", "\r\n ", "\udcff", "\u00e9", "0"]),
                    max_size=80).map("".join)
_FIELDS = st.sampled_from(["From", "To", "Cc", "Sender", "Reply-To", "Subject", "Content-Type",
                           "Content-Disposition", "Content-Language", "Date"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_FIELDS, _HOSTILE), max_size=6), st.sampled_from(["", "multipart/mixed; ", "message/rfc822; "]))
def test_summary_never_raises(fields: list[tuple[str, str]], kind: str) -> None:
    head = "".join(f"{name}: {value}\r\n" for name, value in fields)
    data = (f"Content-Type: {kind}boundary=b\r\n" if kind else "").encode() + \
        head.encode("utf-8", "surrogateescape") + b"\r\n--b\r\n" + head.encode("utf-8", "surrogateescape") + b"\r\nx\r\n"
    M.summarize(data)


# Finding 3: Content-Type and Content-Disposition parameters in one pass, same result.

@pytest.mark.parametrize("field", ["Content-Type: text/plain", "Content-Disposition: attachment"])
def test_parameters_are_linear_in_a_quoted_value_full_of_semicolons(field: str) -> None:
    def make(n: int) -> bytes:
        return field.encode() + b'; a="' + b";" * n + b'"\r\n\r\nx\r\n'

    assert _ratio(make, M.summarize, 2_500) < 24


_NORMAL_TYPES = [
    'text/plain; charset="utf-8"; format=flowed',
    'multipart/mixed;\n boundary="----=_Part_1_2.3"',
    "application/pdf; name*0*=utf-8''r%C3%A9sum; name*1*=%C3%A9.pdf",
    'text/plain; title*=us-ascii\'en\'This%20is%20%2A%2A%2Afun%2A%2A%2A; x="a;b\\"c;d"',
    'text/plain; a="unclosed; b=c',
    "image/png;;name=x; ;",
    'attachment; filename="a \\\\" b.txt"',
]


@pytest.mark.parametrize("value", _NORMAL_TYPES)
def test_parameters_are_those_of_the_email_package(value: str) -> None:
    message = M._HEADER_PARSER.parsestr(f"Content-Type: {value}\n\n")
    assert M._params(message, "content-type") == message.get_params(header="content-type")
    assert M._boundary(message) == message.get_boundary()


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=list(";\"\\= a*0'%bN\t"), max_size=40))
def test_parameters_match_the_email_package_on_any_short_field(value: str) -> None:
    message = M._HEADER_PARSER.parsestr(f"Content-Type: {value}\n\n")
    try:
        expected = message.get_params(header="content-type") or []
        boundary = message.get_boundary()
    except (TypeError, ValueError, LookupError):
        return  # where the email package raises, the summary shows less instead
    assert M._params(message, "content-type") == expected
    assert M._boundary(message) == boundary


# Finding 7: a field's continuation lines are joined once.

def test_header_lines_is_linear_in_continuation_lines() -> None:
    def make(n: int) -> bytes:
        return b"X-A: a\r\n" + b" b\r\n" * n + b"Subject: s\r\n\r\n"

    assert _ratio(make, M.header_lines, 5_000) < 24
    assert M.header_lines(make(2)) == [("X-A", b"X-A: a\r\n b\r\n b\r\n"), ("SUBJECT", b"Subject: s\r\n")]


# Finding 8: how much of a header block the summary parses is bounded.

def _count_parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    parsed: list[str] = []
    parser = M._HEADER_PARSER

    class Counting:
        def parsestr(self, text: str) -> Message:
            parsed.append(text)
            return parser.parsestr(text)

    monkeypatch.setattr(M, "_HEADER_PARSER", Counting())
    return parsed


def test_a_header_block_is_parsed_up_to_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = _count_parsed(monkeypatch)
    data = b"Subject: first\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(80_000)) + b"Cc: late@x\r\n\r\nx\r\n"
    summary = M.summarize(data)
    assert sum(text.count("\n") for text in parsed) <= M.MAX_HEADER_LINES
    assert summary.envelope.startswith('(NIL "first"') and "late" not in summary.envelope
    assert summary.size == len(data) and summary.header == b""  # the block itself is over the index's limit


def test_the_parts_of_a_message_share_one_header_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = _count_parsed(monkeypatch)
    part = b"--b\r\n" + b"X-H: v\r\n" * 2000 + b"\r\nbody\r\n"
    data = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + part * 100 + b"--b--\r\n"
    root = M.structure(data)
    assert sum(text.count("\n") for text in parsed) <= M.MAX_TREE_HEADER_LINES
    assert len(root.children) == 100  # offsets, hence sections, are all still there
    assert M.section_bytes(data, (100,), "", ()) == b"body"


# Review finding 4: one MIME tree for all the items of one FETCH.

def test_sections_build_the_tree_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    original = M.structure

    def counting(data: bytes) -> M.MimePart:
        built.append(len(data))
        return original(data)

    monkeypatch.setattr(M, "structure", counting)
    data = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\npart\r\n" * 3 + b"--b--\r\n"
    sections = M.Sections(data)
    assert sections.get((), "HEADER", ()) == b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    assert built == []  # no part named: no tree
    assert [sections.get((2,), "", ()) for _ in range(50)] == [b"part"] * 50
    assert sections.get((3,), "MIME", ()) == b"\r\n"
    assert built == [len(data)]
