"""What IMAP FETCH and POP3 TOP show of a stored message: header and body sections, ENVELOPE
and BODY/BODYSTRUCTURE (RFC 3501 7.4.2), and the :class:`MessageSummary` that the mailbox
index keeps so that a client's header sync reads no message body (SPEC R-MBX-2).

Sections are cut from the stored bytes by offset (a MIME tree over the original message, RFC
2046 5.1.1 boundaries), never re-serialised: ``BODY[1]`` is exactly the octets the sender
wrote, and the sizes in BODYSTRUCTURE are the sizes a client will then fetch. The standard
library's parser reads each part's header fields.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import email.utils
import itertools
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser

BOUNDARY = b"\r\n\r\n"
# A hostile message cannot make the tree deep or wide: past these, a part is a leaf.
MAX_MIME_DEPTH = 20
MAX_MIME_PARTS = 500
_HEADER_PARSER = HeaderParser(policy=email.policy.compat32)


def quote(value: str | None) -> str:
    """NIL, a quoted string, or a literal when quoting cannot carry it (RFC 3501 4.3, 4.5)."""
    if value is None:
        return "NIL"
    if any(c in value for c in "\r\n\0") or len(value) > 1000 or not value.isascii():
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


def header_lines(header: bytes) -> list[tuple[str, bytes]]:
    """Fields with their continuation lines: (upper-case name, raw bytes with CRLF)."""
    fields: list[tuple[str, bytes]] = []
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
        else:
            name = line.split(b":", 1)[0].strip().decode("ascii", "replace").upper()
            fields.append((name, line + b"\r\n"))
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
    except (ValueError, email.errors.HeaderParseError):
        return text
    out = []
    for chunk, charset in words:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "ascii", "replace"))
        except LookupError:
            out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


@dataclass
class MimePart:
    """One entity of the message: offsets into the whole message's bytes."""

    start: int
    body_start: int
    end: int
    headers: Message
    children: list[MimePart] = field(default_factory=list)
    encapsulated: MimePart | None = None  # message/rfc822: the message inside

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
    def __init__(self) -> None:
        self.parts = 0


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
    headers = _HEADER_PARSER.parsestr(data[start:body_start].decode("utf-8", "surrogateescape"))
    if headers.get("Content-Type") is None:
        headers.set_default_type(default_type)
    part = MimePart(start, body_start, end, headers)
    if depth >= MAX_MIME_DEPTH or budget.parts >= MAX_MIME_PARTS:
        return part
    if part.is_multipart:
        boundary = headers.get_boundary()
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
    pos = start
    while pos < end:
        i = data.find(delimiter, pos, end)
        if i < 0:
            break
        newline = data.find(b"\n", i, end)
        line_end = end if newline < 0 else newline + 1
        pos = line_end
        if i != start and data[i - 1 : i] != b"\n":
            pos = i + 1
            continue
        rest = data[i + len(delimiter) : line_end].rstrip(b"\r\n")
        if rest.startswith(b"--"):
            lines.append((i, line_end, True))
            break
        if rest.strip(b" \t"):
            pos = i + 1  # a longer boundary that merely starts with ours
            continue
        lines.append((i, line_end, False))
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


def section_bytes(data: bytes, part: tuple[int, ...], section: str, fields: tuple[str, ...]) -> bytes:
    """The bytes of BODY[part.section]; empty when the part does not exist (RFC 3501 6.4.5)."""
    if part:
        root = structure(data)
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


def _header(message: Message, name: str) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())


def _addresses(message: Message, name: str) -> str:
    values = message.get_all(name)
    if not values:
        return "NIL"
    out = []
    for display, address in email.utils.getaddresses([str(v) for v in values])[:100]:
        if not address and not display:
            continue
        mailbox, _, host = address.rpartition("@") if "@" in address else (address, "", "")
        out.append(f"({quote(display or None)} NIL {quote(mailbox or None)} {quote(host or None)})")
    return "(" + "".join(out) + ")" if out else "NIL"


def envelope(message: Message) -> str:
    sender = "Sender" if message.get("Sender") else "From"
    reply_to = "Reply-To" if message.get("Reply-To") else "From"
    fields = [
        quote(_header(message, "Date")),
        quote(_header(message, "Subject")),
        _addresses(message, "From"),
        _addresses(message, sender),
        _addresses(message, reply_to),
        _addresses(message, "To"),
        _addresses(message, "Cc"),
        _addresses(message, "Bcc"),
        quote(_header(message, "In-Reply-To")),
        quote(_header(message, "Message-ID")),
    ]
    return "(" + " ".join(fields) + ")"


def _param_list(message: Message, header: str, extra_charset: bool = False) -> str:
    params = message.get_params(header=header) or []
    pairs = []
    for key, value in params[1:21]:
        text = email.utils.collapse_rfc2231_value(value) if isinstance(value, tuple) else value
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
        fields += f" {envelope(inner.headers)} {_structure(data, inner, ext)} {_line_count(body)}"
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
    searching for a word finds it however the sender encoded it."""
    message = parse(data)
    chunks: list[str] = []
    if not body_only:
        chunks.extend(f"{k}: {v}" for k, v in message.items())
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            chunks.append(payload.decode(charset, "replace"))
        except LookupError:
            chunks.append(payload.decode("utf-8", "replace"))
    return "\n".join(chunks)


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
        envelope=envelope(root.headers),
        body=bodystructure(data, root, extensible=False),
        bodystructure=bodystructure(data, root, extensible=True),
    )
