"""IMAP SEARCH (RFC 3501 6.4.4): the keys parsed into one test per message, and what the test
needs to read (the index's header block, or the message itself for BODY and TEXT)."""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Callable

from rempart.common import mime as M
from rempart.common.mailstore import IndexedMessage
from rempart.imap_pop.imapproto import (
    ImapSyntaxError,
    No,
    Token,
    in_sequence_set,
    parse_number,
    parse_sequence_set,
    text_of,
)

SEARCH_DECODE_LIMIT = 1024 * 1024
# Keys that read the message (FROM, TO, CC, BCC, SUBJECT, HEADER, SENT*, BODY, TEXT) in one SEARCH:
# each scans every message searched, and a line holds thousands of them ("OR BODY x" repeated).
# Mail clients send a handful (a few words times FROM/TO/SUBJECT/BODY); past this, a tagged NO.
MAX_SEARCH_CONTENT_KEYS = 64
CONTENT_KEYS = frozenset({"FROM", "TO", "CC", "BCC", "SUBJECT", "HEADER", "BODY", "TEXT", "SENTBEFORE", "SENTON",
                          "SENTSINCE"})
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def parse_date(text: str) -> datetime.date | None:
    try:
        day, month, year = text.split("-")
        return datetime.date(int(year), MONTHS.index(month.capitalize()) + 1, int(day))
    except ValueError:
        return None


class MessageTexts:
    """What the content keys of one SEARCH derive from the message being matched (its header
    fields, its lower-cased octets, its decoded text), each at most once per message: a SEARCH
    with many keys decodes a message once, not once per key. Only the last message is kept."""

    def __init__(self) -> None:
        self._content: bytes | None = None
        self._lines: list[tuple[str, bytes]] | None = None
        self._fields: list[tuple[str, str, str]] | None = None
        self._words: dict[int, str] = {}
        self._lowered: dict[bool, bytes] = {}
        self._decoded: dict[bool, str] = {}

    def _of(self, content: bytes) -> None:
        # Every key is handed the same bytes object for one message: another object is another message.
        if content is not self._content:
            self._content = content
            self._lines, self._fields, self._words, self._lowered, self._decoded = None, None, {}, {}, {}

    def header_lines(self, content: bytes) -> list[tuple[str, bytes]]:
        self._of(content)
        if self._lines is None:
            self._lines = M.header_lines(M.split_header(content)[0])
        return self._lines

    def fields(self, content: bytes) -> list[tuple[str, str, str]]:
        """(upper-case name, value unfolded as text, the same lower-cased) of each header field."""
        self._of(content)
        if self._fields is None:
            values = [(name, " ".join(raw.decode("utf-8", "replace").split(":", 1)[-1].split()))
                      for name, raw in self.header_lines(content)]
            self._fields = [(name, text, text.lower()) for name, text in values]
        return self._fields

    def field_words(self, content: bytes, index: int) -> str:
        """Field ``index``'s value with its RFC 2047 encoded words decoded, lower-cased."""
        self._of(content)
        words = self._words.get(index)
        if words is None:
            words = self._words[index] = M.decode_words(self.fields(content)[index][1]).lower()
        return words

    def lowered(self, content: bytes, body_only: bool) -> bytes:
        self._of(content)
        lowered = self._lowered.get(body_only)
        if lowered is None:
            raw = M.split_header(content)[1] if body_only else content
            lowered = self._lowered[body_only] = raw.lower()
        return lowered

    def decoded(self, content: bytes, body_only: bool) -> str:
        """The decoded text parts, case-folded (the costly part: a full MIME parse)."""
        self._of(content)
        decoded = self._decoded.get(body_only)
        if decoded is None:
            decoded = self._decoded[body_only] = M.text_for_search(content, body_only).casefold()
        return decoded


class SearchQuery:
    def __init__(self, test: Callable[[int, IndexedMessage, bytes], bool], needs_content: bool,
                 needs_body: bool) -> None:
        self.test = test
        self.needs_content = needs_content
        self.needs_body = needs_body

    def match(self, seq: int, message: IndexedMessage, content: bytes) -> bool:
        return self.test(seq, message, content)


def _flag_test(flag: str, present: bool) -> Callable[[int, IndexedMessage, bytes], bool]:
    return lambda _s, m, _c: (flag in m.flags) == present


def _header_test(name: str, value: str, texts: MessageTexts) -> Callable[[int, IndexedMessage, bytes], bool]:
    needle = value.lower()
    wanted = name.upper()

    def test(_s: int, _m: IndexedMessage, content: bytes) -> bool:
        for index, (field_name, _text, lowered) in enumerate(texts.fields(content)):
            if field_name == wanted:
                # R-MBX-7: "Café" is found whether the sender wrote it in UTF-8 (RFC 6532) or as
                # an RFC 2047 encoded word.
                if needle in lowered or needle in texts.field_words(content, index):
                    return True
        return False

    return test


def _text_test(value: str, body_only: bool, parser: SearchParser) -> Callable[[int, IndexedMessage, bytes], bool]:
    """BODY / TEXT: the raw octets, and for messages up to SEARCH_DECODE_LIMIT the decoded text
    parts (base64, quoted-printable, charsets), case-insensitively."""
    parser.needs_content = parser.needs_body = True
    raw_needle = value.lower().encode("utf-8")
    needle = value.casefold()
    texts = parser.texts

    def test(_s: int, _m: IndexedMessage, content: bytes) -> bool:
        if raw_needle in texts.lowered(content, body_only):
            return True
        if len(content) > SEARCH_DECODE_LIMIT:
            return False
        return needle in texts.decoded(content, body_only)

    return test


def _sent_date_test(key: str, day: datetime.date, texts: MessageTexts) -> Callable[[int, IndexedMessage, bytes], bool]:
    """SENT*: the Date header's day, in its own time zone (RFC 3501 6.4.4)."""

    def test(_s: int, _m: IndexedMessage, content: bytes) -> bool:
        value = next((raw.split(b":", 1)[1] for name, raw in texts.header_lines(content) if name == "DATE"), None)
        if value is None:
            return False
        try:
            sent = email.utils.parsedate_to_datetime(value.decode("ascii", "replace").strip()).date()
        except (TypeError, ValueError, IndexError):
            return False
        return sent < day if key == "SENTBEFORE" else sent == day if key == "SENTON" else sent >= day

    return test


class SearchParser:
    """SEARCH keys (RFC 3501 6.4.4), the common ones."""

    def __init__(self, tokens: list[Token], largest_seq: int, largest_uid: int,
                 recent: set[int] | frozenset[int] = frozenset(), texts: MessageTexts | None = None) -> None:
        self.tokens = tokens
        self.recent = recent  # UIDs \Recent in the session
        self.pos = 0
        self.largest_seq = largest_seq
        self.largest_uid = largest_uid
        self.needs_content = False  # header fields at least (the index's summary has them)
        self.needs_body = False  # BODY / TEXT: the message itself
        self.uses_modseq = False  # RFC 7162 3.1.5 MODSEQ: the answer carries the highest MODSEQ
        self.texts = texts or MessageTexts()  # shared with the parsers of parenthesised keys
        self.content_keys = 0  # nested keys included

    def parse(self) -> SearchQuery:
        tests = []
        while self.pos < len(self.tokens):
            tests.append(self._key())
        return SearchQuery(lambda s, m, c: all(t(s, m, c) for t in tests), self.needs_content, self.needs_body)

    def _next(self) -> Token:
        if self.pos >= len(self.tokens):
            raise ImapSyntaxError("search criteria end too early")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _key(self) -> Callable[[int, IndexedMessage, bytes], bool]:
        token = self._next()
        if isinstance(token, list):
            inner = SearchParser(token, self.largest_seq, self.largest_uid, self.recent, self.texts)
            inner.content_keys = self.content_keys
            query = inner.parse()
            self.content_keys = inner.content_keys
            self.needs_content |= inner.needs_content
            self.needs_body |= inner.needs_body
            self.uses_modseq |= inner.uses_modseq
            return query.test
        key = text_of(token).upper()
        if key in CONTENT_KEYS:
            self.content_keys += 1
            if self.content_keys > MAX_SEARCH_CONTENT_KEYS:
                raise No(f"[LIMIT] Too many SEARCH keys that read messages (at most {MAX_SEARCH_CONTENT_KEYS})")
        flags = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "FLAGGED": "\\Flagged", "SEEN": "\\Seen",
                 "DRAFT": "\\Draft"}
        recent = self.recent
        if key == "ALL":
            return lambda _s, _m, _c: True
        if key == "RECENT":
            return lambda _s, m, _c: m.uid in recent
        if key == "OLD":
            return lambda _s, m, _c: m.uid not in recent
        if key == "NEW":  # RFC 3501 6.4.4: RECENT UNSEEN
            return lambda _s, m, _c: m.uid in recent and "\\Seen" not in m.flags
        if key in flags:
            return _flag_test(flags[key], True)
        if key.startswith("UN") and key[2:] in flags:
            return _flag_test(flags[key[2:]], False)
        if key in ("KEYWORD", "UNKEYWORD"):
            return _flag_test(text_of(self._next()), key == "KEYWORD")
        if key == "NOT":
            negated = self._key()
            return lambda s, m, c: not negated(s, m, c)
        if key == "OR":
            left, right = self._key(), self._key()
            return lambda s, m, c: left(s, m, c) or right(s, m, c)
        if key == "MODSEQ":
            # MODSEQ [entry-name entry-type-req] mod-sequence-valzer (RFC 7162 3.1.5): the
            # per-flag entries are answered with the message's MODSEQ, as RFC 7162 allows.
            value = parse_number(text_of(self._next()))
            if value is None and self.pos + 1 < len(self.tokens):
                self._next()  # entry-type-req (priv, shared, all)
                value = parse_number(text_of(self._next()))
            if value is None:
                raise ImapSyntaxError("bad MODSEQ")
            self.uses_modseq = True
            since = value
            return lambda _s, m, _c: m.modseq >= since
        if key == "UID":
            ranges = parse_sequence_set(text_of(self._next()), self.largest_uid)
            return lambda _s, m, _c: in_sequence_set(m.uid, ranges)
        if key in ("LARGER", "SMALLER"):
            parsed = parse_number(text_of(self._next()))
            if parsed is None:
                raise ImapSyntaxError("bad size")
            size = parsed
            if key == "LARGER":
                return lambda _s, m, _c: m.size > size
            return lambda _s, m, _c: m.size < size
        if key in ("BEFORE", "ON", "SINCE"):
            # Internal date (arrival), compared by day in UTC, as RFC 3501 6.4.4 asks.
            date = parse_date(text_of(self._next()))
            if date is None:
                raise ImapSyntaxError("bad date")
            day = date

            def by_date(_s: int, m: IndexedMessage, _c: bytes) -> bool:
                got = datetime.datetime.fromtimestamp(m.internal_date_ms / 1000, tz=datetime.UTC).date()
                return got < day if key == "BEFORE" else got == day if key == "ON" else got >= day

            return by_date
        if key in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            self.needs_content = True
            return _header_test(key, text_of(self._next()), self.texts)
        if key == "HEADER":
            name = text_of(self._next())
            self.needs_content = True
            return _header_test(name, text_of(self._next()), self.texts)
        if key in ("BODY", "TEXT"):
            return _text_test(text_of(self._next()), body_only=key == "BODY", parser=self)
        if key in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            sent = parse_date(text_of(self._next()))
            if sent is None:
                raise ImapSyntaxError("bad date")
            self.needs_content = True
            return _sent_date_test(key, sent, self.texts)
        if key and key[0] in "0123456789*":
            ranges = parse_sequence_set(key, self.largest_seq)
            return lambda s, _m, _c: in_sequence_set(s, ranges)
        raise ImapSyntaxError(f"unknown search key {key[:30]}")

