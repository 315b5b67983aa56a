"""The server settings of SPEC.md as forms, grouped the way the guide groups them.

The fields, their types, bounds and defaults come from :class:`rempart.common.config.MailSettings`
(nothing is listed twice); this module adds only the grouping and a line of help per field. A
saved group becomes a ``PATCH /v1/settings`` of the fields whose value changed, validated by the
API's own body model, so a bad value is refused with the field named, as in the API.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rempart.admin_api.console.forms import Form
from rempart.admin_api.models import FieldError
from rempart.admin_api.redaction import is_secret
from rempart.common.config import MailSettings

Kind = Literal["bool", "int", "float", "text", "choice", "lines", "pairs", "json", "secret"]


@dataclass(frozen=True)
class Group:
    key: str
    title: str
    sections: tuple[str, ...]
    intro: str


GROUPS = (
    Group("relay", "Relay and senders", ("relay", "recipients"),
          "Who may send through this server and what happens to mail for unknown addresses (R-REL, R-DOM)."),
    Group("limits", "Limits", ("limits",), "Sending limits and message size (R-LIM)."),
    Group("dns", "DNS checks", ("dns",),
          "Checks on unauthenticated, untrusted senders: DNSBL, reverse DNS, SPF, SRS (R-DNS)."),
    Group("ips", "Intrusion prevention", ("ips",), "When an IP is blocked, and for how long (R-IPS)."),
    Group("login", "Login policy", ("login", "twofa"), "Lockout, login names, IP restrictions, 2FA (R-LOG, R-2FA)."),
    Group("passwords", "Passwords", ("password",), "The rules every new password must follow (R-PWD-1)."),
    Group("tls", "TLS", ("tls",), "Encryption of client connections and the Received header (R-TLS)."),
    Group("smtp", "SMTP protocol", ("smtp",), "How the SMTP edge treats a misbehaving client."),
    Group("outbound", "Outbound delivery", ("outbound",), "The relay that delivers to other domains (R-OUT)."),
)
GROUPS_BY_KEY = {group.key: group for group in GROUPS}

HELP: dict[str, str] = {
    "relay.trusted_hosts": "IPs, networks (CIDR) or host names that may relay without SMTP AUTH (R-REL-1).",
    "relay.pop_before_smtp": "Let an IP relay for a while after a POP3 login. Dangerous: off unless you must.",
    "relay.pop_before_smtp_minutes": "How long a POP3 login opens relaying for its IP.",
    "relay.reject_unauthorized_local_sender": "Refuse an unauthenticated sender that claims a local domain (R-REL-2).",
    "relay.reject_auth_sender_mismatch": "MAIL FROM must be the authenticated account or one of its aliases (R-REL-3).",
    "relay.relay_only_if_sender_local": "Unauthenticated relaying only for senders in a local domain (R-REL-4).",
    "relay.helo_filter_enabled": "Apply the HELO/EHLO rules below (R-REL-5).",
    "relay.helo_rules": 'Ordered rules, JSON: [{"match": "exact|wildcard|regex", "pattern": "...", '
                        '"action": "accept|reject"}].',
    "relay.helo_bypass": "Client IPs or networks the HELO rules never apply to.",
    "relay.connect_delay_seconds": "Wait this long before the greeting (tarpit, R-REL-6); 0 = none.",
    "relay.pregreet_drop": "Drop clients that talk before the greeting (spam bots do).",
    "recipients.unknown_recipient_action": "Mail to an address that does not exist: reject, catch-all or discard "
                                           "(R-DOM-1).",
    "recipients.catch_all_address": "Where catch-all delivers.",
    "limits.max_messages_per_day": "Per user: messages to external recipients per day; 0 = unlimited (R-LIM-1).",
    "limits.domain_max_messages_per_day": "Per domain, all users together; dominant over the rest; 0 = unlimited.",
    "limits.counter_timezone": "The time zone in which daily counters reset (an IANA name, e.g. Europe/Paris).",
    "limits.max_recipients": "Most RCPT TO in one incoming transaction (R-LIM-4).",
    "limits.max_hops": "Most Received headers before a message is refused as looping (R-LIM-5).",
    "limits.max_message_size": "Largest message in bytes, announced in EHLO SIZE (R-LIM-7).",
    "limits.mailbox_quota_mb": "What an account's folders may hold, in MiB; 0 = no quota. Over it: 452 at RCPT, "
                               "NO [OVERQUOTA] at IMAP APPEND (R-MBX-5).",
    "limits.outbound_max_recipients_per_connection": "Most recipients per outgoing connection (R-LIM-6).",
    "dns.dnsbl_zones": "DNS blocklists to query, one per line; the guide advises two or three at most (R-DNS-1).",
    "dns.reputation_zone": "An IP reputation zone; its answer is logged and added to the trace (R-DNS-2).",
    "dns.require_rdns": "Refuse clients whose IP has no reverse DNS (R-DNS-3).",
    "dns.rdns_bypass": "IPs or networks exempt from the reverse DNS check.",
    "dns.require_sender_domain": "Refuse a sender domain with no MX, A or AAAA record (R-DNS-4).",
    "dns.spf_enabled": "Check SPF and add Received-SPF (R-DNS-5).",
    "dns.spf_fail_action": "What an SPF fail does.",
    "dns.spf_softfail_action": "What an SPF softfail does.",
    "dns.srs_enabled": "Rewrite the sender (SRS) when forwarding to remote addresses (R-DNS-6).",
    "dns.srs_bypass": "Destination domains never rewritten.",
    "dns.srs_secrets": "The SRS keys: never shown; rotate to make a new one.",
    "dns.srs_domain": "The SRS return domain; empty = the forwarding alias's own domain.",
    "dns.timeout_seconds": "DNS timeout; a timeout is a temporary failure (4xx), never a refusal (R-DNS-7).",
    "ips.smtp": "Intrusion prevention on SMTP (R-IPS-1).",
    "ips.imap_pop": "Intrusion prevention on IMAP and POP3.",
    "ips.across_sessions": "Count attempts over several sessions, not just one.",
    "ips.max_connections_per_minute": "Block an IP with more connections per minute than this; 0 = off (R-IPS-2).",
    "ips.known_ip_exempt_from_connection_rate": "Connections from an IP with a recent good login do not count "
                                                "towards the rate (R-IPS-6).",
    "ips.ipv6_prefix_length": "IPv6 clients are counted and blocked per prefix of this length.",
    "ips.max_failed_logins": "Block an IP after this many failed logins in the window; 0 = off.",
    "ips.failed_logins_window_minutes": "The window of the failed-login count.",
    "ips.max_unknown_recipients": "Block after this many unknown recipients; 0 = off (R-IPS-3).",
    "ips.max_relay_denials": "Block after this many refused relay attempts; 0 = off.",
    "ips.max_rset": "Block after this many RSET commands; 0 = off.",
    "ips.spam_score_threshold": "Block above this spam score (from a scanner); 0 = off.",
    "ips.block_dnsbl_listed": "Block an IP listed on a DNSBL.",
    "ips.max_message_size_mb": "Block after a message larger than this many MB; 0 = off.",
    "ips.max_simultaneous_connections": "Block with more simultaneous connections than this; 0 = off.",
    "ips.simultaneous_exceptions": "IPs or networks exempt from the simultaneous-connections rule.",
    "ips.simultaneous_connection_ttl_seconds": "A connection never reported closed stops counting after this.",
    "ips.counter_window_minutes": "The window of the other counters.",
    "ips.block_minutes": "How long a block lasts (R-IPS-4).",
    "ips.refuse_blocked": "Refuse a blocked IP at connect (421 4.0.0).",
    "ips.close_blocked_connection": "Close the connection that tripped the block.",
    "ips.close_all_connections": "Also close every other open connection of that IP, on every replica.",
    "ips.whitelist": "IPs or networks never blocked (R-IPS-5).",
    "login.lockout_mode": "After too many failures: lock the account, slow logins down, or nothing (R-LOG-1).",
    "login.max_failures": "Failures that lock the account.",
    "login.lock_minutes": "How long the lock lasts.",
    "login.failure_window_minutes": "The window in which failures are counted.",
    "login.known_ip_bypass": "Logins from an IP the account used recently are not locked out.",
    "login.known_ip_days": "How long an IP stays known after a good login.",
    "login.login_with": "Log in with the user name or the full address, or only the full address (R-LOG-2).",
    "login.convert_percent_slash": "Read % and / in login names as @.",
    "login.aliases_as_login": "Accept an alias address as the login name.",
    "login.allowed_ips": "Only these IPs or networks may log in; empty = everywhere (R-LOG-3).",
    "login.failure_delay_ms": "Every failed login answers after this delay, user known or not (R-LOG-4).",
    "twofa.required_for_admins": "Administrators must set up two-step verification before anything else "
                                 "(R-2FA-1).",
    "password.min_length": "Shortest password allowed.",
    "password.require_digit": "At least one digit.",
    "password.require_non_alnum": "At least one character that is not a letter or a digit.",
    "password.require_upper": "At least one upper-case letter.",
    "password.require_lower": "At least one lower-case letter.",
    "password.forbid_user_or_domain": "The password may not contain the user or domain name.",
    "password.min_strength": "Least zxcvbn strength (0-4); 0 = no check.",
    "tls.min_version": "Oldest TLS version clients may use (R-TLS-3).",
    "tls.cipher_preset": "strict: forward-secret AEAD only; compat: the guide's list.",
    "tls.honor_server_order": "The server's cipher order wins.",
    "tls.plaintext_auth_requires_tls": "Refuse PLAIN, LOGIN and USER/PASS before TLS (R-TLS-2).",
    "tls.received_hide_client_ip": "Leave the client IP out of the Received header (R-TLS-5).",
    "tls.received_add_rdns": "Add the client's reverse DNS name to the Received header.",
    "tls.received_show_auth_user": "Name the authenticated user in the Received header.",
    "smtp.bare_line_endings": "A bare CR or LF (SMTP smuggling): refuse the message, or repair it.",
    "smtp.error_budget": "5xx replies a client may get before it is disconnected (421 4.7.0).",
    "smtp.auth_failure_budget": "Failed AUTH attempts per connection before it is closed.",
    "outbound.starttls": "Use STARTTLS when the remote offers it (R-TLS-4).",
    "outbound.tls_min_version": "Oldest TLS version used towards other servers.",
    "outbound.max_lifetime_hours": "Give up and bounce (DSN) after this long in the queue (R-OUT-2).",
    "outbound.retry_backoff_seconds": "Wait before each retry, one value per line; the last one repeats.",
    "outbound.delay_notice_hours": "Tell the sender a message is delayed after this long; 0 = never.",
    "outbound.transports": 'Smarthosts by destination domain ("*" for all), JSON: '
                           '{"example.com": {"host": "[relay.example.net]:587", "username": ""}}.',
    "outbound.max_recipients_per_connection_exceptions": "Per destination domain, one per line: domain=number.",
    "outbound.domain_messages_per_minute": "Messages per minute to one destination domain; 0 = unlimited (R-LIM-6).",
    "outbound.domain_messages_per_minute_exceptions": "Per destination domain, one per line: domain=number.",
    "outbound.sender_domain_messages_per_minute": "Messages per minute from one sender domain; 0 = unlimited.",
    "outbound.sender_domain_messages_per_minute_exceptions": "Per sender domain, one per line: domain=number.",
    "outbound.max_connections_per_domain": "Simultaneous connections to one destination domain.",
}


@dataclass(frozen=True)
class SettingField:
    section: str
    name: str
    kind: Kind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def input_name(self) -> str:
        return f"{self.section}__{self.name}"

    def shown(self, value: Any) -> str:
        """The value as the form's input holds it."""
        if self.kind == "lines":
            return "\n".join(str(v) for v in value or [])
        if self.kind == "pairs":
            return "\n".join(f"{k}={v}" for k, v in (value or {}).items())
        if self.kind == "json":
            return json.dumps(value, indent=2, sort_keys=True)
        if self.kind == "bool":
            return "on" if value else ""
        return "" if value is None else str(value)


    @property
    def default_text(self) -> str:
        if self.kind == "bool":
            return "on" if self.default else "off"
        if self.kind == "secret":
            return "none"
        return self.shown(self.default).replace("\n", ", ") or "empty"


def _kind(info: FieldInfo) -> tuple[Kind, tuple[str, ...]]:
    annotation = info.annotation
    if is_secret(info):
        return "secret", ()
    if annotation is bool:
        return "bool", ()
    if annotation is int:
        return "int", ()
    if annotation is float:
        return "float", ()
    if annotation is str:
        return "text", ()
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "choice", tuple(str(a) for a in args)
    if origin is list and args and args[0] in (str, int, float):
        return "lines", ()
    if origin is dict and args == (str, int):
        return "pairs", ()
    return "json", ()


def _bounds(info: FieldInfo) -> tuple[float | None, float | None]:
    low = high = None
    for meta in info.metadata:
        if isinstance(meta, Ge | Gt):
            low = float(meta.ge if isinstance(meta, Ge) else meta.gt)  # type: ignore[arg-type]
        if isinstance(meta, Le | Lt):
            high = float(meta.le if isinstance(meta, Le) else meta.lt)  # type: ignore[arg-type]
    return low, high


def section_fields(section: str) -> list[SettingField]:
    model = MailSettings.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    defaults = model().model_dump(mode="json")
    out = []
    for name, info in model.model_fields.items():
        kind, choices = _kind(info)
        low, high = _bounds(info)
        out.append(SettingField(section, name, kind, defaults[name], HELP.get(f"{section}.{name}", ""), choices,
                                low, high))
    return out


def group_fields(group: Group) -> list[SettingField]:
    return [field for section in group.sections for field in section_fields(section)]


def parse_field(field: SettingField, form: Form) -> Any:
    """What the form says for ``field``, as the settings model will read it (text for numbers)."""
    raw = form.get(field.input_name)
    if field.kind == "bool":
        return form.has(field.input_name)
    if field.kind == "lines":
        return [line.strip() for line in raw.splitlines() if line.strip()]
    if field.kind == "pairs":
        pairs: dict[str, str] = {}
        for line in raw.splitlines():
            if not line.strip():
                continue
            name, sep, value = line.partition("=")
            if not sep or not name.strip():
                raise ValueError("one name=number per line")
            pairs[name.strip()] = value.strip()
        return pairs
    if field.kind == "json":
        return json.loads(raw) if raw.strip() else None
    return raw.strip()


def form_changes(group: Group, form: Form, current: dict[str, Any]) -> tuple[dict[str, Any], list[FieldError]]:
    """The settings document of what ``form`` changes in ``group``, compared to ``current`` (the
    effective settings as ``GET /v1/settings`` shows them), and the fields that could not be read."""
    doc: dict[str, Any] = {}
    errors: list[FieldError] = []
    for field in group_fields(group):
        if field.kind == "secret":
            continue  # write-only: rotated, never typed into a form
        try:
            value = parse_field(field, form)
        except ValueError as exc:  # json.JSONDecodeError too
            errors.append(FieldError(field=field.key, detail=str(exc).split(":")[0] or "not readable"))
            continue
        if _same(value, current.get(field.section, {}).get(field.name)):
            continue
        doc.setdefault(field.section, {})[field.name] = value
    return doc, errors


def _same(typed: Any, current: Any) -> bool:
    # Form values are text ("5", "0.0"): compare them the way the model will read them.
    if isinstance(current, bool) or isinstance(typed, bool):
        return typed is current
    if isinstance(current, int | float) and isinstance(typed, str):
        try:
            return float(typed) == float(current)
        except ValueError:
            return False
    if isinstance(current, list) and isinstance(typed, list):
        return _json(typed) == _json(current) or _numbers_equal(typed, current)
    if isinstance(current, dict) and isinstance(typed, dict):
        return _json(typed) == _json(current) or (
            typed.keys() == current.keys() and all(_same(typed[k], current[k]) for k in typed))
    return bool(typed == current)


def _numbers_equal(typed: list[Any], current: list[Any]) -> bool:
    try:
        return len(typed) == len(current) and all(float(a) == float(b) for a, b in zip(typed, current, strict=True))
    except (TypeError, ValueError):
        return False


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
