"""Replies the relay records per recipient: the remote's own, or one the relay makes up for
what went wrong before a remote answered (RFC 3463 codes). The DSN's Status and
Diagnostic-Code fields come from these."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")

# R-TLS-4: the guide's client-session log line, exactly.
TLS_NOT_VERIFIED = "Client session SSL: Not verified ({code}) - proceed anyway"


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str
    remote: bool = False  # said by a remote server (DSN "Diagnostic-Code: smtp; ...")

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".strip()

    @classmethod
    def from_smtp(cls, code: int, message: str) -> Reply:
        """A remote reply; its enhanced code if it gave one, else the class's default."""
        text = " ".join(message.split())
        first, _, rest = text.partition(" ")
        if _ENHANCED.match(first) and first[0] == str(code)[0]:
            return cls(code, first, rest, remote=True)
        return cls(code, f"{str(code)[0]}.0.0", text, remote=True)

    @classmethod
    def parse(cls, line: str) -> Reply:
        code_text, _, rest = line.partition(" ")
        code = int(code_text) if code_text.isdigit() else 451
        first, _, text = rest.partition(" ")
        if _ENHANCED.match(first):
            return cls(code, first, text)
        return cls(code, f"{str(code)[0]}.0.0", rest)


def connection_failed(detail: str) -> Reply:
    return Reply(451, "4.4.1", f"Connection failed: {detail}"[:400])


def connection_lost(detail: str) -> Reply:
    return Reply(451, "4.4.2", f"Connection lost: {detail}"[:400])


EXPIRED = Reply(554, "4.4.7", "Message expired: delivery not possible within the maximum lifetime")
# Not an SMTP reply: what a recipient removed from the queue through the admin API is left with.
REMOVED = Reply(550, "5.0.0", "Removed from the queue by an administrator, not delivered")
BLOB_UNREADABLE = Reply(451, "4.3.0", "Message body could not be read from the store")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Remote server does not support SMTPUTF8, needed for this address")
