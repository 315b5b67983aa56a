"""Every reply the policy service gives: the guide's texts exactly as SPEC.md gives them.

Code and tests share these, so that a changed word is one change and a test asserts what a
mail client really sees. Addresses appear in angle brackets and IPs in square brackets, in
the sendmail style the guide's texts follow (``<bob@example.org>... Unknown user``).
"""

from __future__ import annotations

from rempart.common.clients import TEMPFAIL_TEXT

OK = "Ok"
CONNECT_OK = "Service ready"

# R-IPS-4
def intrusion_prevention_active(ip: str) -> str:
    return f"Intrusion prevention active for [{ip}]"


# R-MBX-5
def mailbox_full(address: str) -> str:
    return f"<{address}>... Mailbox full, try again later"


# R-DOM-1
def unknown_user(address: str) -> str:
    return f"<{address}>... Unknown user"


# R-REL-1, R-REL-4
def we_do_not_relay(sender: str, recipient: str) -> str:
    return f"<{sender}>... we do not relay <{recipient}>"


# R-REL-2
def access_not_allowed(sender: str, recipient: str) -> str:
    return f"<{sender}> Access to <{recipient}> not allowed"


# R-REL-3
def permission_denied(sender: str) -> str:
    return f"<{sender}>... Permission denied"


TOO_MANY_RECIPIENTS = "Too many recipients"  # R-LIM-4
TOO_MANY_HOPS = "Too many hops"  # R-LIM-5
MESSAGE_TOO_BIG = "Message size exceeds fixed maximum message size"  # R-LIM-7
DAILY_LIMIT_EXCEEDED = "Daily sending limit exceeded"  # R-LIM-1/2
BAD_RECIPIENT_SYNTAX = "Bad recipient address syntax"
BAD_SENDER_SYNTAX = "Bad sender address syntax"

# A dependency (Redis) failed: fail closed (R-OPS-3). Same text as the edges' own fallback.
TEMPORARY_PROBLEM = TEMPFAIL_TEXT


# R-DNS-1
def dnsbl_listed(ip: str, zone: str) -> str:
    return f"Service unavailable; client [{ip}] blocked using {zone}"


# R-DNS-2: the answers of an IP reputation zone, and the trace header that carries the result.
IP_REPUTATION_HEADER = "X-Rempart-IP-Reputation"
REPUTATION_ACCEPTED = "Accepted"
REPUTATION_BLACKLISTED = "Blacklisted"
REPUTATION_GREYLISTED = "Greylisted"


def reputation_blacklisted(ip: str, zone: str) -> str:
    return f"Service unavailable; client [{ip}] has a bad IP reputation at {zone}"


def reputation_greylisted(ip: str) -> str:
    return f"Client [{ip}] greylisted by IP reputation, try again later"


# R-DNS-3
def sender_ip_must_resolve(sender: str) -> str:
    return f"<{sender}>... Sender IP must resolve"


# R-DNS-4
def sender_domain_must_exist(sender: str) -> str:
    return f"<{sender}>... Sender domain must exist"


# R-DNS-5 (RFC 7372: X.7.23 "SPF validation failed")
def spf_failed(identity: str) -> str:
    return f"<{identity}>... SPF validation failed"


# R-DNS-7: a DNS timeout or SERVFAIL is never a permanent refusal.
DNS_TEMPORARY_FAILURE = "Temporary DNS failure, try again later"


# R-REL-5
def helo_rejected(helo: str) -> str:
    return f"<{helo}>... HELO rejected"


# R-IPS-3 simultaneous connections
def too_many_connections(ip: str) -> str:
    return f"Too many connections from [{ip}]"
