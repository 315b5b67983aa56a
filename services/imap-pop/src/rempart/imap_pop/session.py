"""What IMAP and POP3 sessions share: client facts, policy at connect, after every login
result and at disconnect, authentication through the auth service, the plaintext-before-TLS
rule, and being closed from outside (R-IPS-4).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import Counter

from rempart.common import keys
from rempart.common.clients import AuthClient, PolicyClient
from rempart.common.config import SettingsCache
from rempart.common.edgelogin import LoginAttempt, LoginDecision, LoginOutcome
from rempart.common.events import mailbox_changed_subject
from rempart.common.mailbox import Mailboxes
from rempart.common.mailstore import BATCH_MIN, IndexedMessage, MailboxIndex, MessageStore
from rempart.common.mime import normalise
from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.sasl import Credentials, decode_response
from rempart.common.tls import ServerTls
from rempart.imap_pop.settings import ImapPopSettings
from rempart.imap_pop.stream import Stream

log = logging.getLogger(__name__)

IMAP_SESSIONS = Counter("rempart_imap_sessions_total", "IMAP sessions accepted")
POP3_SESSIONS = Counter("rempart_pop3_sessions_total", "POP3 sessions accepted")

# An account's IMAP sessions (R-LIM): drop the expired, then take a place unless the account
# has ARGV[3] already (0: no limit); renewing is taking it again. Server time, so replicas agree.
_CLAIM_SESSION_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# Only the owner renews or releases: a late session never frees a lock another one took.
_LOCK_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_LOCK_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Send a challenge (``+ <base64>``) and return the client's line; None when it went away.
Continuation = Callable[[bytes], Awaitable[str | None]]


class ContentCache:
    """The last messages read on this replica, as served (CRLF line ends), up to a number of
    bytes: a message read by two clients (a laptop and a phone), or twice by one, is read from
    JetStream once. A message's bytes never change, so a cached copy is never stale; each copy
    of a message (COPY, MOVE) shares its delivery's entry."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    @staticmethod
    def key(message: IndexedMessage) -> str:
        return message.blob or f"{message.record_seq}/{message.transaction_id.split('/', 1)[0]}"

    def get(self, message: IndexedMessage) -> bytes | None:
        key = self.key(message)
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
        return data

    def put(self, message: IndexedMessage, data: bytes) -> None:
        if len(data) > self.limit // 8 or not self.limit:
            return  # one large message would push out many small ones
        key = self.key(message)
        if key in self._entries:
            return
        self._entries[key] = data
        self.held += len(data)
        while self.held > self.limit:
            _, old = self._entries.popitem(last=False)
            self.held -= len(old)


@dataclass
class Backend:
    """The process-wide parts every session uses."""

    settings: ImapPopSettings
    redis: aioredis.Redis
    nc: NATS
    mailboxes: Mailboxes  # every change to a mailbox goes through it (the change log first)
    config: SettingsCache
    policy: PolicyClient
    auth: AuthClient
    tls: ServerTls | None
    instance: str
    draining: bool = False
    # Fire-and-forget calls (STAGE_DISCONNECT) are kept here so they are neither collected
    # mid-flight nor lost at shutdown.
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.content_cache = ContentCache(self.settings.imap_content_cache_mb * 1024 * 1024)
        self._reading: dict[str, asyncio.Future[bytes]] = {}
        self._lock_renew = self.redis.register_script(_LOCK_RENEW_LUA)
        self._lock_release = self.redis.register_script(_LOCK_RELEASE_LUA)
        self._claim_session = self.redis.register_script(_CLAIM_SESSION_LUA)

    @property
    def store(self) -> MessageStore:
        """Where messages are read."""
        return self.mailboxes.store

    @property
    def index(self) -> MailboxIndex:
        """The mailbox index, for reading (changes go through :attr:`mailboxes`)."""
        return self.mailboxes.index

    async def read_content(self, message: IndexedMessage) -> bytes:
        """A message as IMAP and POP3 serve it (CRLF line ends, RFC 5322 2.3); a read already
        under way for it (a read-ahead) is joined, not repeated."""
        data = self.content_cache.get(message)
        if data is not None:
            return data
        reading = self._reading.get(ContentCache.key(message)) or self.read_ahead(message)
        assert reading is not None
        return await asyncio.shield(reading)

    async def read_many(self, messages: Sequence[IndexedMessage]) -> dict[int, bytes]:
        """UID -> content of those of ``messages`` that are cached or that come in batched reads
        of their delivery records (a FETCH 1:* of a folder filled in one go); the others are for
        :meth:`read_content`, one by one."""
        out: dict[int, bytes] = {}
        wanted: dict[int, str] = {}
        for message in messages:
            data = self.content_cache.get(message)
            if data is not None:
                out[message.uid] = data
            elif not message.blob and message.record_seq and ContentCache.key(message) not in self._reading:
                wanted[message.record_seq] = message.transaction_id.split("/", 1)[0]
        if len(wanted) >= BATCH_MIN:
            bodies = await self.store.read_record_bodies(wanted)
            for message in messages:
                body = bodies.get(message.record_seq) if message.uid not in out else None
                if body is not None:
                    out[message.uid] = data = normalise(body)
                    self.content_cache.put(message, data)
        return out

    def read_ahead(self, message: IndexedMessage) -> asyncio.Future[bytes] | None:
        """Start reading a message a client is about to ask for (None: cached or under way)."""
        key = ContentCache.key(message)
        if key in self._reading or self.content_cache.get(message) is not None:
            return None
        reading = self._reading[key] = asyncio.ensure_future(self._read(message))
        reading.add_done_callback(lambda _: self._reading.pop(key, None))
        return reading

    async def _read(self, message: IndexedMessage) -> bytes:
        data = normalise(await self.store.read_message(message))
        self.content_cache.put(message, data)
        return data

    # RFC 1939 8 / RFC 3206: one POP3 session per maildrop, across replicas. The lock has a
    # short TTL that its session renews, so a crashed replica never locks a mailbox for long.
    async def lock_maildrop(self, account: str, owner: str) -> bool:
        ttl_ms = int(self.settings.pop3_lock_seconds * 1000)
        return bool(await self.redis.set(keys.pop3_maildrop_lock(account), owner, nx=True, px=ttl_ms))

    async def renew_maildrop(self, account: str, owner: str) -> bool:
        ttl_ms = int(self.settings.pop3_lock_seconds * 1000)
        return bool(await self._lock_renew(keys=[keys.pop3_maildrop_lock(account)], args=[owner, ttl_ms]))

    async def release_maildrop(self, account: str, owner: str) -> None:
        await self._lock_release(keys=[keys.pop3_maildrop_lock(account)], args=[owner])

    async def claim_session(self, account: str, session_id: str) -> bool:
        """A place among the account's IMAP sessions (taken, or renewed); False at the limit."""
        ttl_ms = int(self.settings.imap_session_claim_seconds * 1000)
        return bool(await self._claim_session(keys=[keys.imap_account_sessions(account)],
                                              args=[session_id, ttl_ms, self.settings.imap_max_sessions_per_account]))

    async def release_session(self, account: str, session_id: str) -> None:
        await self.redis.zrem(keys.imap_account_sessions(account), session_id)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def publish_changed(self, account: str, folder: str) -> None:
        """Wake IDLE sessions on every replica; a lost event is caught by their poll."""
        try:
            await self.nc.publish(mailbox_changed_subject(account), folder.encode())
        except Exception as exc:  # noqa: BLE001 - an event must never break mail access
            log.warning("mailbox change event not published: %s", exc)

    async def folder_exists(self, account: str, folder: str) -> bool:
        return folder in await self.index.folders(account)


@dataclass(eq=False)
class Session:
    backend: Backend
    stream: Stream
    client_ip: str
    client_port: int
    protocol: str  # "imap" or "pop3"
    implicit_tls: bool = False
    session_id: str = field(default_factory=lambda: os.urandom(8).hex())
    account: str = ""
    waiting_for_command: bool = False
    bad_commands: int = 0
    connected: bool = False  # the connect verdict was asked for: disconnect is reported
    closed_reason: str = ""  # set when closed from outside (R-IPS-4)

    @property
    def policy_protocol(self) -> policy_pb2.Protocol.ValueType:
        return policy_pb2.PROTOCOL_IMAP if self.protocol == "imap" else policy_pb2.PROTOCOL_POP3

    def facts(self) -> policy_pb2.SessionFacts:
        return policy_pb2.SessionFacts(
            session_id=self.session_id,
            client_ip=self.client_ip,
            client_port=self.client_port,
            protocol=self.policy_protocol,
            tls=self.stream.tls,
            tls_version=self.stream.tls_version,
            tls_cipher=self.stream.tls_cipher,
            authenticated_account=self.account,
            edge_instance=self.backend.instance,
        )

    async def connect_verdict(self) -> policy_pb2.Verdict:
        self.connected = True
        return await self.backend.policy.check(
            policy_pb2.CheckRequest(stage=policy_pb2.STAGE_CONNECT, session=self.facts())
        )

    async def report_disconnect(self) -> None:
        """STAGE_DISCONNECT (simultaneous-connection counting); never delays the close."""
        await self.backend.policy.check(
            policy_pb2.CheckRequest(stage=policy_pb2.STAGE_DISCONNECT, session=self.facts())
        )

    def goodbye(self, text: str) -> bytes:
        """The last line before closing from outside: IMAP ``* BYE``, POP3 ``-ERR``."""
        return (f"* BYE {text}" if self.protocol == "imap" else f"-ERR {text}").encode() + b"\r\n"

    def tls_available(self) -> bool:
        return self.backend.tls is not None and not self.stream.tls

    def plaintext_auth_allowed(self) -> bool:
        """R-TLS-2: plaintext mechanisms only inside TLS, unless the client is trusted."""
        if self.stream.tls:
            return True
        settings = self.backend.config.server
        if not settings.tls.plaintext_auth_requires_tls:
            return True
        return ip_in_networks(self.client_ip, settings.relay.trusted_hosts)

    def login_attempt(self) -> LoginAttempt:
        return LoginAttempt(self.backend.auth, self.backend.policy, self.backend.config.server.login, self.facts(),
                            self.protocol)

    async def login(self, login: str, password: str, mechanism: str) -> LoginDecision:
        """IMAP LOGIN, POP3 USER/PASS: the kit's reading of auth and policy (edgelogin)."""
        return self._settle(await self.login_attempt().password(Credentials(login, password), mechanism))

    async def sasl_login(self, mechanism: str, initial: str | None, continuation: Continuation) -> LoginDecision:
        """AUTHENTICATE / AUTH: ``initial`` is the SASL-IR or RFC 5034 initial response, as sent.
        Raises SaslError (cancelled or malformed), which the protocol answers as a syntax error."""

        async def challenge(data: bytes) -> bytes:
            line = await continuation(data)
            if line is None:
                raise ConnectionResetError("client left during SASL")
            return decode_response(line)

        first = decode_response(initial, initial=True) if initial is not None else None
        return self._settle(await self.login_attempt().sasl(mechanism, first, challenge))

    def _settle(self, decision: LoginDecision) -> LoginDecision:
        if decision.outcome is LoginOutcome.OK:
            self.account = decision.account
        return decision


def verdict_text(verdict: policy_pb2.Verdict, default: str = "Connection refused") -> str:
    """The verdict's words without an SMTP code in front: IMAP and POP3 have their own."""
    text = verdict.text.strip()
    words = text.split(" ", 2)
    if len(words) == 3 and words[0].isdigit() and len(words[0]) == 3 and words[1][:1].isdigit():
        text = words[2]
    elif len(words) >= 2 and words[0].isdigit() and len(words[0]) == 3:
        text = text[4:]
    return " ".join(text.split()) or default
