"""SMTP replies of the edge, shared by the code and the tests (RFC 5321, RFC 3463 codes)."""

from __future__ import annotations

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
