"""The durable audit trail of administrative changes (R-ADM-5): the JetStream stream ``AUDIT``.

Each record is one JSON document on ``rempart.audit.<object kind>``: who (actor, the actor's
source IP, the API key used if any), when (RFC 3339, UTC), what (action, object kind and id, the
object's domain for confinement) and a redacted before/after of the object. The writer waits for
the stream's acknowledgement: a record the API answered for is on disk (the server fsyncs before
it acks, DESIGN.md "Durability").

The stream is separate from ``EVENTS`` (the security event log) so that its retention is its own
setting: an audit trail is usually kept much longer than connection noise. The admin API, its
only writer, creates it with its configured limits at start and applies them again when they
change; a writer that finds it missing (a test harness, a wiped JetStream) creates it with the
limits it was given.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import BadRequestError, NotFoundError

log = logging.getLogger(__name__)

AUDIT_STREAM = "AUDIT"
AUDIT_SUBJECTS = "rempart.audit.>"
AUDIT_PREFIX = "rempart.audit."
# How long a write (or the readiness probe before it) may wait for JetStream before the admin
# API gives up and answers 503.
AUDIT_TIMEOUT_SECONDS = 3.0
MAX_KIND = 32


class AuditUnavailable(ConnectionError):
    """The audit record could not be written (or the stream cannot take one now)."""


@dataclass(frozen=True)
class AuditRetention:
    """The stream's limits; 0 means no limit of that kind."""

    max_age_days: int = 365
    max_bytes: int = 1 << 30
    replicas: int = 1

    def config(self) -> jsapi.StreamConfig:
        return jsapi.StreamConfig(
            name=AUDIT_STREAM,
            subjects=[AUDIT_SUBJECTS],
            retention=jsapi.RetentionPolicy.LIMITS,
            storage=jsapi.StorageType.FILE,
            max_age=float(self.max_age_days * 86400) if self.max_age_days else None,
            max_bytes=self.max_bytes or -1,
            num_replicas=self.replicas,
            duplicate_window=120,
            allow_direct=True,
        )


def audit_subject(kind: str) -> str:
    token = "".join(c if c.isalnum() or c in "_-" else "_" for c in kind[:MAX_KIND]) or "other"
    return AUDIT_PREFIX + token


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_record(
    *,
    actor: str,
    actor_ip: str,
    action: str,
    kind: str,
    object_id: str,
    domain: str = "",
    api_key: str = "",
    before: Any = None,
    after: Any = None,
    details: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One audit record. ``before`` and ``after`` must already be redacted by the caller."""
    return {
        "id": uuid.uuid4().hex,
        "time": rfc3339(dt.datetime.now(dt.UTC)),
        "actor": actor,
        "actor_ip": actor_ip,
        "api_key": api_key,
        "action": action,
        "object": {"kind": kind, "id": object_id},
        "domain": domain,
        "before": before,
        "after": after,
        "details": details or {},
    }


class AuditLog:
    """Writes records to the ``AUDIT`` stream, acknowledged; reads them back by sequence."""

    def __init__(self, js: JetStreamContext, retention: AuditRetention | None = None,
                 timeout: float = AUDIT_TIMEOUT_SECONDS) -> None:
        self._js = js
        self._retention = retention or AuditRetention()
        self._timeout = timeout

    async def ensure(self) -> None:
        """Create the stream, or bring its limits to the configured ones (the only settings
        of the stream an operator changes through the admin API's settings)."""
        wanted = self._retention.config()
        try:
            info = await self._js.stream_info(AUDIT_STREAM)
        except NotFoundError:
            try:
                await self._js.add_stream(wanted)
            except BadRequestError:
                pass  # another replica created it meanwhile
            return
        current = info.config
        if (current.max_age or None) != (wanted.max_age or None) or (current.max_bytes or -1) != wanted.max_bytes:
            await self._js.update_stream(current.evolve(max_age=wanted.max_age, max_bytes=wanted.max_bytes))

    async def ready(self) -> None:
        """Raise :class:`AuditUnavailable` unless a record could be written now: NATS answers and
        the stream exists (created if missing). Asked before an audited write changes anything."""
        try:
            await asyncio.wait_for(self._ready(), self._timeout)
        except Exception as exc:
            raise AuditUnavailable(f"audit stream unavailable: {type(exc).__name__}") from exc

    async def _ready(self) -> None:
        try:
            await self._js.stream_info(AUDIT_STREAM)
        except NotFoundError:
            await self.ensure()

    async def write(self, record: dict[str, Any]) -> int:
        """Publish ``record`` and wait for the stream's acknowledgement; its sequence. Raises
        :class:`AuditUnavailable` when it is not acknowledged."""
        data = json.dumps(record, separators=(",", ":"), sort_keys=True, default=str).encode()
        subject = audit_subject(str(record.get("object", {}).get("kind", "")))
        headers = {"Nats-Msg-Id": str(record["id"])}  # a retried publish is stored once
        for attempt in (1, 2):
            try:
                ack = await self._js.publish(subject, data, timeout=self._timeout, stream=AUDIT_STREAM,
                                             headers=dict(headers))
                return int(ack.seq)
            except Exception as exc:
                if attempt == 2:
                    raise AuditUnavailable(f"audit record not acknowledged: {type(exc).__name__}") from exc
                try:
                    await asyncio.wait_for(self._ready(), self._timeout)
                except Exception as again:
                    raise AuditUnavailable(f"audit stream unavailable: {type(again).__name__}") from again
        raise AssertionError("unreachable")

    async def bounds(self) -> tuple[int, int]:
        """The first and last sequence the stream holds (0, 0 when it does not exist)."""
        try:
            info = await self._js.stream_info(AUDIT_STREAM)
        except NotFoundError:
            return 0, 0
        return int(info.state.first_seq), int(info.state.last_seq)

    async def get(self, seq: int) -> dict[str, Any] | None:
        """The record at ``seq``, or None (trimmed by the limits, or not a record)."""
        try:
            msg = await self._js.get_msg(AUDIT_STREAM, seq=seq)
        except NotFoundError:
            return None
        try:
            decoded = json.loads(msg.data or b"")
        except ValueError:
            return None
        return decoded if isinstance(decoded, dict) else None
