"""Process settings of the imap-pop service (``REMPART_*``); built once in ``main()``."""

from __future__ import annotations

from pydantic import Field

from rempart.common.settings import EdgeSettings


class ImapPopSettings(EdgeSettings):
    ops_port: int = 9102
    # 0 picks a free port (tests); -1 turns the listener off.
    imap_port: int = 2143
    imaps_port: int = 2993
    pop3_port: int = 2110
    pop3s_port: int = 2995
    max_sessions: int = Field(default=5000, ge=1)
    # RFC 3501 5.4: at least 30 minutes; RFC 1939 3: at least 10 minutes. The timeout covers a
    # whole command (line, literals, SASL continuations): a client trickling one byte a second
    # (slow-loris) is cut when it runs out, not kept alive by each byte.
    imap_idle_timeout_seconds: float = Field(default=1800.0, gt=0)
    pop3_idle_timeout_seconds: float = Field(default=600.0, gt=0)
    # Before login a client has no claim on those minutes: a connection that never logs in
    # holds a session slot this long at most (both protocols).
    preauth_timeout_seconds: float = Field(default=60.0, gt=0)
    # IDLE keepalive: an untagged OK this often, so that load balancers and NAT with idle
    # timeouts (AWS NLB: 350 s) do not cut an IDLE silently.
    idle_keepalive_seconds: float = Field(default=120.0, gt=0)
    # After a closing error (too many bad commands, a lost command stream), keep reading and
    # dropping input this long so the client reads our last line instead of a TCP reset.
    linger_seconds: float = Field(default=1.0, ge=0)
    # IMAP sessions one account may hold at once, over every replica (0: no limit). Thunderbird
    # keeps up to 5 per profile; a phone and a laptop or two stay far below.
    imap_max_sessions_per_account: int = Field(default=50, ge=0)
    # A session's place among them lives this long unless the session renews it (a replica that
    # dies frees its places by themselves).
    imap_session_claim_seconds: float = Field(default=120.0, ge=5)
    # RFC 3206 [IN-USE]: the POP3 maildrop lock lives this long unless its session renews it.
    pop3_lock_seconds: float = Field(default=60.0, ge=1)
    # IDLE wakes on rempart.mailbox.<id>.changed; this poll catches a missed event.
    idle_poll_seconds: float = Field(default=10.0, gt=0)
    proxy_header_timeout_seconds: float = Field(default=5.0, gt=0)
    tls_handshake_timeout_seconds: float = Field(default=15.0, gt=0)
    run_indexer: bool = True
    # The background compactor folds an account's change log into its snapshot once the log
    # holds more than this many of its records (0: never; `python -m rempart.common.reindex
    # --compact` still does). Replay of an account after a Redis loss reads at most about this.
    mailbox_compact_records: int = Field(default=10_000, ge=0)
    # How often (with jitter) the compactor looks for such accounts: one stream-info request.
    mailbox_compact_every_seconds: float = Field(default=60.0, gt=0)
    # Messages each replica keeps as it served them (MiB), so that a message read again (a second
    # client, a re-sync) is not read from JetStream again; 0 turns the cache off.
    imap_content_cache_mb: int = Field(default=64, ge=0)
