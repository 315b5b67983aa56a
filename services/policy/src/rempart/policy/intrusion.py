"""Intrusion prevention (SPEC R-IPS-1..6): counters per IP and trigger, and IP blocks.

Every counter and block lives in Redis and changes only inside one Lua script, so that every
replica of every protocol shares them and concurrent calls never double-count or double-block.
A counter is a fixed window that starts with its first hit (``INCR`` then ``EXPIRE``). A block
is a key with a TTL of ``block_minutes`` holding why and when, plus an entry in a sorted set
(score = expiry) so that the admin API can list blocks without scanning the keyspace.

What is counted and blocked is the client's *subject* (:func:`rempart.common.ipblocks.intrusion_subject`):
an IPv4 address, or for IPv6 the network address of the client's prefix (``ips.ipv6_prefix_length``,
default /64, R-IPS-6), so that a client cannot dodge its counters by changing addresses inside
its own prefix; a block of the prefix refuses every address in it.

R-IPS-6: a successful login records the subject as known for ``login.known_ip_days`` (R-LOG-1's
known-IP window). Connections from a known subject are not counted towards
``max_connections_per_minute``: a household behind one NAT, whose mail clients keep several
connections each and reconnect often, is never blocked by the rate. Every other trigger, failed
logins first, still counts and blocks. The auth service's known IPs are kept per account (its
lockout bypass); at connect no account is known yet, hence this record per subject.

A block's subject, its record and its lifting are defined once in :mod:`rempart.common.ipblocks`,
which the admin API uses for its blocks by hand; it publishes the ``ips/unblocked`` event itself.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

import redis.asyncio as aioredis
from prometheus_client import Counter

from rempart.common import ipblocks, keys
from rempart.common.ipblocks import block_document
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.policy import replies
from rempart.policy.decision import CheckContext, Decision, accept, ip_in
from rempart.policy.scripts import LuaScript

log = logging.getLogger(__name__)

IPS_BLOCKS_TOTAL = Counter("rempart_ips_blocks_total", "IP blocks by intrusion prevention", ["reason"])

# Counter triggers (the ``trigger`` part of ``keys.ips_counter``), named in rempart.common.keys:
# the admin API's unblock clears the same ones.
TRIGGER_CONNECTIONS = keys.IPS_TRIGGER_CONNECTIONS
TRIGGER_FAILED_LOGINS = keys.IPS_TRIGGER_FAILED_LOGINS
TRIGGER_UNKNOWN_RECIPIENTS = keys.IPS_TRIGGER_UNKNOWN_RECIPIENTS
TRIGGER_RELAY_DENIALS = keys.IPS_TRIGGER_RELAY_DENIALS
TRIGGER_RSET = keys.IPS_TRIGGER_RSET
TRIGGERS = keys.IPS_TRIGGERS

REASON_CONNECTIONS = "R-IPS-2 connections per minute"
REASON_FAILED_LOGINS = "R-IPS-2 failed logins"
REASON_UNKNOWN_RECIPIENTS = "R-IPS-3 unknown recipients"
REASON_RELAY_DENIALS = "R-IPS-3 relay denials"
REASON_RSET = "R-IPS-3 RSET commands"
REASON_SPAM_SCORE = "R-IPS-3 spam score"
REASON_MESSAGE_SIZE = "R-IPS-3 message size"
REASON_SIMULTANEOUS = "R-IPS-3 simultaneous connections"

MAX_LISTED_BLOCKS = 10000

# KEYS: counter, block, blocks-zset[, exemption]. ARGV: window s, max, block s, block doc,
# subject, expires at. Returns {count, newly_blocked}; count -1 when the subject was already
# blocked, 0 when the exemption key exists (nothing counted either way).
_COUNT_AND_BLOCK = LuaScript("""
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, 0} end
if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return {0, 0} end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1])) end
if n > tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', tonumber(ARGV[3]))
  redis.call('ZADD', KEYS[3], tonumber(ARGV[6]), ARGV[5])
  redis.call('DEL', KEYS[1])
  return {n, 1}
end
return {n, 0}
""")

# KEYS: block, blocks-zset. ARGV: block s, block doc, ip, expires at. Returns 1 when new.
_BLOCK = LuaScript("""
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', tonumber(ARGV[1])) then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[3])
  return 1
end
return 0
""")


# The IP's open sessions: a sorted set member per session, scored by its expiry, so that a
# session whose edge died without sending DISCONNECT stops counting by itself.
# KEYS: sessions zset, block, blocks zset. ARGV: now, session expiry, member, max, key ttl,
# block s, block doc, ip, block expires at. Returns {count, newly_blocked}; over the limit the
# session is not recorded (it is refused) and the IP is blocked.
_OPEN_SESSION = LuaScript("""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
local n = redis.call('ZCARD', KEYS[1])
if n > tonumber(ARGV[4]) then
  redis.call('ZREM', KEYS[1], ARGV[3])
  local newly = 0
  if redis.call('SET', KEYS[2], ARGV[7], 'NX', 'EX', tonumber(ARGV[6])) then
    redis.call('ZADD', KEYS[3], tonumber(ARGV[9]), ARGV[8])
    newly = 1
  end
  return {n, newly}
end
return {n, 0}
""")


@dataclass(frozen=True)
class Block:
    ip: str  # the subject: an IP, or the network address of an IPv6 prefix
    reason: str
    blocked_at: float
    expires_at: float
    protocol: str = ""
    session_id: str = ""
    prefix: str = ""  # ``2001:db8:1:2::/64`` when a whole IPv6 prefix is blocked
    client_ip: str = ""  # the address whose call tripped the block


async def is_blocked(redis: aioredis.Redis, subject: str) -> bool:
    return bool(await redis.exists(keys.ips_block(subject)))


async def list_blocks(redis: aioredis.Redis) -> list[Block]:
    """Every current block (R-IPS-5), oldest expiry first; expired entries are pruned."""
    now = time.time()
    await redis.zremrangebyscore(keys.IPS_BLOCKS, "-inf", now)
    ips = [str(ip) for ip in await redis.zrange(keys.IPS_BLOCKS, 0, MAX_LISTED_BLOCKS - 1)]
    if not ips:
        return []
    docs = await redis.mget([keys.ips_block(ip) for ip in ips])
    out: list[Block] = []
    for ip, raw in zip(ips, docs, strict=True):
        if raw is None:
            continue  # expired or removed between the two calls
        try:
            doc = json.loads(raw)
            out.append(
                Block(
                    ip=ip,
                    reason=str(doc.get("reason", "")),
                    blocked_at=float(doc.get("blocked_at", 0)),
                    expires_at=float(doc.get("expires_at", 0)),
                    protocol=str(doc.get("protocol", "")),
                    session_id=str(doc.get("session_id", "")),
                    prefix=str(doc.get("prefix", "")),
                    client_ip=str(doc.get("client_ip", "")),
                )
            )
        except (ValueError, TypeError, AttributeError):
            out.append(Block(ip=ip, reason="", blocked_at=0.0, expires_at=0.0))
    return out


async def unblock(redis: aioredis.Redis, ip: str) -> bool:
    """Remove a block and the subject's counters (:func:`rempart.common.ipblocks.unblock`, which
    the admin API uses too); True if it was blocked. ``ip`` is the subject as :func:`list_blocks`
    names it (an IPv6 prefix's network address)."""
    return await ipblocks.unblock(redis, ip)


def _block_doc(ctx: CheckContext, reason: str, seconds: int) -> tuple[str, float]:
    now = time.time()
    expires = now + seconds
    doc = block_document(reason=reason, blocked_at=now, expires_at=expires, client_ip=ctx.client_ip,
                         prefix=ctx.ips_prefix, protocol=policy_pb2.Protocol.Name(ctx.session.protocol),
                         session_id=ctx.session.session_id)
    return doc, expires


async def _announce(ctx: CheckContext, reason: str) -> None:
    IPS_BLOCKS_TOTAL.labels(reason).inc()
    ips = ctx.settings.ips
    log.warning(
        "ip blocked",
        extra={"session": ctx.session.session_id, "client_ip": ctx.client_ip, "reason": reason,
               "prefix": ctx.ips_prefix},
    )
    # Edges subscribe to this to close the IP's other connections (R-IPS-4); ``prefix``, when
    # set, is the IPv6 network the block covers (R-IPS-6).
    await ctx.events.publish(
        "ips",
        "blocked",
        client_ip=ctx.client_ip,
        protocol=policy_pb2.Protocol.Name(ctx.session.protocol),
        session_id=ctx.session.session_id,
        reason=reason,
        minutes=str(ips.block_minutes),
        close_all_connections=str(ips.close_all_connections).lower(),
        instance=ctx.session.edge_instance,
        prefix=ctx.ips_prefix,
    )


async def count(
    ctx: CheckContext, trigger: str, limit: int, window_seconds: int, reason: str, exemption_key: str = ""
) -> tuple[int, bool]:
    """Count one event for the client's subject; block it when the count goes over ``limit``.

    Returns (count, newly blocked); count is -1 when the subject is already blocked, 0 when
    ``exemption_key`` exists in Redis (nothing counted). A limit of 0 turns the trigger off.
    Callers check :attr:`CheckContext.ips_applies` first.
    """
    if limit <= 0:
        return 0, False
    ips = ctx.settings.ips
    subject = ctx.ips_subject
    # "Attempts across several sessions" (R-IPS-1) is the default; off, each session counts alone.
    scope = subject if ips.across_sessions else f"{subject}:{ctx.session.session_id[:128]}"
    seconds = ips.block_minutes * 60
    doc, expires = _block_doc(ctx, reason, seconds)
    script_keys = [keys.ips_counter(trigger, scope), keys.ips_block(subject), keys.IPS_BLOCKS]
    if exemption_key:
        script_keys.append(exemption_key)
    result = await _COUNT_AND_BLOCK(ctx.redis, script_keys, [window_seconds, limit, seconds, doc, subject, expires])
    n, newly = int(result[0]), bool(int(result[1]))
    if newly:
        await _announce(ctx, reason)
    return n, newly


async def block_now(ctx: CheckContext, reason: str) -> bool:
    """Block the client IP at once (threshold triggers: spam score, message size)."""
    seconds = ctx.settings.ips.block_minutes * 60
    doc, expires = _block_doc(ctx, reason, seconds)
    block_keys = [keys.ips_block(ctx.ips_subject), keys.IPS_BLOCKS]
    newly = bool(await _BLOCK(ctx.redis, block_keys, [seconds, doc, ctx.ips_subject, expires]))
    if newly:
        await _announce(ctx, reason)
    return newly


def refused(ctx: CheckContext, rule: str) -> Decision:
    """R-IPS-4: ``421 4.0.0 Intrusion prevention active for [ip]`` and close."""
    return Decision(
        policy_pb2.ACTION_CLOSE, 421, "4.0.0", replies.intrusion_prevention_active(ctx.client_ip), rule, ip_blocked=True
    )


def after_block(ctx: CheckContext, newly_blocked: bool, already_blocked: bool, normal: Decision) -> Decision:
    """The reply for a call that counted: the normal reply, or close when the IP is now blocked."""
    if not (newly_blocked or already_blocked):
        return normal
    decision = refused(ctx, "R-IPS-4") if ctx.settings.ips.close_blocked_connection else normal
    return replace(decision, ip_blocked=newly_blocked)


async def count_and_decide(
    ctx: CheckContext, trigger: str, limit: int, window_seconds: int, reason: str, normal: Decision
) -> Decision:
    if not ctx.ips_applies:
        return normal
    n, newly = await count(ctx, trigger, limit, window_seconds, reason)
    return after_block(ctx, newly, n < 0, normal)


def _counter_window(ctx: CheckContext) -> int:
    return ctx.settings.ips.counter_window_minutes * 60


# Rules, one per trigger ---------------------------------------------------------------------
async def screen_connection(ctx: CheckContext) -> Decision | None:
    """R-IPS-4 and R-IPS-2 at connect, in one round trip: a blocked IP is refused; more than
    ``max_connections_per_minute`` connections in 60 s blocks the IP, unless an account logged
    in from it within the known-IP window (R-IPS-6)."""
    if not ctx.ips_applies:
        return None
    ips = ctx.settings.ips
    if ips.max_connections_per_minute > 0:
        exemption = keys.ips_known(ctx.ips_subject) if ips.known_ip_exempt_from_connection_rate else ""
        n, newly = await count(
            ctx, TRIGGER_CONNECTIONS, ips.max_connections_per_minute, 60, REASON_CONNECTIONS, exemption
        )
        blocked = newly or n < 0
    else:
        newly, blocked = False, await is_blocked(ctx.redis, ctx.ips_subject)
    if blocked and ips.refuse_blocked:
        return replace(refused(ctx, "R-IPS-2" if newly else "R-IPS-4"), ip_blocked=newly)
    return None


async def record_known_ip(ctx: CheckContext) -> Decision | None:
    """R-IPS-6: a successful login, on any protocol, makes the subject known for the known-IP
    window of R-LOG-1 (each login renews it). Recorded even while the exemption is off, so that
    turning it on helps the users who logged in meanwhile."""
    if not ctx.request.auth_success or ctx.ip is None:
        return None
    account = ctx.account or ctx.request.auth_login.strip().lower()
    await ctx.redis.set(
        keys.ips_known(ctx.ips_subject), account[:320], ex=ctx.settings.login.known_ip_days * 86400
    )
    return None


async def count_failed_login(ctx: CheckContext) -> Decision | None:
    """R-IPS-2: more than ``max_failed_logins`` failures within the window blocks the IP."""
    if ctx.request.auth_success:
        return None
    ips = ctx.settings.ips
    return await count_and_decide(
        ctx,
        TRIGGER_FAILED_LOGINS,
        ips.max_failed_logins,
        ips.failed_logins_window_minutes * 60,
        REASON_FAILED_LOGINS,
        accept("R-IPS-2"),
    )


async def count_unknown_recipient(ctx: CheckContext, normal: Decision) -> Decision:
    """R-IPS-3 / R-DOM-1: unknown recipients count in every mode."""
    return await count_and_decide(
        ctx,
        TRIGGER_UNKNOWN_RECIPIENTS,
        ctx.settings.ips.max_unknown_recipients,
        _counter_window(ctx),
        REASON_UNKNOWN_RECIPIENTS,
        normal,
    )


async def count_relay_denial(ctx: CheckContext, normal: Decision) -> Decision:
    return await count_and_decide(
        ctx,
        TRIGGER_RELAY_DENIALS,
        ctx.settings.ips.max_relay_denials,
        _counter_window(ctx),
        REASON_RELAY_DENIALS,
        normal,
    )


async def count_rset(ctx: CheckContext) -> Decision | None:
    if not ctx.is_smtp:
        return None
    return await count_and_decide(
        ctx, TRIGGER_RSET, ctx.settings.ips.max_rset, _counter_window(ctx), REASON_RSET, accept("R-IPS-3")
    )


async def check_message(ctx: CheckContext) -> Decision | None:
    """R-IPS-3 at DATA: a spam score over the threshold, or a message over N MB, blocks the IP."""
    if not ctx.ips_applies or not ctx.is_smtp:
        return None
    ips = ctx.settings.ips
    reason = ""
    request = ctx.request
    size_block = message_size_block(ctx)
    if ips.spam_score_threshold > 0 and request.spam_score_present and request.spam_score > ips.spam_score_threshold:
        reason = REASON_SPAM_SCORE
    elif size_block is not None and ctx.request.message_size > size_block:
        reason = REASON_MESSAGE_SIZE
    if not reason:
        return None
    newly = await block_now(ctx, reason)
    return replace(refused(ctx, "R-IPS-3"), ip_blocked=newly)


def message_size_block(ctx: CheckContext) -> int | None:
    """R-IPS-3: the message size (bytes) above which :func:`check_message` blocks the client
    IP, or None when it blocks none for size."""
    mb = ctx.settings.ips.max_message_size_mb
    if mb <= 0 or not ctx.ips_applies or not ctx.is_smtp:
        return None
    return int(mb * 1024 * 1024)


def _session_member(ctx: CheckContext) -> str:
    return f"{ctx.session.edge_instance[:128]}|{ctx.session.session_id[:128]}"


def _tracks_sessions(ctx: CheckContext) -> bool:
    ips = ctx.settings.ips
    return (
        ips.max_simultaneous_connections > 0
        and ctx.is_smtp
        and ctx.ips_applies
        and not ip_in(ctx.ip, ips.simultaneous_exceptions)
    )


async def open_session(ctx: CheckContext) -> Decision | None:
    """R-IPS-3: more than ``max_simultaneous_connections`` open SMTP sessions from one IP, on
    every edge together: ``421 4.7.0 Too many connections from [ip]``, close, and block."""
    if not _tracks_sessions(ctx):
        return None
    ips = ctx.settings.ips
    now = time.time()
    seconds = ips.block_minutes * 60
    doc, expires = _block_doc(ctx, REASON_SIMULTANEOUS, seconds)
    result = await _OPEN_SESSION(
        ctx.redis,
        [keys.ips_connections(ctx.ips_subject), keys.ips_block(ctx.ips_subject), keys.IPS_BLOCKS],
        [now, now + ips.simultaneous_connection_ttl_seconds, _session_member(ctx), ips.max_simultaneous_connections,
         ips.simultaneous_connection_ttl_seconds, seconds, doc, ctx.ips_subject, expires],
    )
    count, newly = int(result[0]), bool(int(result[1]))
    if count <= ips.max_simultaneous_connections:
        return None
    if newly:
        await _announce(ctx, REASON_SIMULTANEOUS)
    return Decision(
        policy_pb2.ACTION_CLOSE, 421, "4.7.0", replies.too_many_connections(ctx.client_ip), "R-IPS-3",
        ip_blocked=newly,
    )


async def close_session(ctx: CheckContext) -> Decision | None:
    """STAGE_DISCONNECT: the session no longer counts."""
    if ctx.settings.ips.max_simultaneous_connections > 0 and ctx.is_smtp:
        await ctx.redis.zrem(keys.ips_connections(ctx.ips_subject), _session_member(ctx))
    return None
