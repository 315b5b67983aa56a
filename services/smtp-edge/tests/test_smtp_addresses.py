"""The edge's fast reading of MAIL/RCPT paths answers exactly what aiosmtpd's parser answers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from rempart.smtp_edge.session import EdgeSMTP

Answer = tuple[str | None, str | None] | str


def both(arg: str, local_part_limit: int = 0) -> tuple[Answer, Answer]:
    """The edge's answer and aiosmtpd's (or the exception each raised: aiosmtpd's parser raises
    IndexError on a few truncated inputs, which aiosmtpd turns into a 500 reply)."""
    edge = EdgeSMTP.__new__(EdgeSMTP)
    edge.local_part_limit = local_part_limit

    def answer(read: Callable[[str], tuple[str | None, str | None]]) -> Answer:
        try:
            return read(arg)
        except Exception as exc:  # compared, not hidden
            return type(exc).__name__

    return answer(edge._getaddr), answer(lambda a: SMTP._getaddr(edge, a))


@pytest.mark.parametrize("arg", [
    "<peer@example.test>", "<peer@example.test> SIZE=100", "<peer@example.test>  SIZE=1 BODY=8BITMIME",
    "<a.b+c%d!e@x.test>", "<user%remote@local.test>", "<peer@example.test> ", "<>", "<> SIZE=5",
    "< peer@example.test >", '<"a b"@x.test>', "<@relay:peer@example.test>", "<peer@[127.0.0.1]>",
    "<a..b@x.test>", "<.a@x.test>", "<a.@x.test>", "<a@x..test>", "<a@-x.test>", "peer@example.test",
    "<peer@example.test>SIZE=1", "<peer@example.test>\tSIZE=1", "<pe er@x.test>", "<p@x.test", "<é@x.test>",
])
def test_simple_and_odd_paths_read_alike(arg: str) -> None:
    fast, slow = both(arg)
    assert fast == slow


def test_the_local_part_limit_applies_on_the_fast_path() -> None:
    assert both("<" + "a" * 65 + "@x.test>", local_part_limit=64) == ((None, None), (None, None))


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="ab.@<>-+%!\"' \t[]:,()\\=xyz1é", max_size=30))
def test_any_path_reads_alike(arg: str) -> None:
    fast, slow = both(arg)
    assert fast == slow
