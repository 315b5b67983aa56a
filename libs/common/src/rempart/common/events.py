"""NATS: the connection, the JetStream streams, and audit/security events.

Subjects are ``rempart.events.<area>.<what>`` (captured by the stream ``EVENTS`` for the audit
log), ``rempart.config.changed`` and ``rempart.mailbox.<id>.changed`` (DESIGN.md "Contracts").
Events are protobuf (:class:`rempart.common.pb.events.v1.events_pb2.Event`). Publishing an event
never blocks or breaks mail flow: a failure is logged once per outage and the mail goes on.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

from rempart.common.pb.events.v1 import events_pb2

log = logging.getLogger(__name__)

EVENTS_STREAM = "EVENTS"
EVENTS_SUBJECTS = "rempart.events.>"
MAIL_STREAM = "MAIL"
MAIL_ACCEPTED_SUBJECT = "rempart.mail.accepted"
MAIL_EXPUNGED_SUBJECT = "rempart.mail.expunged"
MAIL_APPENDED_SUBJECT = "rempart.mail.appended"
# The mailbox change log (DESIGN "The mailbox"): one subject per account.
MAILBOX_LOG_STREAM = "MBXLOG"
MAILBOX_LOG_PREFIX = "rempart.mbx."
# Each account's compacted change log: a head naming the current snapshot, and its body in chunks.
MAILBOX_SNAPSHOT_STREAM = "MBXSNAP"
MAILBOX_SNAPSHOT_HEADS = "rempart.mbxsnap.head.*"
BLOB_BUCKET = "MAILBLOBS"
CONFIG_CHANGED = "rempart.config.changed"
IPS_BLOCKED = "rempart.events.ips.blocked"


def event_subject(area: str, what: str) -> str:
    return f"rempart.events.{area}.{what}"


def mailbox_log_token(account: str) -> str:
    """The account as one subject token: a digest, so that any address fits."""
    return hashlib.sha256(account.encode()).hexdigest()[:32]


def mailbox_log_subject(account: str) -> str:
    """The account's subject on the change log: a replay of one account filters on one subject."""
    return MAILBOX_LOG_PREFIX + mailbox_log_token(account)


def mailbox_snapshot_head_subject(token: str) -> str:
    """Where the account's current snapshot is named (one message; a new one replaces it only
    if nobody else's did first: the publish names the sequence it replaces)."""
    return f"rempart.mbxsnap.head.{token}"


def mailbox_snapshot_body_subject(token: str, nonce: str) -> str:
    """The chunks of one snapshot: a subject of its own, so that a snapshot being written never
    mixes with the current one, and dropping an old one is one purge."""
    return f"rempart.mbxsnap.body.{token}.{nonce}"


def mailbox_changed_subject(mailbox: str) -> str:
    # NATS subject tokens cannot hold '.', ' ', '*' or '>': encode the address.
    token = mailbox.replace(".", "_").replace("@", "_at_").replace("*", "_").replace(">", "_")
    return f"rempart.mailbox.{token}.changed"


# How long nc.drain() waits for the subscriptions' pending messages at shutdown before it closes.
NATS_DRAIN_SECONDS = 2.0


async def _nats_error(exc: Exception) -> None:
    """nats-py's asynchronous errors: a drain that ran out of time at shutdown is expected under
    load (what was not handled is redelivered: explicit acks), the rest is logged as an error."""
    if isinstance(exc, nats.errors.DrainTimeoutError):
        log.warning("NATS drain did not finish within %.0f s: closing", NATS_DRAIN_SECONDS)
        return
    log.error("nats: %s", exc or type(exc).__name__, exc_info=exc)


async def connect_nats(url: str, name: str) -> NATS:
    """Connect with endless reconnects; callers see failures as publish/request errors.

    The drain timeout is nats-py's own (30 s by default): a drain cut short from outside, by
    cancelling nc.drain(), leaves nats-py's gathered subscription drains with an exception nobody
    retrieves, logged by asyncio as an error when the process stops (a rolling update test found it).
    """
    return await nats.connect(
        servers=[u.strip() for u in url.split(",") if u.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=3,
        drain_timeout=NATS_DRAIN_SECONDS,  # type: ignore[arg-type]  # annotated int, used as a float
        error_cb=_nats_error,
    )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> list[str]:
    """Create the streams Rempart relies on, or bring an existing one up to what the code needs
    (idempotent; every service calls it at start). Returns what differs from ``replicas``.

    An existing stream keeps every setting an operator chose: only the subjects and direct get
    (the read path) are added, and the replica count is raised to ``replicas``, never lowered.
    (Every pod used to reset MAIL to R1 at start, undoing an operator's R3 on a cluster: a
    durability loss on the next node failure, R-OPS-6.)
    """
    wanted = [
        jsapi.StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_SUBJECTS],
            retention=jsapi.RetentionPolicy.LIMITS,
            storage=jsapi.StorageType.FILE,
            max_age=30 * 24 * 3600,
            max_bytes=1 << 30,
            num_replicas=replicas,
        ),
        jsapi.StreamConfig(
            # The system of record for mail: never trimmed by age or size.
            name=MAIL_STREAM,
            subjects=["rempart.mail.>"],
            retention=jsapi.RetentionPolicy.LIMITS,
            storage=jsapi.StorageType.FILE,
            duplicate_window=120,
            num_replicas=replicas,
            allow_direct=True,
        ),
        jsapi.StreamConfig(
            # What happened to mailboxes (folders, UIDs, flags, subscriptions): never trimmed
            # either, a rebuilt index is only as good as this log.
            name=MAILBOX_LOG_STREAM,
            subjects=["rempart.mbx.>"],
            retention=jsapi.RetentionPolicy.LIMITS,
            storage=jsapi.StorageType.FILE,
            num_replicas=replicas,
            allow_direct=True,
        ),
        jsapi.StreamConfig(
            # The change log's history, compacted: one snapshot per account (its records up to
            # a sequence, then purged from MBXLOG). As precious as MBXLOG itself.
            name=MAILBOX_SNAPSHOT_STREAM,
            subjects=["rempart.mbxsnap.>"],
            retention=jsapi.RetentionPolicy.LIMITS,
            storage=jsapi.StorageType.FILE,
            num_replicas=replicas,
            allow_direct=True,
        ),
    ]
    differences: list[str] = []
    for config in wanted:
        differences += await _while_jetstream_settles(functools.partial(_ensure_stream, js, config))
    differences += await _while_jetstream_settles(lambda: _ensure_blob_store(js, replicas))
    for line in differences:
        log.warning("stream settings differ from this service's: %s", line)
    return differences


async def _ensure_blob_store(js: JetStreamContext, replicas: int) -> list[str]:
    try:
        await js.object_store(BLOB_BUCKET)
    except Exception:  # noqa: BLE001 - nats raises several "not found" types
        try:
            await js.create_object_store(
                BLOB_BUCKET, config=jsapi.ObjectStoreConfig(storage=jsapi.StorageType.FILE, replicas=replicas))
        except APIError as exc:
            if replicas == 1 or not _single_node(exc):
                raise
            await js.create_object_store(
                BLOB_BUCKET, config=jsapi.ObjectStoreConfig(storage=jsapi.StorageType.FILE, replicas=1))
            return [f"OBJ_{BLOB_BUCKET} created with 1 replica, not {replicas}: {exc.description}"]
        return []
    blobs = jsapi.StreamConfig(name=f"OBJ_{BLOB_BUCKET}", subjects=[], num_replicas=replicas, allow_direct=True)
    return await _ensure_stream(js, blobs)


def _single_node(exc: APIError) -> bool:
    """The server runs without a cluster: more than one replica can never be placed. (A cluster
    still forming answers otherwise, and is waited for: mail never silently loses replicas.)"""
    return "non-clustered" in str(exc.description or "")


# A cluster that has just elected its leader may still answer "no suitable peers", time out or
# have no responder for a few seconds; a pod starting then waits instead of crash-looping.
SETTLE_SECONDS = 30.0


async def _while_jetstream_settles(step: Callable[[], Awaitable[list[str]]]) -> list[str]:
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            return await step()
        except (ServiceUnavailableError, NatsTimeoutError, NoRespondersError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.info("JetStream not ready yet (%s), retrying", type(exc).__name__)
            await asyncio.sleep(0.5)
        except APIError as exc:
            # 10008 "insufficient resources" / 10074-ish placement errors while peers join.
            if time.monotonic() > deadline or exc.code not in (500, 503):
                raise
            log.info("JetStream not ready yet (%s), retrying", exc.description)
            await asyncio.sleep(0.5)


async def _ensure_stream(js: JetStreamContext, wanted: jsapi.StreamConfig) -> list[str]:
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        try:
            await js.add_stream(wanted)
        except BadRequestError:
            pass  # another replica created it meanwhile
        except APIError as exc:
            if int(wanted.num_replicas or 1) == 1 or not _single_node(exc):
                raise
            # More replicas than the servers can hold (a single node): mail must still flow;
            # the stream starts with one and the difference is reported.
            await js.add_stream(wanted.evolve(num_replicas=1))
            return [f"{wanted.name} created with 1 replica, not {wanted.num_replicas}: {exc.description}"]
        return []
    current = info.config
    have = int(current.num_replicas or 1)
    want = int(wanted.num_replicas or 1)
    differences = []
    # What reads and writes need first, then the replica count: a cluster too small for the
    # replicas must not keep direct reads from being turned on.
    changes: dict[str, object] = {}
    missing = [s for s in wanted.subjects or [] if s not in (current.subjects or [])]
    if missing:
        changes["subjects"] = [*(current.subjects or []), *missing]
    if wanted.allow_direct and not current.allow_direct:
        changes["allow_direct"] = True
    if want < have:
        differences.append(f"{wanted.name} keeps {have} replicas (this service asks for {want}; never lowered)")
    for step in (changes, {"num_replicas": want} if want > have else {}):
        if not step:
            continue
        try:
            current = (await js.update_stream(current.evolve(**step))).config
        except APIError as exc:
            # For example more replicas than the cluster has nodes: reported, never fatal.
            differences.append(f"{wanted.name}: could not apply {sorted(step)}: {exc.description}")
    return differences


# How long a stream read waits for the next message before it checks whether one is still due.
READ_WAIT_SECONDS = 5.0


async def read_stream(js: JetStreamContext, stream: str, subjects: str, *, after: int = 0, up_to: int = 0,
                      last_per_subject: bool = False) -> AsyncIterator[tuple[str, bytes, int]]:
    """The messages of ``stream`` on ``subjects`` (wildcards allowed) after sequence ``after``
    and up to ``up_to`` (0: up to the last one), in order, as (subject, data, sequence); with
    ``last_per_subject``, only the last message of each subject. Messages deleted from the
    stream meanwhile (space reclaimed, a compacted log) are skipped: when none comes for a
    while, the stream is asked whether one is still due."""
    try:
        first = await js.get_msg(stream, seq=after + 1, next=True, subject=subjects)
    except NotFoundError:
        return
    if up_to and int(first.seq or 0) > up_to:
        return
    policy = jsapi.DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else jsapi.DeliverPolicy.BY_START_SEQUENCE
    config = None if last_per_subject else jsapi.ConsumerConfig(opt_start_seq=after + 1)
    sub = await js.subscribe(subjects, stream=stream, ordered_consumer=True, deliver_policy=policy, config=config)
    seen = after
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=READ_WAIT_SECONDS)
            except NatsTimeoutError:
                try:
                    due = int((await js.get_msg(stream, seq=seen + 1, next=True, subject=subjects)).seq or 0)
                except NotFoundError:
                    return
                if last_per_subject or (up_to and due > up_to):
                    return
                log.info("reading %s: message %d is due and late, still waiting", stream, due)
                continue
            seq = int(msg.metadata.sequence.stream)
            if up_to and seq > up_to:
                return
            seen = seq
            yield msg.subject, msg.data, seq
            if (up_to and seq >= up_to) or msg.metadata.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def subject_counts(js: JetStreamContext, stream: str, subjects: str) -> dict[str, int]:
    """How many messages each subject matching ``subjects`` holds in ``stream`` (the server
    keeps these counts: no message is read). Asked page by page: the server answers for at
    most 100,000 subjects at a time."""
    counts: dict[str, int] = {}
    while True:
        # nats-py's stream_info asks for the first page only: the request is made here.
        request = json.dumps({"subjects_filter": subjects, "offset": len(counts)}).encode()
        info = await js._api_request(f"{js._prefix}.STREAM.INFO.{stream}", request, timeout=js._timeout)
        page = info.get("state", {}).get("subjects") or {}
        counts.update({str(k): int(v) for k, v in page.items()})
        if not page or len(counts) >= int(info.get("total", 0)):
            return counts


async def fetch_batch(sub: JetStreamContext.PullSubscription, batch: int, timeout: float, what: str) -> list[Msg]:
    """One fetch from a pull consumer: the messages, or none after a timeout (nothing to do) or
    a NATS failure (logged, then a pause, so that a lost server is not spun on). A cancelled
    caller stays cancelled: nats-py may turn the cancellation into a timeout."""
    try:
        return await sub.fetch(batch=batch, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a timeout, or NATS reconnecting: the caller retries
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise asyncio.CancelledError from None
        if not isinstance(exc, TimeoutError):
            log.warning("%s fetch failed: %s", what, exc)
            await asyncio.sleep(1)
        return []


class EventBus:
    """Publishes events; subscribes to subjects. One per process."""

    def __init__(self, nc: NATS, service: str) -> None:
        self._nc = nc
        self._service = service
        self._failing = False

    @property
    def connection(self) -> NATS:
        return self._nc

    async def publish(
        self,
        area: str,
        what: str,
        *,
        client_ip: str = "",
        account: str = "",
        protocol: str = "",
        session_id: str = "",
        reason: str = "",
        **attributes: str,
    ) -> events_pb2.Event:
        event = events_pb2.Event(
            id=uuid.uuid4().hex,
            time_unix_ms=int(time.time() * 1000),
            area=area,
            what=what,
            service=self._service,
            client_ip=client_ip,
            account=account,
            protocol=protocol,
            session_id=session_id,
            reason=reason,
            attributes={k: str(v) for k, v in attributes.items()},
        )
        try:
            await self._nc.publish(event_subject(area, what), event.SerializeToString())
            if self._failing:
                log.warning("event publishing works again")
            self._failing = False
        except Exception as exc:  # noqa: BLE001 - an event must never break mail flow
            if not self._failing:
                log.error("event publishing failed: %s", exc)
            self._failing = True
        return event

    async def subscribe(self, subject: str, handler: Callable[[Msg], Awaitable[None]]) -> None:
        await self._nc.subscribe(subject, cb=handler)

    async def config_changed(self, scope: str, version: int) -> None:
        await self._nc.publish(CONFIG_CHANGED, f"{scope} {version}".encode())
