"""Local recipients (SPEC R-DOM-1, R-DOM-2): aliases and domain aliases resolve first, then an
unknown address is rejected, sent to the domain's catch-all, or accepted and discarded, per
domain. Unknown recipients count for intrusion prevention (R-IPS-3) in every mode, so that a
catch-all domain is no safer a target for address harvesting than a rejecting one.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from rempart.common import keys
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.policy import intrusion, replies
from rempart.policy.addresses import AddressError, parse_address
from rempart.policy.decision import CheckContext, Decision, accept, reject, tempfail
from rempart.policy.srs import SrsError, looks_like_srs

log = logging.getLogger(__name__)

MAX_TARGETS = 1000  # an alias expanding further than this is a configuration error


async def check_sender_syntax(ctx: CheckContext) -> Decision | None:
    try:
        ctx.sender()
    except AddressError:
        return reject(501, "5.1.7", replies.BAD_SENDER_SYNTAX, "RFC5321")
    return None


async def check_syntax(ctx: CheckContext) -> Decision | None:
    try:
        ctx.recipient()
    except AddressError:
        return reject(501, "5.1.3", replies.BAD_RECIPIENT_SYNTAX, "RFC5321")
    refused = await check_sender_syntax(ctx)
    if refused is None:
        await ctx.prefetch_envelope()
    return refused


async def _split_targets(ctx: CheckContext, targets: list[str]) -> tuple[list[str], list[str]]:
    local: list[str] = []
    remote: list[str] = []
    for target in targets[:MAX_TARGETS]:
        domain = target.rpartition("@")[2]
        if await ctx.canonical_domain(domain) is None:
            remote.append(target)
        else:
            local.append(target)
    return local, remote


async def check_local_recipient(ctx: CheckContext) -> Decision | None:
    """Decide every recipient in a local domain; None for a remote one (relay rules apply)."""
    recipient = ctx.recipient()
    domain = await ctx.canonical_domain(recipient.domain)
    if domain is None:
        return None
    # "user%remote@local", "remote!user@local", "\"user@remote\"@local": never routed, never
    # looked up: a local domain has no such user.
    if recipient.has_routing_characters:
        targets = None
    elif domain == recipient.domain and ctx.known_account(recipient.address):
        targets = [recipient.address]  # an account: nothing to expand (R-DOM-2 is for aliases)
    else:
        targets = await ctx.directory.resolve(recipient.address)
    if targets:
        local, remote = await _split_targets(ctx, targets)
        if any([await _over_quota(ctx, mailbox) for mailbox in local]):
            # R-MBX-5: the whole recipient waits (the sender retries), so an alias never
            # delivers to some members and silently not to a full one.
            return tempfail(452, "4.2.2", replies.mailbox_full(recipient.address), "R-MBX-5")
        # Forwarding off-site through a local alias is relaying the domain's owner allowed.
        rule = "" if targets == [recipient.address] else "R-DOM-2"
        return await rewrite_for_forwarding(ctx, accept(rule, local_mailboxes=local, remote_recipients=remote), domain)
    return await rewrite_for_forwarding(ctx, await _unknown_recipient(ctx, domain, recipient.address), domain)


async def _over_quota(ctx: CheckContext, mailbox: str) -> bool:
    """Whether a local mailbox holds its quota or more (R-MBX-5; 0 MiB = no quota)."""
    limit = (await ctx.config.effective(mailbox.rpartition("@")[2], mailbox)).limits.mailbox_quota_mb
    if not limit:
        return False
    used = int(await ctx.redis.hget(keys.mailbox_usage(mailbox), "bytes") or 0)
    return used >= limit * 1024 * 1024


def _bypassed(domain: str, entries: list[str]) -> bool:
    for entry in entries:
        entry = entry.strip().lower().rstrip(".")
        if entry and (domain == entry or domain.endswith("." + entry)):
            return True
    return False


async def rewrite_for_forwarding(ctx: CheckContext, decision: Decision, alias_domain: str) -> Decision:
    """R-DNS-6: a local alias that forwards a remote sender's mail off-site sends it with an SRS
    envelope sender, so that the destination's SPF check sees our domain, not the sender's."""
    settings = ctx.settings.dns
    if not settings.srs_enabled or decision.action != policy_pb2.ACTION_ACCEPT or not decision.remote_recipients:
        return decision
    sender = ctx.sender()
    if sender is None or await ctx.canonical_domain(sender.domain) is not None:
        return decision  # bounces are never rewritten; our own senders pass SPF as themselves
    if all(_bypassed(r.rpartition("@")[2], settings.srs_bypass) for r in decision.remote_recipients):
        return decision
    rewritten = ctx.srs.forward(settings.srs_secrets, sender.address, settings.srs_domain.strip() or alias_domain)
    return replace(decision, rewritten_sender=rewritten, rule=decision.rule or "R-DNS-6")


async def check_srs_recipient(ctx: CheckContext) -> Decision | None:
    """R-DNS-6: a bounce to an SRS address we issued goes back to the original sender; a forged
    or expired one is an unknown user (and counts as one for R-IPS-3)."""
    recipient = ctx.recipient()
    if not looks_like_srs(recipient.local):
        return None
    domain = await ctx.canonical_domain(recipient.domain)
    if domain is None:
        return None
    settings = ctx.settings.dns
    try:
        original = parse_address(ctx.srs.reverse(settings.srs_secrets, recipient.address))
    except (SrsError, AddressError) as exc:
        if ctx.known_account(recipient.address) or await ctx.directory.resolve(recipient.address):
            return None  # a real mailbox that happens to look like SRS
        log.info("srs address refused: %s", exc, extra={"session": ctx.session.session_id,
                                                         "client_ip": ctx.client_ip})
        normal = reject(550, "5.1.1", replies.unknown_user(recipient.address), "R-DNS-6")
        return await intrusion.count_unknown_recipient(ctx, normal)
    return accept("R-DNS-6", remote_recipients=[original.address])


async def _unknown_recipient(ctx: CheckContext, domain: str, address: str) -> Decision:
    settings = (await ctx.config.effective(domain)).recipients
    normal = reject(550, "5.1.1", replies.unknown_user(address), "R-DOM-1")
    if settings.unknown_recipient_action == "discard":
        normal = Decision(policy_pb2.ACTION_DISCARD, 250, "2.1.5", replies.OK, "R-DOM-1")
    elif settings.unknown_recipient_action == "catch_all" and settings.catch_all_address:
        targets = await ctx.directory.resolve(settings.catch_all_address) or []
        local, remote = await _split_targets(ctx, targets)
        if local or remote:
            normal = accept("R-DOM-1", local_mailboxes=local, remote_recipients=remote)
    return await intrusion.count_unknown_recipient(ctx, normal)


async def accept_remote(ctx: CheckContext) -> Decision | None:
    """The last RCPT rule: a remote recipient every relay and limit rule let through."""
    return accept("R-REL-1", local_mailboxes=(), remote_recipients=[ctx.recipient().address])
