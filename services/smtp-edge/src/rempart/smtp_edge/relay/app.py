"""The outbound relay process (``python -m rempart.smtp_edge.relay``, the chart's relay
Deployment): a durable JetStream pull consumer on ``rempart.mail.accepted`` shared by every
replica, delivering each record's remote recipients (queue.py), with the ops port and SIGTERM
drain of every Rempart service.

Implementation notes, the rules every path obeys:
- A record is acknowledged only when every remote recipient has a final result (delivered,
  bounced with its DSN stored, or dropped); until then it is ``nak``'ed with the delay to its
  next due recipient, so JetStream (fsynced, replicated) holds the queue, not this process.
- A record being worked on is kept alive with ``in_progress`` acks, so a slow remote (RFC 5321
  allows 10 minutes for the final reply) never makes JetStream hand it to another replica.
- Results are written per recipient as the remote answers, before anything else happens; a
  replica killed at any point leaves a record that the next one resumes where it stopped.
- One replica at a time works on a transaction (a Redis lock that lapses with its owner, kept
  alive with the ``in_progress`` acks): JetStream's copy of a record and a retry asked for
  through the admin API may meet. A retry is taken by one replica, which reads the record from
  the MAIL stream by its sequence and processes it at once; JetStream's copy comes back at its
  ``nak`` delay and finds the work done or not yet due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Coroutine
from typing import Any

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import NotFoundError
from prometheus_client import Gauge

from rempart.common import tracing
from rempart.common.directory import Directory
from rempart.common.dkim import DkimKeyStore
from rempart.common.events import MAIL_ACCEPTED_SUBJECT, MAIL_STREAM, fetch_batch
from rempart.common.mailbox import Mailboxes, MailboxLog
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.outqueue import RETRY_SUBJECT
from rempart.common.pb.events.v1 import events_pb2
from rempart.common.runtime import ServiceRuntime
from rempart.common.secretbox import SecretBox
from rempart.smtp_edge.relay.delivery import SmtpClient, TlsPolicy
from rempart.smtp_edge.relay.mtasts import MtaSts
from rempart.smtp_edge.relay.queue import Attempt, RecipientStore, RelayQueue
from rempart.smtp_edge.relay.routing import Router
from rempart.smtp_edge.relay.settings import RelaySettings
from rempart.smtp_edge.relay.signing import DkimSigner

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("rempart_relay_queue_depth", "Transactions with remote recipients not yet final")
QUEUE_OLDEST = Gauge("rempart_relay_queue_oldest_seconds", "Age of the oldest queued transaction")
IN_FLIGHT = Gauge("rempart_relay_in_flight", "Records being worked on by this replica")
FETCH_BATCH = 64
ERROR_RETRY_SECONDS = 30.0
MIN_RETRY_SECONDS = 1.0
# Another replica works on the transaction: look again after this.
BUSY_RETRY_SECONDS = 5.0
# Retries asked for are announced on RETRY_SUBJECT; a replica that missed the announcement
# (reconnecting, starting) still finds them within this.
RETRY_POLL_SECONDS = 5.0


async def consumer_subscription(
    js: JetStreamContext, settings: RelaySettings
) -> JetStreamContext.PullSubscription:
    config = jsapi.ConsumerConfig(
        durable_name=settings.consumer,
        ack_policy=jsapi.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=settings.max_ack_pending,
        filter_subject=MAIL_ACCEPTED_SUBJECT,
        deliver_policy=jsapi.DeliverPolicy.ALL,
    )
    return await js.pull_subscribe(MAIL_ACCEPTED_SUBJECT, durable=settings.consumer, stream=MAIL_STREAM,
                                   config=config)


class Relay:
    def __init__(self, runtime: ServiceRuntime, settings: RelaySettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.queue: RelayQueue | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._gauge_task: asyncio.Task[None] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._retry_asked = asyncio.Event()

    async def start(self) -> None:
        rt, settings = self.runtime, self.settings
        outbound = rt.config.server.outbound
        tls = TlsPolicy(starttls=outbound.starttls, min_version=outbound.tls_min_version,
                        ca_file=settings.tls_ca_file)
        router = Router(settings.nameservers(), settings.dns_timeout_seconds, settings.mx_port)
        directory = Directory(rt.redis)
        self.queue = RelayQueue(
            hostname=settings.hostname,
            router=router,
            client=SmtpClient(settings.hostname, tls, settings.connect_timeout_seconds,
                              settings.command_timeout_seconds, settings.connection_cache_seconds,
                              settings.connection_cache_per_destination),
            mailboxes=Mailboxes(await MessageStore.open(rt.js, settings.inline_body_max_bytes), MailboxIndex(rt.redis),
                                MailboxLog(rt.js)),
            directory=directory,
            events=rt.events,
            config=rt.config,
            results=RecipientStore(rt.redis, settings.rate_window_seconds),
            smarthost_passwords={k: v.get_secret_value() for k, v in settings.smarthost_passwords.items()},
            signer=DkimSigner(DkimKeyStore(rt.redis, SecretBox(settings.secret_key.get_secret_value())), directory),
            sts=MtaSts(rt.redis, router, settings.tls_ca_file, settings.outbound_mta_sts_port,
                       settings.outbound_mta_sts_timeout_seconds) if settings.outbound_mta_sts else None,
        )
        rt.config.on_change(self._apply_settings)
        self._sub = await consumer_subscription(rt.js, settings)
        rt.ops.add_check("consumer", self._consumer_check)
        await rt.nc.subscribe(RETRY_SUBJECT, cb=self._on_retry_asked)
        self._loop_task = asyncio.create_task(self._consume(), name="relay-consume")
        self._gauge_task = asyncio.create_task(self._gauges(), name="relay-gauges")
        self._retry_task = asyncio.create_task(self._retries(), name="relay-retries")
        log.info("relay consuming", extra={"consumer": settings.consumer, "parallel": settings.max_parallel_messages})

    async def _apply_settings(self) -> None:
        if self.queue is not None:
            outbound = self.runtime.config.server.outbound
            self.queue.client.tls.starttls = outbound.starttls
            self.queue.client.tls.min_version = outbound.tls_min_version

    async def _consumer_check(self) -> None:
        if self._sub is None or self._loop_task is None or self._loop_task.done():
            raise RuntimeError("consumer not running")

    async def _consume(self) -> None:
        assert self._sub is not None
        while not self._stopping.is_set():
            free = self.settings.max_parallel_messages - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, timeout=1, return_when=asyncio.FIRST_COMPLETED)
                continue
            for msg in await fetch_batch(self._sub, min(free, FETCH_BATCH), 1, "relay"):
                self._spawn(self._handle(msg))
            IN_FLIGHT.set(len(self._tasks))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lock_owner(self) -> str:
        return f"{self.runtime.instance}/{uuid.uuid4().hex[:12]}"

    async def _handle(self, msg: Msg) -> None:
        assert self.queue is not None
        try:
            record = events_pb2.DeliveryRecord.FromString(msg.data)
        except DecodeError:
            log.error("undecodable record on %s, terminated", msg.subject)
            await msg.term()
            return
        if not record.remote_recipients:
            await msg.ack()
            return
        txn, results, owner = record.transaction_id, self.queue.results, self._lock_owner()
        try:
            looked = await results.lock(txn, owner, self.settings.ack_wait_seconds)
        except Exception:  # Redis trouble: the record comes back later
            log.exception("relay attempt failed, will retry", extra={"queue_id": txn})
            await msg.nak(delay=ERROR_RETRY_SECONDS)
            return
        if looked is None:
            await msg.nak(delay=BUSY_RETRY_SECONDS)  # a retry asked for is being worked on
            return
        heartbeat = asyncio.create_task(self._keep_alive(txn, owner, msg))
        attempt: Attempt | None = None
        try:
            with tracing.consuming([msg], "relay", self.settings.consumer):  # the edge's trace, from the headers
                attempt = await self.queue.process(record, int(msg.metadata.sequence.stream), looked, owner)
        except asyncio.CancelledError:
            # Drain ran out of time: hand the record back now rather than after ack_wait.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise
        except Exception:  # Redis or NATS trouble: the record comes back later
            log.exception("relay attempt failed, will retry", extra={"queue_id": txn})
            await msg.nak(delay=ERROR_RETRY_SECONDS)
            return
        finally:
            heartbeat.cancel()
            if attempt is None or not attempt.unlocked:
                with contextlib.suppress(Exception):
                    await asyncio.shield(results.unlock(txn, owner))
        if attempt.finished:
            await msg.ack()
        else:
            await msg.nak(delay=max(attempt.retry_in, MIN_RETRY_SECONDS))

    async def _keep_alive(self, txn: str, owner: str, msg: Msg | None) -> None:
        assert self.queue is not None
        while True:
            await asyncio.sleep(self.settings.ack_wait_seconds / 3)
            with contextlib.suppress(Exception):
                if msg is not None:
                    await msg.in_progress()
                await self.queue.results.refresh_lock(txn, owner, self.settings.ack_wait_seconds)

    # Retries asked for through the admin API ---------------------------------------------------
    async def _on_retry_asked(self, msg: Msg) -> None:
        self._retry_asked.set()

    async def _retries(self) -> None:
        assert self.queue is not None
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_asked.wait(), RETRY_POLL_SECONDS)
            self._retry_asked.clear()
            free = self.settings.max_parallel_messages - len(self._tasks)
            if self._stopping.is_set() or free <= 0:
                continue
            try:
                for txn in await self.queue.results.claim_retries(free):
                    self._spawn(self._retry(txn))
            except Exception as exc:  # noqa: BLE001 - Redis trouble: the next look finds them
                log.warning("retries asked for not taken: %s", exc)

    async def _retry(self, txn: str) -> None:
        """A retry asked for: the record, read from the MAIL stream by its sequence, processed
        now. Any failure leaves it to JetStream's copy, which comes back at its delay and finds
        the recipients due."""
        assert self.queue is not None
        results = self.queue.results
        message = await results.get(txn)
        if message is None:
            return  # delivered or removed meanwhile
        try:
            if not message.seq:
                raise LookupError("its stream sequence is not known yet")
            raw = await self.runtime.js.get_msg(MAIL_STREAM, seq=message.seq, direct=True)
            record = events_pb2.DeliveryRecord.FromString(raw.data or b"")
            if record.transaction_id != txn:
                raise LookupError(f"record {message.seq} is another transaction")
        except (LookupError, NotFoundError, DecodeError) as exc:
            log.warning("retry asked for, record not read (%s): left to its schedule", exc, extra={"queue_id": txn})
            return
        owner = self._lock_owner()
        looked = await results.lock(txn, owner, self.settings.ack_wait_seconds)
        if looked is None:
            await results.postpone_retry(txn, BUSY_RETRY_SECONDS)
            return
        heartbeat = asyncio.create_task(self._keep_alive(txn, owner, None))
        try:
            attempt = await self.queue.process(record, message.seq, looked)
            log.info("retried as asked", extra={"queue_id": txn, "finished": attempt.finished})
        except Exception:  # JetStream's copy comes back at its time
            log.exception("retry asked for failed: left to its schedule", extra={"queue_id": txn})
        finally:
            heartbeat.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(results.unlock(txn, owner))

    async def _gauges(self) -> None:
        assert self.queue is not None
        while True:
            try:
                depth, oldest_ms = await self.queue.results.depth_and_oldest_ms()
                QUEUE_DEPTH.set(depth)
                QUEUE_OLDEST.set(max(0.0, time.time() - oldest_ms / 1000) if oldest_ms else 0.0)
            except Exception as exc:  # noqa: BLE001 - metrics never stop the relay
                log.debug("queue gauges: %s", exc)
            await asyncio.sleep(10)

    async def drain(self, grace: float) -> None:
        """SIGTERM: fetch nothing more; let the records in hand finish within the grace period,
        then hand the rest back to JetStream (another replica resumes them)."""
        self._stopping.set()
        self._retry_asked.set()
        # Every step is bounded: a stop never hangs on a task that will not end or a peer that
        # does not answer (asyncio.wait_for would wait for a cancelled task without limit).
        loops = {t for t in (self._loop_task, self._retry_task) if t is not None}
        if loops:
            _done, stuck = await asyncio.wait(loops, timeout=3)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=2)
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._gauge_task is not None:
            self._gauge_task.cancel()
        if self._sub is not None:
            await _bounded("the consumer's unsubscribe", self._sub.unsubscribe())
        if self.queue is not None:
            await _bounded("QUIT of the kept sessions", self.queue.client.close_idle(), 12.0)
            if self.queue.sts is not None:
                await _bounded("the MTA-STS client's close", self.queue.sts.close())


async def _bounded(what: str, step: Awaitable[object], seconds: float = 5.0) -> None:
    try:
        await asyncio.wait_for(step, seconds)
    except Exception as exc:  # noqa: BLE001 - stopping anyway: said, not raised
        log.warning("while stopping, %s did not finish: %s", what, type(exc).__name__)


async def serve(settings: RelaySettings) -> None:
    async with ServiceRuntime("relay", settings) as runtime:
        relay = Relay(runtime, settings)
        await relay.start()
        await runtime.wait_for_shutdown()
        await relay.drain(settings.shutdown_grace_seconds)
