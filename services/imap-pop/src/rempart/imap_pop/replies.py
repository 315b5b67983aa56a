"""Reply texts the code and the tests share (SPEC R-LOG-4, R-TLS-2, DESIGN.md "Contracts")."""

from __future__ import annotations

# IMAP (RFC 3501, RFC 5530 response codes)
IMAP_GREETING = "Rempart IMAP4rev1 ready"
IMAP_AUTH_FAILED = "NO [AUTHENTICATIONFAILED] Authentication failed."
IMAP_TEMPFAIL = "NO [UNAVAILABLE] Temporary failure, try later"
IMAP_PRIVACY_REQUIRED = "NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections"
IMAP_BYE_TEMPFAIL = "* BYE [UNAVAILABLE] Temporary failure, try later"
IMAP_BYE_SHUTDOWN = "* BYE Server shutting down"
IMAP_BYE_TOO_MANY_BAD = "* BYE Too many invalid commands"
IMAP_BYE_AUTOLOGOUT = "* BYE Autologout; idle for too long"
IMAP_BYE_TOO_MANY_SESSIONS = "* BYE [UNAVAILABLE] Too many connections, try later"
IMAP_TOO_MANY_ACCOUNT_SESSIONS = "NO [LIMIT] Too many connections for this account, close one and try again"
IMAP_BYE_DESYNC = "* BYE Command stream out of step, closing"
IMAP_BYE_LOGOUT = "* BYE Rempart IMAP4rev1 logging out"
IMAP_LITERAL_TOO_LARGE = "BAD [TOOBIG] Literal too large"
IMAP_LINE_TOO_LONG = "* BAD Line too long"

# POP3 (RFC 1939, RFC 2449 CAPA, RFC 3206 response codes)
POP3_GREETING = "+OK Rempart POP3 ready"
# RFC 3206 5: AUTH-RESP-CODE is advertised, so a credentials failure says [AUTH]; the text
# after it is the guide's (R-LOG-4), the same whether the user exists or not.
POP3_AUTH_FAILED = "-ERR [AUTH] Unknown user or incorrect password"
POP3_TEMPFAIL = "-ERR [SYS/TEMP] Temporary failure, try later"
POP3_PLAINTEXT_DISALLOWED = "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections"
POP3_SHUTDOWN = "-ERR [SYS/TEMP] Server shutting down"
POP3_TOO_MANY_BAD = "-ERR Too many invalid commands"
POP3_AUTOLOGOUT = "-ERR Autologout; idle for too long"
POP3_TOO_MANY_SESSIONS = "-ERR [SYS/TEMP] Too many connections, try later"
POP3_BYE = "+OK Rempart POP3 signing off"
POP3_IN_USE = "-ERR [IN-USE] Mailbox locked by another POP3 session"
POP3_DESYNC = "-ERR Command stream out of step, closing"
POP3_BAD_CHARACTERS = "-ERR Invalid characters in command"
POP3_LINE_TOO_LONG = "-ERR Line too long"

MAX_BAD_COMMANDS = 10
MAX_LINE = 8192
MAX_LITERAL = 64 * 1024
IMAP_IDLE_KEEPALIVE = "* OK Still here"
