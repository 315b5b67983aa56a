"""The IMAP4rev1 wire syntax (RFC 3501 section 9), server side: the one place that parses it.

A command arrives as parts: the first line, then for each ``{n}`` / ``{n+}`` (RFC 7888
LITERAL+) at the end of a line, the literal's bytes and the line that follows. The session
reads the parts (it owns the limits and the ``+`` continuation); :func:`tokenize` turns them
into tokens; the helpers below read sequence sets, FETCH items and strings for replies.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

MAX_DEPTH = 8
MAX_TOKENS = 10000


class ImapSyntaxError(ValueError):
    pass


class CloseSession(Exception):
    """Say nothing more; close the connection."""


class No(Exception):
    """A tagged NO (or BAD when ``bad``) with this text."""

    def __init__(self, text: str, bad: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.bad = bad


class Atom(str):
    """An unquoted atom (case matters to the caller: NIL, flags, keywords)."""

    __slots__ = ()


Token = Union[Atom, str, bytes, list["Token"]]  # noqa: UP007 - recursive alias


@dataclass
class Command:
    tag: str
    name: str
    args: list[Token]
    uid: bool = False

_LITERAL_RE = re.compile(rb"\{(\d{1,10})(\+?)\}$")
_TAG_RE = re.compile(rb"^[\x21-\x7e]+$")
_ATOM_STOP = set(b' ()"{')


@dataclass(frozen=True)
class LiteralMarker:
    size: int
    synchronising: bool


def literal_at_end(line: bytes) -> LiteralMarker | None:
    """``{n}`` or ``{n+}`` ending a line: the client will send n bytes next."""
    match = _LITERAL_RE.search(line)
    if match is None:
        return None
    return LiteralMarker(int(match.group(1)), match.group(2) != b"+")


def split_tag(line: bytes) -> tuple[str, str]:
    """Tag and command name of a first line; raises for a line with no valid tag."""
    head = line.split(b" ", 2)
    tag = head[0]
    if not tag or not _TAG_RE.match(tag) or any(c in tag for c in b'(){%*"\\+'):
        raise ImapSyntaxError("bad tag")
    if len(head) < 2 or not head[1]:
        raise ImapSyntaxError("missing command")
    return tag.decode("ascii"), head[1].decode("ascii", "replace").upper()


def tokenize(parts: list[bytes]) -> list[Token]:
    """Tokens of a whole command (tag and name included). Parts: line, literal, line, ..."""
    stack: list[list[Token]] = [[]]
    count = 0
    for index in range(0, len(parts), 2):
        line = parts[index]
        literal = parts[index + 1] if index + 1 < len(parts) else None
        pos = 0
        n = len(line)
        while pos < n:
            ch = line[pos]
            if ch == 0x20:
                pos += 1
                continue
            count += 1
            if count > MAX_TOKENS:
                raise ImapSyntaxError("too many tokens")
            if ch == 0x28:  # (
                if len(stack) > MAX_DEPTH:
                    raise ImapSyntaxError("lists nested too deep")
                new: list[Token] = []
                stack[-1].append(new)
                stack.append(new)
                pos += 1
            elif ch == 0x29:  # )
                if len(stack) == 1:
                    raise ImapSyntaxError("unbalanced parenthesis")
                stack.pop()
                pos += 1
            elif ch == 0x22:  # "
                value, pos = _quoted(line, pos)
                stack[-1].append(value)
            elif ch == 0x7B:  # {
                if _LITERAL_RE.fullmatch(line[pos:]) is None or literal is None:
                    raise ImapSyntaxError("bad literal")
                stack[-1].append(literal)
                pos = n
            else:
                value, pos = _atom(line, pos)
                stack[-1].append(Atom(value))
        if literal is None and index + 1 < len(parts):
            raise ImapSyntaxError("literal without marker")
    if len(stack) != 1:
        raise ImapSyntaxError("unbalanced parenthesis")
    return stack[0]


def _quoted(line: bytes, pos: int) -> tuple[str, int]:
    out = bytearray()
    pos += 1
    while pos < len(line):
        ch = line[pos]
        if ch == 0x5C:  # backslash: only \" and \\ are quoted-specials
            if pos + 1 >= len(line) or line[pos + 1] not in b'"\\':
                raise ImapSyntaxError("bad escape in quoted string")
            out.append(line[pos + 1])
            pos += 2
        elif ch == 0x22:
            return out.decode("utf-8", "replace"), pos + 1
        elif ch in (0x0D, 0x0A, 0x00):
            raise ImapSyntaxError("control character in quoted string")
        else:
            out.append(ch)
            pos += 1
    raise ImapSyntaxError("unterminated quoted string")


def _atom(line: bytes, pos: int) -> tuple[str, int]:
    # A FETCH attribute such as BODY[HEADER.FIELDS (FROM TO)]<0.100> is one atom: inside
    # brackets, spaces and parentheses belong to it.
    start = pos
    depth = 0
    while pos < len(line):
        ch = line[pos]
        if ch < 0x20 or ch == 0x7F:
            raise ImapSyntaxError("control character in atom")
        if ch == 0x5B:
            depth += 1
        elif ch == 0x5D:
            depth = max(0, depth - 1)
        elif depth == 0 and ch in _ATOM_STOP:
            break
        pos += 1
    if depth:
        raise ImapSyntaxError("unbalanced bracket")
    return line[start:pos].decode("utf-8", "replace"), pos


def text_of(token: Token) -> str:
    """An astring (atom, quoted string or literal) as text."""
    if isinstance(token, list):
        raise ImapSyntaxError("expected a string, got a list")
    if isinstance(token, bytes):
        return token.decode("utf-8", "replace")
    return str(token)


# Sequence sets (RFC 3501 9 "sequence-set"): "1:4,7,9:*".
SequenceSet = list[tuple[int, int]]
MAX_SEQUENCE_RANGES = 2000


def parse_sequence_set(text: str, largest: int) -> SequenceSet:
    """Sorted, disjoint ranges (low, high), with ``*`` as ``largest`` (the last number in use).

    Overlapping ranges are merged, so ``1:*,1:*,...`` costs one range, and a lookup is a
    binary search whatever the client sent.
    """
    ranges: SequenceSet = []
    items = text.split(",")
    if len(items) > MAX_SEQUENCE_RANGES:
        raise ImapSyntaxError("sequence set too long")
    for item in items:
        bounds = item.split(":")
        if len(bounds) > 2 or not all(bounds):
            raise ImapSyntaxError("bad sequence set")
        values = [_seq_number(b, largest) for b in bounds]
        low, high = min(values), max(values)
        ranges.append((low, high))
    merged: SequenceSet = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _seq_number(text: str, largest: int) -> int:
    if text == "*":
        return largest
    value = parse_number(text)
    if value is None or text.startswith("0") or len(text) > 10:
        raise ImapSyntaxError("bad sequence number")
    if value > 0xFFFFFFFF:
        raise ImapSyntaxError("sequence number too large")
    return value


def in_sequence_set(value: int, ranges: SequenceSet) -> bool:
    """``ranges`` as :func:`parse_sequence_set` returns them: sorted and disjoint."""
    i = bisect.bisect_right(ranges, (value, 0xFFFFFFFF + 1)) - 1
    return i >= 0 and ranges[i][0] <= value <= ranges[i][1]


_NUMBER_RE = re.compile(r"[0-9]{1,20}")
MAX_NUMBER = 2**63 - 1  # RFC 7162 mod-sequences are 63-bit; sizes and UIDs are smaller


def parse_number(text: str) -> int | None:
    """An unsigned decimal (ASCII digits only: ``str.isdigit`` takes "²"), at most 2**63 - 1."""
    if not _NUMBER_RE.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_NUMBER else None


def missing_numbers(present: list[int], below: int) -> SequenceSet:
    """The ranges of 1..below-1 not in ``present`` (sorted): computed from the gaps, so the cost
    follows the numbers present, not the span."""
    out: SequenceSet = []
    expected = 1
    for value in present:
        if value >= below:
            break
        if value > expected:
            out.append((expected, value - 1))
        expected = max(expected, value + 1)
    if expected < below:
        out.append((expected, below - 1))
    return out


def format_ranges(ranges: SequenceSet) -> str:
    return ",".join(f"{low}" if low == high else f"{low}:{high}" for low, high in ranges)


def intersect_ranges(a: SequenceSet, b: SequenceSet) -> SequenceSet:
    out: SequenceSet = []
    i = j = 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low <= high:
            out.append((low, high))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def number_ranges(values: list[int]) -> SequenceSet:
    """Numbers as sorted, disjoint ranges: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: SequenceSet = []
    for value in sorted(set(values)):
        if out and out[-1][1] + 1 == value:
            out[-1] = (out[-1][0], value)
        else:
            out.append((value, value))
    return out


def compress_numbers(values: list[int]) -> str:
    """UIDs as a compact set: 1:3,7 (for COPYUID, VANISHED, MODIFIED)."""
    return format_ranges(number_ranges(values))


# FETCH items (RFC 3501 6.4.5).
@dataclass(frozen=True)
class FetchItem:
    name: str  # FLAGS, UID, RFC822.SIZE, INTERNALDATE, ENVELOPE, BODYSTRUCTURE, BODY, RFC822,
    # RFC822.HEADER, RFC822.TEXT, BODY.PEEK (answered as BODY), BINARY...
    section: str = ""  # inside the brackets, upper-cased part specifier, e.g. HEADER.FIELDS
    fields: tuple[str, ...] = ()  # HEADER.FIELDS (...) names
    part: tuple[int, ...] = ()  # 1.2 ...
    partial: tuple[int, int] | None = None
    bracketed: bool = False

    @property
    def peek(self) -> bool:
        return self.name == "BODY.PEEK"

    def response_name(self) -> str:
        if not self.bracketed:
            return self.name
        section = ".".join(str(p) for p in self.part)
        if self.section:
            section = f"{section}.{self.section}" if section else self.section
        if self.fields:
            section += " (" + " ".join(self.fields) + ")"
        origin = f"<{self.partial[0]}>" if self.partial else ""
        return f"BODY[{section}]{origin}"


_SIMPLE_ITEMS = {
    "FLAGS", "UID", "RFC822.SIZE", "INTERNALDATE", "ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822",
    "RFC822.HEADER", "RFC822.TEXT", "MODSEQ",
}
_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SECTION_RE = re.compile(
    r"^(?P<name>BODY|BODY\.PEEK)\[(?P<section>[^\]]*)\](?:<(?P<start>\d{1,10})\.(?P<count>\d{1,10})>)?$",
    re.IGNORECASE,
)
_FIELD_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,100}$")


def parse_fetch_items(token: Token) -> list[FetchItem]:
    atoms: list[Token] = token if isinstance(token, list) else [token]
    if isinstance(token, Atom) and token.upper() in _MACROS:
        return [FetchItem(name) for name in _MACROS[token.upper()]]
    items: list[FetchItem] = []
    for atom in atoms:
        if not isinstance(atom, Atom):
            raise ImapSyntaxError("bad FETCH item")
        items.append(_fetch_item(str(atom)))
    if not items:
        raise ImapSyntaxError("empty FETCH item list")
    return items


def _fetch_item(text: str) -> FetchItem:
    upper = text.upper()
    if upper in _SIMPLE_ITEMS:
        return FetchItem(upper)
    match = _SECTION_RE.match(text)
    if match is None:
        raise ImapSyntaxError(f"unknown FETCH item {text[:40]}")
    name = match.group("name").upper()
    partial = None
    if match.group("start") is not None:
        count = int(match.group("count"))
        if count == 0:
            raise ImapSyntaxError("zero-length partial")
        partial = (int(match.group("start")), count)
    part, section, fields = _section(match.group("section"))
    return FetchItem(name, section, fields, part, partial, bracketed=True)


def _section(text: str) -> tuple[tuple[int, ...], str, tuple[str, ...]]:
    spec = text.strip()
    fields: tuple[str, ...] = ()
    paren = spec.find("(")
    if paren >= 0:
        if not spec.endswith(")"):
            raise ImapSyntaxError("bad header field list")
        names = spec[paren + 1 : -1].split()
        if not names or len(names) > 100 or not all(_FIELD_NAME_RE.match(n) for n in names):
            raise ImapSyntaxError("bad header field list")
        fields = tuple(n.upper() for n in names)
        spec = spec[:paren].strip()
    part: list[int] = []
    pieces = spec.split(".") if spec else []
    while pieces and (number := parse_number(pieces[0])) is not None:
        pieces.pop(0)
        if number == 0 or number > 0xFFFFFFFF or len(part) >= 20:
            raise ImapSyntaxError("bad section part")
        part.append(number)
    section = ".".join(pieces).upper()
    allowed = {"", "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"}
    if section not in allowed or (section == "MIME" and not part):
        raise ImapSyntaxError("bad section")
    if bool(fields) != section.startswith("HEADER.FIELDS"):
        raise ImapSyntaxError("bad header field list")
    return tuple(part), section, fields


# Writing strings into replies.
def literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


_WILDCARD_RUN = re.compile(r"[*%]{2,}")


class ListPatterns:
    """LIST patterns (RFC 3501 6.3.8): ``*`` matches anything, ``%`` anything but the hierarchy
    delimiter; all the patterns of one LIST (RFC 5258 allows a list of them) matched at once.

    A Thompson NFA whose set of pattern positions is one integer, a bit per position, with the
    patterns side by side: one name character costs a few integer operations whatever the
    number of patterns, wildcards and live positions. A regular expression backtracks
    (``LIST "" "**********x"`` blocked the event loop for minutes); a set of positions walked
    one by one costs each live position per character (``"*a" * 200 + "b"`` keeps 200 alive:
    13.7 ms per 200-character name, minutes for a LIST over many folders).

    A run of wildcards is one wildcard first (``*`` if it holds one, else ``%``: ``%*`` matches
    what ``*`` does), so a wildcard is never followed by another and the positions a wildcard
    may skip to (it may match nothing) are one shift away.

    :meth:`matching` also answers for the name's parents (the prefixes before each delimiter),
    which LIST shows as ``\\Noselect`` (RFC 3501 6.3.8): they are walked on the way, not again.
    ``work`` counts name characters walked times patterns, for the caller's budget.
    """

    def __init__(self, patterns: Iterable[str], delimiter: str = "/") -> None:
        self.delimiter = delimiter
        self.literals: dict[str, int] = {}  # character -> positions holding it
        self.stars = 0
        wild = start = accept = 0
        offset = 0
        count = 0
        for pattern in patterns:
            pattern = _WILDCARD_RUN.sub(lambda run: "*" if "*" in run.group() else "%", pattern)
            start |= 1 << offset
            for i, char in enumerate(pattern):
                bit = 1 << (offset + i)
                if char in "*%":
                    wild |= bit
                    if char == "*":
                        self.stars |= bit
                else:
                    self.literals[char] = self.literals.get(char, 0) | bit
            # The bit after a pattern's last position is its end: nothing moves on from it,
            # so no state leaks into the next pattern.
            accept |= 1 << (offset + len(pattern))
            offset += len(pattern) + 1
            count += 1
        self.wild = wild
        self.accept = accept
        self.start = start | (start & wild) << 1
        self.count = count
        self.work = 0

    def matching(self, name: str) -> list[str]:
        """The name's parents, then the name, that some pattern matches (shortest first)."""
        literals, stars, wild, accept, delimiter = self.literals, self.stars, self.wild, self.accept, self.delimiter
        states = self.start
        found = []
        walked = 0
        for i, char in enumerate(name):
            if char == delimiter and states & accept:
                found.append(name[:i])
            # A literal moves on, "*" stays, "%" stays unless this is the delimiter.
            states = (states & literals.get(char, 0)) << 1 | states & (stars if char == delimiter else wild)
            walked += 1
            if not states:
                break
            states |= (states & wild) << 1
        else:
            if states & accept:
                found.append(name)
        self.work += walked * self.count
        return found


def wildcard_match(pattern: str, name: str, delimiter: str = "/") -> bool:
    """Whether one LIST pattern (RFC 3501 6.3.8) matches the whole name; see :class:`ListPatterns`."""
    return ListPatterns([pattern], delimiter).matching(name)[-1:] == [name]
