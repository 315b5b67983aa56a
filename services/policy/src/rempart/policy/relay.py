"""Relaying and sender control (SPEC R-REL-1..4).

Relaying (a remote recipient) is allowed only for an authenticated session, a trusted client IP
or, when the administrator turned it on, POP-before-SMTP. Everything else is an open-relay
attempt: refused, counted for intrusion prevention (R-IPS-3) and announced as an event.
"""

from __future__ import annotations

import logging

from rempart.common import keys
from rempart.policy import intrusion, replies
from rempart.policy.addresses import AddressError
from rempart.policy.decision import MAILBOX_PROTOCOLS, CheckContext, Decision, reject

log = logging.getLogger(__name__)


async def record_pop_before_smtp(ctx: CheckContext) -> Decision | None:
    """STAGE_AUTH success over IMAP/POP3: remember the IP for POP-before-SMTP (R-REL-1)."""
    relay = ctx.settings.relay
    if (
        ctx.request.auth_success
        and relay.pop_before_smtp
        and ctx.session.protocol in MAILBOX_PROTOCOLS
        and ctx.ip is not None
    ):
        await ctx.redis.set(
            keys.pop_before_smtp(ctx.client_ip), ctx.request.auth_login[:320], ex=relay.pop_before_smtp_minutes * 60
        )
    return None


async def pop_before_smtp(ctx: CheckContext) -> bool:
    if not ctx.settings.relay.pop_before_smtp or ctx.ip is None:
        return False
    memo = ctx.memo.get("pbs")
    if memo is None:
        memo = bool(await ctx.redis.exists(keys.pop_before_smtp(ctx.client_ip)))
        ctx.memo["pbs"] = memo
    return bool(memo)


async def authorized(ctx: CheckContext) -> bool:
    """R-REL-1: the session may relay."""
    return ctx.authenticated or ctx.trusted or await pop_before_smtp(ctx)


async def check_auth_sender(ctx: CheckContext) -> Decision | None:
    """R-REL-3: MAIL FROM must be the authenticated account or one of its aliases."""
    if not ctx.authenticated or not ctx.settings.relay.reject_auth_sender_mismatch:
        return None
    try:
        sender = ctx.sender()
    except AddressError:
        return reject(501, "5.1.7", replies.BAD_SENDER_SYNTAX, "R-REL-3")
    if sender is None:
        return None  # the null sender impersonates nobody (bounces, RFC 5321 4.5.5)
    account = await ctx.directory.get_account(ctx.account)
    allowed = {ctx.account, *(account.aliases if account is not None else [])}
    canonical = await ctx.canonical_domain(sender.domain)
    candidates = {sender.address, f"{sender.local}@{canonical}" if canonical else sender.address}
    if candidates & allowed:
        return None
    return reject(501, "5.7.1", replies.permission_denied(ctx.sender_text), "R-REL-3")


async def check_local_sender(ctx: CheckContext) -> Decision | None:
    """R-REL-2: an unauthorized session may not use a local sender, even to a local recipient."""
    if not ctx.settings.relay.reject_unauthorized_local_sender:
        return None
    if not await ctx.sender_is_local() or await authorized(ctx):
        return None
    recipient = ctx.recipient()
    return reject(550, "5.7.1", replies.access_not_allowed(ctx.sender_text, recipient.address), "R-REL-2")


async def check_relay(ctx: CheckContext) -> Decision | None:
    """R-REL-1 and R-REL-4 for a recipient outside the local domains."""
    recipient = ctx.recipient()
    if await ctx.canonical_domain(recipient.domain) is not None:
        return None
    rule = ""
    if not await authorized(ctx):
        rule = "R-REL-1"
    elif (
        not ctx.authenticated
        and ctx.settings.relay.relay_only_if_sender_local
        and not await ctx.sender_is_local()
    ):
        rule = "R-REL-4"
    if not rule:
        return None
    log.info(
        "relay denied",
        extra={"session": ctx.session.session_id, "client_ip": ctx.client_ip, "rule": rule},
    )
    await ctx.events.publish(
        "relay",
        "denied",
        client_ip=ctx.client_ip,
        session_id=ctx.session.session_id,
        reason=rule,
        sender=ctx.sender_text,
        recipient=recipient.address,
    )
    denied = reject(550, "5.7.1", replies.we_do_not_relay(ctx.sender_text, recipient.address), rule)
    return await intrusion.count_relay_denial(ctx, denied)
