"""What IMAP and POP3 sessions share: client facts, policy at connect and after a failed
login, authentication through the auth service, and the plaintext-before-TLS rule.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import os
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import Counter

from rempart.common import keys
from rempart.common.clients import AuthClient, PolicyClient
from rempart.common.config import SettingsCache
from rempart.common.events import mailbox_changed_subject
from rempart.common.mailstore import MailboxIndex, MessageStore
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
        return await self.backend.policy.check(
            policy_pb2.CheckRequest(stage=policy_pb2.STAGE_CONNECT, session=self.facts())
        )

    def tls_available(self) -> bool:
        return self.backend.tls is not None and not self.stream.tls

    def plaintext_auth_allowed(self) -> bool:
        """R-TLS-2: plaintext mechanisms only inside TLS, unless the client is trusted."""
        if self.stream.tls:
            return True
        settings = self.backend.config.server
        if not settings.tls.plaintext_auth_requires_tls:
            return True
        return ip_in(self.client_ip, settings.relay.trusted_hosts)

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
        if reply.status == auth_pb2.AUTH_STATUS_OK and reply.account:
            self.account = reply.account
            LOGINS.labels(self.protocol, "ok").inc()
            log.info("login", extra={"session": self.session_id, "account": reply.account,
                                     "client_ip": self.client_ip, "mechanism": mechanism})
            return LoginResult.OK, False
        if reply.status in _FAILED:
            result = LoginResult.FAILED
        else:
            result = LoginResult.TEMPFAIL
        status_name = auth_pb2.AuthStatus.Name(reply.status)
        LOGINS.labels(self.protocol, result.value).inc()
        log.info("login refused", extra={"session": self.session_id, "client_ip": self.client_ip,
                                         "status": status_name, "mechanism": mechanism})
        if result is LoginResult.TEMPFAIL:
            return result, False
        # Intrusion prevention counts failed logins (R-IPS-2) and may close us (R-IPS-4).
        verdict = await self.backend.policy.check(
            policy_pb2.CheckRequest(
                stage=policy_pb2.STAGE_AUTH,
                session=self.facts(),
                auth_success=False,
                auth_login=login[:320],
                auth_failure=status_name,
            )
        )
        return result, verdict.action == policy_pb2.ACTION_CLOSE or verdict.ip_blocked


def ip_in(ip: str, networks: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for net in networks:
        try:
            if address in ipaddress.ip_network(net, strict=False):
                return True
        except ValueError:
            continue
    return False


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
