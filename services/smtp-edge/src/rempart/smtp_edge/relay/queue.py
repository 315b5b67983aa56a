"""The outbound queue (R-OUT-2, R-OUT-3, R-LIM-6): what happens to one accepted transaction's
remote recipients, attempt after attempt.

The queue's system of record is the MAIL stream itself: the relay's durable consumer leaves a
record unacknowledged until every remote recipient has a final result, and asks JetStream to
redeliver it (``nak`` with a delay) when the next recipient is due. What each recipient got is
kept in Redis (:mod:`rempart.common.outqueue`: the states, from ``pending`` to ``delivered``,
``bounced`` or ``dropped``), written after every remote reply, so that a relay killed anywhere
resends only what the remote had not accepted. The admin API reads the same state, and acts on
it: a retry makes the waiting recipients due and one replica takes the record at once; a
removal is looked for before each record, each connection and each final dot.

Recipients are grouped per destination domain and envelope sender (SRS gives forwarded copies
their own sender, R-DNS-6), each group with at most N recipients per connection (R-LIM-6), like
mox's queue keeps one record per recipient group with its own next attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.client import Pipeline

from rempart.common import keys
from rempart.common.config import MailSettings, OutboundSettings, SettingsCache
from rempart.common.directory import Directory
from rempart.common.events import EventBus
from rempart.common.mailbox import Mailboxes
from rempart.common.outqueue import RESULT_RETENTION_SECONDS, OutboundQueue, RecipientState, domain_of
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.redisconn import run_scripts
from rempart.smtp_edge.relay import replies
from rempart.smtp_edge.relay.delivery import Envelope, HostFailed, Outcome, SmtpClient
from rempart.smtp_edge.relay.dsn import RecipientReport, build_dsn, dsn_transaction_id
from rempart.smtp_edge.relay.mtasts import MtaSts, StsPolicy, enforce_failed
from rempart.smtp_edge.relay.replies import Reply
from rempart.smtp_edge.relay.routing import MailHost, Route, RouteError, Router
from rempart.smtp_edge.relay.signing import DkimSigner

log = logging.getLogger(__name__)

DELIVERIES = Counter("rempart_relay_recipients_total", "Remote recipients by result",
                     ["result"])  # delivered, deferred, bounced, expired, dropped, removed
SESSIONS = Counter("rempart_relay_sessions_total", "Outbound SMTP sessions", ["tls"])
POSSIBLE_DUPLICATES = Counter(
    "rempart_relay_possible_duplicates_total",
    "Recipients resent after a relay stopped between the final dot and the remote's reply")

# R-LIM-6 across replicas: one message to a destination domain and from a sender domain per
# call, both counted in the current minute, or neither when one is over its limit.
_RATE_LUA = """
for i = 1, #KEYS do
  local limit = tonumber(ARGV[i])
  if limit > 0 and tonumber(redis.call('GET', KEYS[i]) or '0') >= limit then return 0 end
end
for i = 1, #KEYS do
  if tonumber(ARGV[i]) > 0 then
    redis.call('INCR', KEYS[i])
    redis.call('EXPIRE', KEYS[i], 120)
  end
end
return 1
"""


# A lock taken only while its value is still the caller's (a replica never frees another's).
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REFRESH_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RecipientStore(OutboundQueue):
    """The queue's shared state (per-recipient results, the index for depth and age, retries
    and removals), plus what only the relay needs: the R-LIM-6 counters, the retries to take
    and the lock of the replica working on a transaction."""

    def __init__(self, redis: aioredis.Redis, rate_window_seconds: float = 60.0) -> None:
        super().__init__(redis)
        self._redis = redis
        self._rate = redis.register_script(_RATE_LUA)
        self._unlock = redis.register_script(_UNLOCK_LUA)
        self._refresh = redis.register_script(_REFRESH_LUA)
        self.rate_window_seconds = rate_window_seconds

    async def look(self, transaction_id: str) -> Look:
        """A record's recipient states, whether it was removed, and whether its facts are kept,
        in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            self._look(pipe, transaction_id)
            return Look.of(*await pipe.execute())

    @staticmethod
    def _look(pipe: Any, transaction_id: str) -> None:
        pipe.hgetall(keys.relay_recipients(transaction_id))
        pipe.exists(keys.relay_removed(transaction_id))
        pipe.exists(keys.relay_message(transaction_id))

    async def mark_sending(self, transaction_id: str, states: dict[str, RecipientState]) -> bool:
        """Just before the final dot: these recipients are on their way, unless the message was
        removed meanwhile (then False, and the dot must not be sent)."""
        key = keys.relay_recipients(transaction_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(keys.relay_removed(transaction_id))
            pipe.hset(key, mapping={r: s.to_json() for r, s in states.items()})
            pipe.expire(key, RESULT_RETENTION_SECONDS)
            removed, _, _ = await pipe.execute()
        return not removed

    async def claim_retries(self, limit: int, now_ms: int | None = None) -> list[str]:
        """The retries asked for and due, each taken by exactly one replica."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        asked: list[Any] = await self._redis.zrangebyscore(  # type: ignore[assignment]
            keys.RELAY_RETRIES, "-inf", now_ms, start=0, num=limit)
        mine = []
        for txn in asked:
            if await self._redis.zrem(keys.RELAY_RETRIES, str(txn)):
                mine.append(str(txn))
        return mine

    async def postpone_retry(self, transaction_id: str, seconds: float) -> None:
        """Another replica is working on it: take the retry again after it."""
        at = int((time.time() + seconds) * 1000)
        await self._redis.zadd(keys.RELAY_RETRIES, {transaction_id: at})

    async def lock(self, transaction_id: str, owner: str, ttl_seconds: float) -> Look | None:
        """One replica at a time works on a transaction: the consumer's copy and a retry asked
        for may meet. The lock lapses with its owner (``ttl_seconds``, refreshed as it works).
        With the lock, in the same round trip, what :meth:`look` reads (read after the lock was
        taken: nobody else changes it meanwhile); None when another replica holds it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.relay_lock(transaction_id), owner, nx=True, px=int(ttl_seconds * 1000))
            self._look(pipe, transaction_id)
            locked, *looked = await pipe.execute()
        return Look.of(*looked) if locked else None

    async def refresh_lock(self, transaction_id: str, owner: str, ttl_seconds: float) -> None:
        await self._refresh(keys=[keys.relay_lock(transaction_id)], args=[owner, int(ttl_seconds * 1000)])

    async def unlock(self, transaction_id: str, owner: str) -> None:
        await self._unlock(keys=[keys.relay_lock(transaction_id)], args=[owner])

    async def done_and_unlock(self, transaction_id: str, owner: str) -> None:
        """:meth:`done` and :meth:`unlock` in one round trip (the end of a finished record)."""
        def leave(pipe: Pipeline) -> None:
            pipe.zrem(keys.RELAY_QUEUE, transaction_id)
            pipe.zrem(keys.RELAY_RETRIES, transaction_id)

        await run_scripts(self._redis, [(self._unlock, [keys.relay_lock(transaction_id)], [owner])], before=leave)

    async def take_rate(self, destination: str, dst_limit: int, sender_domain: str, src_limit: int) -> bool:
        if dst_limit <= 0 and src_limit <= 0:
            return True
        window = int(time.time() // self.rate_window_seconds)
        allowed = await self._rate(
            keys=[keys.relay_rate("dst", destination, window), keys.relay_rate("src", sender_domain, window)],
            args=[dst_limit, src_limit])
        return bool(allowed)

    def next_rate_window_ms(self) -> int:
        return int((time.time() // self.rate_window_seconds + 1) * self.rate_window_seconds * 1000)


@dataclass
class Look:
    """A record's recipient states, whether it was removed, whether its facts are kept."""

    states: dict[str, RecipientState]
    removed: bool
    known: bool

    @classmethod
    def of(cls, raw: dict[Any, Any], removed: Any, known: Any) -> Look:
        return cls({str(k): RecipientState.from_json(str(v)) for k, v in raw.items()}, bool(removed), bool(known))


def reply_of(state: RecipientState) -> Reply:
    """The reply a recipient's state records (a DSN's Status and Diagnostic-Code)."""
    reply = Reply.parse(state.reply) if state.reply else Reply(451, "4.0.0", "not attempted")
    return Reply(reply.code, reply.enhanced, reply.text, remote=state.remote_reply)


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def backoff_seconds(settings: OutboundSettings, attempts: int) -> float:
    schedule = settings.retry_backoff_seconds
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def strip_return_path(data: bytes) -> bytes:
    """The edge writes Return-Path for final delivery (R-TLS-5); it must not leave with the
    message (RFC 5321 4.4: a relay removes it, the final hop adds its own)."""
    while data[:12].lower() == b"return-path:":
        end = data.find(b"\n")
        if end < 0:
            return data
        data = data[end + 1:]
        while data[:1] in (b" ", b"\t"):  # folded continuation
            end = data.find(b"\n")
            data = data[end + 1:] if end >= 0 else b""
    return data


@dataclass
class Attempt:
    """The outcome of processing a record once: finished, or when to look again."""

    finished: bool
    retry_in: float = 0.0
    unlocked: bool = False  # the lock was given back with the end of the record


@dataclass
class RelayQueue:
    hostname: str
    router: Router
    client: SmtpClient
    mailboxes: Mailboxes  # where bounces (DSN) are delivered, and where messages are read
    directory: Directory
    events: EventBus
    config: SettingsCache
    results: RecipientStore
    smarthost_passwords: dict[str, str] = field(default_factory=dict)
    signer: DkimSigner | None = None  # R-OUT-5: DKIM for local sender domains
    sts: MtaSts | None = None  # R-OUT-5: MTA-STS policies of destinations (RFC 8461)
    _domain_slots: dict[str, asyncio.Semaphore] = field(default_factory=dict)

    # One record ----------------------------------------------------------------------------
    async def process(self, record: events_pb2.DeliveryRecord, seq: int = 0, looked: Look | None = None,
                      owner: str = "") -> Attempt:
        """Attempt what is due of one record, conclude (bounces, expiry, delay notices), and say
        when to look again. ``seq`` is the record's MAIL stream sequence, kept for the queue view
        and for a retry asked for through the admin API. ``looked``: its state as read with the
        lock (else read now); ``owner``: the lock's, given back with the end of the record."""
        settings = self.config.server
        out = settings.outbound
        txn = record.transaction_id
        look = looked if looked is not None else await self.results.look(txn)
        states, removed, known = look.states, look.removed, look.known
        if removed:
            return await self._removed(txn, states)
        fresh = {r: RecipientState() for r in dict.fromkeys(record.remote_recipients) if r not in states}
        states.update(fresh)
        if fresh or (not known and any(not s.final for s in states.values())):
            await self.results.enter(record, seq, fresh)
        resumed = {r: s for r, s in states.items() if s.state == "sending"}
        for rcpt, state in resumed.items():
            # R-OUT-3: killed after the dot and before the reply: the one unavoidable duplicate.
            POSSIBLE_DUPLICATES.inc()
            log.warning("resending after an unconfirmed final dot", extra={"queue_id": txn, "recipient": rcpt})
            state.state = "pending"
        now_ms = int(time.time() * 1000)
        due = [r for r, s in states.items() if s.state == "pending" and s.next_ms <= now_ms]
        if due:
            await self._attempt(record, due, states, settings)
            # Removed meanwhile through the admin API: what is not final is dropped (when every
            # recipient is final there is nothing to drop, and no need to ask).
            if any(not s.final for s in states.values()) and await self.results.removed(txn):
                return await self._removed(txn, states)
        await self._conclude(record, states, out)
        pending = [s for s in states.values() if s.state == "pending"]
        if pending:
            wait = max(0.0, (min(s.next_ms for s in pending) - time.time() * 1000) / 1000)
            return Attempt(False, wait)
        if owner:
            await self.results.done_and_unlock(txn, owner)
            return Attempt(True, unlocked=True)
        await self.results.done(txn)
        return Attempt(True)

    async def _removed(self, txn: str, states: dict[str, RecipientState]) -> Attempt:
        """Removed from the queue through the admin API: the recipients not yet delivered are
        dropped, with no DSN (the administrator's decision), and the record is done."""
        dropped = {r: s for r, s in states.items() if not s.final}
        now_ms = int(time.time() * 1000)
        for state in dropped.values():
            state.state, state.reply, state.remote_reply, state.last_ms = "dropped", str(replies.REMOVED), False, now_ms
        await self.results.save(txn, dropped)
        await self.results.done(txn)
        if dropped:
            DELIVERIES.labels("removed").inc(len(dropped))
            log.info("removed from the queue by an administrator: not delivered, not bounced",
                     extra={"queue_id": txn, "recipients": sorted(dropped)})
        return Attempt(True)

    async def _attempt(self, record: events_pb2.DeliveryRecord, due: list[str],
                       states: dict[str, RecipientState], settings: MailSettings) -> None:
        try:
            data = strip_return_path(await self.mailboxes.store.record_body(record))
        except Exception as exc:  # noqa: BLE001 - a store hiccup or a missing blob: retry, then expire
            log.error("cannot read the message to relay: %s", exc, extra={"queue_id": record.transaction_id})
            self._settle(record.transaction_id, {r: replies.BLOB_UNREADABLE for r in due}, states, settings, "")
            await self.results.save(record.transaction_id, {r: states[r] for r in due})
            return
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for rcpt in due:
            sender = record.remote_senders.get(rcpt) or record.mail_from
            groups[(domain_of(rcpt), sender)].append(rcpt)
        # Signed once per envelope sender (its domain may choose the key), at each attempt.
        signed: dict[str, bytes] = {}
        for sender in dict.fromkeys(sender for _, sender in groups):
            signed[sender] = await self.signer.sign(data, sender) if self.signer is not None else data
        await asyncio.gather(*(
            self._deliver_group(record, signed[sender], domain, sender, rcpts, states, settings)
            for (domain, sender), rcpts in groups.items()
        ))

    async def _deliver_group(self, record: events_pb2.DeliveryRecord, data: bytes, domain: str, sender: str,
                             rcpts: list[str], states: dict[str, RecipientState], settings: MailSettings) -> None:
        out = settings.outbound
        txn = record.transaction_id
        try:
            route = await self.router.route(domain, out.transports)
        except RouteError as exc:
            self._settle(txn, {r: exc.reply for r in rcpts}, states, settings, "")
            await self.results.save(txn, {r: states[r] for r in rcpts})
            return
        sender_domain = domain_of(sender) if sender else ""
        allowed = await self.results.take_rate(
            domain, out.domain_messages_per_minute_exceptions.get(domain, out.domain_messages_per_minute),
            sender_domain,
            out.sender_domain_messages_per_minute_exceptions.get(sender_domain, out.sender_domain_messages_per_minute)
            if sender_domain else 0)
        if not allowed:
            # R-LIM-6: over a per-minute rate the message waits for the next minute; not an attempt.
            next_window_ms = self.results.next_rate_window_ms()
            for rcpt in rcpts:
                states[rcpt].next_ms = next_window_ms
            log.info("rate limited, waiting", extra={"queue_id": txn, "domain": domain, "sender": sender})
            return
        per_connection = out.max_recipients_per_connection_exceptions.get(
            domain, settings.limits.outbound_max_recipients_per_connection)
        slots = self._domain_slots.setdefault(domain, asyncio.Semaphore(out.max_connections_per_domain))
        async with slots:
            for number, chunk in enumerate(chunks(rcpts, per_connection)):
                if number and await self.results.removed(txn):
                    # Removed through the admin API while an earlier connection delivered: no new
                    # one. (The first was just looked at; the final dot is checked in any case.)
                    return
                envelope = Envelope(sender, chunk, data, *self._dsn_params(record, chunk))
                outcome = await self._deliver_chunk(txn, route, envelope, states, per_connection)
                if outcome.withdrawn:
                    log.info("removed from the queue during the transaction: final dot not sent",
                             extra={"queue_id": txn, "mx": outcome.host, "recipients": chunk})
                    return
                self._settle(txn, outcome.replies, states, settings, outcome.host)
                await self.results.save(txn, {r: states[r] for r in chunk})
                self._log_outcome(txn, sender, outcome)

    async def _deliver_chunk(self, txn: str, route: Route, envelope: Envelope,
                             states: dict[str, RecipientState], per_connection: int = 0) -> Outcome:
        async def before_dot(accepted: list[str]) -> bool:
            for rcpt in accepted:
                states[rcpt].state = "sending"
            if await self.results.mark_sending(txn, {r: states[r] for r in accepted}):
                return True
            for rcpt in accepted:
                states[rcpt].state = "pending"
            return False  # removed meanwhile: the dot is not sent

        login = None
        implicit_tls = False
        if route.smarthost is not None:
            implicit_tls = route.smarthost.implicit_tls
            if route.smarthost.username:
                login = (route.smarthost.username, self.smarthost_passwords.get(route.transport_key, ""))
        hosts = route.hosts
        policy = await self.sts.policy(route.domain) if self.sts is not None and route.smarthost is None else None
        require_tls = policy is not None and policy.mode == "enforce"
        if policy is not None and policy.mode != "none":
            hosts = self._sts_hosts(txn, route, policy)
            if not hosts:
                return Outcome(replies={r: enforce_failed(route.domain, "no MX host matches the policy")
                                        for r in envelope.recipients})
        last: Reply | None = None
        for host in hosts:
            try:
                addresses = await self.router.addresses(host.name)
            except RouteError as exc:
                last = exc.reply
                continue
            if not addresses:
                last = last or Reply(451, "4.4.4", f"No address for mail host {host.name}")
                continue
            for address in addresses:
                try:
                    outcome = await self.client.deliver(address, host.port, host.name, envelope,
                                                        implicit_tls=implicit_tls, login=login,
                                                        before_dot=before_dot, require_tls=require_tls,
                                                        max_recipients=per_connection)
                except HostFailed as exc:
                    last = exc.reply
                    log.info("mail host failed, trying the next", extra={
                        "queue_id": txn, "mx": host.name, "address": address, "reply": str(exc.reply)})
                    continue
                if not outcome.reused:
                    SESSIONS.labels(outcome.tls_version or "none").inc()
                if policy is not None and policy.mode == "testing" and not outcome.tls_verified:
                    log.warning("MTA-STS policy (testing) of %s not met: %s, delivered anyway", route.domain,
                                "TLS not verified" if outcome.tls_version else "no TLS",
                                extra={"queue_id": txn, "mx": host.name, "policy_id": policy.id})
                return outcome
        reply = last or Reply(451, "4.4.4", f"No mail host for {route.domain}")
        if reply.permanent and not reply.remote:
            reply = Reply(451, reply.enhanced.replace("5.", "4.", 1), reply.text)
        return Outcome(replies={r: reply for r in envelope.recipients})

    @staticmethod
    def _sts_hosts(txn: str, route: Route, policy: StsPolicy) -> list[MailHost]:
        """RFC 8461 4.1: under ``enforce`` only the MX hosts the policy names; under
        ``testing`` all of them, each one it does not name logged."""
        matching = [h for h in route.hosts if policy.matches(h.name)]
        for host in route.hosts:
            if host not in matching:
                log.warning("MTA-STS policy (%s) of %s does not name MX %s%s", policy.mode, route.domain, host.name,
                            ": skipped" if policy.mode == "enforce" else ", used anyway",
                            extra={"queue_id": txn, "mx": host.name, "policy_id": policy.id})
        return matching if policy.mode == "enforce" else route.hosts

    def _settle(self, txn: str, outcome: dict[str, Reply], states: dict[str, RecipientState],
                settings: MailSettings, mta: str) -> None:
        now_ms = int(time.time() * 1000)
        for rcpt, reply in outcome.items():
            state = states[rcpt]
            state.reply, state.remote_reply, state.mta, state.last_ms = str(reply), reply.remote, mta, now_ms
            if reply.ok:
                state.state = "delivered"
                DELIVERIES.labels("delivered").inc()
            elif reply.permanent:
                state.state = "failed"
            else:
                state.state = "pending"
                state.attempts += 1
                state.next_ms = now_ms + int(backoff_seconds(settings.outbound, state.attempts) * 1000)
                DELIVERIES.labels("deferred").inc()

    def _log_outcome(self, txn: str, sender: str, outcome: Outcome) -> None:
        for rcpt, reply in outcome.replies.items():
            status = "sent" if reply.ok else ("bounced" if reply.permanent else "deferred")
            log.info(status, extra={"queue_id": txn, "sender": sender, "recipient": rcpt, "mx": outcome.host,
                                    "address": outcome.address, "tls": outcome.tls_version or "none",
                                    "tls_verified": outcome.tls_verified, "reply": str(reply)})

    def _dsn_params(self, record: events_pb2.DeliveryRecord,
                    rcpts: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """RFC 3461 parameters to pass on: the edge keeps RET/ENVID and ``NOTIFY:<rcpt>``."""
        mail = {k: v for k, v in record.dsn.items() if k in ("RET", "ENVID")}
        per_rcpt = {r: {k: v for k in ("NOTIFY", "ORCPT") if (v := _dsn_value(record, k, r))} for r in rcpts}
        return mail, per_rcpt

    # After the attempt: expiry, bounces, delay notices -------------------------------------
    async def _conclude(self, record: events_pb2.DeliveryRecord, states: dict[str, RecipientState],
                        out: OutboundSettings) -> None:
        txn = record.transaction_id
        now = time.time()
        expires = record.received_unix_ms / 1000 + out.max_lifetime_hours * 3600
        changed: dict[str, RecipientState] = {}
        for rcpt, state in states.items():
            if state.state == "pending" and now >= expires:
                last = state.reply or "no attempt succeeded"
                state.state = "failed"
                state.reply, state.remote_reply = f"{replies.EXPIRED} (last: {last})", False
                DELIVERIES.labels("expired").inc()
                changed[rcpt] = state
        failed = [r for r, s in states.items() if s.state == "failed"]
        if failed:
            await self._bounce(record, failed, states, "failed", expires)
            changed.update({r: states[r] for r in failed})
        if out.delay_notice_hours > 0 and now - record.received_unix_ms / 1000 >= out.delay_notice_hours * 3600:
            late = [r for r, s in states.items() if s.state == "pending" and not s.delay_noticed
                    and _notify_allows(record, r, "DELAY")]
            if late:
                await self._bounce(record, late, states, "delayed", expires)
                for rcpt in late:
                    states[rcpt].delay_noticed = True
                    changed[rcpt] = states[rcpt]
        await self.results.save(txn, changed)

    async def _bounce(self, record: events_pb2.DeliveryRecord, rcpts: list[str],
                      states: dict[str, RecipientState], action: Literal["failed", "delayed"],
                      expires: float) -> None:
        txn = record.transaction_id
        wanted = [r for r in rcpts if _notify_allows(record, r, "FAILURE" if action == "failed" else "DELAY")]
        if action == "failed":
            for rcpt in rcpts:
                states[rcpt].state = "bounced" if rcpt in wanted and record.mail_from else "dropped"
                DELIVERIES.labels("bounced" if states[rcpt].state == "bounced" else "dropped").inc()
        if not wanted:
            return
        if not record.mail_from:
            # RFC 5321 4.5.5 / RFC 3461 6.2: no DSN about a message whose sender is <> (a DSN
            # itself); bounce loops are impossible, and the drop is logged.
            log.warning("bounce of a bounce dropped", extra={
                "queue_id": txn, "recipients": wanted, "reply": states[wanted[0]].reply})
            await self.events.publish("relay", "bounce_dropped", reason="R-OUT-2", queue_id=txn,
                                      recipients=",".join(wanted))
            return
        reports = [RecipientReport(
            recipient=r, action=action, reply=reply_of(states[r]), remote_mta=states[r].mta,
            original_recipient=_dsn_value(record, "ORCPT", r),
            last_attempt_unix=states[r].last_ms / 1000,
            will_retry_until_unix=expires if action == "delayed" else 0.0,
        ) for r in wanted]
        try:
            original = await self.mailboxes.store.record_body(record)
        except Exception as exc:  # noqa: BLE001 - the DSN still goes, with what is known
            log.error("original unreadable for its DSN: %s", exc, extra={"queue_id": txn})
            original = f"X-Rempart-Queue-ID: {txn}\r\n".encode()
        message = build_dsn(
            reporting_mta=self.hostname, sender=record.mail_from, original=original, original_id=txn,
            arrival_unix=record.received_unix_ms / 1000, reports=reports,
            envid=record.dsn.get("ENVID", ""), return_full=record.dsn.get("RET", "").upper() == "FULL",
        )
        await self.deliver_notice(record.mail_from, message, dsn_transaction_id(txn, reports))
        log.info("DSN sent", extra={"queue_id": txn, "action": action, "to": record.mail_from, "recipients": wanted})
        await self.events.publish("relay", "dsn", reason="R-OUT-2", queue_id=txn, action=action,
                                  recipients=",".join(wanted))

    async def deliver_notice(self, to: str, message: bytes, transaction_id: str) -> None:
        """A DSN enters the normal store: the sender's mailbox when local, else the queue."""
        local: list[str] = []
        remote: list[str] = []
        if await self.directory.canonical_domain(domain_of(to)) is not None:
            for target in await self.directory.resolve(to) or []:
                is_local = await self.directory.canonical_domain(domain_of(target)) is not None
                (local if is_local else remote).append(target)
        else:
            remote.append(to)
        if not local and not remote:
            log.warning("DSN dropped: the local sender no longer exists", extra={"to": to, "dsn": transaction_id})
            return
        if local:
            # R-TLS-5: Return-Path at final delivery; a DSN's envelope sender is empty.
            message = b"Return-Path: <>\r\n" + message
        # Filed in the local mailboxes by the indexer, as every delivery record is.
        await self.mailboxes.store.accept(
            message, mail_from="", local_mailboxes=local, remote_recipients=remote, transaction_id=transaction_id)


def _dsn_value(record: events_pb2.DeliveryRecord, name: str, rcpt: str) -> str:
    value = record.dsn.get(f"{name}:{rcpt}")
    if value is None:
        wanted = f"{name}:{rcpt}".lower()
        value = next((v for k, v in record.dsn.items() if k.lower() == wanted), "")
    return value


def _notify_allows(record: events_pb2.DeliveryRecord, rcpt: str, what: str) -> bool:
    """RFC 3461 4.1: without NOTIFY, failures and delays are reported; NEVER reports nothing."""
    notify = _dsn_value(record, "NOTIFY", rcpt).upper()
    if not notify:
        return True
    return what in {n.strip() for n in notify.split(",")}
