"""POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), SASL PLAIN and SCRAM-SHA-256 (RFC 5034), the RFC 3206
response codes, and one session per maildrop ([IN-USE]) across replicas.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re

from rempart.common.edgelogin import LoginDecision, LoginOutcome
from rempart.common.mailstore import INBOX, IndexedMessage
from rempart.common.mime import split_header
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.sasl import PLAIN, SCRAM_SHA_256, SaslError, SaslMalformed
from rempart.imap_pop import replies as R
from rempart.imap_pop.imapproto import parse_number
from rempart.imap_pop.session import Session, verdict_text
from rempart.imap_pop.stream import LineTooLong, StreamDesynchronised
from rempart.imap_pop.traces import pop3_command

log = logging.getLogger(__name__)

# RFC 1939 3: commands are printable ASCII words; NUL and other controls never belong (a NUL
# can cut a string short in a later component, a classic injection).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Pop3Session(Session):
    user: str = ""
    messages: list[IndexedMessage]
    uidvalidity: int = 0  # of INBOX when the maildrop was opened: names the folder in the change log
    deleted: set[int]
    closing: bool = False
    locked: bool = False
    _renewer: asyncio.Task[None] | None = None

    def send(self, line: str) -> None:
        self.stream.write(line.encode("utf-8") + b"\r\n")

    async def run(self) -> None:
        self.messages = []
        self.deleted = set()
        try:
            await self._run()
        finally:
            await self._unlock()

    async def _close_with(self, line: str) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self.send(line)
            await self.stream.drain()
            await self.stream.linger(self.backend.settings.linger_seconds)
        self.closing = True

    async def _run(self) -> None:
        verdict = await self.connect_verdict()
        if verdict.action == policy_pb2.ACTION_TEMPFAIL:
            await self.stream.send(R.POP3_TEMPFAIL.encode() + b"\r\n")
            return
        if verdict.action in (policy_pb2.ACTION_REJECT, policy_pb2.ACTION_CLOSE):
            await self.stream.send(f"-ERR {verdict_text(verdict)}\r\n".encode())
            return
        await self.stream.send(R.POP3_GREETING.encode() + b"\r\n")
        while not self.closing:
            if self.backend.draining:
                await self.stream.send(R.POP3_SHUTDOWN.encode() + b"\r\n")
                return
            self.waiting_for_command = True
            try:
                settings = self.backend.settings
                async with asyncio.timeout(
                    settings.pop3_idle_timeout_seconds if self.account else settings.preauth_timeout_seconds
                ):
                    line = await self.stream.readline(R.MAX_LINE)
            except TimeoutError:
                await self.stream.send(R.POP3_AUTOLOGOUT.encode() + b"\r\n")
                return
            except LineTooLong:
                self.send(R.POP3_LINE_TOO_LONG)
                if await self._bad():
                    return
                await self.stream.drain()
                continue
            except StreamDesynchronised:
                await self._close_with(R.POP3_DESYNC)
                return
            finally:
                self.waiting_for_command = False
            if line is None:
                return
            text = line.decode("utf-8", "replace")
            if _CONTROL.search(text):
                self.send(R.POP3_BAD_CHARACTERS)
                if await self._bad():
                    return
                await self.stream.drain()
                continue
            try:
                await pop3_command(self, text, self.dispatch)  # in the command's trace span
            except LineTooLong:
                self.send(R.POP3_LINE_TOO_LONG)
            except TimeoutError:
                await self.stream.send(R.POP3_AUTOLOGOUT.encode() + b"\r\n")
                return
            except StreamDesynchronised:
                await self._close_with(R.POP3_DESYNC)
                return
            except (OSError, ConnectionError):
                return
            except Exception as exc:  # noqa: BLE001 - Redis or NATS failing: fail closed, temporarily
                log.warning("command failed: %s", exc, extra={"session": self.session_id})
                self.send(R.POP3_TEMPFAIL)
            await self.stream.drain()

    async def _bad(self) -> bool:
        self.bad_commands += 1
        if self.bad_commands >= R.MAX_BAD_COMMANDS:
            await self._close_with(R.POP3_TOO_MANY_BAD)
            return True
        return False

    async def dispatch(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if self.account:
            handler = {
                "STAT": self.stat, "LIST": self.list_, "RETR": self.retr, "DELE": self.dele, "NOOP": self.noop,
                "RSET": self.rset, "QUIT": self.quit, "UIDL": self.uidl, "TOP": self.top, "CAPA": self.capa,
            }.get(verb)
        else:
            handler = {
                "USER": self.user_, "PASS": self.pass_, "AUTH": self.auth, "STLS": self.stls,
                "CAPA": self.capa, "QUIT": self.quit_unauthenticated, "NOOP": self.noop,
            }.get(verb)
        if handler is None:
            self.send("-ERR Unknown command")
            await self._bad()
            return
        await handler(arg)

    def sasl_mechanisms(self) -> list[str]:
        # SCRAM never shows the password: offered before TLS as well (R-TLS-2).
        return [PLAIN, SCRAM_SHA_256] if self.plaintext_auth_allowed() else [SCRAM_SHA_256]

    async def capa(self, _arg: str) -> None:
        # RFC 2449 6: what this state offers; USER, SASL and STLS only before login, and the
        # plaintext ones only inside TLS or from a trusted address (R-TLS-2).
        lines = ["+OK Capability list follows", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if not self.account:
            if self.plaintext_auth_allowed():
                lines.append("USER")
            mechanisms = self.sasl_mechanisms()
            if mechanisms:
                lines.append("SASL " + " ".join(mechanisms))
            if self.tls_available():
                lines.append("STLS")
        lines += ["IMPLEMENTATION Rempart", "."]
        for line in lines:
            self.send(line)

    async def noop(self, _arg: str) -> None:
        self.send("+OK")

    async def quit_unauthenticated(self, _arg: str) -> None:
        self.send(R.POP3_BYE)
        self.closing = True

    async def stls(self, _arg: str) -> None:
        if not self.tls_available() or self.backend.tls is None:
            self.send("-ERR STLS not available")
            return
        dropped = await self.stream.start_tls(
            self.backend.tls.context(), self.backend.settings.tls_handshake_timeout_seconds,
            reply=b"+OK Begin TLS negotiation\r\n",
        )
        if dropped:
            log.warning("discarded plaintext pipelined after STLS", extra={"session": self.session_id,
                                                                            "bytes": dropped})
        self.user = ""

    async def user_(self, arg: str) -> None:
        if not self.plaintext_auth_allowed():
            self.send(R.POP3_PLAINTEXT_DISALLOWED)
            return
        if not arg or len(arg) > 320:
            self.send("-ERR Missing or bad user name")
            return
        self.user = arg
        self.send("+OK")

    async def pass_(self, arg: str) -> None:
        if not self.plaintext_auth_allowed():
            self.send(R.POP3_PLAINTEXT_DISALLOWED)
            return
        if not self.user:
            self.send("-ERR USER first")
            return
        user, self.user = self.user, ""
        await self._login(user, arg, "USER")

    async def auth(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            self.send("+OK")
            for name in self.sasl_mechanisms():
                self.send(name)
            self.send(".")
            return
        mechanism = mechanism.upper()
        if mechanism == PLAIN and not self.plaintext_auth_allowed():
            self.send(R.POP3_PLAINTEXT_DISALLOWED)
            return
        if mechanism not in self.sasl_mechanisms():
            self.send("-ERR Unsupported mechanism")
            return
        try:
            decision = await self.sasl_login(mechanism, initial or None, self._continuation)
        except SaslError as exc:
            self.send(f"-ERR {exc}")
            if isinstance(exc, SaslMalformed):
                await self._bad()
            return
        await self._enter_transaction(decision)

    async def _continuation(self, challenge: bytes) -> str | None:
        """``+ <base64>`` and the client's answer line (RFC 5034 4), within the idle timeout
        (a TimeoutError ends the session); None when the client went away."""
        await self.stream.send(b"+ " + base64.b64encode(challenge) + b"\r\n")
        async with asyncio.timeout(self.backend.settings.pop3_idle_timeout_seconds):
            line = await self.stream.readline(R.MAX_LINE)
        if line is None:
            self.closing = True
            return None
        return line.decode("ascii", "replace").strip()

    async def _login(self, login: str, password: str, mechanism: str) -> None:
        await self._enter_transaction(await self.login(login, password, mechanism))

    async def _enter_transaction(self, decision: LoginDecision) -> None:
        if decision.outcome is LoginOutcome.OK:
            try:
                if not await self.backend.lock_maildrop(self.account, self.session_id):
                    log.info("maildrop in use", extra={"session": self.session_id, "account": self.account})
                    self.account = ""
                    self.send(R.POP3_IN_USE)
                    return
                self.locked = True
                self.uidvalidity = (await self.backend.index.status(self.account, INBOX)).uidvalidity
                self.messages = await self.backend.index.messages(self.account, INBOX)
            except Exception as exc:  # noqa: BLE001 - Redis down: fail closed, temporarily
                log.warning("mailbox not readable: %s", exc, extra={"session": self.session_id})
                await self._unlock()
                self.account = ""
                self.send(R.POP3_TEMPFAIL)
                return
            self._renewer = asyncio.create_task(self._renew_lock(self.account), name="pop3-lock")
            self.send(f"+OK Logged in, {len(self.messages)} messages")
            return
        self.send(R.POP3_AUTH_FAILED if decision.outcome is LoginOutcome.FAILED else R.POP3_TEMPFAIL)
        if decision.close:
            self.closing = True

    async def _renew_lock(self, account: str) -> None:
        while True:
            await asyncio.sleep(self.backend.settings.pop3_lock_seconds / 3)
            try:
                if not await self.backend.renew_maildrop(account, self.session_id):
                    log.warning("maildrop lock lost", extra={"session": self.session_id, "account": account})
                    return
            except Exception as exc:  # noqa: BLE001 - Redis blip: the next round retries
                log.warning("maildrop lock not renewed: %s", exc, extra={"session": self.session_id})

    async def _unlock(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        if not self.locked:
            return
        self.locked = False
        try:
            await self.backend.release_maildrop(self.account, self.session_id)
        except Exception as exc:  # noqa: BLE001 - the TTL frees it soon anyway
            log.warning("maildrop lock not released: %s", exc, extra={"session": self.session_id})

    def _message(self, arg: str) -> tuple[int, IndexedMessage] | None:
        text = arg.split(" ")[0]
        index = parse_number(text)
        if index is None or len(text) > 9:
            self.send("-ERR Bad message number")
            return None
        if not 1 <= index <= len(self.messages) or index in self.deleted:
            self.send("-ERR No such message")
            return None
        return index, self.messages[index - 1]

    async def stat(self, _arg: str) -> None:
        live = [m for i, m in enumerate(self.messages, 1) if i not in self.deleted]
        self.send(f"+OK {len(live)} {sum(m.size for m in live)}")

    async def list_(self, arg: str) -> None:
        if arg:
            found = self._message(arg)
            if found:
                self.send(f"+OK {found[0]} {found[1].size}")
            return
        self.send("+OK")
        for i, message in enumerate(self.messages, 1):
            if i not in self.deleted:
                self.send(f"{i} {message.size}")
        self.send(".")

    async def uidl(self, arg: str) -> None:
        if arg:
            found = self._message(arg)
            if found:
                self.send(f"+OK {found[0]} {found[1].transaction_id or found[1].blob}")
            return
        self.send("+OK")
        for i, message in enumerate(self.messages, 1):
            if i not in self.deleted:
                self.send(f"{i} {message.transaction_id or message.blob}")
        self.send(".")

    async def _read(self, message: IndexedMessage) -> bytes | None:
        try:
            return await self.backend.read_content(message)
        except Exception as exc:  # noqa: BLE001 - NATS down or blob missing
            log.warning("blob not readable: %s", exc, extra={"session": self.session_id})
            self.send(R.POP3_TEMPFAIL)
            return None

    def _send_multiline(self, data: bytes) -> None:
        # RFC 1939 3: byte-stuff lines that start with the termination octet.
        if data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
        self.stream.write(data + b".\r\n")

    async def retr(self, arg: str) -> None:
        found = self._message(arg)
        if not found:
            return
        data = await self._read(found[1])
        if data is None:
            return
        self.send(f"+OK {len(data)} octets")
        self._send_multiline(data)

    async def top(self, arg: str) -> None:
        args = arg.split(" ")
        if len(args) != 2 or parse_number(args[1]) is None:
            self.send("-ERR Usage: TOP msg lines")
            return
        found = self._message(args[0])
        if not found:
            return
        data = await self._read(found[1])
        if data is None:
            return
        head, body = split_header(data)
        lines = body.split(b"\r\n")[: int(args[1][:9])]
        self.send("+OK")
        self._send_multiline(head + b"".join(line + b"\r\n" for line in lines))

    async def dele(self, arg: str) -> None:
        found = self._message(arg)
        if found:
            self.deleted.add(found[0])
            self.send(f"+OK Message {found[0]} deleted")

    async def rset(self, _arg: str) -> None:
        self.deleted.clear()
        self.send("+OK")

    async def quit(self, _arg: str) -> None:
        # RFC 1939 6: the UPDATE state removes the messages marked as deleted.
        self.closing = True
        gone = [self.messages[i - 1] for i in sorted(self.deleted)]
        if gone:
            try:
                await self.backend.mailboxes.expunge(self.account, INBOX, self.uidvalidity, gone)
            except Exception as exc:  # noqa: BLE001 - keep the messages; say so
                log.warning("expunge failed: %s", exc, extra={"session": self.session_id})
                self.send("-ERR [SYS/TEMP] Some deleted messages not removed")
                return
            await self.backend.publish_changed(self.account, INBOX)
        # RFC 1939 6: the maildrop is released before the +OK, so a client that reconnects
        # right after it never finds its own old lock.
        await self._unlock()
        self.send(R.POP3_BYE)

