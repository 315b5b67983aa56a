"""One SMTP client transaction to one destination (R-TLS-4, RFC 5321 section 4.1).

Per recipient the remote's RCPT reply decides; a message is delivered to a recipient only when
the remote answered 250 to the final dot. That answer is what the queue records; a connection
lost after the dot and before the reply leaves the recipient unconfirmed (resent later: the one
duplicate SMTP allows, RFC 1047).

TLS: STARTTLS whenever the remote offers it (R-TLS-4), at the outbound minimum version. The
certificate is checked first; a certificate that does not verify still encrypts: the session
is redone without the check and the guide's line ``Client session SSL: Not verified (N) -
proceed anyway`` is logged, N being OpenSSL's verify error (18 self-signed, 20 unknown issuer,
10 expired, 62 host name mismatch). Hosts seen unverified are remembered for an hour so that
the next session goes straight to the unchecked handshake. A handshake that fails for any other
reason is a temporary failure of that host, never a fallback to plain text.

``require_tls`` (a destination under an MTA-STS ``enforce`` policy, RFC 8461 4.2): TLS 1.2 or
later with a certificate valid for the MX name, or no delivery: a host that offers no STARTTLS
or whose certificate does not verify is a temporary failure (``451 4.7.5``), with no unchecked
retry and no plain text.

Connection reuse (as Postfix's connection cache): a session that ended its transaction cleanly
is kept open for ``idle_seconds`` (``REMPART_CONNECTION_CACHE_SECONDS``, 2 s as Postfix's
``smtp_connection_cache_time_limit``) for the
next message to the same host, address, port and terms (TLS requirement, AUTH). Reusing one
costs a RSET, where a new session costs the connection, greeting, EHLO, STARTTLS's handshake and
EHLO again; a RSET that fails (the remote closed it meanwhile) means a new session, and no
recipient is touched. R-LIM-6's recipients per connection count across the messages of a reused
session: one that reached the limit is closed, not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.errors import SMTPDataError, SMTPException, SMTPResponseException, SMTPServerDisconnected

from rempart.smtp_edge.relay import replies
from rempart.smtp_edge.relay.replies import Reply

log = logging.getLogger(__name__)

TLS_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
UNVERIFIED_MEMORY_SECONDS = 3600.0
# Called with the recipients accepted at RCPT just before the final dot; False: do not send it.
BeforeDot = Callable[[list[str]], Awaitable[bool]]


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: list[str]
    data: bytes
    # RFC 3461, passed on when the remote offers DSN: RET/ENVID and per-recipient NOTIFY/ORCPT.
    mail_params: dict[str, str] = field(default_factory=dict)
    rcpt_params: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Outcome:
    """What one session did: per-recipient replies, and the facts of the session."""

    replies: dict[str, Reply] = field(default_factory=dict)
    host: str = ""
    address: str = ""
    tls_version: str = ""
    tls_verified: bool = False
    unconfirmed: bool = False  # the dot was sent and no reply came
    withdrawn: bool = False  # the queue withdrew the message before the dot (removed meanwhile)
    reused: bool = False  # on a session kept from an earlier message


@dataclass
class TlsPolicy:
    starttls: bool = True
    min_version: str = "TLSv1.2"
    ca_file: str = ""
    _contexts: dict[tuple[str, bool], ssl.SSLContext] = field(default_factory=dict)
    _unverified: dict[str, float] = field(default_factory=dict)

    def context(self, verify: bool, strict: bool = False) -> ssl.SSLContext:
        """``strict``: an MTA-STS session, TLS 1.2 at least whatever the outbound minimum."""
        version = self.min_version
        if strict and TLS_VERSIONS[version] < ssl.TLSVersion.TLSv1_2:
            version = "TLSv1.2"
        key = (version, verify)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if self.ca_file:
                ctx.load_verify_locations(cafile=self.ca_file)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = TLS_VERSIONS[version]
            self._contexts[key] = ctx
        return ctx

    def known_unverified(self, host: str) -> bool:
        until = self._unverified.get(host)
        return until is not None and until > time.monotonic()

    def remember_unverified(self, host: str) -> None:
        self._unverified[host] = time.monotonic() + UNVERIFIED_MEMORY_SECONDS
        if len(self._unverified) > 10_000:
            now = time.monotonic()
            self._unverified = {h: t for h, t in self._unverified.items() if t > now}


@dataclass
class Parked:
    """An idle session kept for the next message to the same destination."""

    smtp: aiosmtplib.SMTP
    tls_version: str
    tls_verified: bool
    recipients: int  # sent on this connection so far (R-LIM-6)
    until: float  # monotonic


# address, port, MX host name, implicit TLS, AUTH login, TLS required (MTA-STS enforce)
SessionKey = tuple[str, int, str, bool, tuple[str, str] | None, bool]


class HostFailed(Exception):
    """This host could not take the message (connect, greeting, EHLO, TLS): try the next one."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass
class SmtpClient:
    helo_name: str
    tls: TlsPolicy
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    idle_seconds: float = 2.0  # 0: one session per message
    max_idle_per_destination: int = 8
    _idle: dict[SessionKey, list[Parked]] = field(default_factory=dict)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)

    async def _open(self, address: str, port: int, host: str, implicit_tls: bool,
                    verify: bool, strict: bool = False) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=address, port=port, local_hostname=self.helo_name, timeout=self.command_timeout,
            start_tls=False, use_tls=implicit_tls,
            tls_context=self.tls.context(verify, strict) if implicit_tls else None,
        )
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except SMTPResponseException as exc:
            raise HostFailed(Reply.from_smtp(exc.code, exc.message)) from None
        except SMTPException as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise cause from None
            raise HostFailed(replies.connection_failed(f"{host}[{address}]:{port}: {exc}")) from None
        return smtp

    async def _session(self, address: str, port: int, host: str, implicit_tls: bool,
                       outcome: Outcome, require_tls: bool = False) -> aiosmtplib.SMTP:
        """Connected, greeted, EHLO'd and, where offered (or required), under TLS."""
        verify = require_tls or not self.tls.known_unverified(host)
        try:
            smtp = await self._open(address, port, host, implicit_tls, verify, require_tls)
        except ssl.SSLCertVerificationError as exc:
            if require_tls:
                raise HostFailed(self._unverified_refused(host, exc)) from None
            self._log_unverified(host, address, exc)
            smtp = await self._open(address, port, host, implicit_tls, False)
            verify = False
        try:
            await self._hello(smtp)
            if not implicit_tls and (self.tls.starttls or require_tls) and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(server_hostname=host, tls_context=self.tls.context(verify, require_tls))
                except ssl.SSLCertVerificationError as exc:
                    smtp.close()
                    if require_tls:
                        raise HostFailed(self._unverified_refused(host, exc)) from None
                    self._log_unverified(host, address, exc)
                    verify = False
                    smtp = await self._open(address, port, host, False, False)
                    await self._hello(smtp)
                    if not smtp.supports_extension("starttls"):
                        raise HostFailed(Reply(451, "4.7.5", f"{host} stopped offering STARTTLS")) from None
                    await smtp.starttls(server_hostname=host, tls_context=self.tls.context(False))
                await self._hello(smtp)  # RFC 3207 4.2: forget what was said before TLS
            if implicit_tls or smtp.get_transport_info("sslcontext") is not None:
                sslobj = smtp.get_transport_info("ssl_object")
                outcome.tls_version = str(sslobj.version()) if sslobj is not None else "TLS"
                outcome.tls_verified = verify
            if require_tls and not outcome.tls_version:
                raise HostFailed(Reply(451, "4.7.5", f"{host} offers no STARTTLS and MTA-STS requires TLS"))
        except HostFailed:
            smtp.close()
            raise
        except SMTPResponseException as exc:
            smtp.close()
            raise HostFailed(Reply.from_smtp(exc.code, exc.message)) from None
        except (SMTPException, ssl.SSLError, OSError) as exc:
            smtp.close()
            raise HostFailed(replies.connection_failed(f"{host}[{address}]:{port}: {exc}")) from None
        return smtp

    @staticmethod
    def _unverified_refused(host: str, exc: ssl.SSLCertVerificationError) -> Reply:
        return Reply(451, "4.7.5", f"{host}: certificate not verified ({exc.verify_code} "
                                   f"{exc.verify_message}) and MTA-STS requires it")

    def _log_unverified(self, host: str, address: str, exc: ssl.SSLCertVerificationError) -> None:
        self.tls.remember_unverified(host)
        log.warning(replies.TLS_NOT_VERIFIED.format(code=exc.verify_code),
                    extra={"mx": host, "address": address, "verify_message": exc.verify_message})

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPResponseException as exc:
            if not smtp.is_connected or exc.code < 500:
                raise
            await smtp.helo()

    async def deliver(self, address: str, port: int, host: str, envelope: Envelope, *,
                      implicit_tls: bool = False, login: tuple[str, str] | None = None,
                      before_dot: BeforeDot | None = None, require_tls: bool = False,
                      max_recipients: int = 0) -> Outcome:
        """One transaction with ``host`` at ``address``, on an idle session kept from an earlier
        message when there is one, else on a new session; raises :class:`HostFailed` when the
        host could not take part (then the caller tries the next host). ``before_dot`` is called
        with the recipients the remote accepted just before the final dot, so that the queue
        can mark them in flight (a kill after that point may make a duplicate), or withdraw
        the message (the transaction is then reset, and no dot is sent). ``max_recipients``
        (R-LIM-6, 0: no limit) bounds the recipients a connection carries over its messages."""
        outcome = Outcome(host=host, address=address)
        key: SessionKey = (address, port, host, implicit_tls, login, require_tls)
        parked = await self._reuse(key, len(envelope.recipients), max_recipients)
        if parked is not None:
            smtp, sent = parked.smtp, parked.recipients
            outcome.tls_version, outcome.tls_verified = parked.tls_version, parked.tls_verified
            outcome.reused = True
        else:
            smtp, sent = await self._session(address, port, host, implicit_tls, outcome, require_tls), 0
        try:
            if login is not None and parked is None:
                if not outcome.tls_version:
                    raise HostFailed(Reply(451, "4.7.10", f"{host}: no TLS, AUTH credentials withheld"))
                try:
                    await smtp.login(*login)
                except SMTPResponseException as exc:
                    raise HostFailed(Reply.from_smtp(exc.code, exc.message)) from None
            await self._transaction(smtp, envelope, outcome, before_dot)
        except HostFailed:
            smtp.close()
            raise
        except (SMTPException, OSError, TimeoutError) as exc:
            # Lost mid-transaction: whoever has no reply yet gets a temporary one.
            smtp.close()
            lost = replies.connection_lost(f"{host}[{address}]: {exc}")
            for rcpt in envelope.recipients:
                if rcpt not in outcome.replies or outcome.replies[rcpt].ok:
                    outcome.replies[rcpt] = lost
            return outcome
        sent += len(envelope.recipients)
        if outcome.unconfirmed or not smtp.is_connected or (max_recipients and sent >= max_recipients):
            await self._quit(smtp)
        else:
            self._park(key, Parked(smtp, outcome.tls_version, outcome.tls_verified, sent,
                                   time.monotonic() + self.idle_seconds))
        return outcome

    async def _reuse(self, key: SessionKey, recipients: int, max_recipients: int) -> Parked | None:
        """The newest idle session for ``key`` that can take ``recipients`` more and answers a
        RSET; the others found on the way (expired, full, dead) are closed."""
        parked_list = self._idle.get(key)
        while parked_list:
            parked = parked_list.pop()
            if not parked_list:
                del self._idle[key]
            if (parked.until < time.monotonic() or not parked.smtp.is_connected
                    or (max_recipients and parked.recipients + recipients > max_recipients)):
                self._quit_later(parked.smtp)
                parked_list = self._idle.get(key)
                continue
            try:
                await parked.smtp.rset(timeout=min(self.command_timeout, 30.0))
                return parked
            except (SMTPException, OSError, TimeoutError) as exc:
                log.debug("kept session to %s unusable: %s", key[2], exc)
                parked.smtp.close()
            parked_list = self._idle.get(key)
        return None

    def _park(self, key: SessionKey, parked: Parked) -> None:
        parked_list = self._idle.setdefault(key, [])
        if self.idle_seconds <= 0 or len(parked_list) >= self.max_idle_per_destination:
            self._quit_later(parked.smtp)
            if not parked_list:
                del self._idle[key]
            return
        parked_list.append(parked)
        asyncio.get_running_loop().call_later(self.idle_seconds + 0.05, self._expire, key)

    def _expire(self, key: SessionKey) -> None:
        parked_list = self._idle.get(key)
        if not parked_list:
            return
        now = time.monotonic()
        for parked in [p for p in parked_list if p.until <= now]:
            parked_list.remove(parked)
            self._quit_later(parked.smtp)
        if not parked_list:
            del self._idle[key]

    def _quit_later(self, smtp: aiosmtplib.SMTP) -> None:
        task = asyncio.get_running_loop().create_task(self._quit(smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.quit(timeout=10)
        except (SMTPException, OSError, TimeoutError):
            smtp.close()

    async def close_idle(self) -> None:
        """QUIT every kept session (the relay stops)."""
        for parked_list in self._idle.values():
            for parked in parked_list:
                self._quit_later(parked.smtp)
        self._idle.clear()
        if self._closing:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._closing), timeout=10)

    async def _transaction(self, smtp: aiosmtplib.SMTP, envelope: Envelope, outcome: Outcome,
                           before_dot: BeforeDot | None) -> None:
        utf8 = not all(a.isascii() for a in [envelope.sender, *envelope.recipients])
        if utf8 and not smtp.supports_extension("smtputf8"):
            for rcpt in envelope.recipients:
                outcome.replies[rcpt] = replies.SMTPUTF8_REQUIRED
            return
        encoding = "utf-8" if utf8 else "ascii"
        mail_options = []
        if smtp.supports_extension("size"):
            mail_options.append(f"SIZE={len(envelope.data)}")
        if smtp.supports_extension("8bitmime") and not envelope.data.isascii():
            mail_options.append("BODY=8BITMIME")
        if utf8:
            mail_options.append("SMTPUTF8")
        dsn = smtp.supports_extension("dsn")
        if dsn:
            mail_options += [f"{k}={v}" for k, v in envelope.mail_params.items()]
        response = await smtp.execute_command(
            b"MAIL", f"FROM:<{envelope.sender}>".encode(encoding), *(o.encode() for o in mail_options))
        if response.code != 250:
            reply = Reply.from_smtp(response.code, response.message)
            for rcpt in envelope.recipients:
                outcome.replies[rcpt] = reply
            return
        accepted: list[str] = []
        for rcpt in envelope.recipients:
            options = [f"{k}={v}" for k, v in envelope.rcpt_params.get(rcpt, {}).items()] if dsn else []
            response = await smtp.execute_command(
                b"RCPT", f"TO:<{rcpt}>".encode(encoding), *(o.encode() for o in options))
            if response.code in (250, 251):
                accepted.append(rcpt)
            else:
                outcome.replies[rcpt] = Reply.from_smtp(response.code, response.message)
            if not smtp.is_connected:
                break
        for rcpt in envelope.recipients:
            outcome.replies.setdefault(rcpt, replies.connection_lost("closed during RCPT"))
        if not accepted:
            await smtp.rset()
            return
        if before_dot is not None and not await before_dot(accepted):
            outcome.withdrawn = True
            for rcpt in accepted:
                outcome.replies[rcpt] = replies.REMOVED
            await smtp.rset()
            return
        try:
            response = await smtp.data(envelope.data)
            reply = Reply.from_smtp(response.code, response.message)
        except SMTPDataError as exc:
            reply = Reply.from_smtp(exc.code, exc.message)
        except (SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            outcome.unconfirmed = True
            reply = replies.connection_lost(f"no reply to the message data: {exc}")
        for rcpt in accepted:
            outcome.replies[rcpt] = reply
