"""Parsing and normalising SMTP envelope addresses (RFC 5321 section 4.1.2).

Relay tricks hide a remote destination inside an address that looks local: ``user%remote@local``
(the "percent hack"), ``remote!user@local`` (UUCP bang paths), ``"user@remote"@local`` (a quoted
local part), ``@local:user@remote`` (source routes), ``user@local.`` (trailing dot) and
``user@[1.2.3.4]`` (address literals). We normalise each to the one address it really names and
never interpret routing characters in a local part: such a recipient in a local domain is an
unknown user, never a relay.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from rempart.common.directory import valid_domain_name

MAX_PATH = 256  # RFC 5321 4.5.3.1.3
MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
ROUTING_CHARACTERS = frozenset("%!@")
_ATEXT_SPECIALS = frozenset("!#$%&'*+-/=?^_`{|}~.")


class AddressError(ValueError):
    """Not a usable envelope address."""


@dataclass(frozen=True)
class MailAddress:
    local: str
    domain: str  # lower case, no trailing dot; an address literal keeps its brackets

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def has_routing_characters(self) -> bool:
        """``%``, ``!`` or ``@`` in the local part: an old routing syntax we never honour."""
        return any(c in ROUTING_CHARACTERS for c in self.local)


def _strip_brackets(text: str) -> str:
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _strip_source_route(text: str) -> str:
    # RFC 5321 4.1.1.3 / appendix C: servers SHOULD ignore a source route and deliver to the
    # final mailbox. Only a leading "@host,...:" is a route; a quoted local part may hold ':'.
    if text.startswith("@"):
        colon = text.find(":")
        if colon < 0:
            raise AddressError("source route without mailbox")
        return text[colon + 1 :]
    return text


def _split(text: str) -> tuple[str, str]:
    """Split at the '@' that ends the local part, honouring a quoted local part."""
    if text.startswith('"'):
        chars: list[str] = []
        i = 1
        while i < len(text):
            c = text[i]
            if c == "\\":
                if i + 1 >= len(text):
                    raise AddressError("dangling escape")
                chars.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                break
            chars.append(c)
            i += 1
        else:
            raise AddressError("unterminated quoted local part")
        rest = text[i + 1 :]
        if not rest.startswith("@"):
            raise AddressError("missing domain")
        local = "".join(chars)
        if any(ord(c) < 32 or ord(c) == 127 for c in local):
            raise AddressError("control character in local part")
        return local, rest[1:]
    local, sep, domain = text.rpartition("@")
    if not sep:
        raise AddressError("missing domain")
    for c in local:
        if not (c.isalnum() or c in _ATEXT_SPECIALS or c == "@"):
            raise AddressError("character not allowed in local part")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError("misplaced dot in local part")
    return local, domain


def _normalize_domain(domain: str) -> str:
    domain = domain.strip().lower()
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        if inner.startswith("ipv6:"):
            inner = inner[5:]
        try:
            ip = ipaddress.ip_address(inner)
        except ValueError as exc:
            raise AddressError("bad address literal") from exc
        return f"[{'ipv6:' if ip.version == 6 else ''}{ip.compressed}]"
    # "local.org." is the same domain as "local.org" (a fully qualified name): one decision.
    if domain.endswith("."):
        domain = domain[:-1]
    if len(domain) > MAX_DOMAIN or not valid_domain_name(domain):
        raise AddressError("bad domain")
    return domain


def parse_address(raw: str) -> MailAddress:
    """Normalise a MAIL FROM / RCPT TO path to the mailbox it names; raises AddressError."""
    if len(raw) > MAX_PATH + 2:
        raise AddressError("path too long")
    text = _strip_source_route(_strip_brackets(raw))
    if not text:
        raise AddressError("empty address")
    local, domain = _split(text)
    if not local or len(local) > MAX_LOCAL_PART:
        raise AddressError("bad local part length")
    return MailAddress(local.lower(), _normalize_domain(domain))


def parse_sender(raw: str) -> MailAddress | None:
    """MAIL FROM: None for the null sender ``<>``."""
    if not _strip_brackets(raw):
        return None
    return parse_address(raw)
