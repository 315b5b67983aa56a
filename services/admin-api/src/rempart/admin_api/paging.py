"""One way to page every list of the admin API (R-ADM-2): ``limit`` and an opaque ``cursor``.

A list answers at most ``limit`` items (bounded per route) and ``next_cursor``: null at the end,
else the value to send as ``cursor`` for the next page. A cursor names the last item shown (and
the list it belongs to), never an offset, so that items added or removed meanwhile neither
repeat nor skip the others. A cursor of another list, or garbage, is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, TypeVar

from fastapi import Query

from rempart.admin_api.backend import invalid
from rempart.admin_api.models import MAX_ADDRESS

T = TypeVar("T")
MAX_CURSOR = 600
DEFAULT_LIMIT = 100
MAX_PAGE = 1000
CursorQuery = Annotated[
    str | None, Query(max_length=MAX_CURSOR, description="next_cursor of the previous page; omit for the first")
]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="At most this many items (1-1000)")]
# ``q`` on the lists of names (domains, accounts, aliases, domain aliases): see :func:`containing`.
NameFilter = Annotated[str | None, Query(max_length=MAX_ADDRESS, description="Only names that contain this")]


def containing(names: Iterable[str], q: str | None) -> list[str]:
    """The names that contain ``q`` (trimmed, case-insensitive: names are stored lower-case); all without."""
    wanted = (q or "").strip().lower()
    return [name for name in names if wanted in name]


def encode_cursor(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}\0{value}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> str | None:
    """The value a cursor of list ``kind`` names; None without a cursor; 422 for anything else."""
    if cursor is None:
        return None
    try:
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error):
        decoded = ""
    found, sep, value = decoded.partition("\0")
    if not sep or found != kind:
        raise _refused()
    return value


NOT_A_CURSOR = "not a next_cursor from this list"
_SEQUENCE = re.compile(r"[0-9]{1,20}")


def _refused() -> Exception:
    return invalid("Not a cursor of this list", "cursor", NOT_A_CURSOR, "query")


def decode_score_cursor(kind: str, cursor: str | None) -> tuple[float, str] | None:
    """(score, member) of a cursor ``encode_cursor(kind, f"{score!r} {member}")`` names; None
    without a cursor. The score must be a finite number: ``nan`` or ``inf`` would reach Redis
    and fail there (a 503), so they are a 422 naming ``cursor`` like any other garbage."""
    value = decode_cursor(kind, cursor)
    if value is None:
        return None
    score_text, sep, member = value.partition(" ")
    try:
        score = float(score_text)
    except ValueError:
        raise _refused() from None
    if not sep or not math.isfinite(score):
        raise _refused()
    return score, member


def decode_seq_cursor(kind: str, cursor: str | None) -> int | None:
    """The stream sequence (1 or more, ASCII digits) a cursor of list ``kind`` names; None without."""
    value = decode_cursor(kind, cursor)
    if value is None:
        return None
    if not _SEQUENCE.fullmatch(value) or int(value) < 1:
        raise _refused()
    return int(value)


def page_sorted(kind: str, items: Sequence[T], key: Callable[[T], str], cursor: str | None,
                limit: int) -> tuple[list[T], str | None]:
    """A page of ``items`` sorted by ``key``: those after the cursor's key, and the next cursor."""
    after = decode_cursor(kind, cursor)
    ordered = sorted(items, key=key)
    rest = [item for item in ordered if after is None or key(item) > after]
    shown = rest[:limit]
    more = len(rest) > limit
    return shown, encode_cursor(kind, key(shown[-1])) if more and shown else None
