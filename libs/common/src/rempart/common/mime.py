"""What IMAP FETCH and POP3 TOP show of a stored message: header and body sections, ENVELOPE
and BODY/BODYSTRUCTURE (RFC 3501 7.4.2), and the :class:`MessageSummary` that the mailbox
index keeps so that a client's header sync reads no message body (SPEC R-MBX-2).

Sections are cut from the stored bytes by offset (a MIME tree over the original message, RFC
2046 5.1.1 boundaries), never re-serialised: ``BODY[1]`` is exactly the octets the sender
wrote, and the sizes in BODYSTRUCTURE are the sizes a client will then fetch. The standard
library's parser reads each part's header fields.
"""

from __future__ import annotations

import binascii
import email
import email.errors
import email.header
import email.policy
import email.utils
import itertools
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser

BOUNDARY = b"\r\n\r\n"
# A hostile message cannot make the tree deep or wide: past these, a part is a leaf.
MAX_MIME_DEPTH = 20
MAX_MIME_PARTS = 500
# Nor can it make the header parser's work unbounded (it runs on the event loop, at every accepted
# message): an entity's header block is parsed up to this many lines and bytes, the rest of its
# fields are not seen (a real block has a few hundred lines at most), and the whole tree's header
# parsing shares one budget of lines and bytes: past it, a part's header is not parsed at all (it is
# then text/plain, RFC 2045 5.2). Offsets, hence the bytes of every section, are unaffected.
MAX_HEADER_LINES = 10_000
MAX_HEADER_BYTES = 1024 * 1024
MAX_TREE_HEADER_LINES = 20_000
MAX_TREE_HEADER_BYTES = 2 * 1024 * 1024
# The address parser of the email package costs a few microseconds a character and recurses on
# nested comments and groups: an address field is parsed up to this many characters (over 100
# ordinary addresses; ENVELOPE shows 100 at most), and a field it cannot parse is NIL. All the
# envelopes of one message (the top one first, then each message/rfc822 part's) share a budget of
# characters: a digest of hundreds of messages with long address fields cannot multiply the cost.
MAX_ADDRESS_FIELD = 8 * 1024
MAX_TREE_ADDRESS_CHARS = 32 * 1024
MAX_ENVELOPE_ADDRESSES = 100
# A Content-Type or Content-Disposition field is read up to this many parameters (a real one has a
# few; BODYSTRUCTURE shows 20): each costs the email package's RFC 2231 decoding.
MAX_PARAMS = 50
# What the email package may raise on a hostile header field: a summary never fails for that.
_HEADER_ERRORS = (RecursionError, ValueError, TypeError, LookupError, IndexError, email.errors.MessageError)
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class _HeaderPolicy(email.policy.Compat32):
    """compat32, except for a field that holds bytes that are not UTF-8: compat32 hands it out
    as a Header whose text cannot be had when the field also holds UTF-8 (str() raises), so
    that any such field, even Content-Type, made the message unreadable. Here it is the text
    with U+FFFD for each such byte: what str() of that Header gives when it gives anything."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value if value.isascii() else _ESCAPED_BYTE.sub("\ufffd", value)


_HEADER_PARSER = HeaderParser(policy=_HeaderPolicy())


def quote(value: str | None) -> str:
    """NIL, a quoted string, or a literal when quoting cannot carry it (RFC 3501 4.3, 4.5)."""
    if value is None:
        return "NIL"
    if any(c in value for c in "\r\n\0") or len(value) > 1000 or not value.isascii():
        # Surrogates that stand for no byte (a hostile RFC 2231 or encoded-word charset can
        # make them) are not text either: U+FFFD, like an invalid byte.
        value = _LONE_SURROGATE.sub("\ufffd", value)
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        data = value.encode("utf-8")
        return f"{{{len(data)}}}\r\n" + value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def normalise(data: bytes) -> bytes:
    """CRLF line ends throughout, as IMAP and POP3 require."""
    if b"\n" in data.replace(b"\r\n", b""):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header including the blank line, body)."""
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    end = data.find(BOUNDARY)
    if end < 0:
        return data if data.endswith(b"\r\n") or not data else data + b"\r\n", b""
    return data[: end + 4], data[end + 4 :]


# Where a header field starts: after a line end, at a line that is no continuation line.
_FIELD_START = re.compile(b"\r\n(?=[^ \t])")


def header_lines(header: bytes) -> list[tuple[str, bytes]]:
    """Fields with their continuation lines: (upper-case name, raw bytes with CRLF).

    A field is one slice of the block, from its first line to the next field's: gathered line
    by line (each continuation line appended to the field's bytes), it was copied again at
    every line.
    """
    end = len(header)
    while header.endswith(b"\r\n\r\n", 0, end):
        end -= 2  # the blank line that ends the block is no field
    if header.startswith(b"\r\n") or header.find(b"\r\n\r\n", 0, end) >= 0:
        return _header_lines_with_empty_lines(header)
    starts = [0] if end else []
    starts.extend(match.end() for match in _FIELD_START.finditer(header, 0, end))
    fields: list[tuple[str, bytes]] = []
    for number, first in enumerate(starts):
        raw = header[first : starts[number + 1] if number + 1 < len(starts) else end]
        line_end = raw.find(b"\r\n")
        name = raw[: len(raw) if line_end < 0 else line_end].split(b":", 1)[0]
        fields.append((name.strip().decode("ascii", "replace").upper(),
                       raw if raw.endswith(b"\r\n") else raw + b"\r\n"))
    return fields


def _header_lines_with_empty_lines(header: bytes) -> list[tuple[str, bytes]]:
    """:func:`header_lines` of a block with empty lines inside (skipped: a continuation line
    after one still belongs to the field before it), line by line."""
    lines = header.split(b"\r\n")
    firsts: list[tuple[str, int]] = []  # (name, index of the field's first line)
    for index, line in enumerate(lines):
        if not line or (line[:1] in (b" ", b"\t") and firsts):
            continue
        firsts.append((line.split(b":", 1)[0].strip().decode("ascii", "replace").upper(), index))
    fields: list[tuple[str, bytes]] = []
    for number, (name, first) in enumerate(firsts):
        stop = firsts[number + 1][1] if number + 1 < len(firsts) else len(lines)
        fields.append((name, b"\r\n".join([line for line in lines[first:stop] if line]) + b"\r\n"))
    return fields


def header_fields(header: bytes, names: tuple[str, ...], exclude: bool) -> bytes:
    wanted = set(names)
    kept = [raw for name, raw in header_lines(header) if (name in wanted) != exclude]
    return b"".join(kept) + b"\r\n"


def decode_words(text: str) -> str:
    """A header value with its RFC 2047 encoded words decoded (unknown charsets replaced)."""
    if "=?" not in text:
        return text
    try:
        words = email.header.decode_header(text)
    except _HEADER_ERRORS:
        return text
    out = []
    for chunk, charset in words:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "ascii", "replace"))
        except (LookupError, ValueError):  # unknown, or a codec without "replace" (idna)
            out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)


@dataclass
class MimePart:
    """One entity of the message: offsets into the whole message's bytes."""

    start: int
    body_start: int
    end: int
    headers: Message
    children: list[MimePart] = field(default_factory=list)
    encapsulated: MimePart | None = None  # message/rfc822: the message inside
    # The tree's shared budget, and the ENVELOPE once computed (BODY and BODYSTRUCTURE both show
    # an encapsulated message's): a part's address fields are parsed once.
    budget: _Budget = field(default_factory=lambda: _Budget(), repr=False, compare=False)
    envelope: str | None = field(default=None, repr=False, compare=False)

    @property
    def maintype(self) -> str:
        return self.headers.get_content_maintype()

    @property
    def subtype(self) -> str:
        return self.headers.get_content_subtype()

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"


class _Budget:
    """What one message's tree may still cost: parts, header parsing, address parsing."""

    def __init__(self) -> None:
        self.parts = 0
        self.header_lines = MAX_TREE_HEADER_LINES
        self.header_bytes = MAX_TREE_HEADER_BYTES
        self.address_chars = MAX_TREE_ADDRESS_CHARS

    def header_end(self, data: bytes, start: int, end: int) -> int:
        """Where the header text parsed for the block ``data[start:end]`` stops: at most
        :data:`MAX_HEADER_LINES` whole lines and :data:`MAX_HEADER_BYTES`, within what is left
        of the tree's budget; charged to it."""
        lines = min(MAX_HEADER_LINES, self.header_lines)
        stop = min(end, start + min(MAX_HEADER_BYTES, self.header_bytes))
        if stop < end:
            stop = data.rfind(b"\n", start, stop) + 1 or start  # whole lines only
        if data.count(b"\n", start, stop) > lines:
            cut = start
            for _ in range(lines):
                cut = data.find(b"\n", cut, stop) + 1
            stop = cut
        self.header_lines -= data.count(b"\n", start, stop)
        self.header_bytes -= stop - start
        return stop


def structure(data: bytes) -> MimePart:
    """The MIME tree of a normalised (CRLF) message."""
    return _entity(data, 0, len(data), 0, _Budget(), default_type="text/plain")


def _entity(data: bytes, start: int, end: int, depth: int, budget: _Budget, default_type: str) -> MimePart:
    budget.parts += 1
    if data.startswith(b"\r\n", start) and start + 2 <= end:
        body_start = start + 2  # no header fields at all
    else:
        blank = data.find(BOUNDARY, start, end)
        body_start = end if blank < 0 else blank + 4
    # Header fields may carry raw UTF-8 (RFC 6532): decoded as such, so ENVELOPE shows the
    # sender's characters; bytes that are not UTF-8 stay as surrogates and become U+FFFD later.
    parsed_end = budget.header_end(data, start, body_start)
    headers = _HEADER_PARSER.parsestr(data[start:parsed_end].decode("utf-8", "surrogateescape"))
    if headers.get("Content-Type") is None:
        headers.set_default_type(default_type)
    part = MimePart(start, body_start, end, headers, budget=budget)
    if depth >= MAX_MIME_DEPTH or budget.parts >= MAX_MIME_PARTS:
        return part
    if part.is_multipart:
        boundary = _boundary(headers)
        if boundary:
            child_default = "message/rfc822" if part.subtype == "digest" else "text/plain"
            for child_start, child_end in _split_multipart(data, body_start, end, boundary.encode("utf-8", "replace")):
                if budget.parts >= MAX_MIME_PARTS:
                    break
                part.children.append(_entity(data, child_start, child_end, depth + 1, budget, child_default))
    elif (part.maintype, part.subtype) == ("message", "rfc822") and body_start < end:
        part.encapsulated = _entity(data, body_start, end, depth + 1, budget, "text/plain")
    return part


def _split_multipart(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the body parts (RFC 2046 5.1.1): the CRLF before a delimiter belongs to it."""
    delimiter = b"--" + boundary
    lines: list[tuple[int, int, bool]] = []  # (delimiter line start, next line start, is close)
    # Only line starts are looked at (the body's first line, then each "\n--boundary"): an
    # occurrence inside a line is never a delimiter, and looking for its line's end from each
    # one would cost the line's length per occurrence.
    pos = start
    i = start if data.startswith(delimiter, start) and start + len(delimiter) <= end else -1
    while True:
        if i < 0:
            found = data.find(b"\n" + delimiter, pos, end)
            if found < 0:
                break
            i = found + 1
        newline = data.find(b"\n", i, end)
        line_end = end if newline < 0 else newline + 1
        line_start, i = i, -1
        rest = data[line_start + len(delimiter) : line_end].rstrip(b"\r\n")
        pos = line_start  # the next delimiter line starts after this one's newline
        if rest.startswith(b"--"):
            lines.append((line_start, line_end, True))
            break
        if rest.strip(b" \t"):
            continue  # a longer boundary that merely starts with ours
        lines.append((line_start, line_end, False))
        if len(lines) > MAX_MIME_PARTS:
            break
    ranges = []
    for (_, first, close), (following, _, _) in itertools.pairwise(lines):
        if close:
            break
        part_end = following
        if data[part_end - 2 : part_end] == b"\r\n":
            part_end -= 2
        ranges.append((first, max(first, part_end)))
    if lines and not lines[-1][2]:
        ranges.append((lines[-1][1], end))  # no close delimiter: the last part runs to the end
    return ranges


def find_part(root: MimePart, path: tuple[int, ...]) -> MimePart | None:
    """The part a section number names (RFC 3501 6.4.5); None when there is none."""
    current = root
    for depth, number in enumerate(path):
        container = current
        if depth > 0:
            # Below the top, numbers enter an encapsulated message or a multipart; a leaf
            # has no parts.
            if current.encapsulated is not None:
                container = current.encapsulated
            elif not current.is_multipart:
                return None
        if container.is_multipart:
            if not 1 <= number <= len(container.children):
                return None
            current = container.children[number - 1]
        elif number == 1:
            current = container
        else:
            return None
    return current


def section_bytes(data: bytes, part: tuple[int, ...], section: str, fields: tuple[str, ...],
                  root: MimePart | None = None) -> bytes:
    """The bytes of BODY[part.section]; empty when the part does not exist (RFC 3501 6.4.5).

    ``root`` is ``structure(data)`` when the caller has it already (see :class:`Sections`).
    """
    if part:
        root = root if root is not None else structure(data)
        found = find_part(root, part)
        if found is None:
            return b""
        if section == "MIME":
            return data[found.start : found.body_start]
        if not section:
            return data[found.body_start : found.end]
        # HEADER, TEXT and HEADER.FIELDS of a part are those of the message it encapsulates.
        inner = found.encapsulated
        if inner is None:
            return b""
        data = data[inner.start : inner.end]
    head, body = split_header(data)
    if section == "":
        return data
    if section == "HEADER":
        return head
    if section == "TEXT":
        return body
    if section == "HEADER.FIELDS":
        return header_fields(head, fields, exclude=False)
    if section == "HEADER.FIELDS.NOT":
        return header_fields(head, fields, exclude=True)
    return b""


class Sections:
    """The sections of one message for one FETCH: its MIME tree is built at most once, however
    many items name a part (``BODY[1] BODY[1] ...`` would otherwise parse the message again for
    each), and not at all when none does."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._root: MimePart | None = None

    def get(self, part: tuple[int, ...], section: str, fields: tuple[str, ...]) -> bytes:
        """``section_bytes(data, part, section, fields)``."""
        if part and self._root is None:
            self._root = structure(self.data)
        return section_bytes(self.data, part, section, fields, self._root)


def _header(message: Message, name: str) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())


def _addresses(message: Message, name: str, budget: _Budget) -> str:
    """An ENVELOPE address list; NIL when the field is absent, beyond the parser or the budget."""
    values = message.get_all(name)
    if not values:
        return "NIL"
    text = ", ".join(str(v) for v in values)
    cut = len(text) > MAX_ADDRESS_FIELD
    text = text[:MAX_ADDRESS_FIELD]
    if len(text) > budget.address_chars:
        return "NIL"
    budget.address_chars -= len(text)
    try:
        parsed = email.utils.getaddresses([text])
    except _HEADER_ERRORS:
        return "NIL"
    if cut:
        parsed = parsed[:-1]  # the address the cut went through is not the sender's
    out = []
    for display, address in parsed[:MAX_ENVELOPE_ADDRESSES]:
        if not address and not display:
            continue
        mailbox, _, host = address.rpartition("@") if "@" in address else (address, "", "")
        out.append(f"({quote(display or None)} NIL {quote(mailbox or None)} {quote(host or None)})")
    return "(" + "".join(out) + ")" if out else "NIL"


def envelope(message: Message, budget: _Budget | None = None) -> str:
    """ENVELOPE of a message's header fields (RFC 3501 7.4.2)."""
    budget = budget if budget is not None else _Budget()
    from_ = _addresses(message, "From", budget)  # parsed once, though it may stand for three fields
    fields = [
        quote(_header(message, "Date")),
        quote(_header(message, "Subject")),
        from_,
        _addresses(message, "Sender", budget) if message.get("Sender") else from_,
        _addresses(message, "Reply-To", budget) if message.get("Reply-To") else from_,
        _addresses(message, "To", budget),
        _addresses(message, "Cc", budget),
        _addresses(message, "Bcc", budget),
        quote(_header(message, "In-Reply-To")),
        quote(_header(message, "Message-ID")),
    ]
    return "(" + " ".join(fields) + ")"


def part_envelope(part: MimePart) -> str:
    """The ENVELOPE of a message in the tree (the top one, or an encapsulated one), kept."""
    if part.envelope is None:
        part.envelope = envelope(part.headers, part.budget)
    return part.envelope


# Parameters of Content-Type and Content-Disposition are parsed here, in one pass: the email
# package's own splitter rescans a parameter from its start at every ";" inside a quoted string,
# a cost quadratic in the field's length. The result is the same list as Message.get_params
# (RFC 2231 continuations and charsets included, by email.utils.decode_params).


# One item: plain characters, a backslash (with the quote it escapes), or a quoted run (which may
# hold ";" and runs to the end when never closed). Possessive: no backtracking, one pass.
_PARAM_ITEM = re.compile(r'(?:[^;"\\]++|\\"?+|"(?:[^"\\]++|\\"?+)*+(?:"|\Z))*+')


def _param_pieces(value: str) -> list[str]:
    """The first :data:`MAX_PARAMS` ";"-separated items of a field (the type or disposition,
    then its parameters), a ";" between double quotes not separating (a backslash-quote is not
    a quote), each ``name=value`` with its name lower-cased."""
    items: list[str] = []
    pos = 0
    while len(items) <= MAX_PARAMS:
        match = _PARAM_ITEM.match(value, pos)
        end = match.end() if match else pos
        items.append(value[pos:end])
        if end >= len(value):
            break
        pos = end + 1  # past the ";"
    out = []
    for item in items:
        name, equals, rest = item.partition("=")
        out.append((name.strip().lower() + "=" + rest.strip() if equals else item).strip())
    return out


_ParamValue = str | tuple[str | None, str | None, str]  # a tuple: (charset, language, text), RFC 2231


def _raw_params(message: Message, header: str) -> list[tuple[str, _ParamValue]]:
    """The field's parameters, RFC 2231 decoded but still quoted; [] when absent or unparsable."""
    value = message.get(header)
    if value is None:
        return []
    pairs: list[tuple[str, str]] = []
    for item in _param_pieces(str(value)):
        name, equals, rest = item.partition("=")
        pairs.append((name.strip(), rest.strip()) if equals else (item.strip(), ""))
    try:
        return email.utils.decode_params(pairs)  # type: ignore[no-any-return]
    except _HEADER_ERRORS:  # e.g. "a*" and "a*0" together, a 5,000-digit section number
        return [(key, text) for key, text in pairs[:1]]


def _unquoted(value: _ParamValue) -> _ParamValue:
    if isinstance(value, tuple):
        return value[0], value[1], email.utils.unquote(value[2])
    return email.utils.unquote(value)


def _params(message: Message, header: str) -> list[tuple[str, _ParamValue]]:
    """``message.get_params(header=header) or []``, in linear time and never raising."""
    return [(key, _unquoted(value)) for key, value in _raw_params(message, header)]


def _boundary(message: Message) -> str | None:
    """``message.get_boundary()``, in linear time and never raising."""
    for key, value in _raw_params(message, "content-type"):
        if key.lower() == "boundary":
            try:
                return email.utils.collapse_rfc2231_value(_unquoted(value)).rstrip()
            except _HEADER_ERRORS:  # a codec that takes no "replace" (idna)
                return None
    return None


def _text_value(value: _ParamValue) -> str | None:
    """A parameter's text (RFC 2231 charset applied); None when its charset cannot give one."""
    if not isinstance(value, tuple):
        return value
    try:
        text = email.utils.collapse_rfc2231_value(value)
    except _HEADER_ERRORS:
        return None
    return text if isinstance(text, str) else None


def _param_list(message: Message, header: str, extra_charset: bool = False) -> str:
    params = _params(message, header)
    pairs = []
    for key, value in params[1:21]:
        text = _text_value(value)
        if isinstance(text, str):
            pairs.append(f"{quote(key.upper())} {quote(text)}")
    if extra_charset and not any(k.upper() == "CHARSET" for k, _ in params[1:]):
        pairs.insert(0, '"CHARSET" "US-ASCII"')
    return "(" + " ".join(pairs) + ")" if pairs else "NIL"


def _disposition(message: Message) -> str:
    value = message.get("Content-Disposition")
    if value is None:
        return "NIL"
    kind = str(value).split(";", 1)[0].strip().upper() or "ATTACHMENT"
    return f"({quote(kind)} {_param_list(message, 'content-disposition')})"


def _line_count(body: bytes) -> int:
    lines = body.count(b"\n")
    return lines + 1 if body and not body.endswith(b"\n") else lines


def bodystructure(data: bytes, root: MimePart | None = None, extensible: bool = True) -> str:
    """BODYSTRUCTURE (with extension data: dispositions carry attachment names) or BODY."""
    return _structure(data, root if root is not None else structure(data), extensible)


def _structure(data: bytes, part: MimePart, ext: bool) -> str:
    headers = part.headers
    if part.is_multipart:
        if part.children:
            nested = "".join(_structure(data, child, ext) for child in part.children)
        else:  # a multipart with no parts still has one, empty, body (RFC 3501 grammar)
            nested = '("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
        out = f"({nested} {quote(part.subtype.upper())}"
        if ext:
            out += f" {_param_list(headers, 'content-type')} {_disposition(headers)} {_language(headers)} " \
                   f"{quote(_header(headers, 'Content-Location'))}"
        return out + ")"
    maintype, subtype = part.maintype.upper(), part.subtype.upper()
    body = data[part.body_start : part.end]
    encoding = (_header(headers, "Content-Transfer-Encoding") or "7BIT").upper()
    fields = (
        f"{quote(maintype)} {quote(subtype)} {_param_list(headers, 'content-type', maintype == 'TEXT')} "
        f"{quote(_header(headers, 'Content-ID'))} {quote(_header(headers, 'Content-Description'))} "
        f"{quote(encoding)} {len(body)}"
    )
    inner = part.encapsulated
    if (maintype, subtype) == ("MESSAGE", "RFC822") and inner is not None:
        fields += f" {part_envelope(inner)} {_structure(data, inner, ext)} {_line_count(body)}"
    elif maintype == "TEXT":
        fields += f" {_line_count(body)}"
    if ext:
        fields += f" {quote(_header(headers, 'Content-MD5'))} {_disposition(headers)} {_language(headers)} " \
                  f"{quote(_header(headers, 'Content-Location'))}"
    return f"({fields})"


def _language(message: Message) -> str:
    value = _header(message, "Content-Language")
    if not value:
        return "NIL"
    tags = [t.strip() for t in value.split(",") if t.strip()][:10]
    return quote(tags[0]) if len(tags) == 1 else "(" + " ".join(quote(t) for t in tags) + ")"


def text_for_search(data: bytes, body_only: bool) -> str:
    """SEARCH BODY/TEXT: the text parts decoded (base64, quoted-printable, charset), so a client
    searching for a word finds it however the sender encoded it. Read from the bounded MIME tree
    (:func:`structure`), in linear time whatever a sender wrote in its headers: the email
    package's parameter parser is quadratic (0.8 s for one hostile Content-Type), and a
    mailbox's owner would pay it at every SEARCH."""
    data = normalise(data)
    root = structure(data)
    chunks: list[str] = []
    if not body_only:
        chunks.extend(f"{k}: {v}" for k, v in root.headers.items())
    pending = [root]
    while pending:
        part = pending.pop()
        pending.extend(reversed([*part.children, *([part.encapsulated] if part.encapsulated else [])]))
        if part.maintype != "text":
            continue
        payload = _transfer_decoded(data[part.body_start:part.end], part.headers.get("Content-Transfer-Encoding"))
        charset = _charset(part.headers) or "utf-8"
        try:
            chunks.append(payload.decode(charset, "replace"))
        except (LookupError, ValueError):  # unknown, or a codec without "replace" (idna)
            chunks.append(payload.decode("utf-8", "replace"))
    return "\n".join(chunks)


def _transfer_decoded(body: bytes, encoding: object) -> bytes:
    """A part's body without its Content-Transfer-Encoding (RFC 2045 6); as it is when that is
    unknown or broken (as the email package does)."""
    name = str(encoding or "").strip().lower()
    try:
        if name == "base64":
            try:
                return binascii.a2b_base64(body)
            except binascii.Error:  # padding left out: the email package adds it too
                return binascii.a2b_base64(body + b"==")
        if name == "quoted-printable":
            return binascii.a2b_qp(body)
    except (binascii.Error, ValueError):
        return body
    return body


def _charset(headers: Message) -> str | None:
    """``get_content_charset()``, in linear time and never raising."""
    for key, value in _params(headers, "content-type")[1:]:
        if key.lower() == "charset":
            text = _text_value(value)
            return text.strip().lower() if text else None
    return None


# A header block larger than this is not kept in the index: such a message is read from the store.
MAX_SUMMARY_HEADER = 64 * 1024


@dataclass(frozen=True)
class MessageSummary:
    """What FETCH answers most often, computed once when the message enters a mailbox.

    ``header`` is the top-level header block including its blank line (``BODY[HEADER]``);
    it is empty when the block is over :data:`MAX_SUMMARY_HEADER` (then the message is read).
    """

    size: int  # RFC822.SIZE: the octets FETCH serves (CRLF line ends)
    header: bytes
    envelope: str
    body: str
    bodystructure: str

    @property
    def has_header(self) -> bool:
        return bool(self.header)


def summarize(data: bytes) -> MessageSummary:
    """The summary of a stored message (normalised here, as FETCH serves it)."""
    data = normalise(data)
    root = structure(data)
    header = split_header(data)[0]
    return MessageSummary(
        size=len(data),
        header=header if len(header) <= MAX_SUMMARY_HEADER else b"",
        envelope=part_envelope(root),  # first: the top envelope is never short of budget
        body=bodystructure(data, root, extensible=False),
        bodystructure=bodystructure(data, root, extensible=True),
    )
