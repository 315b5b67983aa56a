"""Sending limits (SPEC R-LIM-1..5, R-LIM-7).

Daily external sending counters are per account and per domain, per day in the configured time
zone (R-LIM-3), and move inside one Lua script: the check of both limits and both increments
are one atomic step, so concurrent sessions on any replica can never overshoot a limit.
"""

from __future__ import annotations

import logging
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis.asyncio as aioredis

from rempart.common import keys
from rempart.policy import replies
from rempart.policy.addresses import AddressError, parse_address
from rempart.policy.decision import CheckContext, Decision, reject, tempfail
from rempart.policy.scripts import LuaScript

log = logging.getLogger(__name__)

COUNTER_TTL_SECONDS = 3 * 24 * 3600  # long enough for the admin API to show yesterday's count

# KEYS: account counter, domain counter. ARGV: account limit, domain limit, ttl (0 = unlimited).
# Returns 0 when counted, 1 when the account is over, 2 when the domain total is over.
_COUNT_SENT = LuaScript("""
local dom_limit = tonumber(ARGV[2])
if dom_limit > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= dom_limit then return 2 end
local acct_limit = tonumber(ARGV[1])
if acct_limit > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= acct_limit then return 1 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 0
""")


def day_key(timezone: str, now: datetime | None = None) -> str:
    """The counter day (R-LIM-3): the date in the configured time zone; UTC if it is unknown."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("unknown counter_timezone %r, using UTC", timezone)
        zone = ZoneInfo("UTC")
    return (now.astimezone(zone) if now is not None else datetime.now(zone)).strftime("%Y-%m-%d")


async def sent_today(redis: aioredis.Redis, account: str, timezone: str = "UTC") -> int:
    """R-LIM-3: "# sent external" for an account today (for the admin API)."""
    raw = await redis.get(keys.sent_external(account.lower(), day_key(timezone)))
    return int(raw) if raw else 0


async def domain_sent_today(redis: aioredis.Redis, domain: str, timezone: str = "UTC") -> int:
    raw = await redis.get(keys.domain_sent_external(domain.lower(), day_key(timezone)))
    return int(raw) if raw else 0


async def check_size_param(ctx: CheckContext) -> Decision | None:
    """R-LIM-7 at MAIL: the SIZE= parameter over the sender's maximum."""
    return await _check_size(ctx)


async def check_message_size(ctx: CheckContext) -> Decision | None:
    """R-LIM-7 at DATA: the real size (the edge stops reading at the limit, without buffering)."""
    return await _check_size(ctx)


async def message_size_limit(ctx: CheckContext) -> int:
    """R-LIM-7: the largest message the session's sender may send, in bytes."""
    return (await ctx.account_settings()).limits.max_message_size


async def _check_size(ctx: CheckContext) -> Decision | None:
    if ctx.request.message_size > await message_size_limit(ctx):
        return reject(552, "5.3.4", replies.MESSAGE_TOO_BIG, "R-LIM-7")
    return None


async def check_recipient_count(ctx: CheckContext) -> Decision | None:
    """R-LIM-4: at most ``max_recipients`` RCPT per transaction."""
    if len(ctx.request.accepted_recipients) >= ctx.settings.limits.max_recipients:
        return tempfail(452, "4.5.3", replies.TOO_MANY_RECIPIENTS, "R-LIM-4")
    return None


async def check_hops(ctx: CheckContext) -> Decision | None:
    """R-LIM-5: more Received headers than ``max_hops`` is a mail loop."""
    if ctx.request.hop_count > ctx.settings.limits.max_hops:
        return reject(554, "5.4.6", replies.TOO_MANY_HOPS, "R-LIM-5")
    return None


async def check_daily_external(ctx: CheckContext) -> Decision | None:
    """R-LIM-1/2: count an authenticated sender's mail to an external domain, once per domain
    per message; over the account's or the domain's daily limit, ``452 4.5.3`` on this RCPT."""
    if not ctx.authenticated:
        return None
    recipient = ctx.recipient()
    if await ctx.canonical_domain(recipient.domain) is not None:
        return None
    # Already counted for this message when an accepted recipient shares the domain.
    for accepted in ctx.request.accepted_recipients[: ctx.settings.limits.max_recipients]:
        try:
            if parse_address(accepted).domain == recipient.domain:
                return None
        except AddressError:
            continue
    domain = ctx.account_domain
    account_limit = (await ctx.config.effective(domain, ctx.account)).limits.max_messages_per_day
    # The domain total is the domain's own hard limit: an account cannot raise it (R-LIM-1).
    domain_limit = (await ctx.config.effective(domain)).limits.domain_max_messages_per_day
    day = day_key(ctx.settings.limits.counter_timezone)
    result = int(
        await _COUNT_SENT(
            ctx.redis,
            [keys.sent_external(ctx.account, day), keys.domain_sent_external(domain, day)],
            [account_limit, domain_limit, COUNTER_TTL_SECONDS],
        )
    )
    if result == 0:
        return None
    which = "domain" if result == 2 else "account"
    log.info(
        "daily sending limit exceeded",
        extra={"session": ctx.session.session_id, "account": ctx.account, "limit": which},
    )
    await ctx.events.publish(
        "limits",
        "exceeded",
        client_ip=ctx.client_ip,
        account=ctx.account,
        session_id=ctx.session.session_id,
        reason="R-LIM-1",
        limit=which,
        limit_value=str(domain_limit if result == 2 else account_limit),
    )
    return tempfail(452, "4.5.3", replies.DAILY_LIMIT_EXCEEDED, "R-LIM-1")
