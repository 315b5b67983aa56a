"""One way to page every list of the admin API (R-ADM-2): ``limit`` and an opaque ``cursor``.

A list answers at most ``limit`` items (bounded per route) and ``next_cursor``: null at the end,
else the value to send as ``cursor`` for the next page. A cursor names the last item shown (and
the list it belongs to), never an offset, so that items added or removed meanwhile neither
repeat nor skip the others. A cursor of another list, or garbage, is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

from fastapi import Query

from rempart.admin_api.backend import invalid

T = TypeVar("T")
MAX_CURSOR = 600
DEFAULT_LIMIT = 100
MAX_PAGE = 1000
CursorQuery = Annotated[
    str | None, Query(max_length=MAX_CURSOR, description="next_cursor of the previous page; omit for the first")
]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="At most this many items (1-1000)")]


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
        raise invalid("Not a cursor of this list", "cursor", "not a next_cursor from this list", "query")
    return value


def page_sorted(kind: str, items: Sequence[T], key: Callable[[T], str], cursor: str | None,
                limit: int) -> tuple[list[T], str | None]:
    """A page of ``items`` sorted by ``key``: those after the cursor's key, and the next cursor."""
    after = decode_cursor(kind, cursor)
    ordered = sorted(items, key=key)
    rest = [item for item in ordered if after is None or key(item) > after]
    shown = rest[:limit]
    more = len(rest) > limit
    return shown, encode_cursor(kind, key(shown[-1])) if more and shown else None
