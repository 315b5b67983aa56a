"""POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), SASL PLAIN (RFC 5034) and the
RFC 3206 response codes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from rempart.common.mailstore import INBOX, IndexedMessage, expunge
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.imap_pop import replies as R
from rempart.imap_pop.message import normalise, split_header
from rempart.imap_pop.session import LoginResult, Session, verdict_text
from rempart.imap_pop.stream import LineTooLong, StreamDesynchronised

log = logging.getLogger(__name__)


class Pop3Session(Session):
    user: str = ""
    messages: list[IndexedMessage]
    deleted: set[int]
    closing: bool = False

    def send(self, line: str) -> None:
        self.stream.write(line.encode("utf-8") + b"\r\n")

    async def run(self) -> None:
        self.messages = []
        self.deleted = set()
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
                async with asyncio.timeout(self.backend.settings.pop3_idle_timeout_seconds):
                    line = await self.stream.readline(R.MAX_LINE)
            except TimeoutError:
                await self.stream.send(R.POP3_AUTOLOGOUT.encode() + b"\r\n")
                return
            except LineTooLong:
                self.send("-ERR Line too long")
                if await self._bad():
                    return
                await self.stream.writer.drain()
                continue
            except StreamDesynchronised:
                return
            finally:
                self.waiting_for_command = False
            if line is None:
                return
            try:
                await self.dispatch(line.decode("utf-8", "replace"))
            except LineTooLong:
                self.send("-ERR Line too long")
            except (OSError, ConnectionError, StreamDesynchronised):
                return
            except Exception as exc:  # noqa: BLE001 - Redis or NATS failing: fail closed, temporarily
                log.warning("command failed: %s", exc, extra={"session": self.session_id})
                self.send(R.POP3_TEMPFAIL)
            await self.stream.writer.drain()

    async def _bad(self) -> bool:
        self.bad_commands += 1
        if self.bad_commands >= R.MAX_BAD_COMMANDS:
            self.send(R.POP3_TOO_MANY_BAD)
            await self.stream.writer.drain()
            self.closing = True
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

    async def capa(self, _arg: str) -> None:
        lines = ["+OK Capability list follows", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if not self.account:
            if self.plaintext_auth_allowed():
                lines += ["USER", "SASL PLAIN"]
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
            self.send("PLAIN")
            self.send(".")
            return
        if mechanism.upper() != "PLAIN":
            self.send("-ERR Unsupported mechanism")
            return
        if not self.plaintext_auth_allowed():
            self.send(R.POP3_PLAINTEXT_DISALLOWED)
            return
        if not initial:
            await self.stream.send(b"+ \r\n")
            line = await self.stream.readline(R.MAX_LINE)
            if line is None:
                self.closing = True
                return
            initial = line.decode("ascii", "replace")
        if initial.strip() == "*":
            self.send("-ERR Authentication cancelled")
            return
        try:
            fields = base64.b64decode(initial.strip(), validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            self.send("-ERR Bad base64")
            return
        if len(fields) != 3:
            self.send("-ERR Bad PLAIN response")
            return
        authz, authc, password = (f.decode("utf-8", "replace") for f in fields)
        if authz and authz != authc:
            self.send(R.POP3_AUTH_FAILED)
            return
        await self._login(authc, password, "PLAIN")

    async def _login(self, login: str, password: str, mechanism: str) -> None:
        result, close = await self.login(login, password, mechanism)
        if result is LoginResult.OK:
            try:
                self.messages = await self.backend.index.messages(self.account, INBOX)
            except Exception as exc:  # noqa: BLE001 - Redis down: fail closed, temporarily
                log.warning("mailbox not readable: %s", exc, extra={"session": self.session_id})
                self.account = ""
                self.send(R.POP3_TEMPFAIL)
                return
            self.send(f"+OK Logged in, {len(self.messages)} messages")
            return
        self.send(R.POP3_AUTH_FAILED if result is LoginResult.FAILED else R.POP3_TEMPFAIL)
        if close:
            self.closing = True

    def _message(self, arg: str) -> tuple[int, IndexedMessage] | None:
        number = arg.split(" ")[0]
        if not number.isdigit() or len(number) > 9:
            self.send("-ERR Bad message number")
            return None
        index = int(number)
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
            return normalise(await self.backend.store.read_blob(message.blob))
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
        if len(args) != 2 or not args[1].isdigit():
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
                await expunge(self.backend.store, self.backend.index, self.account, INBOX, gone)
            except Exception as exc:  # noqa: BLE001 - keep the messages; say so
                log.warning("expunge failed: %s", exc, extra={"session": self.session_id})
                self.send("-ERR [SYS/TEMP] Some deleted messages not removed")
                return
            await self.backend.publish_changed(self.account, INBOX)
        self.send(R.POP3_BYE)
