"""Mail-policy settings (SPEC.md) and the versioned settings store (R-OPS-1).

Defaults are the guide's recommended ("conseillée") values as SPEC.md gives them: a fresh
install already behaves as the guide recommends. The store keeps one JSON document per scope
(``server``, ``domain:<name>``, ``account:<address>``) in Redis, each write bumping one global
version; every service caches the documents and reloads when ``rempart.config.changed`` arrives,
or when polling sees the version move (the fallback when an event is missed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import WatchError

from rempart.common import keys

log = logging.getLogger(__name__)


# Marks a setting that is a secret (R-ADM-3): write-only in the OpenAPI document; the admin API
# answers with its count and keyed fingerprints, never its value. Every secret field carries it.
SECRET: dict[str, Any] = {"writeOnly": True, "x-rempart-secret": True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RelaySettings(_Section):
    """R-REL-1..6."""

    trusted_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    pop_before_smtp: bool = False  # dangerous (the guide): opens relay for the POP client's IP
    pop_before_smtp_minutes: int = Field(default=15, ge=1, le=1440)
    reject_unauthorized_local_sender: bool = True
    reject_auth_sender_mismatch: bool = False
    relay_only_if_sender_local: bool = True
    helo_filter_enabled: bool = False
    helo_rules: list[dict[str, str]] = Field(default_factory=list)
    helo_bypass: list[str] = Field(default_factory=list)
    connect_delay_seconds: float = Field(default=0.0, ge=0, le=60)
    pregreet_drop: bool = True


class RecipientSettings(_Section):
    """R-DOM-1 (domain scope)."""

    unknown_recipient_action: Literal["reject", "catch_all", "discard"] = "reject"
    catch_all_address: str = ""


class LimitSettings(_Section):
    """R-LIM-1..7."""

    max_messages_per_day: int = Field(default=0, ge=0)  # per user; 0 = unlimited
    domain_max_messages_per_day: int = Field(default=0, ge=0)  # domain total (hard)
    counter_timezone: str = "UTC"
    max_recipients: int = Field(default=32768, ge=1)
    max_hops: int = Field(default=20, ge=1)
    max_message_size: int = Field(default=50 * 1024 * 1024, ge=1024)
    # R-MBX-5: what an account's folders may hold, in MiB (0 = no limit). Over it: 452 4.2.2 at
    # RCPT, NO [OVERQUOTA] at APPEND and COPY; IMAP GETQUOTAROOT shows it (RFC 9208).
    mailbox_quota_mb: int = Field(default=0, ge=0)
    outbound_max_recipients_per_connection: int = Field(default=100, ge=1)


class DnsSettings(_Section):
    """R-DNS-1..7: only for unauthenticated, untrusted senders."""

    dnsbl_zones: list[str] = Field(default_factory=list)
    reputation_zone: str = ""
    require_rdns: bool = False
    rdns_bypass: list[str] = Field(default_factory=list)
    require_sender_domain: bool = True
    spf_enabled: bool = True
    spf_fail_action: Literal["reject", "tempfail", "accept"] = "reject"
    spf_softfail_action: Literal["reject", "tempfail", "accept"] = "accept"
    srs_enabled: bool = False
    srs_bypass: list[str] = Field(default_factory=list)
    # First signs, all verify (rotation); empty = a key derived from REMPART_SECRET_KEY.
    # SECRET: write-only, the admin API never returns it (R-ADM-3).
    srs_secrets: list[str] = Field(default_factory=list, json_schema_extra=SECRET)
    srs_domain: str = ""  # the SRS return domain; empty = the forwarding alias's own domain
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)


class IntrusionSettings(_Section):
    """R-IPS-1..5, the guide's recommended screen."""

    smtp: bool = True
    imap_pop: bool = True
    across_sessions: bool = True
    max_connections_per_minute: int = Field(default=5, ge=0)
    # R-IPS-6: connections from an IP (an IPv6 prefix) where an account logged in successfully
    # within ``login.known_ip_days`` do not count towards ``max_connections_per_minute``, so that
    # a household's or an office's mail clients behind one NAT are never blocked by the rate.
    # Failed logins still count and still block.
    known_ip_exempt_from_connection_rate: bool = True
    # R-IPS-6: IPv6 clients are counted and blocked per prefix of this length (one subscriber
    # gets a /64 and picks addresses in it at will); 128 counts every address alone.
    ipv6_prefix_length: int = Field(default=64, ge=32, le=128)
    max_failed_logins: int = Field(default=10, ge=0)
    failed_logins_window_minutes: int = Field(default=60, ge=1)
    max_unknown_recipients: int = Field(default=3, ge=0)
    max_relay_denials: int = Field(default=5, ge=0)
    max_rset: int = Field(default=5, ge=0)
    spam_score_threshold: float = Field(default=0.0, ge=0)  # 0 = off
    block_dnsbl_listed: bool = True
    max_message_size_mb: int = Field(default=0, ge=0)  # 0 = off
    max_simultaneous_connections: int = Field(default=0, ge=0)  # 0 = off
    simultaneous_exceptions: list[str] = Field(default_factory=list)
    # A session an edge never reported closed (crashed pod) stops counting after this.
    simultaneous_connection_ttl_seconds: int = Field(default=1800, ge=60, le=86400)
    counter_window_minutes: int = Field(default=60, ge=1)
    block_minutes: int = Field(default=1440, ge=1)
    refuse_blocked: bool = True
    close_blocked_connection: bool = True
    close_all_connections: bool = False
    whitelist: list[str] = Field(default_factory=list)


class LoginSettings(_Section):
    """R-LOG-1..4."""

    lockout_mode: Literal["lock", "slow_down", "off"] = "lock"
    max_failures: int = Field(default=5, ge=1)
    lock_minutes: int = Field(default=10, ge=1)
    failure_window_minutes: int = Field(default=10, ge=1)
    known_ip_bypass: bool = True
    known_ip_days: int = Field(default=30, ge=1)
    login_with: Literal["name_or_address", "address_only"] = "name_or_address"
    convert_percent_slash: bool = True
    aliases_as_login: bool = False
    allowed_ips: list[str] = Field(default_factory=list)  # empty = everywhere (R-LOG-3)
    failure_delay_ms: int = Field(default=1000, ge=0, le=30000)


class PasswordSettings(_Section):
    """R-PWD-1."""

    min_length: int = Field(default=10, ge=1, le=256)
    require_digit: bool = True
    require_non_alnum: bool = True
    require_upper: bool = True
    require_lower: bool = True
    forbid_user_or_domain: bool = True
    min_strength: int = Field(default=2, ge=0, le=4)


class TlsSettings(_Section):
    """R-TLS-2..3, R-TLS-5."""

    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    cipher_preset: Literal["strict", "compat"] = "strict"
    honor_server_order: bool = True
    plaintext_auth_requires_tls: bool = True
    received_hide_client_ip: bool = False
    received_add_rdns: bool = True
    received_show_auth_user: bool = False


class SmtpSettings(_Section):
    """How the SMTP edge treats a client (issue 5: abuse resistance)."""

    # CVE-2023-51766 class: "reject" refuses a message with a bare CR or LF (554); "normalize"
    # turns each into CRLF, as Postfix's smtpd_forbid_bare_newline=normalize does.
    bare_line_endings: Literal["reject", "normalize"] = "reject"
    error_budget: int = Field(default=10, ge=1, le=1000)  # 5xx replies before "421 4.7.0", close
    auth_failure_budget: int = Field(default=3, ge=1, le=100)


class SmarthostTransport(_Section):
    """R-OUT-1: a per-domain transport override, Postfix's ``[host]:port`` form (brackets: no
    MX lookup). The AUTH password is a process secret (``REMPART_SMARTHOST_PASSWORDS``), never
    a setting, so that the settings API never shows it (R-ADM-3)."""

    host: str
    username: str = ""
    implicit_tls: bool = False  # port 465 style; otherwise opportunistic STARTTLS


class OutboundSettings(_Section):
    """R-OUT-1..4, R-TLS-4, R-LIM-6: the outbound relay."""

    starttls: bool = True
    tls_min_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    max_lifetime_hours: float = Field(default=120.0, gt=0)  # 5 days, then a DSN
    # Attempt n waits the n-th value (the last one repeats): mox's and Postfix's ballpark.
    retry_backoff_seconds: list[float] = Field(
        default_factory=lambda: [300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0], min_length=1)
    delay_notice_hours: float = Field(default=4.0, ge=0)  # 0 = no delay notices
    transports: dict[str, SmarthostTransport] = Field(default_factory=dict)  # domain or "*"
    max_recipients_per_connection_exceptions: dict[str, int] = Field(default_factory=dict)
    domain_messages_per_minute: int = Field(default=0, ge=0)  # 0 = unlimited
    domain_messages_per_minute_exceptions: dict[str, int] = Field(default_factory=dict)
    sender_domain_messages_per_minute: int = Field(default=0, ge=0)
    sender_domain_messages_per_minute_exceptions: dict[str, int] = Field(default_factory=dict)
    max_connections_per_domain: int = Field(default=10, ge=1)


class TwoFactorSettings(_Section):
    """R-2FA-1."""

    required_for_admins: bool = True


class MailSettings(_Section):
    """Every run-time setting; the effective value for an account merges server, domain, account."""

    relay: RelaySettings = Field(default_factory=RelaySettings)
    recipients: RecipientSettings = Field(default_factory=RecipientSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    ips: IntrusionSettings = Field(default_factory=IntrusionSettings)
    login: LoginSettings = Field(default_factory=LoginSettings)
    password: PasswordSettings = Field(default_factory=PasswordSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    twofa: TwoFactorSettings = Field(default_factory=TwoFactorSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)


# What a domain or an account may override (SPEC "Scopes"); other sections are server-only.
SCOPED_FIELDS: dict[str, set[str]] = {
    "recipients": {"unknown_recipient_action", "catch_all_address"},
    "limits": {"max_messages_per_day", "domain_max_messages_per_day", "max_message_size", "mailbox_quota_mb"},
    "login": {"allowed_ips"},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def validate_scoped(scope: str, doc: dict[str, Any]) -> None:
    """Refuse a domain/account document that sets a server-only field; raises ValueError."""
    if scope == "server":
        MailSettings.model_validate(doc)
        return
    for section, fields in doc.items():
        allowed = SCOPED_FIELDS.get(section)
        if allowed is None or not isinstance(fields, dict) or not set(fields) <= allowed:
            raise ValueError(f"{section}: not settable at {scope.split(':')[0]} scope")
    MailSettings.model_validate(deep_merge(MailSettings().model_dump(), doc))


class SettingsStore:
    """Reads and writes the versioned documents; the admin API is the only writer."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def version(self) -> int:
        raw = await self._redis.get(keys.SETTINGS_VERSION)
        return int(raw) if raw else 0

    async def get_doc(self, scope: str) -> dict[str, Any]:
        raw = await self._redis.get(keys.settings_doc(scope))
        if not raw:
            return {}
        doc = json.loads(raw)
        return doc if isinstance(doc, dict) else {}

    async def put_doc(self, scope: str, doc: dict[str, Any]) -> int:
        """Validate and store ``doc`` for ``scope``; returns the new global version."""
        validate_scoped(scope, doc)
        body = json.dumps(doc, sort_keys=True)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.settings_doc(scope), body)
            pipe.incr(keys.SETTINGS_VERSION)
            pipe.lpush(
                keys.settings_history(scope),
                json.dumps({"time": time.time(), "doc": doc}, sort_keys=True),
            )
            pipe.ltrim(keys.settings_history(scope), 0, 49)
            result = await pipe.execute()
        return int(result[1])

    async def update_doc(
        self, scope: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> tuple[int, dict[str, Any]]:
        """Read-modify-write of one scope's document, atomic against other writers (R-ADM-2: no
        lost update). ``change`` gets the stored document and returns the new one, or raises to
        write nothing (a stale ETag); it may run more than once when another write interleaves.
        Returns the new global version and the document stored."""
        key = keys.settings_doc(scope)
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    current = json.loads(raw) if raw else {}
                    doc = change(current if isinstance(current, dict) else {})
                    validate_scoped(scope, doc)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, json.dumps(doc, sort_keys=True))
                    pipe.incr(keys.SETTINGS_VERSION)
                    pipe.lpush(
                        keys.settings_history(scope),
                        json.dumps({"time": time.time(), "doc": doc}, sort_keys=True),
                    )
                    pipe.ltrim(keys.settings_history(scope), 0, 49)
                    result = await pipe.execute()
                except WatchError:
                    continue
            return int(result[1]), doc

    async def delete_doc(self, scope: str) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.settings_doc(scope))
            pipe.incr(keys.SETTINGS_VERSION)
            result = await pipe.execute()
        return int(result[1])


class SettingsCache:
    """A service's cached view of the settings, reloaded on change events and by polling."""

    def __init__(self, redis: aioredis.Redis, poll_seconds: float = 1.0) -> None:
        self._store = SettingsStore(redis)
        self._poll_seconds = poll_seconds
        self._version = -1
        self._docs: dict[str, dict[str, Any]] = {}
        self._server = MailSettings()
        self._effective: dict[tuple[str, str], MailSettings] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], Awaitable[None]]] = []

    @property
    def server(self) -> MailSettings:
        return self._server

    @property
    def version(self) -> int:
        return self._version

    def on_change(self, listener: Callable[[], Awaitable[None]]) -> None:
        self._listeners.append(listener)

    async def refresh(self, force: bool = False) -> bool:
        """Reload when the stored version moved; returns True when something was reloaded."""
        async with self._lock:
            version = await self._store.version()
            if version == self._version and not force:
                return False
            server_doc = await self._store.get_doc("server")
            self._server = MailSettings.model_validate(
                deep_merge(MailSettings().model_dump(), server_doc)
            )
            self._docs = {"server": server_doc}
            self._effective.clear()
            self._version = version
        log.info("settings reloaded", extra={"settings_version": version})
        for listener in self._listeners:
            await listener()
        return True

    async def effective(self, domain: str = "", account: str = "") -> MailSettings:
        """The settings for an account: server, then domain, then account overrides."""
        if not domain and not account:
            return self._server
        cache_key = (domain, account)
        found = self._effective.get(cache_key)
        if found is not None:
            return found
        merged = self._server.model_dump()
        if domain:
            merged = deep_merge(merged, await self._scoped_doc(f"domain:{domain}"))
        if account:
            merged = deep_merge(merged, await self._scoped_doc(f"account:{account}"))
        result = MailSettings.model_validate(merged)
        self._effective[cache_key] = result
        return result

    async def _scoped_doc(self, scope: str) -> dict[str, Any]:
        doc = self._docs.get(scope)
        if doc is None:
            doc = await self._store.get_doc(scope)
            self._docs[scope] = doc
        return doc

    def start_polling(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="settings-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.refresh()
            except (aioredis.RedisError, OSError) as exc:
                log.warning("settings poll failed: %s", exc)
