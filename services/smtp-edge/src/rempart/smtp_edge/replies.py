"""SMTP replies of the edge, shared by the code and the tests (RFC 5321, RFC 3463 codes)."""

from __future__ import annotations

from rempart.common.pb.policy.v1 import policy_pb2

GREETING_IDENT = "ESMTP Rempart"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure"
AUTH_ABORTED = "501 5.7.0 Auth aborted"
AUTH_BAD_BASE64 = "501 5.5.2 Can't decode base64"
AUTH_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
STORE_TEMPFAIL = "451 4.3.0 Temporary local problem - please try later"
BARE_LINE_ENDING = "554 5.6.11 Bare CR or LF in message data is not allowed"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_BUSY = "421 4.3.2 Too many connections, try again later"
RCPT_OK = "250 2.1.5 Ok"
MAIL_OK = "250 2.1.0 Ok"
RSET_OK = "250 2.0.0 Ok"
PREGREET = "554 5.7.1 Protocol error: talking before the greeting"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many failed authentications, closing connection"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_MALFORMED = "501 5.5.2 {error}"
DSN_PARAMETER_INVALID = "501 5.5.4 Invalid {name} parameter"
HELO_OK = "250 {hostname}"
INTERNAL_ERROR = "421 4.3.0 Internal error, closing connection"
# R-IPS-4: said to every open connection of a freshly blocked IP (the block's own words after it).
IP_BLOCKED = "421 4.0.0 {refusal}"

# ENHANCEDSTATUSCODES (RFC 2034) is advertised, so every reply but the greeting, the EHLO/HELO
# answers and the intermediate 334/354 carries an RFC 3463 code. aiosmtpd's own replies have
# none: these are the codes they get, by basic code.
DEFAULT_ENHANCED = {
    "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "252": "2.5.0",
    "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0", "455": "4.5.4",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
    "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3", "554": "5.0.0",
    "555": "5.5.4",
}
# aiosmtpd's texts for R-LIM-7, in the words SPEC.md uses.
REWORDED = {
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed maximum message size",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed maximum message size",
}


def with_enhanced_code(status: str) -> str:
    """``status`` with an RFC 3463 code after the basic one when it has none."""
    status = REWORDED.get(status, status)
    code, sep, text = status.partition(" ")
    if len(code) != 3 or not code.isdigit() or code in ("220", "334", "354"):
        return status
    first = text.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return status
    enhanced = DEFAULT_ENHANCED.get(code)
    return f"{code} {enhanced} {text}" if enhanced and sep else status


def of_verdict(verdict: policy_pb2.Verdict) -> str:
    """The reply a policy verdict says: basic code, enhanced code, text."""
    enhanced = f" {verdict.enhanced_code}" if verdict.enhanced_code else ""
    return f"{verdict.code}{enhanced} {verdict.text}".rstrip()
