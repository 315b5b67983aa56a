"""The IMAP command tokenizer and its helpers (rempart.imap_pop.imapproto)."""

from __future__ import annotations

import pytest

from rempart.common.mime import quote
from rempart.imap_pop.imapproto import (
    Atom,
    FetchItem,
    ImapSyntaxError,
    compress_numbers,
    format_ranges,
    in_sequence_set,
    intersect_ranges,
    literal_at_end,
    missing_numbers,
    number_ranges,
    parse_fetch_items,
    parse_number,
    parse_sequence_set,
    split_tag,
    tokenize,
    wildcard_match,
)


def test_tokenize_atoms_quoted_and_lists() -> None:
    tokens = tokenize([b'a1 LOGIN "bob@example.org" "say \\"hi\\" \\\\ now"'])
    assert tokens == ["a1", "LOGIN", "bob@example.org", 'say "hi" \\ now']
    assert isinstance(tokens[0], Atom) and not isinstance(tokens[2], Atom)
    assert tokenize([b"t STORE 1:* +FLAGS.SILENT (\\Seen \\Deleted)"])[4] == ["\\Seen", "\\Deleted"]


def test_tokenize_fetch_attribute_with_brackets_is_one_atom() -> None:
    tokens = tokenize([b"t FETCH 1 (UID BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100> FLAGS)"])
    assert tokens[3] == ["UID", "BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>", "FLAGS"]


def test_tokenize_literals_between_lines() -> None:
    parts = [b"a LOGIN {3}", b"bob", b" {4+}", b"p\r\nw", b""]
    assert tokenize(parts) == ["a", "LOGIN", b"bob", b"p\r\nw"]


@pytest.mark.parametrize(
    "line",
    [b'a LOGIN "unterminated', b"a (NOOP", b"a NOOP)", b'a X "bad\\q"', b"a FETCH 1 BODY[TEXT", b"a X {3}"],
)
def test_tokenize_rejects_malformed(line: bytes) -> None:
    with pytest.raises(ImapSyntaxError):
        tokenize([line])


def test_tokenize_limits_nesting() -> None:
    with pytest.raises(ImapSyntaxError):
        tokenize([b"a X " + b"(" * 20 + b")" * 20])


def test_literal_marker_at_end_of_line() -> None:
    marker = literal_at_end(b"a APPEND INBOX {310}")
    assert marker is not None and (marker.size, marker.synchronising) == (310, True)
    plus = literal_at_end(b"a APPEND INBOX {5+}")
    assert plus is not None and not plus.synchronising
    assert literal_at_end(b"a NOOP {5} x") is None
    assert literal_at_end(b"a X {99999999999}") is None  # more than 10 digits is no literal


def test_split_tag() -> None:
    assert split_tag(b"A001 uid fetch 1 FLAGS") == ("A001", "UID")
    for bad in (b"", b"* NOOP", b"+ X", b"a", b'"a" NOOP'):
        with pytest.raises(ImapSyntaxError):
            split_tag(bad)


def test_sequence_sets() -> None:
    ranges = parse_sequence_set("1:3,7,9:*", 12)
    assert [n for n in range(1, 13) if in_sequence_set(n, ranges)] == [1, 2, 3, 7, 9, 10, 11, 12]
    assert parse_sequence_set("*:4", 2) == [(2, 4)]
    for bad in ("0", "1:", "a", "1,,2", "1:2:3", "99999999999"):
        with pytest.raises(ImapSyntaxError):
            parse_sequence_set(bad, 5)
    assert compress_numbers([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"


def test_fetch_items() -> None:
    assert [i.name for i in parse_fetch_items(Atom("FAST"))] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    items = parse_fetch_items([Atom("BODY.PEEK[HEADER.FIELDS (From Subject)]<0.50>"), Atom("BODY[1.MIME]")])
    assert items[0] == FetchItem("BODY.PEEK", "HEADER.FIELDS", ("FROM", "SUBJECT"), (), (0, 50), True)
    assert items[0].response_name() == "BODY[HEADER.FIELDS (FROM SUBJECT)]<0>"
    assert items[1].response_name() == "BODY[1.MIME]"
    for bad in ("BODY[BOGUS]", "BODY[HEADER.FIELDS]", "RFC822.BOGUS", "BODY[MIME]", "BODY[]<0.0>"):
        with pytest.raises(ImapSyntaxError):
            parse_fetch_items(Atom(bad))


def test_quote_and_wildcards() -> None:
    assert quote(None) == "NIL"
    assert quote('a "b"') == '"a \\"b\\""'
    assert quote("line\r\nbreak") == "{11}\r\nline\r\nbreak"
    assert wildcard_match("*", "Archive/2024")
    assert not wildcard_match("%", "Archive/2024")
    assert wildcard_match("Arch%", "Archive")


def _reference_match(pattern: str, name: str) -> bool:
    import re

    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, flags=re.DOTALL) is not None


def test_wildcard_match_agrees_with_the_rfc_3501_meaning_on_every_small_case() -> None:
    import itertools

    names = ["".join(p) for n in range(5) for p in itertools.product("ab/", repeat=n)]
    patterns = ["".join(p) for n in range(5) for p in itertools.product("a/*%", repeat=n)]
    for pattern in patterns:
        for name in names:
            assert wildcard_match(pattern, name) == _reference_match(pattern, name), (pattern, name)


@pytest.mark.timeout(10)
def test_list_pattern_that_backtracks_a_regex_is_linear() -> None:
    # Issue 9: LIST "" "**********x" against a 60-character name blocked the event loop for minutes.
    name = "a" * 60
    for pattern in ("*" * 10 + "x", "%*" * 20 + "x", "*a" * 30 + "x", "%" * 500 + "x"):
        assert not wildcard_match(pattern, name)
    assert wildcard_match("%*" * 20 + "a", name)


def test_numbers_are_ascii_digits_within_63_bits() -> None:
    assert parse_number("0") == 0 and parse_number("9223372036854775807") == 2**63 - 1
    # Unicode digits pass str.isdigit() and then break int(); a 10,000-digit number costs time.
    for bad in ("²", "١٢", "", "-1", "+1", "1e3", "9223372036854775808", "9" * 10_000):
        assert parse_number(bad) is None, bad


def test_ranges_for_vanished_cost_what_is_present() -> None:
    assert number_ranges([7, 1, 3, 2, 3]) == [(1, 3), (7, 7)]
    assert compress_numbers([7, 1, 3, 2]) == "1:3,7"
    assert missing_numbers([2, 3, 9], 12) == [(1, 1), (4, 8), (10, 11)]
    assert missing_numbers([], 1) == [] and missing_numbers([1, 2], 3) == []
    # The span is 4 billion; the work is the three numbers present.
    assert missing_numbers([5, 6, 7], 2**32) == [(1, 4), (8, 2**32 - 1)]
    assert intersect_ranges([(1, 4), (8, 20)], [(3, 10), (15, 15)]) == [(3, 4), (8, 10), (15, 15)]
    assert format_ranges([(1, 4), (8, 8)]) == "1:4,8"


def test_non_ascii_digits_are_syntax_errors_not_crashes() -> None:
    # Found by the fuzz test: "²" passes str.isdigit() and then breaks int().
    for bad in ("²", "1:²", "\u0661"):
        with pytest.raises(ImapSyntaxError):
            parse_sequence_set(bad, 10)
    with pytest.raises(ImapSyntaxError):
        parse_fetch_items(Atom("BODY[1.²]"))
    with pytest.raises(ImapSyntaxError):
        parse_fetch_items(Atom("BODY[" + "1" * 5000 + "]"))
