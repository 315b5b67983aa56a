"""Activity statistics: what the suite accepted, refused and let log in, per time bucket.

Every replica of every service adds to the same Redis counters, so the admin API's
``GET /v1/stats`` and the web console's status page see the whole cluster without asking any pod:

- the SMTP edge counts each message it stored (the ``250`` after DATA);
- the policy service counts each SMTP command it refused, by reason (a fixed vocabulary,
  :data:`REFUSAL_REASONS`, derived from the rule that decided), each IP it blocked, and each
  refusal because an IP is blocked (with the IP, for the "top blocked IPs");
- the auth service counts each login by protocol (SMTP AUTH, IMAP, POP3, the admin API) and result.

Writing costs the mail path a dictionary update: a :class:`StatsRecorder` adds counts in memory
and one task per process writes them out in one Redis pipeline at most every
:data:`FLUSH_SECONDS`. A write that fails is logged at debug and dropped: statistics are history,
never mail, and a Redis outage must not slow or fail a message (DESIGN.md "Durability").

Storage: a hash per minute and one per hour (field -> count; kept :data:`RETENTION` seconds), and
beside each a sorted set of refused blocked IPs, trimmed to the :data:`MAX_IPS_PER_BUCKET` most
refused so that a botnet cannot grow it without bound, and kept :data:`IP_RETENTION` seconds
(two hours for the minute sets). Reading a range sums whole buckets:
minute buckets for steps that are not whole hours (reaching back :data:`RETENTION` of minutes),
hour buckets otherwise, so that a month costs 720 reads, not 43,200.

Read with :func:`read_series` (any range and step within the bounds) or :func:`last_hour`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from rempart.common import keys

log = logging.getLogger(__name__)

MINUTE = 60
HOUR = 3600
# How long each granularity is kept: minutes for two days, hours for a month and a bit.
RETENTION = {MINUTE: 2 * 24 * HOUR, HOUR: 32 * 24 * HOUR}
# The sorted sets of refused blocked IPs are far bigger than the counts (up to
# MAX_IPS_PER_BUCKET members each): under a botnet, 2,880 full minute sets would hold some
# 300 MB in the Redis that also holds the mailbox index. Minute sets are kept two hours; older
# ranges take their top IPs from the hour sets (60 times fewer).
IP_RETENTION = {MINUTE: 2 * HOUR, HOUR: RETENTION[HOUR]}
FLUSH_SECONDS = 1.0
FLUSH_TIMEOUT_SECONDS = 2.0
MAX_PENDING = 10_000  # distinct (bucket, field) entries held while Redis does not answer
MAX_IPS_PER_BUCKET = 1000
TOP_IPS_READ_PER_BUCKET = 100
MAX_BUCKETS = 1440  # points in one answer
MAX_SOURCE_BUCKETS = 2880  # stored buckets read for one answer (48 h of minutes)
MAX_STEP = 24 * HOUR
MAX_TOP_IPS = 100
READ_CHUNK = 500  # commands per pipeline round trip when reading

# What a refusal is called, from the rule that decided (the policy's Verdict.rule). Requirement
# ids stay in the code: people read words. A rule not listed is "other" (a temporary failure
# of the policy service itself is "temporary_failure").
REASON_BY_RULE = {
    "R-IPS-2": "intrusion_prevention",
    "R-IPS-3": "intrusion_prevention",
    "R-IPS-4": "intrusion_prevention",
    "R-DNS-1": "dnsbl",
    "R-DNS-2": "ip_reputation",
    "R-DNS-3": "no_reverse_dns",
    "R-DNS-4": "sender_domain_missing",
    "R-DNS-5": "spf",
    "R-DNS-6": "unknown_recipient",
    "R-DNS-7": "dns_temporary_failure",
    "R-DOM-1": "unknown_recipient",
    "R-REL-1": "relay_denied",
    "R-REL-2": "local_sender_not_authenticated",
    "R-REL-3": "sender_not_permitted",
    "R-REL-4": "relay_denied",
    "R-REL-5": "helo_rejected",
    "R-REL-6": "pregreet",
    "R-LIM-1": "daily_limit",
    "R-LIM-4": "too_many_recipients",
    "R-LIM-5": "too_many_hops",
    "R-LIM-7": "message_too_big",
    "R-MBX-5": "over_quota",
    "RFC5321": "bad_syntax",
}
TEMPORARY_FAILURE = "temporary_failure"
OTHER = "other"
REFUSAL_REASONS = frozenset(REASON_BY_RULE.values()) | {TEMPORARY_FAILURE, OTHER}
LOGIN_PROTOCOLS = frozenset({"smtp", "imap", "pop3", "admin"})
LOGIN_RESULTS = frozenset({"ok", "invalid", "locked", "ip_restricted", "second_factor", "tempfail"})

# Hash fields. Every name comes from the fixed sets above: a client never makes a new field.
ACCEPTED = "smtp.accepted"
REFUSED = "smtp.refused."
LOGIN = "login."
IPS_BLOCKED = "ips.blocked"
IPS_REFUSED = "ips.refused"


# The keys (named in rempart.common.keys) under their names here.
counts_key = keys.stats_counts
blocked_ips_key = keys.stats_blocked_ips


def refusal_reason(rule: str, temporary: bool = False) -> str:
    """The word for a refusal decided by ``rule`` ("R-DOM-1" -> "unknown_recipient")."""
    reason = REASON_BY_RULE.get(rule.strip())
    if reason is not None:
        return reason
    return TEMPORARY_FAILURE if temporary else OTHER


def _canonical_ip(raw: str) -> str | None:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        return None


class StatsRecorder:
    """Counts for one process, written to Redis in the background (see the module's text).

    Every method is synchronous, cheap and never raises: call it where the decision is made.
    Call :meth:`flush` at shutdown to write what is pending.
    """

    def __init__(self, redis: aioredis.Redis, *, flush_seconds: float = FLUSH_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._flush_seconds = flush_seconds
        self._clock = clock
        self._counts: dict[tuple[int, str], int] = {}
        self._ips: dict[tuple[int, str], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # after close(): counts are kept (bounded) but no flush is scheduled
        self.dropped = 0  # counts lost because too many were pending or a write failed

    # What the services call ----------------------------------------------------------------
    def message_accepted(self) -> None:
        """The edge stored a message and answered 250."""
        self._add(ACCEPTED)

    def refusal(self, reason: str) -> None:
        """An SMTP command was refused; ``reason`` from :func:`refusal_reason`."""
        self._add(REFUSED + (reason if reason in REFUSAL_REASONS else OTHER))

    def login(self, protocol: str, result: str) -> None:
        """A login's outcome: protocol smtp/imap/pop3/admin, result ok/invalid/locked/..."""
        protocol = protocol if protocol in LOGIN_PROTOCOLS else OTHER
        result = result if result in LOGIN_RESULTS else OTHER
        self._add(f"{LOGIN}{protocol}.{result}")

    def ip_blocked(self, ip: str) -> None:
        """Intrusion prevention blocked ``ip`` just now."""
        self._add(IPS_BLOCKED)
        self._add_ip(ip)

    def ip_refused(self, ip: str) -> None:
        """Something from ``ip`` was refused because the IP is blocked."""
        self._add(IPS_REFUSED)
        self._add_ip(ip)

    # Writing -------------------------------------------------------------------------------
    def _minute(self) -> int:
        return int(self._clock()) // MINUTE * MINUTE

    def _room(self) -> bool:
        if len(self._counts) + len(self._ips) < MAX_PENDING:
            return True
        self.dropped += 1
        return False

    def _add(self, name: str) -> None:
        entry = (self._minute(), name)
        if entry in self._counts or self._room():
            self._counts[entry] = self._counts.get(entry, 0) + 1
            self._schedule()

    def _add_ip(self, raw: str) -> None:
        ip = _canonical_ip(raw)
        if ip is None:
            return
        entry = (self._minute(), ip)
        if entry in self._ips or self._room():
            self._ips[entry] = self._ips.get(entry, 0) + 1
            self._schedule()

    def _schedule(self) -> None:
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): written by the next flush
        self._task = loop.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(self._flush_seconds)
        finally:
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Write every pending count in one pipeline; on failure log at debug and drop them."""
        counts, ips = self._counts, self._ips
        self._counts, self._ips = {}, {}
        if not counts and not ips:
            return
        touched: dict[str, int] = {}
        trimmed: dict[str, int] = {}
        pipe = self._redis.pipeline(transaction=False)
        for (minute, name), n in counts.items():
            for granularity in (MINUTE, HOUR):
                key = keys.stats_counts(granularity, minute // granularity * granularity)
                pipe.hincrby(key, name, n)
                touched[key] = granularity
        for (minute, ip), n in ips.items():
            for granularity in (MINUTE, HOUR):
                key = keys.stats_blocked_ips(granularity, minute // granularity * granularity)
                pipe.zincrby(key, n, ip)
                touched[key] = trimmed[key] = granularity
        for key, granularity in touched.items():
            kept = IP_RETENTION[granularity] if key in trimmed else RETENTION[granularity]
            pipe.expire(key, kept + granularity)
        for key in trimmed:
            # Keep the most refused; the least refused go first when a bucket is full.
            pipe.zremrangebyrank(key, 0, -(MAX_IPS_PER_BUCKET + 1))
        try:
            await asyncio.wait_for(pipe.execute(), FLUSH_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - statistics never fail or slow the mail path
            self.dropped += sum(counts.values()) + sum(ips.values())
            log.debug("statistics not written: %s", type(exc).__name__)

    async def close(self) -> None:
        """Write what is pending (at shutdown). No background flush is started afterwards: one
        would outlive the Redis client the service closes next; a later :meth:`flush` still writes."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.flush()


# Reading -------------------------------------------------------------------------------------
class StatsRangeError(ValueError):
    """A range that cannot be answered; ``field`` names the parameter at fault."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class StatsBucket:
    """The counts of one time bucket ``[start, start + seconds)`` (Unix seconds, UTC)."""

    start: int
    seconds: int
    accepted: int = 0
    refused: Mapping[str, int] = field(default_factory=dict)  # reason -> SMTP commands refused
    logins: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # protocol -> result -> n
    ips_blocked: int = 0  # blocks put on IPs
    ips_refused: int = 0  # connections and commands refused because the IP was blocked

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())


@dataclass(frozen=True)
class StatsSeries:
    """A range cut into buckets of ``step`` seconds, its totals and its most refused blocked IPs."""

    start: int
    end: int
    step: int
    granularity: int  # the stored buckets it was summed from (60 or 3600)
    buckets: list[StatsBucket]
    totals: StatsBucket
    top_blocked_ips: list[tuple[str, int]]  # (IP, refusals while blocked), most first


def plan_range(start: float, end: float, step: int, now: float | None = None) -> tuple[int, int, int]:
    """Check a range and align it to its step: (aligned start, aligned end, granularity).

    Buckets start at multiples of ``step`` since the epoch (a 1-day step gives UTC days).
    Raises :class:`StatsRangeError` naming ``from``, ``to`` or ``step``.
    """
    if not (MINUTE <= step <= MAX_STEP) or step % MINUTE:
        raise StatsRangeError("step", f"step must be a whole number of minutes from {MINUTE} to {MAX_STEP} seconds")
    if not (math.isfinite(start) and math.isfinite(end)):
        raise StatsRangeError("from", "from and to must be real times")
    if end <= start:
        raise StatsRangeError("to", "to must be after from")
    first = int(start // step * step)
    last = int(math.ceil(end / step) * step)
    if (last - first) // step > MAX_BUCKETS:
        raise StatsRangeError("step", f"at most {MAX_BUCKETS} buckets per answer: use a longer step or a shorter range")
    granularity = HOUR if step % HOUR == 0 else MINUTE
    if (last - first) // granularity > MAX_SOURCE_BUCKETS:
        raise StatsRangeError("step", "a range longer than 48 hours needs a step of whole hours")
    now = time.time() if now is None else now
    if first < now - RETENTION[granularity] - granularity:
        kept = "48 hours" if granularity == MINUTE else "32 days"
        hint = "; use a step of whole hours" if granularity == MINUTE else ""
        raise StatsRangeError("from", f"statistics in {granularity // MINUTE}-minute buckets are kept {kept}{hint}")
    return first, last, granularity


def _number(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _summed(start: int, seconds: int, hashes: Iterable[Mapping[Any, Any]]) -> StatsBucket:
    accepted = blocked = refused_ips = 0
    refused: dict[str, int] = {}
    logins: dict[str, dict[str, int]] = {}
    for fields in hashes:
        for raw_name, raw_count in fields.items():
            name, n = _text(raw_name), _number(raw_count)
            if name == ACCEPTED:
                accepted += n
            elif name == IPS_BLOCKED:
                blocked += n
            elif name == IPS_REFUSED:
                refused_ips += n
            elif name.startswith(REFUSED):
                reason = name[len(REFUSED):]
                refused[reason] = refused.get(reason, 0) + n
            elif name.startswith(LOGIN):
                protocol, _, result = name[len(LOGIN):].partition(".")
                per = logins.setdefault(protocol, {})
                per[result] = per.get(result, 0) + n
    return StatsBucket(start, seconds, accepted, refused, logins, blocked, refused_ips)


async def _read_all(redis: aioredis.Redis, commands: list[tuple[str, str]]) -> list[Any]:
    out: list[Any] = []
    for offset in range(0, len(commands), READ_CHUNK):
        pipe = redis.pipeline(transaction=False)
        for kind, key in commands[offset:offset + READ_CHUNK]:
            if kind == "counts":
                pipe.hgetall(key)
            else:
                pipe.zrevrange(key, 0, TOP_IPS_READ_PER_BUCKET - 1, withscores=True)
        out.extend(await pipe.execute())
    return out


def _ip_sources(first: int, last: int, granularity: int, now: float) -> tuple[int, list[int]]:
    """(granularity, bucket starts) of the IP sets to read for ``[first, last)``."""
    if granularity == HOUR or first >= now - IP_RETENTION[MINUTE]:
        return granularity, list(range(first, last, granularity))
    return HOUR, list(range(first // HOUR * HOUR, last, HOUR))


async def read_series(redis: aioredis.Redis, start: float, end: float, step: int, *, top_ips: int = 10,
                      now: float | None = None) -> StatsSeries:
    """The counts of ``[start, end)`` (Unix seconds) in buckets of ``step`` seconds, oldest first.

    Every bucket of the aligned range is present, zero where nothing happened. The top blocked
    IPs sum each stored bucket's :data:`TOP_IPS_READ_PER_BUCKET` most refused IPs (exact unless
    more IPs than that were refused in one minute or hour). A range of minute buckets that starts
    before the minute IP sets' :data:`IP_RETENTION` takes its top IPs from the hour sets of the
    whole hours that hold it. Raises :class:`StatsRangeError`.
    This is what ``GET /v1/stats`` answers and what the console's status page draws.
    """
    now = time.time() if now is None else now
    first, last, granularity = plan_range(start, end, step, now)
    top_ips = max(0, min(top_ips, MAX_TOP_IPS))
    sources = list(range(first, last, granularity))
    commands = [("counts", keys.stats_counts(granularity, b)) for b in sources]
    if top_ips:
        ip_granularity, ip_sources = _ip_sources(first, last, granularity, now)
        commands += [("ips", keys.stats_blocked_ips(ip_granularity, b)) for b in ip_sources]
    results = await _read_all(redis, commands)
    hashes = results[:len(sources)]
    per_bucket: dict[int, list[Mapping[Any, Any]]] = {}
    for source, fields in zip(sources, hashes, strict=True):
        per_bucket.setdefault(source // step * step, []).append(fields or {})
    buckets = [_summed(b, step, per_bucket.get(b, [])) for b in range(first, last, step)]
    totals = _summed(first, last - first, [f or {} for f in hashes])
    scores: dict[str, int] = {}
    for ranked in results[len(sources):]:
        for member, score in ranked or []:
            ip = _text(member)
            scores[ip] = scores.get(ip, 0) + int(score)
    top = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:top_ips]
    return StatsSeries(first, last, step, granularity, buckets, totals, top)


async def last_hour(redis: aioredis.Redis, step: int = 5 * MINUTE, *, now: float | None = None) -> StatsSeries:
    """The last hour up to now in ``step``-second buckets (the console's "messages and refusals
    over the last hour": ``bucket.accepted`` and ``bucket.refused_total`` per bucket)."""
    now = time.time() if now is None else now
    return await read_series(redis, now - HOUR, now, step, now=now)
