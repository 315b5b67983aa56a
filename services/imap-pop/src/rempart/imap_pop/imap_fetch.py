"""FETCH rendering (RFC 3501 7.4.2): which items the index's summary answers without reading the
message (R-MBX-2), the windows bodies are read in (R-MBX-6), and each item's bytes."""

from __future__ import annotations

import datetime

from rempart.common import mime as M
from rempart.common.mailstore import IndexedMessage
from rempart.imap_pop.imap_search import MONTHS
from rempart.imap_pop.imapproto import FetchItem, literal

# FETCH (and SEARCH) read message bodies a window at a time: a few reads in flight, a bounded number of
# bytes held, and the socket drained past a high-water mark (R-MBX-6).
FETCH_READS_IN_FLIGHT = 100  # a window at once: one flush of requests, not one each
FETCH_WINDOW_MESSAGES = 100
FETCH_WINDOW_BYTES = 4 * 1024 * 1024
FETCH_WRITE_HIGH_WATER = 256 * 1024
HEADER_SECTIONS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT")


class FetchPlan:
    """What a FETCH's items need: the index's summary, the message body, or neither."""

    def __init__(self, items: list[FetchItem]) -> None:
        self.needs_body = False
        self.needs_summary = False
        self.needs_header = False
        for item in items:
            if item.name in ("FLAGS", "UID", "INTERNALDATE", "MODSEQ"):
                continue
            if item.name == "RFC822.SIZE":
                continue  # the index keeps the size
            if item.name == "ENVELOPE" or (item.name in ("BODY", "BODYSTRUCTURE")
                                                            and not item.bracketed):
                self.needs_summary = True
            elif item.name == "RFC822.HEADER" or (item.bracketed and not item.part
                                                   and item.section in HEADER_SECTIONS):
                self.needs_summary = self.needs_header = True
            else:
                self.needs_body = True


def summary_answers(summary: M.MessageSummary | None, plan: FetchPlan) -> bool:
    """Whether the kept summary answers every item (a huge header block is not kept)."""
    return summary is not None and (not plan.needs_header or summary.has_header)


def header_from_summary(summary: M.MessageSummary | None, data: bytes) -> bool:
    """Header sections come from the summary unless the body was read anyway."""
    return summary is not None and summary.has_header and not data


def read_windows(
    selected: list[tuple[int, IndexedMessage]], reads_bodies: bool
) -> list[list[tuple[int, IndexedMessage]]]:
    windows: list[list[tuple[int, IndexedMessage]]] = []
    current: list[tuple[int, IndexedMessage]] = []
    held = 0
    for entry in selected:
        size = entry[1].size if reads_bodies else 0
        if current and (len(current) >= FETCH_WINDOW_MESSAGES or held + size > FETCH_WINDOW_BYTES):
            windows.append(current)
            current, held = [], 0
        current.append(entry)
        held += size
    if current:
        windows.append(current)
    return windows



def flags_text(flags: frozenset[str]) -> str:
    return "(" + " ".join(sorted(flags)) + ")"


def internal_date(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return f"{moment.day:02d}-{MONTHS[moment.month - 1]}-{moment.year:04d} {moment:%H:%M:%S} +0000"


def render_item(item: FetchItem, message: IndexedMessage, data: bytes,
                summary: M.MessageSummary | None, sections: M.Sections | None = None) -> bytes:
    """One FETCH data item of ``message`` (RFC 3501 7.4.2), from the index where it can.
    ``sections``: the message's sections for every item of one FETCH (its MIME tree built once)."""
    name = item.name
    if name == "UID":
        return f"UID {message.uid}".encode()
    if name == "FLAGS":
        return f"FLAGS {flags_text(message.flags)}".encode()
    if name == "MODSEQ":
        return f"MODSEQ ({message.modseq})".encode()  # RFC 7162 3.1.4
    if name == "RFC822.SIZE":
        return f"RFC822.SIZE {summary.size if summary is not None else message.size}".encode()
    if name == "INTERNALDATE":
        return f'INTERNALDATE "{internal_date(message.internal_date_ms)}"'.encode()
    if name == "ENVELOPE" and summary is not None:
        return f"ENVELOPE {summary.envelope}".encode()
    if name in ("BODYSTRUCTURE", "BODY") and not item.bracketed and summary is not None:
        return f"{name} {summary.bodystructure if name == 'BODYSTRUCTURE' else summary.body}".encode()
    if name == "RFC822.HEADER":
        header = summary.header if summary is not None and header_from_summary(summary, data) \
            else M.split_header(data)[0]
        return b"RFC822.HEADER " + literal(header)
    if name == "RFC822":
        return b"RFC822 " + literal(data)
    if name == "RFC822.TEXT":
        return b"RFC822.TEXT " + literal(M.split_header(data)[1])
    if not item.part and item.section in HEADER_SECTIONS and header_from_summary(summary, data):
        assert summary is not None
        content = M.section_bytes(summary.header, (), item.section, item.fields)
    else:
        content = (sections if sections is not None else M.Sections(data)).get(item.part, item.section, item.fields)
    if item.partial is not None:
        start, count = item.partial
        content = content[start : start + count]
    return item.response_name().encode() + b" " + literal(content)
