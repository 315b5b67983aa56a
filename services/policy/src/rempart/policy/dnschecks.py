"""DNS-based checks at MAIL FROM (SPEC R-DNS-1..5, R-DNS-7), for unauthenticated, untrusted
SMTP sessions only.

They run at MAIL, not at connect, so that a submission client on a listed dynamic address can
still authenticate first, and in the order cheap-to-decisive: DNSBL, IP reputation, reverse DNS,
sender domain, SPF. Any DNS timeout or SERVFAIL on the way answers ``451 4.4.3``: a DNS outage
delays mail, it never refuses it permanently (R-DNS-7).

pyspf is blocking and resolves through the module-level ``spf.DNSLookup``; we install one that
forwards each question to this process's :class:`CachingResolver` on the event loop (the
configured nameservers and the shared cache), and run the SPF evaluation in a worker thread.
The resolver to use travels in a context variable, which ``asyncio.to_thread`` copies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import spf

from rempart.common.pb.policy.v1 import policy_pb2
from rempart.policy import intrusion, replies
from rempart.policy.addresses import MailAddress
from rempart.policy.decision import CheckContext, Decision, ip_in, reject, tempfail
from rempart.policy.resolver import CachingResolver, DnsTemporaryError, reverse_name

log = logging.getLogger(__name__)

MAX_DNSBL_ZONES = 10
MAX_PTR_NAMES = 5
REASON_DNSBL = "R-IPS-3 listed on a DNSBL"
SPF_QUERY_TIME_FACTOR = 3  # an SPF evaluation may take a few lookups' time in total

# RFC 5782 2.1: 127.0.0.2 and up mean listed; 127.0.0.1 never does, and 127.255.255.0/24 is
# where big lists answer "you may not query us" (for example from a public resolver).
_LISTED = ipaddress.ip_network("127.0.0.0/8")
_NOT_LISTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("127.255.255.0/24"))


def client_address(ctx: CheckContext) -> str:
    """The address DNS is asked about: an IPv4-mapped IPv6 peer (dual-stack socket) is IPv4."""
    if isinstance(ctx.ip, ipaddress.IPv6Address) and ctx.ip.ipv4_mapped is not None:
        return str(ctx.ip.ipv4_mapped)
    return ctx.client_ip


def dns_checks_apply(ctx: CheckContext) -> bool:
    return ctx.is_smtp and not ctx.authenticated and not ctx.trusted


def dns_tempfail(ctx: CheckContext, exc: DnsTemporaryError) -> Decision:
    log.warning("dns temporary failure: %s", exc, extra={"session": ctx.session.session_id,
                                                         "client_ip": ctx.client_ip})
    return tempfail(451, "4.4.3", replies.DNS_TEMPORARY_FAILURE, "R-DNS-7")


def _domain_listed(domain: str, entries: list[str]) -> bool:
    domain = domain.lower()
    for entry in entries:
        entry = entry.strip().lower().rstrip(".")
        if entry and (domain == entry or domain.endswith("." + entry)):
            return True
    return False


def _listed_answer(texts: list[str]) -> bool:
    for text in texts:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.version == 4 and address in _LISTED and not any(address in n for n in _NOT_LISTED):
            return True
    return False


async def check_dnsbl(ctx: CheckContext) -> Decision | None:
    """R-DNS-1: every zone asked at once; the first listing zone (in the configured order) wins."""
    zones = [z.strip().strip(".") for z in ctx.settings.dns.dnsbl_zones if z.strip()][:MAX_DNSBL_ZONES]
    if not zones:
        return None
    timeout = ctx.settings.dns.timeout_seconds
    results = await asyncio.gather(
        *(ctx.resolver.query(reverse_name(client_address(ctx), zone), "A", timeout) for zone in zones),
        return_exceptions=True,
    )
    failure: DnsTemporaryError | None = None
    for zone, result in zip(zones, results, strict=True):
        if isinstance(result, DnsTemporaryError):
            failure = failure or result
        elif isinstance(result, BaseException):
            raise result
        elif _listed_answer(result.texts()):
            return await _dnsbl_listed(ctx, zone)
    if failure is not None:
        raise failure
    return None


async def _dnsbl_listed(ctx: CheckContext, zone: str) -> Decision:
    log.info("dnsbl listed", extra={"session": ctx.session.session_id, "client_ip": ctx.client_ip, "zone": zone})
    await ctx.events.publish("dns", "dnsbl_listed", client_ip=ctx.client_ip, session_id=ctx.session.session_id,
                             reason="R-DNS-1", zone=zone)
    refused = reject(554, "5.7.1", replies.dnsbl_listed(ctx.client_ip, zone), "R-DNS-1")
    ips = ctx.settings.ips
    if not (ips.block_dnsbl_listed and ctx.ips_applies):
        return refused
    newly = await intrusion.block_now(ctx, REASON_DNSBL)
    action = policy_pb2.ACTION_CLOSE if ips.close_blocked_connection else refused.action
    return replace(refused, action=action, ip_blocked=newly)


async def check_reputation(ctx: CheckContext) -> Decision | None:
    """R-DNS-2: 127.0.0.2 blacklisted (refused), 127.0.0.3 greylisted (try later), else accepted;
    logged, and the result goes into the message's trace header."""
    zone = ctx.settings.dns.reputation_zone.strip().strip(".")
    if not zone:
        return None
    answer = await ctx.resolver.query(reverse_name(client_address(ctx), zone), "A", ctx.settings.dns.timeout_seconds)
    texts = answer.texts()
    verdict = replies.REPUTATION_ACCEPTED
    if "127.0.0.2" in texts:
        verdict = replies.REPUTATION_BLACKLISTED
    elif "127.0.0.3" in texts:
        verdict = replies.REPUTATION_GREYLISTED
    log.info("ip reputation", extra={"session": ctx.session.session_id, "client_ip": ctx.client_ip,
                                     "zone": zone, "reputation": verdict, "answer": ",".join(texts)})
    if verdict == replies.REPUTATION_BLACKLISTED:
        return reject(554, "5.7.1", replies.reputation_blacklisted(ctx.client_ip, zone), "R-DNS-2")
    if verdict == replies.REPUTATION_GREYLISTED:
        return tempfail(451, "4.7.1", replies.reputation_greylisted(ctx.client_ip), "R-DNS-2")
    ctx.headers.append((replies.IP_REPUTATION_HEADER, verdict))
    return None


async def check_rdns(ctx: CheckContext, sender: MailAddress | None) -> Decision | None:
    """R-DNS-3: a PTR whose name resolves back to the client IP (forward-confirmed)."""
    settings = ctx.settings.dns
    if not settings.require_rdns or ip_in(ctx.ip, settings.rdns_bypass):
        return None
    if sender is not None and _domain_listed(sender.domain, settings.rdns_bypass):
        return None
    timeout = settings.timeout_seconds
    address = client_address(ctx)
    ptr = await ctx.resolver.query(reverse_name(address), "PTR", timeout)
    failure: DnsTemporaryError | None = None
    for record in ptr.records[:MAX_PTR_NAMES]:
        name = record.to_text().rstrip(".").lower()
        try:
            if address in await ctx.resolver.addresses(name, timeout):
                return None
        except DnsTemporaryError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
    return reject(501, "5.7.1", replies.sender_ip_must_resolve(ctx.sender_text), "R-DNS-3")


async def check_sender_domain(ctx: CheckContext, sender: MailAddress | None) -> Decision | None:
    """R-DNS-4: the sender's domain has an MX, else an A or AAAA (RFC 5321 5.1's implicit MX).
    A null MX (RFC 7505) says the domain takes no mail, so no bounce could reach it: refused."""
    if not ctx.settings.dns.require_sender_domain or sender is None or sender.is_literal:
        return None
    if await ctx.canonical_domain(sender.domain) is not None:
        return None
    timeout = ctx.settings.dns.timeout_seconds
    mx = await ctx.resolver.query(sender.domain, "MX", timeout)
    refused = reject(501, "5.7.1", replies.sender_domain_must_exist(ctx.sender_text), "R-DNS-4")
    if mx.records:
        null_mx = all(r.to_text().split()[-1] == "." for r in mx.records)
        return refused if null_mx else None
    if mx.nxdomain:
        return refused
    if (await ctx.resolver.query(sender.domain, "A", timeout)).records:
        return None
    if (await ctx.resolver.query(sender.domain, "AAAA", timeout)).records:
        return None
    return refused


# SPF (R-DNS-5) -------------------------------------------------------------------------------
_SPF_RESOLVER: contextvars.ContextVar[tuple[CachingResolver, asyncio.AbstractEventLoop, float]] = (
    contextvars.ContextVar("spf_resolver")
)
_PYSPF_LOOKUP: Callable[..., Any] = spf.DNSLookup


def _spf_dns_lookup(name: str, qtype: str, strict: object = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup contract: ``[((name, qtype), value), ...]``, TempError on failure."""
    found = _SPF_RESOLVER.get(None)
    if found is None:
        return list(_PYSPF_LOOKUP(name, qtype, strict, timeout))
    resolver, loop, per_lookup = found
    future = asyncio.run_coroutine_threadsafe(resolver.query(name, qtype, per_lookup), loop)
    try:
        answer = future.result(per_lookup + 1)
    except DnsTemporaryError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    except concurrent.futures.TimeoutError as exc:
        future.cancel()
        raise spf.TempError("DNS timeout") from exc
    out: list[Any] = []
    for record in answer.records:
        value: Any
        if qtype in ("A", "AAAA"):
            value = record.address  # type: ignore[attr-defined]
        elif qtype == "MX":
            value = (record.preference, record.exchange)  # type: ignore[attr-defined]
        elif qtype == "PTR":
            value = record.target.to_text(True)  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            value = record.strings  # type: ignore[attr-defined]
        else:
            continue
        out.append(((name, qtype), value))
    return out


spf.DNSLookup = _spf_dns_lookup


def _evaluate_spf(ip: str, sender: str, helo: str, receiver: str, query_time: float) -> tuple[str, str]:
    query = spf.query(i=ip, s=sender, h=helo, receiver=receiver, querytime=query_time)
    result, _code, _explanation = query.check()
    header = query.get_header(result, receiver)
    return str(result), str(header)


def _clean_header(value: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else " " for c in value)[:998]


def _spf_action(ctx: CheckContext, action: str, identity: str) -> Decision | None:
    text = replies.spf_failed(identity)
    if action == "reject":
        return reject(550, "5.7.23", text, "R-DNS-5")
    if action == "tempfail":
        return tempfail(451, "4.7.23", text, "R-DNS-5")
    return None


async def check_spf(ctx: CheckContext, sender: MailAddress | None, receiver: str) -> Decision | None:
    """R-DNS-5 (RFC 7208): MAIL FROM, or the HELO identity for the null sender (section 2.3)."""
    settings = ctx.settings.dns
    if not settings.spf_enabled:
        return None
    helo = ctx.session.helo_name.strip()[:255]
    if sender is None and not helo:
        return None
    identity = sender.address if sender is not None else f"postmaster@{helo}"
    loop = asyncio.get_running_loop()
    token = _SPF_RESOLVER.set((ctx.resolver, loop, settings.timeout_seconds))
    try:
        result, header = await asyncio.to_thread(
            _evaluate_spf, client_address(ctx), sender.address if sender is not None else "", helo or "unknown",
            receiver, settings.timeout_seconds * SPF_QUERY_TIME_FACTOR,
        )
    finally:
        _SPF_RESOLVER.reset(token)
    log.info("spf", extra={"session": ctx.session.session_id, "client_ip": ctx.client_ip, "spf": result})
    if result == "temperror":
        raise DnsTemporaryError(f"SPF temperror for {identity}")
    decision: Decision | None = None
    if result == "fail":
        decision = _spf_action(ctx, settings.spf_fail_action, identity)
    elif result == "softfail":
        decision = _spf_action(ctx, settings.spf_softfail_action, identity)
    if decision is None:
        ctx.headers.append(("Received-SPF", _clean_header(header)))
    return decision


async def check_mail(ctx: CheckContext) -> Decision | None:
    """Every R-DNS check of MAIL FROM, in order; a DNS failure anywhere is ``451 4.4.3``."""
    if not dns_checks_apply(ctx):
        return None
    sender = ctx.sender()
    try:
        for check in (check_dnsbl, check_reputation):
            decision = await check(ctx)
            if decision is not None:
                return decision
        for envelope_check in (check_rdns, check_sender_domain):
            decision = await envelope_check(ctx, sender)
            if decision is not None:
                return decision
        return await check_spf(ctx, sender, ctx.hostname)
    except DnsTemporaryError as exc:
        return dns_tempfail(ctx, exc)
