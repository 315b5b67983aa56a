"""Fuzzing what a logged-in client controls (issue 9): LIST patterns against folder names, and the
command parser (tokenizer, sequence sets, FETCH items, SEARCH keys). 1,000 inputs each with
hypothesis: never an exception other than a protocol error, never a step over 100 ms (a
backtracking matcher took minutes on one pattern); and the matcher's time measured growing in
proportion to the folder name, on the pattern shape that made the backtracking one explode."""

from __future__ import annotations

import datetime
import itertools
import timeit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rempart.imap_pop.imap_search import SearchParser
from rempart.imap_pop.imapproto import (
    ImapSyntaxError,
    No,
    parse_fetch_items,
    parse_number,
    parse_sequence_set,
    split_tag,
    tokenize,
    wildcard_match,
)

# Hypothesis generation costs most of each example: 1,000 a test keeps the fuzzing to seconds.
FUZZ = settings(max_examples=1_000, deadline=datetime.timedelta(milliseconds=100),
                suppress_health_check=[HealthCheck.too_slow])

# Folder names as users make them, and patterns heavy in wildcards (the backtracking shape).
NAME = st.text(alphabet="ab/x.*%", min_size=0, max_size=200)
PATTERN = st.text(alphabet="ab/x*%", min_size=0, max_size=420)
# IMAP command text: the bytes that matter to the tokenizer, and some others.
COMMAND = st.text(alphabet='a1 ()[]<>{}"\\*%:,.+-\r\nUIDFETCHBODYSEARCHNOTOR\x00é²', max_size=300)


@FUZZ
@given(pattern=PATTERN, name=NAME)
def test_list_pattern_matching_is_linear(pattern: str, name: str) -> None:
    assert isinstance(wildcard_match(pattern, name), bool)


def test_list_pattern_time_grows_linearly_with_the_name() -> None:
    # Names 8 times longer against the wildcard-heavy shape: a linear matcher takes about 8 times
    # as long, a quadratic one 64 times, a backtracking one astronomically more. A ratio, so it
    # holds on a slow or busy machine; the best of interleaved repeats filters out pauses.
    pattern = "*%" * 10 + "x"
    short, long = "a" * 25, "a" * 200  # 200: the longest folder name

    def timed(name: str) -> float:
        return timeit.timeit(lambda: wildcard_match(pattern, name), number=3)

    timings = [(timed(short), timed(long)) for _ in range(9)]
    ratio = min(t for _, t in timings) / min(t for t, _ in timings)
    assert ratio < 24, timings
    assert not wildcard_match(pattern, long) and wildcard_match(pattern, long + "x")


def test_list_pattern_time_grows_at_most_linearly_with_the_pattern() -> None:
    # Patterns 8 times longer made of wildcard runs ("*%*%..."): walking each run from each of its
    # positions cost the square of the pattern's length (64 times; 2.4 s for one 400-character
    # pattern against a 200-character name, a LIST any logged-in client may send).
    name = "a" * 200

    def timed(pattern: str) -> float:
        return timeit.timeit(lambda: wildcard_match(pattern, name), number=3)

    short, long = "*%" * 25 + "x", "*%" * 200 + "x"
    timings = [(timed(short), timed(long)) for _ in range(9)]
    ratio = min(t for _, t in timings) / min(t for t, _ in timings)
    assert ratio < 24, timings
    assert not wildcard_match(long, name) and wildcard_match(long, name + "x")
    # What a run means is kept: "%" stops at the delimiter, a run with a "*" does not.
    assert not wildcard_match("%%%x", "a/x") and wildcard_match("%%*x", "a/x") and wildcard_match("%*%x", "a/b/x")
    assert wildcard_match("a%%", "ab") and not wildcard_match("a%%", "a/b") and wildcard_match("a*%", "a/b")


def test_list_pattern_worst_case_answers_at_once() -> None:
    # The pattern that took minutes with regular expressions: answered, and right.
    assert not wildcard_match("*" * 400 + "x", "a" * 200)
    assert wildcard_match("*" * 400 + "a", "a" * 200)


@FUZZ
@given(text=COMMAND)
def test_command_parser_raises_only_protocol_errors(text: str) -> None:
    line = text.encode("utf-8")
    try:
        split_tag(line)
        tokens = tokenize([line])
    except ImapSyntaxError:
        return
    for token in tokens[2:]:
        try:
            parse_fetch_items(token)
        except ImapSyntaxError:
            pass
    try:
        SearchParser(tokens[2:], 1000, 5000).parse()
    except (ImapSyntaxError, No):
        pass


@FUZZ
@given(text=st.text(alphabet="0123456789:*,", max_size=200), largest=st.integers(0, 2**32 - 1))
def test_sequence_sets_parse_or_refuse(text: str, largest: int) -> None:
    try:
        ranges = parse_sequence_set(text, largest)
    except ImapSyntaxError:
        return
    assert all(low <= high for low, high in ranges)
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))


@FUZZ
@given(text=st.text(max_size=40))
def test_numbers_parse_or_refuse(text: str) -> None:
    value = parse_number(text)
    assert value is None or 0 <= value < 2**63
