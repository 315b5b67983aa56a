"""What IMAP and POP3 sessions share: client facts, policy at connect, after every login
result and at disconnect, authentication through the auth service, the plaintext-before-TLS
rule, and being closed from outside (R-IPS-4).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import Counter

from rempart.common import keys
from rempart.common.clients import AuthClient, PolicyClient
from rempart.common.config import SettingsCache
from rempart.common.events import mailbox_changed_subject
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.netmatch import ip_in_networks
from rempart.common.pb.auth.v1 import auth_pb2
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.tls import ServerTls
from rempart.imap_pop.settings import Settings
from rempart.imap_pop.stream import Stream

log = logging.getLogger(__name__)

LOGINS = Counter("rempart_imap_pop_logins_total", "IMAP and POP3 login attempts", ["protocol", "result"])
IMAP_SESSIONS = Counter("rempart_imap_sessions_total", "IMAP sessions accepted")
POP3_SESSIONS = Counter("rempart_pop3_sessions_total", "POP3 sessions accepted")

_FAILED = {
    auth_pb2.AUTH_STATUS_INVALID,
    auth_pb2.AUTH_STATUS_LOCKED,
    auth_pb2.AUTH_STATUS_IP_RESTRICTED,
    auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED,
}


# RFC 6154: the folders every account has from its first login, with their special use.
SPECIAL_USE_FOLDERS = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}
# A field no folder can be named ('*' is refused in names): the hash exists once provisioned,
# even after the user deleted every special folder, so they do not come back.
_PROVISIONED = "*"


# Only the owner renews or releases: a late session never frees a lock another one took.
_LOCK_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_LOCK_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


SCRAM = "SCRAM-SHA-256"
MAX_SCRAM_MESSAGE = 2048  # decoded; real client messages are about 100 bytes


class SaslCancelled(Exception):
    """The client answered a challenge with ``*``."""


class SaslMalformed(Exception):
    """Not base64, not UTF-8, or too long."""


# A challenge: send these bytes as ``+ <base64>``, return the client's line (None: it left).
Challenge = Callable[[bytes], Awaitable[str | None]]


class LoginResult(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    TEMPFAIL = "tempfail"


@dataclass
class Backend:
    """The process-wide parts every session uses."""

    settings: Settings
    redis: aioredis.Redis
    nc: NATS
    store: MessageStore
    index: MailboxIndex
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
        self._lock_renew = self.redis.register_script(_LOCK_RENEW_LUA)
        self._lock_release = self.redis.register_script(_LOCK_RELEASE_LUA)

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

    async def delete_folder(self, account: str, folder: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(keys.mailbox_folders(account), folder)
            pipe.delete(keys.mailbox_meta(account, folder), keys.mailbox_uids(account, folder),
                        keys.mailbox_txn(account, folder))
            await pipe.execute()

    async def folder_exists(self, account: str, folder: str) -> bool:
        return folder in await self.index.folders(account)

    async def provision_folders(self, account: str) -> None:
        """First login: create Sent, Drafts, Trash and Junk with their RFC 6154 attributes."""
        key = keys.mailbox_special_use(account)
        if await self.redis.exists(key):
            return
        for name in SPECIAL_USE_FOLDERS:
            await self.index.create_folder(account, name)
        fields = [_PROVISIONED, "1"]
        for name, use in SPECIAL_USE_FOLDERS.items():
            fields += [name, use]
        await self.redis.hset(key, items=fields)

    async def special_uses(self, account: str) -> dict[str, str]:
        """Folder -> special-use attribute."""
        raw = await self.redis.hgetall(keys.mailbox_special_use(account))
        return {str(k): str(v) for k, v in raw.items() if k != _PROVISIONED}

    async def move_special_use(self, account: str, old: str, new: str | None) -> None:
        """A renamed special folder keeps its use (RFC 6154 2); a deleted one drops it."""
        key = keys.mailbox_special_use(account)
        use = await self.redis.hget(key, old)
        if use is None:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(key, old)
            if new is not None:
                pipe.hset(key, new, use)
            await pipe.execute()


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

    async def login(self, login: str, password: str, mechanism: str) -> tuple[LoginResult, bool]:
        """Ask the auth service; returns the result and whether policy wants the session closed."""
        reply = await self.backend.auth.authenticate(
            auth_pb2.AuthenticateRequest(
                login=login,
                password=password,
                client_ip=self.client_ip,
                protocol=self.protocol,
                mechanism=mechanism,
                tls=self.stream.tls,
                session_id=self.session_id,
            )
        )
        return await self.auth_result(login, reply.status, reply.account, mechanism)

    async def scram_login(self, initial: str | None, challenge: Challenge) -> tuple[LoginResult, bool]:
        """SCRAM-SHA-256 (RFC 5802, RFC 7677) through the auth service: the password never
        crosses the wire, so it is offered before TLS too (R-TLS-2). ``initial`` is the SASL-IR
        initial response, if the client sent one."""
        if initial is None:
            initial = await _answer(challenge, b"")
        client_first = _sasl_text(initial)
        login = _scram_user(client_first)
        start = await self.backend.auth.scram_start(
            auth_pb2.ScramStartRequest(client_first=client_first, client_ip=self.client_ip, protocol=self.protocol,
                                       session_id=self.session_id, tls=self.stream.tls)
        )
        if start.status != auth_pb2.AUTH_STATUS_OK:
            return await self.auth_result(login, start.status, "", SCRAM)
        client_final = _sasl_text(await _answer(challenge, start.server_first.encode()))
        finish = await self.backend.auth.scram_finish(start.conversation_id, client_final)
        if finish.status == auth_pb2.AUTH_STATUS_OK and finish.account:
            # RFC 5802 5: the client checks the server's signature; its answer carries nothing.
            await _answer(challenge, finish.server_final.encode())
        return await self.auth_result(login, finish.status, finish.account, SCRAM)

    async def auth_result(
        self, login: str, status: auth_pb2.AuthStatus.ValueType, account: str, mechanism: str
    ) -> tuple[LoginResult, bool]:
        """Tell policy every result (DESIGN.md): failures count for R-IPS-2, a success records
        the IP for POP-before-SMTP (R-REL-1). The session is logged in only if policy agrees."""
        status_name = auth_pb2.AuthStatus.Name(status)
        success = status == auth_pb2.AUTH_STATUS_OK and bool(account)
        if not success and status not in _FAILED:
            LOGINS.labels(self.protocol, LoginResult.TEMPFAIL.value).inc()
            log.info("login tempfail", extra={"session": self.session_id, "client_ip": self.client_ip,
                                              "status": status_name, "mechanism": mechanism})
            return LoginResult.TEMPFAIL, False
        facts = self.facts()
        if success:
            facts.authenticated_account = account
        verdict = await self.backend.policy.check(
            policy_pb2.CheckRequest(
                stage=policy_pb2.STAGE_AUTH,
                session=facts,
                auth_success=success,
                auth_login=login[:320],
                auth_failure="" if success else status_name,
            )
        )
        close = verdict.action == policy_pb2.ACTION_CLOSE or verdict.ip_blocked
        if success and verdict.action in (policy_pb2.ACTION_ACCEPT, policy_pb2.ACTION_DISCARD):
            self.account = account
            LOGINS.labels(self.protocol, LoginResult.OK.value).inc()
            log.info("login", extra={"session": self.session_id, "account": account,
                                     "client_ip": self.client_ip, "mechanism": mechanism})
            return LoginResult.OK, False
        if success and verdict.action == policy_pb2.ACTION_TEMPFAIL:
            # Fail closed: without policy's word the login does not count as done.
            LOGINS.labels(self.protocol, LoginResult.TEMPFAIL.value).inc()
            log.info("login held back: policy unavailable", extra={"session": self.session_id,
                                                                   "client_ip": self.client_ip})
            return LoginResult.TEMPFAIL, False
        LOGINS.labels(self.protocol, LoginResult.FAILED.value).inc()
        log.info("login refused", extra={"session": self.session_id, "client_ip": self.client_ip,
                                         "status": status_name if not success else "POLICY_" + verdict.rule,
                                         "mechanism": mechanism})
        return LoginResult.FAILED, close or (success and verdict.action == policy_pb2.ACTION_REJECT)


async def _answer(challenge: Challenge, data: bytes) -> str:
    line = await challenge(data)
    if line is None:
        raise ConnectionResetError("client left during SASL")
    if line.strip() == "*":
        raise SaslCancelled
    return line.strip()


def _sasl_text(response: str) -> str:
    if len(response) > MAX_SCRAM_MESSAGE * 2:
        raise SaslMalformed
    try:
        text = base64.b64decode(response, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise SaslMalformed from None
    if len(text) > MAX_SCRAM_MESSAGE:
        raise SaslMalformed
    return text


def _scram_user(client_first: str) -> str:
    """The ``n=`` name of a client-first message, for policy's log (never the proof)."""
    for attribute in client_first.split(",")[2:]:
        if attribute.startswith("n="):
            return attribute[2:].replace("=2C", ",").replace("=3D", "=")[:320]
    return ""


def verdict_text(verdict: policy_pb2.Verdict) -> str:
    """The verdict's words without an SMTP code in front: IMAP and POP3 have their own."""
    text = verdict.text.strip()
    words = text.split(" ", 2)
    if len(words) == 3 and words[0].isdigit() and len(words[0]) == 3 and words[1][:1].isdigit():
        text = words[2]
    elif len(words) >= 2 and words[0].isdigit() and len(words[0]) == 3:
        text = text[4:]
    return " ".join(text.split()) or "Connection refused"


async def sleep_forever() -> None:
    await asyncio.Event().wait()
