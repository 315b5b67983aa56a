"""What IMAP FETCH and POP3 TOP show of a stored message: header and body sections, ENVELOPE
and BODYSTRUCTURE (RFC 3501 7.4.2), built with the standard library's email parser.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import Message

from rempart.imap_pop.imapproto import quote

BOUNDARY = b"\r\n\r\n"


def normalise(data: bytes) -> bytes:
    """CRLF line ends throughout, as IMAP and POP3 require."""
    if b"\n" in data.replace(b"\r\n", b""):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header including the blank line, body)."""
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


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def _part(message: Message, path: tuple[int, ...]) -> Message | None:
    current = message
    for number in path:
        if current.is_multipart():
            payload = current.get_payload()
            if not isinstance(payload, list) or number > len(payload):
                return None
            chosen = payload[number - 1]
            if not isinstance(chosen, Message):
                return None
            current = chosen
        elif number != 1:
            return None
        elif current.get_content_type() == "message/rfc822":
            inner = current.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                current = inner[0]
    return current


def section_bytes(data: bytes, part: tuple[int, ...], section: str, fields: tuple[str, ...]) -> bytes:
    """The bytes of BODY[part.section]; empty when the part does not exist (RFC 3501 6.4.5)."""
    if part:
        message = _part(parse(data), part)
        if message is None:
            return b""
        if section == "MIME" or not section:
            raw = normalise(message.as_bytes())
            head, body = split_header(raw)
            return head if section == "MIME" else body
        data = normalise(message.as_bytes())
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


def bodystructure(message: Message, depth: int = 0) -> str:
    """BODYSTRUCTURE without extension data (allowed by RFC 3501's grammar)."""
    if message.is_multipart() and depth < 20:
        payload = message.get_payload()
        parts = payload if isinstance(payload, list) else []
        inner = "".join(bodystructure(p, depth + 1) for p in parts[:200] if isinstance(p, Message))
        return f"({inner} {quote(message.get_content_subtype().upper())})"
    maintype = message.get_content_maintype().upper()
    subtype = message.get_content_subtype().upper()
    params = message.get_params(header="content-type") or []
    pairs = [f"{quote(k.upper())} {quote(str(v))}" for k, v in params[1:] if isinstance(v, str)][:20]
    if maintype == "TEXT" and not any(k.upper() == "CHARSET" for k, _ in params[1:]):
        pairs.insert(0, '"CHARSET" "US-ASCII"')
    param_list = "(" + " ".join(pairs) + ")" if pairs else "NIL"
    raw = normalise(message.as_bytes())
    _, body = split_header(raw)
    encoding = (message.get("Content-Transfer-Encoding") or "7BIT").strip().upper()
    fields = (
        f"{quote(maintype)} {quote(subtype)} {param_list} {quote(_header(message, 'Content-ID'))} "
        f"{quote(_header(message, 'Content-Description'))} {quote(encoding)} {len(body)}"
    )
    if maintype == "TEXT":
        lines = body.count(b"\r\n")
        fields += f" {lines}"
    return f"({fields})"
