"""The one place that names Redis keys. Every key starts with ``rp:``.

Nothing else in Rempart spells a key: call these functions, so that a rename or a new tenant
prefix is one change, and a reader can see every piece of shared state in one page.
"""

from __future__ import annotations

PREFIX = "rp:"

# Settings store (R-OPS-1): one versioned JSON document per scope.
SETTINGS_VERSION = PREFIX + "cfg:version"


def settings_doc(scope: str) -> str:
    """``scope`` is ``server``, ``domain:<name>`` or ``account:<address>``."""
    return f"{PREFIX}cfg:doc:{scope}"


def settings_history(scope: str) -> str:
    return f"{PREFIX}cfg:hist:{scope}"


# Directory: domains, accounts, aliases.
DOMAINS = PREFIX + "dir:domains"


def domain(name: str) -> str:
    return f"{PREFIX}dir:domain:{name}"


def domain_accounts(name: str) -> str:
    return f"{PREFIX}dir:domain:{name}:accounts"


def account(address: str) -> str:
    return f"{PREFIX}dir:account:{address}"


def alias(address: str) -> str:
    return f"{PREFIX}dir:alias:{address}"


def domain_alias(name: str) -> str:
    return f"{PREFIX}dir:domalias:{name}"


def credentials(address: str) -> str:
    return f"{PREFIX}auth:cred:{address}"


# Auth state (R-LOG-1): failures and locks.
def login_failures(address: str) -> str:
    return f"{PREFIX}auth:fail:{address}"


def login_lock(address: str) -> str:
    return f"{PREFIX}auth:lock:{address}"


def known_login_ips(address: str) -> str:
    return f"{PREFIX}auth:knownip:{address}"


# Intrusion prevention (R-IPS): counters per IP and trigger, and blocks. ``ip`` is the IPS
# subject: an IPv4 address, or for IPv6 the network address of the client's prefix (R-IPS-6).
# The triggers the policy service counts; an unblock (the policy's or the admin API's) clears
# every one of them.
IPS_TRIGGER_CONNECTIONS = "conn"
IPS_TRIGGER_FAILED_LOGINS = "authfail"
IPS_TRIGGER_UNKNOWN_RECIPIENTS = "unknown"
IPS_TRIGGER_RELAY_DENIALS = "relay"
IPS_TRIGGER_RSET = "rset"
IPS_TRIGGERS = (IPS_TRIGGER_CONNECTIONS, IPS_TRIGGER_FAILED_LOGINS, IPS_TRIGGER_UNKNOWN_RECIPIENTS,
                IPS_TRIGGER_RELAY_DENIALS, IPS_TRIGGER_RSET)


def ips_counter(trigger: str, ip: str) -> str:
    return f"{PREFIX}ips:cnt:{trigger}:{ip}"


def ips_block(ip: str) -> str:
    return f"{PREFIX}ips:block:{ip}"


IPS_BLOCKS = PREFIX + "ips:blocks"


def ips_connections(ip: str) -> str:
    return f"{PREFIX}ips:conns:{ip}"


def ips_known(ip: str) -> str:
    """R-IPS-6: an account logged in successfully from this IPS subject; TTL the known-IP window."""
    return f"{PREFIX}ips:known:{ip}"


# Sending limits (R-LIM-1..3).
def sent_external(address: str, day: str) -> str:
    return f"{PREFIX}lim:sent:{day}:{address}"


def domain_sent_external(domain_name: str, day: str) -> str:
    return f"{PREFIX}lim:dsent:{day}:{domain_name}"


# Mailbox index (DESIGN.md "Durability"): derived from the MAIL stream, rebuildable.
def mailbox_meta(mailbox: str, folder: str) -> str:
    return f"{PREFIX}mbx:{{{mailbox}}}:{folder}:meta"


def mailbox_uids(mailbox: str, folder: str) -> str:
    return f"{PREFIX}mbx:{{{mailbox}}}:{folder}:uids"


def mailbox_message(mailbox: str, folder: str, uid: int) -> str:
    return f"{mailbox_message_prefix(mailbox, folder)}{uid}"


def mailbox_txn(mailbox: str, folder: str) -> str:
    """Hash transaction id -> UID: makes indexing a delivery record idempotent."""
    return f"{PREFIX}mbx:{{{mailbox}}}:{folder}:txn"


def mailbox_folders(mailbox: str) -> str:
    return f"{PREFIX}mbx:{{{mailbox}}}:folders"


# Outside the rp:mbx: space so that a flush keeps it: UIDVALIDITY only ever grows.
UIDVALIDITY_SEQ = PREFIX + "uidvalidity:seq"
MAILBOX_ALL_PATTERN = PREFIX + "mbx:*"
INDEX_STREAM_SEQ = PREFIX + "mbx:indexed-seq"


# Admin API sessions (R-LOG-5): the SHA-256 of the bearer token, never the token itself.
def admin_session(token_sha256: str) -> str:
    return f"{PREFIX}admin:session:{token_sha256}"


# Admin API keys (R-ADM-1): a record per key (the HMAC of the key, never the key) and the index of
# all keys by creation time.
ADMIN_API_KEYS = PREFIX + "admin:apikeys"
# The bootstrap superadmin's audit record while it is not yet acknowledged (written on the next try).
ADMIN_BOOTSTRAP_AUDIT = PREFIX + "admin:bootstrap:audit"


def admin_api_key(key_id: str) -> str:
    return f"{PREFIX}admin:apikey:{key_id}"


# Statistics (issue 12): per time bucket, a hash of counts and a sorted set of blocked IPs.
def stats_counts(granularity: int, bucket: int) -> str:
    """The hash of counts of the bucket that starts at ``bucket`` (Unix seconds)."""
    return f"{PREFIX}stats:{granularity}:{bucket}"


def stats_blocked_ips(granularity: int, bucket: int) -> str:
    """The sorted set (IP -> refusals while blocked) of the same bucket."""
    return f"{PREFIX}stats:{granularity}:{bucket}:ips"


# Relay (R-REL-1): POP-before-SMTP, the IPs that logged in over IMAP/POP3 recently.
def pop_before_smtp(ip: str) -> str:
    return f"{PREFIX}rel:pbs:{ip}"


def mailbox_special_use(mailbox: str) -> str:
    """Hash folder -> RFC 6154 attribute (``\\Sent`` ...); its existence means "provisioned"."""
    return f"{PREFIX}mbx:{{{mailbox}}}:special-use"


def mailbox_subscriptions(mailbox: str) -> str:
    """Set of subscribed folder names (RFC 3501 6.3.6); absent: every folder counts as subscribed
    (accounts from before subscriptions were kept)."""
    return f"{PREFIX}mbx:{{{mailbox}}}:subscriptions"


def mailbox_vanished(mailbox: str, folder: str) -> str:
    """Sorted set UID -> MODSEQ of its expunge (QRESYNC, RFC 7162 3.2.5)."""
    return f"{PREFIX}mbx:{{{mailbox}}}:{folder}:vanished"


# How many index entries (every account, every folder, copies too) refer to a delivery: the
# last one going away frees its bytes (R-MBX-5). Under rp:mbx:, so a rebuild counts them anew.
MESSAGE_REFS_PREFIX = PREFIX + "mbx:ref:"


def message_refs(transaction_id: str) -> str:
    return MESSAGE_REFS_PREFIX + transaction_id


def mailbox_usage(mailbox: str) -> str:
    """Hash bytes, messages: what the account's folders hold (RFC 9208 QUOTA, R-MBX-5)."""
    return f"{PREFIX}mbx:{{{mailbox}}}:usage"


def mailbox_changes(mailbox: str, folder: str) -> str:
    """Sorted set UID -> MODSEQ of its last change: what a session catches up with (R-MBX-2)."""
    return f"{PREFIX}mbx:{{{mailbox}}}:{folder}:bymodseq"


def mailbox_uid_cache(mailbox: str, folder: str) -> str:
    """A folder's UIDs at a MODSEQ (``mailstore.UidCache``): what SELECT starts from."""
    return f"{PREFIX}mbx:{{{mailbox}}}:{folder}:uidcache"


def mailbox_journal(mailbox: str) -> str:
    """Hash name -> a change Redis made that the change log may not have yet (``mailstore``)."""
    return f"{PREFIX}mbx:{{{mailbox}}}:journal"


MAILBOX_JOURNAL_PATTERN = PREFIX + "mbx:{*}:journal"


def account_of_mailbox_key(key: str) -> str:
    """The account a per-account mailbox key belongs to (what its braces hold)."""
    return key[key.index("{") + 1 : key.rindex("}")]


def mailbox_modseq(mailbox: str) -> str:
    """The account's change counter: each flag change takes the next value, which orders the
    change log's flag records the way Redis applied them."""
    return f"{PREFIX}mbx:{{{mailbox}}}:modseq"


def imap_account_sessions(account: str) -> str:
    """Sorted set session id -> expiry (ms): an account's IMAP sessions on every replica."""
    return f"{PREFIX}imap:sessions:{{{account}}}"


def pop3_maildrop_lock(mailbox: str) -> str:
    """RFC 1939 4 / RFC 3206 [IN-USE]: one POP3 session per maildrop, short TTL, refreshed."""
    return f"{PREFIX}pop3:lock:{{{mailbox}}}"


# Auth (R-2FA-1, R-TLS-2): the last TOTP time step used (replay protection), SCRAM conversations.
# TOTP secrets, recovery codes and app passwords live in the credentials hash, so that deleting
# an account deletes them with the password.
def totp_last_step(address: str) -> str:
    return f"{PREFIX}auth:totpstep:{address}"


def scram_conversation(conversation_id: str) -> str:
    return f"{PREFIX}auth:scram:{conversation_id}"


def mailbox_message_prefix(mailbox: str, folder: str) -> str:
    """The message keys of a folder are this prefix plus the UID (used inside Lua)."""
    return f"{PREFIX}mbx:{{{mailbox}}}:{folder}:msg:"


# Outbound relay (R-OUT-2, R-OUT-3): per-recipient results of a queued transaction, the queue
# (transaction id -> arrival time, for depth and age), and the R-LIM-6 per-minute counters.
def relay_recipients(transaction_id: str) -> str:
    return f"{PREFIX}out:rcpt:{transaction_id}"


RELAY_QUEUE = PREFIX + "out:queue"


def relay_rate(kind: str, domain_name: str, minute: int) -> str:
    """``kind`` is ``dst`` (destination domain) or ``src`` (sender domain)."""
    return f"{PREFIX}out:rate:{kind}:{domain_name}:{minute}"


# DKIM signing keys (R-OUT-5): per local domain, a hash selector -> key record (the private key
# sealed with REMPART_SECRET_KEY); the version moves at every change so relays reload.
def dkim_keys(domain_name: str) -> str:
    return f"{PREFIX}dkim:keys:{domain_name}"


DKIM_VERSION = PREFIX + "dkim:version"


# MTA-STS (RFC 8461): a destination's policy, cached for its max_age and shared by the relays.
def mta_sts_policy(domain_name: str) -> str:
    return f"{PREFIX}out:sts:{domain_name}"


# The outbound queue as an admin resource (rempart.common.outqueue): a queued transaction's
# envelope facts (sender, recipients, size, arrival, MAIL stream sequence), the retries asked
# for (transaction id -> when), a removal (the relay drops the record and never sends it again)
# and the lock of the relay replica working on a transaction.
def relay_message(transaction_id: str) -> str:
    return f"{PREFIX}out:msg:{transaction_id}"


RELAY_RETRIES = PREFIX + "out:retry"


def relay_removed(transaction_id: str) -> str:
    return f"{PREFIX}out:removed:{transaction_id}"


def relay_lock(transaction_id: str) -> str:
    return f"{PREFIX}out:lock:{transaction_id}"
