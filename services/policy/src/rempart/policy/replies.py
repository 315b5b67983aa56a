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
