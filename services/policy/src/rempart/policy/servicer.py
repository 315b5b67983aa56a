"""The gRPC servicer: one Check call runs the stage's pipeline of rules and answers a Verdict.

Stages the policy has no rule for (COMMAND) are accepted. Any Redis failure, or any
unexpected error, answers ``451 4.3.0``; a DNS failure answers ``451 4.4.3``: fail closed, never
accept (R-OPS-3, R-DNS-7).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import grpc
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from rempart.common import metrics, tracing
from rempart.common.config import SettingsCache
from rempart.common.directory import Directory
from rempart.common.events import EventBus
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc
from rempart.common.stats import StatsRecorder, refusal_reason
from rempart.policy import dnschecks, helo, intrusion, limits, recipients, relay, replies
from rempart.policy.decision import (
    SMTP_PROTOCOLS,
    CheckContext,
    Decision,
    Rule,
    accept,
    host_names,
    run_pipeline,
    temporary_problem,
)
from rempart.policy.resolver import CachingResolver, DnsTemporaryError
from rempart.policy.srs import SrsKeys

log = logging.getLogger(__name__)

# Stage.values() builds a list on every call: looked up once (it showed in the per-message profile).
STAGE_NAMES = {number: name for name, number in policy_pb2.Stage.items()}
CHECKS_TOTAL = Counter("rempart_policy_checks_total", "Policy decisions", ["stage", "action"])
CHECK_SECONDS = Histogram(
    "rempart_policy_check_seconds",
    "Time to decide one Check call",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

MAX_FIELD = 1024  # any string field longer than this is refused before any rule runs
MAX_ACCEPTED_RECIPIENTS = 100_000
TRUSTED_RETRY_SECONDS = 30.0
MAX_TRUSTED_NAMES = 1000

# Cheap checks before expensive ones; the first rule with an opinion decides.
PIPELINES: dict[int, tuple[Sequence[Rule], Decision]] = {
    policy_pb2.STAGE_CONNECT: (
        (intrusion.screen_connection, intrusion.open_session),
        accept("", replies.CONNECT_OK, code=220),
    ),
    policy_pb2.STAGE_HELO: ((helo.check_helo,), accept("", code=250, enhanced="2.0.0")),
    policy_pb2.STAGE_AUTH: (
        (intrusion.count_failed_login, intrusion.record_known_ip, relay.record_pop_before_smtp),
        accept("", code=235, enhanced="2.7.0"),
    ),
    policy_pb2.STAGE_MAIL: (
        (recipients.check_sender_syntax, relay.check_auth_sender, limits.check_size_param, dnschecks.check_mail),
        accept("", code=250, enhanced="2.1.0"),
    ),
    policy_pb2.STAGE_RCPT: (
        (
            recipients.check_syntax,
            limits.check_recipient_count,
            relay.check_local_sender,
            recipients.check_srs_recipient,
            recipients.check_local_recipient,
            relay.check_relay,
            limits.check_daily_external,
            recipients.accept_remote,
        ),
        accept("", code=250, enhanced="2.1.5"),
    ),
    policy_pb2.STAGE_DATA: (
        (limits.check_hops, limits.check_message_size, intrusion.check_message),
        accept("", code=250, enhanced="2.0.0"),
    ),
    policy_pb2.STAGE_RSET: ((intrusion.count_rset,), accept("", code=250, enhanced="2.0.0")),
    policy_pb2.STAGE_DISCONNECT: ((intrusion.close_session,), accept("", code=221, enhanced="2.0.0")),
}
DEFAULT_PIPELINE: tuple[Sequence[Rule], Decision] = ((), accept(""))
# The verdicts an accepted recipient gets DATA bounds with (data_bounds below).
PASSED = frozenset({policy_pb2.ACTION_ACCEPT, policy_pb2.ACTION_DISCARD})


async def data_bounds(ctx: CheckContext) -> tuple[int, int]:
    """(max size, max hops): the messages the STAGE_DATA pipeline above accepts without a word
    when no spam score comes with them, given to the edge with each accepted recipient so that
    such a message costs no DATA call of its own (issue 11; DESIGN: fold the stages that need
    no round trip). The edge asks as before for anything beyond them. These follow the DATA
    rules: limits.check_hops (R-LIM-5), limits.check_message_size (R-LIM-7),
    intrusion.check_message's size block (R-IPS-3); tests/test_data_bounds.py checks
    that the bounds and the pipeline agree on either side of each bound."""
    size = await limits.message_size_limit(ctx)
    block = intrusion.message_size_block(ctx)
    if block is not None:
        size = min(size, block)
    return size, ctx.settings.limits.max_hops


# How long a session may reuse an accepted MAIL verdict for the same sender (issue 11). Every
# MAIL rule is a function of the session's facts, the sender, SIZE= and the settings, and of DNS
# answers (cached by the resolver anyway): no counter moves at MAIL. A client that sends message
# after message from one sender over one session (an MTA emptying its queue) is asked once per
# this many seconds instead of once per message; settings changes end it sooner (the edge).
MAIL_REUSE_SECONDS = 30


async def mail_reuse(ctx: CheckContext, decision: Decision) -> tuple[int, int] | None:
    """(seconds, max SIZE=) for an accepted MAIL verdict that the session may reuse: none when
    it comes with a delay (a tarpit is paid every time)."""
    if decision.action != policy_pb2.ACTION_ACCEPT or decision.delay_ms:
        return None
    return MAIL_REUSE_SECONDS, await limits.message_size_limit(ctx)


# The SMTP stages whose refusals GET /v1/stats counts by reason (a failed AUTH is a login, counted
# by the auth service; RSET and DISCONNECT refuse nothing a client sent mail with).
COUNTED_STAGES = frozenset({policy_pb2.STAGE_CONNECT, policy_pb2.STAGE_HELO, policy_pb2.STAGE_MAIL,
                            policy_pb2.STAGE_RCPT, policy_pb2.STAGE_DATA})
REFUSALS = frozenset({policy_pb2.ACTION_REJECT, policy_pb2.ACTION_TEMPFAIL, policy_pb2.ACTION_CLOSE})


def _oversized(request: policy_pb2.CheckRequest) -> bool:
    fields = (
        request.mail_from, request.recipient, request.auth_login, request.command, request.auth_failure,
        request.session.session_id, request.session.client_ip, request.session.helo_name,
        request.session.authenticated_account,
    )
    return any(len(f) > MAX_FIELD for f in fields) or len(request.accepted_recipients) > MAX_ACCEPTED_RECIPIENTS


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(
        self,
        redis: aioredis.Redis,
        config: SettingsCache,
        events: EventBus,
        resolver: CachingResolver,
        srs: SrsKeys,
        hostname: str = "localhost",
    ) -> None:
        self._redis = redis
        self._config = config
        self._directory = Directory(redis)
        self._events = events
        self._resolver = resolver
        self._srs = srs
        self._hostname = hostname
        self._trusted_known: dict[str, frozenset[str]] = {}
        self.stats = StatsRecorder(redis)
        self._trusted_retry: dict[str, float] = {}
        # The Session streams open now: each one's task, and whether it is deciding a stage.
        self._sessions: dict[asyncio.Task[object], bool] = {}
        self._ended: set[asyncio.Task[object]] = set()  # cancelled by end_sessions
        self._draining = False

    async def _trusted_name_ips(self, ctx: CheckContext) -> frozenset[str]:
        """R-REL-1: trusted hosts given by name, resolved (A and AAAA) through the DNS cache.

        When DNS fails, the last addresses a name had keep being trusted and the name is asked
        again only after :data:`TRUSTED_RETRY_SECONDS`, so that an outage neither stalls every
        call for the DNS timeout nor turns a trusted relay into an untrusted one. A name never
        resolved trusts nobody: the stricter answer."""
        names = host_names(tuple(ctx.settings.relay.trusted_hosts))
        if not names:
            return frozenset()
        now = time.monotonic()
        due = [name for name in names if self._trusted_retry.get(name, 0.0) <= now]
        if due:
            timeout = ctx.settings.dns.timeout_seconds
            results = await asyncio.gather(
                *(self._resolver.addresses(name, timeout) for name in due), return_exceptions=True
            )
            if len(self._trusted_known) > MAX_TRUSTED_NAMES:
                self._trusted_known.clear()
                self._trusted_retry.clear()
            for name, result in zip(due, results, strict=True):
                if isinstance(result, DnsTemporaryError):
                    log.warning("trusted host %s does not resolve now: %s", name, result)
                    self._trusted_retry[name] = now + TRUSTED_RETRY_SECONDS
                elif isinstance(result, BaseException):
                    raise result
                else:
                    self._trusted_known[name] = frozenset(result)
        out: set[str] = set()
        for name in names:
            out |= self._trusted_known.get(name, frozenset())
        return frozenset(out)

    async def decide(self, request: policy_pb2.CheckRequest) -> Decision:
        if _oversized(request):
            return temporary_problem("oversized-request")
        ctx = CheckContext(
            request, redis=self._redis, config=self._config, directory=self._directory, events=self._events,
            resolver=self._resolver, srs=self._srs, hostname=self._hostname,
        )
        if ctx.ip is None:
            # The edge always knows the peer's address; anything else is an edge bug: fail closed.
            return temporary_problem("bad-client-ip")
        rules, default = PIPELINES.get(request.stage, DEFAULT_PIPELINE)
        try:
            ctx.trusted_name_ips = await self._trusted_name_ips(ctx)
            decision = await run_pipeline(ctx, rules, default)
            if request.stage == policy_pb2.STAGE_RCPT and decision.action in PASSED:
                decision = replace(decision, data_bounds=await data_bounds(ctx))
            elif request.stage == policy_pb2.STAGE_MAIL:
                decision = replace(decision, reuse=await mail_reuse(ctx, decision))
        except (aioredis.RedisError, OSError) as exc:
            log.warning("redis failed, failing closed: %s", exc, extra={"session": request.session.session_id})
            return temporary_problem("redis-unavailable")
        if decision.action == policy_pb2.ACTION_ACCEPT:
            if ctx.headers:
                decision = replace(decision, headers=decision.headers + tuple(ctx.headers))
            if request.stage == policy_pb2.STAGE_CONNECT:
                decision = helo.tarpit(ctx, decision)
        return decision

    async def Check(  # the gRPC method name
        self, request: policy_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> policy_pb2.Verdict:
        return await self._answer(request)

    async def Session(  # the gRPC method name
        self,
        requests: AsyncIterator[policy_pb2.CheckRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[policy_pb2.Verdict]:
        """One SMTP session's stages over one stream: each request answered in order.

        While the service drains, the stream ends (OK) as soon as it is between two stages
        (:meth:`end_sessions`): the edge asks its next stage on a new stream, which the load
        balancing sends to another replica, and this replica stops within seconds instead of
        holding on to every open SMTP session for its whole grace period."""
        task = asyncio.current_task()
        assert task is not None
        self._sessions[task] = False
        try:
            async for request in requests:
                self._sessions[task] = True
                yield await self._answer(request)
                if self._draining:
                    return
                self._sessions[task] = False
        except asyncio.CancelledError:
            if task not in self._ended or task.uncancel() > 0:
                raise  # gRPC's own cancellation too (the client went away)
            # Ended by end_sessions between two stages: a request in flight was not read, so
            # the edge may ask it again (clients.StreamEnded).
        finally:
            self._sessions.pop(task, None)
            self._ended.discard(task)

    def end_sessions(self) -> int:
        """Drain: end every Session stream waiting between two stages now; a stream deciding a
        stage ends right after its verdict. Returns how many were ended now."""
        self._draining = True
        waiting = [task for task, deciding in self._sessions.items() if not deciding]
        for task in waiting:
            self._ended.add(task)
            task.cancel()
        return len(waiting)

    async def _answer(self, request: policy_pb2.CheckRequest) -> policy_pb2.Verdict:
        started = time.perf_counter()
        stage = STAGE_NAMES.get(request.stage, "UNKNOWN")
        # A span per decision, under the call's (a session's stream carries every stage).
        with tracing.span(f"policy {stage}", attributes={
            "rempart.policy.stage": stage, "client.address": request.session.client_ip[:64],
            "rempart.session.id": request.session.session_id[:64],
        }) as span:
            try:
                decision = await self.decide(request)
            except Exception:  # a bug must never turn into an accept
                log.exception("policy check failed", extra={"session": request.session.session_id})
                decision = temporary_problem("internal-error")
            if span.is_recording():
                span.set_attributes({"rempart.policy.action": policy_pb2.Action.Name(decision.action),
                                     "rempart.policy.code": decision.code, "rempart.policy.rule": decision.rule})
        action = policy_pb2.Action.Name(decision.action)
        metrics.child(CHECKS_TOTAL, stage, action).inc()
        self._count(request, decision)
        metrics.observe(CHECK_SECONDS, time.perf_counter() - started)  # exemplar: the call's trace
        # One line per refusal at info; the happy path at debug (a line per stage of every
        # message costs more than some decisions).
        level = logging.INFO if decision.action != policy_pb2.ACTION_ACCEPT else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "decision",
                extra={
                    "session": request.session.session_id,
                    "stage": stage,
                    "action": action,
                    "code": decision.code,
                    "rule": decision.rule,
                    "client_ip": request.session.client_ip,
                },
            )
        return decision.to_verdict()

    def _count(self, request: policy_pb2.CheckRequest, decision: Decision) -> None:
        """The decision in the cluster's statistics (rempart.common.stats, GET /v1/stats)."""
        if decision.action not in REFUSALS and not decision.ip_blocked:
            return
        client_ip = request.session.client_ip
        if decision.ip_blocked:
            self.stats.ip_blocked(client_ip)
        elif decision.action == policy_pb2.ACTION_CLOSE and decision.rule.startswith("R-IPS-"):
            self.stats.ip_refused(client_ip)
        if (decision.action in REFUSALS and request.stage in COUNTED_STAGES
                and request.session.protocol in SMTP_PROTOCOLS):
            self.stats.refusal(refusal_reason(decision.rule, decision.action == policy_pb2.ACTION_TEMPFAIL))
