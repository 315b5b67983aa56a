"""The decision pipeline: each rule family offers rules; a stage runs its rules in order and
the first rule with an opinion decides (cheap checks before expensive ones, as postscreen does).

A rule is ``async def rule(ctx) -> Decision | None``; ``None`` means "no objection, go on".
:class:`CheckContext` carries the request and the facts several rules need, each computed at
most once per call.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import redis.asyncio as aioredis

from rempart.common import keys
from rempart.common.config import MailSettings, SettingsCache
from rempart.common.directory import Directory
from rempart.common.events import EventBus
from rempart.common.ipblocks import intrusion_subject, never_blocked
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.policy import replies
from rempart.policy.addresses import AddressError, MailAddress, parse_address, parse_sender
from rempart.policy.resolver import CachingResolver
from rempart.policy.scripts import LuaScript
from rempart.policy.srs import SrsKeys

Action = policy_pb2.Action

SMTP_PROTOCOLS = frozenset({policy_pb2.PROTOCOL_SMTP, policy_pb2.PROTOCOL_SUBMISSION, policy_pb2.PROTOCOL_SMTPS})
MAILBOX_PROTOCOLS = frozenset({policy_pb2.PROTOCOL_IMAP, policy_pb2.PROTOCOL_POP3})


@dataclass(frozen=True)
class Decision:
    action: Action.ValueType
    code: int
    enhanced_code: str
    text: str
    rule: str
    local_mailboxes: tuple[str, ...] = ()
    remote_recipients: tuple[str, ...] = ()
    ip_blocked: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    delay_ms: int = 0
    rewritten_sender: str = ""
    # RCPT: (max size, max hops) the DATA stage accepts without being asked (issue 11).
    data_bounds: tuple[int, int] | None = None
    # MAIL: (seconds, max SIZE=) the same session may reuse this verdict for the same sender.
    reuse: tuple[int, int] | None = None

    def to_verdict(self) -> policy_pb2.Verdict:
        bounds = reuse = None
        if self.data_bounds is not None:
            bounds = policy_pb2.DataBounds(max_size=self.data_bounds[0], max_hops=self.data_bounds[1])
        if self.reuse is not None:
            reuse = policy_pb2.VerdictReuse(seconds=self.reuse[0], max_size=self.reuse[1])
        return policy_pb2.Verdict(
            action=self.action,
            code=self.code,
            enhanced_code=self.enhanced_code,
            text=self.text,
            rule=self.rule,
            local_mailboxes=list(self.local_mailboxes),
            remote_recipients=list(self.remote_recipients),
            ip_blocked=self.ip_blocked,
            add_headers=[policy_pb2.Header(name=name, value=value) for name, value in self.headers],
            delay_ms=self.delay_ms,
            rewritten_sender=self.rewritten_sender,
            data_bounds=bounds,
            reuse=reuse,
        )


def accept(
    rule: str = "",
    text: str = replies.OK,
    *,
    code: int = 250,
    enhanced: str = "2.0.0",
    local_mailboxes: Sequence[str] = (),
    remote_recipients: Sequence[str] = (),
) -> Decision:
    return Decision(
        policy_pb2.ACTION_ACCEPT, code, enhanced, text, rule, tuple(local_mailboxes), tuple(remote_recipients)
    )


def reject(code: int, enhanced: str, text: str, rule: str) -> Decision:
    return Decision(policy_pb2.ACTION_REJECT, code, enhanced, text, rule)


def tempfail(code: int, enhanced: str, text: str, rule: str) -> Decision:
    return Decision(policy_pb2.ACTION_TEMPFAIL, code, enhanced, text, rule)


def temporary_problem(rule: str) -> Decision:
    return tempfail(451, "4.3.0", replies.TEMPORARY_PROBLEM, rule)


@lru_cache(maxsize=256)
def _networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue  # a host name: resolved through DNS (see host_names)
    return tuple(out)


@lru_cache(maxsize=64)
def host_names(entries: tuple[str, ...]) -> tuple[str, ...]:
    """The entries of a hosts list that are names, not addresses or networks."""
    out: list[str] = []
    for entry in entries:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            if entry.strip():
                out.append(entry.strip().lower().rstrip("."))
    return tuple(out)


def ip_in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, entries: Iterable[str]) -> bool:
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in _networks(tuple(entries)))


def _parsed_or_error(parse: Callable[[str], MailAddress | None], text: str) -> MailAddress | AddressError | None:
    try:
        return parse(text)
    except AddressError as exc:
        return exc


def _value_or_raise(found: MailAddress | AddressError | None) -> MailAddress | None:
    if isinstance(found, AddressError):
        raise found
    return found


@lru_cache(maxsize=4096)
def _client_facts(client_ip: str, ipv6_prefix_length: int) -> tuple[
        ipaddress.IPv4Address | ipaddress.IPv6Address | None, str, str, str]:
    """The client address parsed (None if it is no address); its canonical text form, so that
    one IP has one counter and one block however the edge spells it; and what intrusion
    prevention counts and blocks (R-IPS-6): the IP, or its IPv6 prefix. Every stage of a
    session asks again: kept for the recent addresses."""
    try:
        parsed = ipaddress.ip_address(client_ip)
    except ValueError:
        return None, client_ip[:64], client_ip[:64], ""
    subject, prefix = intrusion_subject(parsed, ipv6_prefix_length)
    return parsed, parsed.compressed, subject, prefix


class CheckContext:
    """One Check call: the request, the shared dependencies, and memoised facts."""

    def __init__(
        self,
        request: policy_pb2.CheckRequest,
        *,
        redis: aioredis.Redis,
        config: SettingsCache,
        directory: Directory,
        events: EventBus,
        resolver: CachingResolver,
        srs: SrsKeys,
        hostname: str = "localhost",
    ) -> None:
        self.request = request
        self.session = request.session
        self.redis = redis
        self.config = config
        self.directory = directory
        self.events = events
        self.resolver = resolver
        self.srs = srs
        self.hostname = hostname  # this mail system's name (Received-SPF receiver=)
        self.settings: MailSettings = config.server
        # Addresses of the trusted hosts given by name (R-REL-1), resolved before the rules run.
        self.trusted_name_ips: frozenset[str] = frozenset()
        # Headers the accepted message gets (Received-SPF, IP reputation), whoever decides.
        self.headers: list[tuple[str, str]] = []
        self.ip, self.client_ip, self.ips_subject, self.ips_prefix = _client_facts(
            self.session.client_ip, self.settings.ips.ipv6_prefix_length)
        self.memo: dict[str, object] = {}
        self._parsed: dict[str, MailAddress | AddressError | None] = {}

    # Session facts ----------------------------------------------------------------------------
    @property
    def authenticated(self) -> bool:
        return bool(self.session.authenticated_account)

    @property
    def account(self) -> str:
        return self.session.authenticated_account.strip().lower()

    @property
    def account_domain(self) -> str:
        return self.account.rpartition("@")[2]

    @property
    def is_smtp(self) -> bool:
        return self.session.protocol in SMTP_PROTOCOLS

    @property
    def trusted(self) -> bool:
        """R-REL-1: the client IP is in the trusted hosts list."""
        return ip_in(self.ip, self.settings.relay.trusted_hosts) or self.client_ip in self.trusted_name_ips

    @property
    def whitelisted(self) -> bool:
        """R-IPS-5: trusted hosts and the IPS whitelist are never counted nor blocked (the
        admin API refuses a block of theirs by the same rule, :func:`never_blocked`)."""
        if self.client_ip in self.trusted_name_ips:
            return True
        return self.ip is not None and never_blocked(self.ip, self.settings)

    @property
    def ips_applies(self) -> bool:
        """R-IPS-1: always for SMTP (when on), for IMAP/POP3 only when enabled."""
        if self.whitelisted or self.ip is None:
            return False
        ips = self.settings.ips
        if self.is_smtp:
            return ips.smtp
        if self.session.protocol in MAILBOX_PROTOCOLS:
            return ips.imap_pop
        return False

    async def account_settings(self) -> MailSettings:
        """The authenticated account's effective settings (server < domain < account)."""
        if not self.authenticated:
            return self.settings
        return await self.config.effective(self.account_domain, self.account)

    # Envelope facts ---------------------------------------------------------------------------
    def sender(self) -> MailAddress | None:
        """MAIL FROM, normalised; None for the null sender; raises AddressError. Parsed once
        per call however many rules ask (it showed in the per-RCPT profile)."""
        if "sender" not in self._parsed:
            self._parsed["sender"] = _parsed_or_error(parse_sender, self.request.mail_from)
        return _value_or_raise(self._parsed["sender"])

    def recipient(self) -> MailAddress:
        """RCPT TO, normalised; raises AddressError. Parsed once per call."""
        if "recipient" not in self._parsed:
            self._parsed["recipient"] = _parsed_or_error(parse_address, self.request.recipient)
        found = _value_or_raise(self._parsed["recipient"])
        assert found is not None
        return found

    @property
    def sender_text(self) -> str:
        """MAIL FROM as it appears in reply texts."""
        try:
            sender = self.sender()
        except AddressError:
            return self.request.mail_from[:256]
        return sender.address if sender is not None else ""

    async def canonical_domain(self, domain: str) -> str | None:
        """The local domain ``domain`` names (itself or via a domain alias); None if remote."""
        key = f"domain:{domain}"
        if key not in self.memo:
            self.memo[key] = None if domain.startswith("[") else await self.directory.canonical_domain(domain)
        found = self.memo[key]
        return found if isinstance(found, str) else None

    async def prefetch_envelope(self) -> None:
        """Look up, in one Redis round trip, what the RCPT rules ask about the sender's and the
        recipient's domains and whether the recipient is an account (the common case)."""
        domains: list[str] = []
        for parse in (self.recipient, self.sender):
            try:
                found = parse()
            except AddressError:
                continue
            if found is not None and not found.is_literal and f"domain:{found.domain}" not in self.memo:
                domains.append(found.domain)
        try:
            recipient: MailAddress | None = self.recipient()
        except AddressError:
            recipient = None
        if not domains and recipient is None:
            return
        # One script call, not a pipeline of five commands: redis-py's cost is per command
        # sent and parsed, and this runs at every RCPT (issue 11's profile).
        results = await _PREFETCH(
            self.redis,
            [keys.DOMAINS, *(keys.domain_alias(d) for d in domains),
             *([keys.account(recipient.address)] if recipient is not None else [])],
            [len(domains), *domains],
        )
        for i, domain in enumerate(domains):
            is_domain, alias_target = results[2 * i], results[2 * i + 1]
            self.memo[f"domain:{domain}"] = domain if is_domain else (str(alias_target) if alias_target else None)
        if recipient is not None:
            self.memo[f"account:{recipient.address}"] = bool(results[-1])

    def known_account(self, address: str) -> bool | None:
        """Whether ``address`` is an account, when :meth:`prefetch_envelope` looked it up."""
        found = self.memo.get(f"account:{address}")
        return found if isinstance(found, bool) else None

    async def sender_is_local(self) -> bool:
        try:
            sender = self.sender()
        except AddressError:
            return False
        return sender is not None and await self.canonical_domain(sender.domain) is not None


# KEYS: the local domains set, each domain's alias key, then the recipient's account key (if
# any). ARGV: the number of domains, then the domains. Returns, per domain, whether it is local
# and its alias target (false: none), then whether the account exists.
_PREFETCH = LuaScript("""
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  out[#out + 1] = redis.call('SISMEMBER', KEYS[1], ARGV[i + 1])
  out[#out + 1] = redis.call('GET', KEYS[i + 1])
end
if #KEYS > n + 1 then out[#out + 1] = redis.call('EXISTS', KEYS[n + 2]) end
return out
""")

Rule = Callable[[CheckContext], Awaitable[Decision | None]]


async def run_pipeline(ctx: CheckContext, rules: Sequence[Rule], default: Decision) -> Decision:
    for rule in rules:
        decision = await rule(ctx)
        if decision is not None:
            return decision
    return default

