"""The trace header an MTA adds (RFC 5321 4.4) with the R-TLS-5 options."""

from __future__ import annotations

import datetime
from email.utils import format_datetime


def received_header(
    *,
    helo: str,
    client_ip: str,
    client_rdns: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls_version: str = "",
    tls_cipher: str = "",
    auth_account: str = "",
    hide_client_ip: bool = False,
    add_rdns: bool = True,
) -> bytes:
    """``protocol`` is the RFC 3848 "with" keyword: ESMTP, ESMTPS, ESMTPA, ESMTPSA or SMTP."""
    helo = _clean(helo)[:255] or "unknown"
    if hide_client_ip:
        source = f"from {helo}"
    else:
        rdns = _clean(client_rdns) if add_rdns and client_rdns else "unknown"
        source = f"from {helo} ({rdns} [{client_ip}])"
    lines = [f"Received: {source}", f"\tby {hostname} (Rempart) with {protocol} id {queue_id}"]
    if tls_version:
        cipher = f" with cipher {_clean(tls_cipher)}" if tls_cipher else ""
        lines.append(f"\t(using {_clean(tls_version)}{cipher})")
    if auth_account:
        lines.append(f"\t(authenticated as {_clean(auth_account)})")
    suffix = f"; {format_datetime(datetime.datetime.now(datetime.UTC))}"
    if recipient:
        lines.append(f"\tfor <{_clean(recipient)}>{suffix}")
    else:
        lines[-1] += suffix
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _clean(value: str) -> str:
    # A HELO name is client-controlled: no line breaks or parentheses may leak into the header.
    return "".join(c for c in value if c.isprintable() and c not in "()\r\n")


def count_hops(data: bytes) -> int:
    """Received headers in the message's header section (R-LIM-5)."""
    header_end = data.find(b"\r\n\r\n")
    head = data if header_end < 0 else data[: header_end + 2]
    hops = 0
    for line in head.split(b"\r\n"):
        if line[:9].lower() == b"received:":
            hops += 1
    return hops


def has_bare_line_ending(data: bytes) -> bool:
    """A CR or LF that is not part of CRLF: the raw material of SMTP smuggling (CVE-2023-51766)."""
    return data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n")


def normalize_line_endings(data: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF (the "normalize" choice of settings smtp.bare_line_endings)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
