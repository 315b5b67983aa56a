"""IMAP4rev1 (RFC 3501) with IDLE (2177), UIDPLUS (4315), MOVE (6851), NAMESPACE (2342),
ID (2971), ENABLE (5161), LITERAL+ (7888), SASL-IR (4959), UNSELECT (3691), CHILDREN (3348),
SPECIAL-USE (6154), and AUTHENTICATE PLAIN and SCRAM-SHA-256 (RFC 7677, through the auth service).

A mailbox is the canonical account address the auth service returned; its folders, UIDs and
flags are the Redis index (:class:`MailboxIndex`); message bytes come from the blob store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import email.utils
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from rempart.common import mime as M
from rempart.common.edgelogin import LoginDecision, LoginOutcome
from rempart.common.events import mailbox_changed_subject
from rempart.common.mailstore import FLAG_LIMIT, INBOX, BlobUnreadable, IndexedMessage, expunge
from rempart.common.mime import quote
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.sasl import PLAIN, SCRAM_SHA_256, SaslError
from rempart.imap_pop import replies as R
from rempart.imap_pop.imapproto import (
    Atom,
    FetchItem,
    ImapSyntaxError,
    SequenceSet,
    Token,
    compress_numbers,
    in_sequence_set,
    is_nil,
    literal,
    literal_at_end,
    parse_fetch_items,
    parse_sequence_set,
    split_tag,
    text_of,
    tokenize,
    wildcard_match,
)
from rempart.imap_pop.session import Session, verdict_text
from rempart.imap_pop.stream import LineTooLong, StreamDesynchronised

log = logging.getLogger(__name__)

SYSTEM_FLAGS = {"\\SEEN", "\\ANSWERED", "\\FLAGGED", "\\DELETED", "\\DRAFT"}
FLAGS_LIST = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
MAX_FLAGS = 50
MAX_FOLDERS = 1000
MAX_FOLDER_NAME = 200
MAX_LIST_PATTERN = 2 * MAX_FOLDER_NAME + 20
STORE_BATCH = 500  # messages per atomic flag script call
MAX_LITERALS_PER_COMMAND = 16
SEARCH_DECODE_LIMIT = 1024 * 1024
DELIMITER = "/"
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


class CloseSession(Exception):
    """Say nothing more; close the connection."""


class No(Exception):
    """A tagged NO (or BAD when ``bad``) with this text."""

    def __init__(self, text: str, bad: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.bad = bad


@dataclass
class Command:
    tag: str
    name: str
    args: list[Token]
    uid: bool = False


Handler = Callable[[Command], Awaitable[None]]


class ImapSession(Session):
    folder: str | None = None
    readonly: bool = False
    view: list[IndexedMessage]
    uidvalidity: int = 0
    closing: bool = False
    changed: asyncio.Event

    # Output
    def out(self, line: str | bytes) -> None:
        self.stream.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")

    def _command_timeout(self) -> float:
        settings = self.backend.settings
        return settings.imap_idle_timeout_seconds if self.account else settings.preauth_timeout_seconds

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS", "MOVE",
                "UNSELECT", "CHILDREN", "SPECIAL-USE"]
        if not self.account:
            if self.tls_available():
                caps.append("STARTTLS")
            # SCRAM never shows the password: offered before TLS as well (R-TLS-2).
            caps.append("AUTH=SCRAM-SHA-256")
            if self.plaintext_auth_allowed():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        return " ".join(caps)

    # Session loop
    async def run(self) -> None:
        self.view = []
        self.changed = asyncio.Event()
        verdict = await self.connect_verdict()
        if verdict.action == policy_pb2.ACTION_TEMPFAIL:
            await self.stream.send(R.IMAP_BYE_TEMPFAIL.encode() + b"\r\n")
            return
        if verdict.action in (policy_pb2.ACTION_REJECT, policy_pb2.ACTION_CLOSE):
            await self.stream.send(f"* BYE {verdict_text(verdict)}\r\n".encode())
            return
        self.out(f"* OK [CAPABILITY {self.capabilities()}] {R.IMAP_GREETING}")
        await self.stream.writer.drain()
        subscription = None
        try:
            while not self.closing:
                if self.backend.draining:
                    self.out(R.IMAP_BYE_SHUTDOWN)
                    await self.stream.writer.drain()
                    return
                if subscription is None and self.account:
                    subscription = await self.backend.nc.subscribe(
                        mailbox_changed_subject(self.account), cb=self._on_changed
                    )
                try:
                    # One deadline for the whole command, literals included (slow-loris).
                    async with asyncio.timeout(self._command_timeout()):
                        command = await self._next_command()
                except TimeoutError:
                    await self.stream.send(R.IMAP_BYE_AUTOLOGOUT.encode() + b"\r\n")
                    return
                if command is None:
                    return
                await self._execute(command)
                await self.stream.writer.drain()
        except StreamDesynchronised:
            # Over a megabyte without a line end: no next command can be found in it.
            await self._close_with(R.IMAP_BYE_DESYNC)
        except CloseSession:
            return
        finally:
            if subscription is not None:
                try:
                    await subscription.unsubscribe()
                except Exception as exc:  # noqa: BLE001 - NATS gone at shutdown
                    log.debug("unsubscribe failed: %s", exc)

    async def _on_changed(self, _msg: Msg) -> None:
        self.changed.set()

    async def _close_with(self, line: str) -> None:
        """Last words, then drop whatever the client still sends for a moment, then close."""
        with contextlib.suppress(OSError, ConnectionError):
            self.out(line)
            await self.stream.writer.drain()
            await self.stream.linger(self.backend.settings.linger_seconds)

    async def _next_command(self) -> Command | None:
        """Read one complete command; None at end of stream."""
        while True:
            self.waiting_for_command = True
            try:
                line = await self.stream.readline(R.MAX_LINE)
            except LineTooLong:
                self.out(R.IMAP_LINE_TOO_LONG)
                await self._count_bad()
                await self.stream.writer.drain()
                continue
            finally:
                self.waiting_for_command = False
            if line is None:
                return None
            if not line.strip():
                continue
            try:
                tag, name = split_tag(line)
            except ImapSyntaxError as exc:
                self.out(f"* BAD {exc}")
                await self._count_bad()
                await self.stream.writer.drain()
                continue
            parts = await self._read_literals(tag, name, line)
            if parts is None:
                continue
            try:
                tokens = tokenize(parts)
            except ImapSyntaxError as exc:
                self.out(f"{tag} BAD {exc}")
                await self._count_bad()
                continue
            args = tokens[2:]
            if name == "UID":
                if not args or not isinstance(args[0], Atom):
                    self.out(f"{tag} BAD UID needs a command")
                    await self._count_bad()
                    continue
                return Command(tag, str(args[0]).upper(), args[1:], uid=True)
            return Command(tag, name, args)

    async def _read_literals(self, tag: str, name: str, line: bytes) -> list[bytes] | None:
        parts = [line]
        # APPEND carries a message: the server's message size limit (R-LIM-7) bounds it.
        limit = self.backend.config.server.limits.max_message_size if name == "APPEND" else R.MAX_LITERAL
        total = 0
        while (marker := literal_at_end(parts[-1])) is not None:
            total += marker.size
            if total > limit or len(parts) > 2 * MAX_LITERALS_PER_COMMAND:
                if not marker.synchronising:
                    # LITERAL+: the bytes are already on their way; we cannot find the next
                    # command in them, so the stream is lost.
                    self.out(f"{tag} {R.IMAP_LITERAL_TOO_LARGE}")
                    await self._close_with(R.IMAP_BYE_DESYNC)
                    raise CloseSession
                self.out(f"{tag} {R.IMAP_LITERAL_TOO_LARGE}")
                await self._count_bad()
                await self.stream.writer.drain()
                return None
            if marker.synchronising:
                await self.stream.send(b"+ Ready for literal data\r\n")
            data = await self.stream.readexactly(marker.size)
            if data is None:
                raise CloseSession
            parts.append(data)
            try:
                rest = await self.stream.readline(R.MAX_LINE)
            except LineTooLong:
                self.out(f"{tag} BAD Line too long")
                await self._count_bad()
                return None
            if rest is None:
                raise CloseSession
            parts.append(rest)
        return parts

    async def _count_bad(self) -> None:
        self.bad_commands += 1
        if self.bad_commands >= R.MAX_BAD_COMMANDS:
            await self._close_with(R.IMAP_BYE_TOO_MANY_BAD)
            raise CloseSession

    def _handlers(self) -> dict[str, Handler]:
        anywhere: dict[str, Handler] = {
            "CAPABILITY": self.cmd_capability, "NOOP": self.cmd_noop, "LOGOUT": self.cmd_logout,
            "ID": self.cmd_id,
        }
        if not self.account:
            return anywhere | {
                "STARTTLS": self.cmd_starttls, "LOGIN": self.cmd_login, "AUTHENTICATE": self.cmd_authenticate,
            }
        authenticated = anywhere | {
            "SELECT": self.cmd_select, "EXAMINE": self.cmd_select, "LIST": self.cmd_list, "LSUB": self.cmd_list,
            "STATUS": self.cmd_status, "CREATE": self.cmd_create, "DELETE": self.cmd_delete,
            "SUBSCRIBE": self.cmd_subscribe, "UNSUBSCRIBE": self.cmd_subscribe, "RENAME": self.cmd_rename,
            "APPEND": self.cmd_append, "NAMESPACE": self.cmd_namespace, "ENABLE": self.cmd_enable,
            "IDLE": self.cmd_idle,
        }
        if self.folder is None:
            return authenticated
        return authenticated | {
            "CHECK": self.cmd_noop, "CLOSE": self.cmd_close, "UNSELECT": self.cmd_close,
            "EXPUNGE": self.cmd_expunge, "SEARCH": self.cmd_search, "FETCH": self.cmd_fetch,
            "STORE": self.cmd_store, "COPY": self.cmd_copy, "MOVE": self.cmd_copy,
        }

    async def _execute(self, command: Command) -> None:
        handler = self._handlers().get(command.name)
        uid_ok = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"}
        if handler is None or (command.uid and command.name not in uid_ok):
            self.out(f"{command.tag} BAD Unknown command or wrong state")
            await self._count_bad()
            return
        try:
            await handler(command)
        except ImapSyntaxError as exc:
            self.out(f"{command.tag} BAD {exc}")
            await self._count_bad()
        except No as exc:
            self.out(f"{command.tag} {'BAD' if exc.bad else 'NO'} {exc.text}")
            if exc.bad:
                await self._count_bad()
        except (CloseSession, StreamDesynchronised):
            raise
        except (OSError, ConnectionError):
            raise CloseSession from None
        except Exception as exc:  # noqa: BLE001 - Redis or NATS failing: fail closed, temporarily
            log.warning("command failed: %s", exc, extra={"session": self.session_id, "command": command.name})
            self.out(f"{command.tag} {R.IMAP_TEMPFAIL}")

    def ok(self, command: Command, text: str = "") -> None:
        name = f"UID {command.name}" if command.uid else command.name
        self.out(f"{command.tag} OK {text or name + ' completed'}")

    # Any state
    async def cmd_capability(self, command: Command) -> None:
        self.out(f"* CAPABILITY {self.capabilities()}")
        self.ok(command)

    async def cmd_noop(self, command: Command) -> None:
        if self.folder is not None:
            await self.refresh(expunges=True)
        self.ok(command)

    async def cmd_logout(self, command: Command) -> None:
        self.out(R.IMAP_BYE_LOGOUT)
        self.ok(command)
        self.closing = True

    async def cmd_id(self, command: Command) -> None:
        self.out('* ID ("name" "Rempart")')
        self.ok(command)

    # Not authenticated
    async def cmd_starttls(self, command: Command) -> None:
        if not self.tls_available() or self.backend.tls is None:
            raise No("STARTTLS not available", bad=True)
        dropped = await self.stream.start_tls(
            self.backend.tls.context(), self.backend.settings.tls_handshake_timeout_seconds,
            reply=f"{command.tag} OK Begin TLS negotiation now\r\n".encode(),
        )
        if dropped:
            log.warning("discarded plaintext pipelined after STARTTLS",
                        extra={"session": self.session_id, "bytes": dropped})

    async def cmd_login(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ImapSyntaxError("LOGIN needs user name and password")
        if not self.plaintext_auth_allowed():
            raise No(R.IMAP_PRIVACY_REQUIRED[3:])
        await self._login(command, text_of(command.args[0]), text_of(command.args[1]), "LOGIN")

    async def cmd_authenticate(self, command: Command) -> None:
        if not command.args or not isinstance(command.args[0], Atom) or len(command.args) > 2:
            raise ImapSyntaxError("AUTHENTICATE needs a mechanism")
        mechanism = str(command.args[0]).upper()
        if mechanism not in (PLAIN, SCRAM_SHA_256):
            raise No("Unsupported authentication mechanism")
        if mechanism == PLAIN and not self.plaintext_auth_allowed():
            raise No(R.IMAP_PRIVACY_REQUIRED[3:])
        initial = text_of(command.args[1]) if len(command.args) > 1 else None  # SASL-IR (RFC 4959)
        try:
            decision = await self.sasl_login(mechanism, initial, self._continuation)
        except SaslError as exc:
            raise No(str(exc), bad=True) from None
        await self._login_reply(command, decision)

    async def _continuation(self, challenge: bytes) -> str:
        """Send ``+ <base64 challenge>`` and read the client's line (RFC 3501 6.2.2), within the
        command timeout."""
        await self.stream.send(b"+ " + base64.b64encode(challenge) + b"\r\n")
        try:
            async with asyncio.timeout(self.backend.settings.imap_idle_timeout_seconds):
                line = await self.stream.readline(R.MAX_LINE)
        except LineTooLong:
            raise No("Line too long", bad=True) from None
        except TimeoutError:
            await self.stream.send(R.IMAP_BYE_AUTOLOGOUT.encode() + b"\r\n")
            raise CloseSession from None
        if line is None:
            raise CloseSession
        return line.decode("ascii", "replace").strip()

    async def _login(self, command: Command, login: str, password: str, mechanism: str) -> None:
        await self._login_reply(command, await self.login(login, password, mechanism))

    async def _login_reply(self, command: Command, decision: LoginDecision) -> None:
        if decision.outcome is LoginOutcome.OK:
            try:
                await self.backend.provision_folders(self.account)
            except Exception as exc:  # noqa: BLE001 - missing default folders never block a login
                log.warning("default folders not created: %s", exc, extra={"session": self.session_id})
            self.ok(command, f"[CAPABILITY {self.capabilities()}] Logged in")
            return
        failed = decision.outcome is LoginOutcome.FAILED
        self.out(f"{command.tag} {R.IMAP_AUTH_FAILED if failed else R.IMAP_TEMPFAIL}")
        if decision.close:
            # Policy's own words: "Intrusion prevention active for [ip]" when this login blocked it.
            self.out(f"* BYE {verdict_text(decision.verdict or policy_pb2.Verdict(), 'Connection closed by policy')}")
            await self.stream.writer.drain()
            raise CloseSession

    # Authenticated
    def _folder_name(self, token: Token) -> str:
        name = text_of(token)
        if name.upper() == "INBOX":
            return INBOX
        if (not name or len(name) > MAX_FOLDER_NAME or any(c in name for c in "*%{}\r\n\0\\\"")
                or name.startswith(DELIMITER) or name.endswith(DELIMITER) or "//" in name):
            raise No("[CANNOT] Invalid mailbox name")
        return name

    async def cmd_select(self, command: Command) -> None:
        if len(command.args) < 1:
            raise ImapSyntaxError("SELECT needs a mailbox")
        self.folder = None
        self.view = []
        folder = self._folder_name(command.args[0])
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[NONEXISTENT] No such mailbox")
        status = await self.backend.index.status(self.account, folder)
        self.view = await self.backend.index.messages(self.account, folder)
        self.folder = folder
        self.readonly = command.name == "EXAMINE"
        self.uidvalidity = status.uidvalidity
        self.changed.clear()
        self.out(f"* FLAGS {FLAGS_LIST}")
        self.out(f"* {len(self.view)} EXISTS")
        self.out("* 0 RECENT")
        unseen = next((i for i, m in enumerate(self.view, 1) if "\\Seen" not in m.flags), None)
        if unseen is not None:
            self.out(f"* OK [UNSEEN {unseen}] First unseen")
        self.out(f"* OK [UIDVALIDITY {status.uidvalidity}] UIDs valid")
        self.out(f"* OK [UIDNEXT {status.uidnext}] Predicted next UID")
        permanent = "()" if self.readonly else "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
        self.out(f"* OK [PERMANENTFLAGS {permanent}] Limited")
        self.ok(command, f"[{'READ-ONLY' if self.readonly else 'READ-WRITE'}] {command.name} completed")

    async def cmd_list(self, command: Command) -> None:
        # RFC 5258 syntax is accepted (clients that know SPECIAL-USE send "LIST (SPECIAL-USE)
        # ..."): selection options, a list of patterns, RETURN options.
        args = list(command.args)
        only_special = False
        if command.name == "LIST" and args and isinstance(args[0], list):
            selection = args.pop(0)
            assert isinstance(selection, list)
            only_special = "SPECIAL-USE" in {text_of(o).upper() for o in selection}
        if command.name == "LIST" and len(args) == 4 and isinstance(args[2], Atom) and args[2].upper() == "RETURN":
            args = args[:2]
        if len(args) != 2:
            raise ImapSyntaxError(f"{command.name} needs reference and pattern")
        reference = text_of(args[0])
        patterns = [text_of(p) for p in args[1][:20]] if isinstance(args[1], list) else [text_of(args[1])]
        if len(reference) + max((len(p) for p in patterns), default=0) > MAX_LIST_PATTERN:
            # No folder name is longer: such a pattern can only cost time (matching is
            # pattern x name per folder).
            raise ImapSyntaxError("LIST pattern too long")
        if patterns == [""]:
            self.out(f'* {command.name} (\\Noselect) "{DELIMITER}" ""')
            self.ok(command)
            return
        folders = (await self.backend.index.folders(self.account))[:MAX_FOLDERS]
        uses = await self.backend.special_uses(self.account)
        names = set(folders)
        # A folder whose parent does not exist (deleted, or made by another server) still
        # needs its parent listed, as \Noselect, for "%" listings (RFC 3501 6.3.8).
        implied = {DELIMITER.join(f.split(DELIMITER)[:i]) for f in folders for i in range(1, f.count(DELIMITER) + 1)}
        for folder in sorted(names | implied, key=lambda n: (n != INBOX, n)):
            if not any(wildcard_match(reference + p, folder) or (p.upper() == "INBOX" and folder == INBOX)
                       for p in patterns):
                continue
            if only_special and folder not in uses:
                continue
            children = any(n.startswith(folder + DELIMITER) for n in names)
            attributes = ["\\HasChildren" if children else "\\HasNoChildren"]
            if folder not in names:
                attributes.insert(0, "\\Noselect")
            if folder in uses:
                attributes.append(uses[folder])
            self.out(f'* {command.name} ({" ".join(attributes)}) "{DELIMITER}" {quote(folder)}')
        self.ok(command)

    async def cmd_status(self, command: Command) -> None:
        if len(command.args) != 2 or not isinstance(command.args[1], list):
            raise ImapSyntaxError("STATUS needs a mailbox and a list")
        folder = self._folder_name(command.args[0])
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[NONEXISTENT] No such mailbox")
        status = await self.backend.index.status(self.account, folder)
        out = []
        messages: list[IndexedMessage] | None = None
        for item in command.args[1]:
            name = text_of(item).upper()
            if name == "MESSAGES":
                out.append(f"MESSAGES {status.exists}")
            elif name == "RECENT":
                out.append("RECENT 0")
            elif name == "UIDNEXT":
                out.append(f"UIDNEXT {status.uidnext}")
            elif name == "UIDVALIDITY":
                out.append(f"UIDVALIDITY {status.uidvalidity}")
            elif name == "UNSEEN":
                if messages is None:
                    messages = await self.backend.index.messages(self.account, folder)
                unseen = sum(1 for m in messages if "\\Seen" not in m.flags)
                out.append(f"UNSEEN {unseen}")
            else:
                raise ImapSyntaxError("unknown STATUS item")
        self.out(f"* STATUS {quote(folder)} ({' '.join(out)})")
        self.ok(command)

    async def cmd_create(self, command: Command) -> None:
        if len(command.args) != 1:
            raise ImapSyntaxError("CREATE needs a mailbox")
        folder = self._folder_name(command.args[0])
        folders = await self.backend.index.folders(self.account)
        if folder in folders:
            raise No("[ALREADYEXISTS] Mailbox exists")
        await self._create_with_parents(folder, folders)
        self.ok(command)

    async def _create_with_parents(self, folder: str, folders: list[str]) -> None:
        """RFC 3501 6.3.3: creating a/b/c also creates a and a/b when they are missing."""
        pieces = folder.split(DELIMITER)
        wanted = [DELIMITER.join(pieces[:i]) for i in range(1, len(pieces) + 1)]
        missing = [name for name in wanted if name not in folders and name.upper() != INBOX]
        if len(folders) + len(missing) > MAX_FOLDERS:
            raise No("[LIMIT] Too many mailboxes")
        for name in missing:
            await self.backend.index.create_folder(self.account, name)

    async def cmd_delete(self, command: Command) -> None:
        if len(command.args) != 1:
            raise ImapSyntaxError("DELETE needs a mailbox")
        folder = self._folder_name(command.args[0])
        if folder == INBOX:
            raise No("[CANNOT] INBOX cannot be deleted")
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[NONEXISTENT] No such mailbox")
        # RFC 3501 6.3.4: the mailbox goes with its messages (Thunderbird's "Empty Trash"
        # deletes folders that still hold mail); each removal is a durable tombstone first.
        doomed = await self.backend.index.messages(self.account, folder)
        await expunge(self.backend.store, self.backend.index, self.account, folder, doomed)
        await self.backend.delete_folder(self.account, folder)
        await self.backend.move_special_use(self.account, folder, None)
        if self.folder == folder:
            self.folder = None
            self.view = []
        await self.backend.publish_changed(self.account, folder)
        self.ok(command)

    async def cmd_rename(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ImapSyntaxError("RENAME needs two mailbox names")
        source = self._folder_name(command.args[0])
        target = self._folder_name(command.args[1])
        folders = await self.backend.index.folders(self.account)
        if source not in folders:
            raise No("[NONEXISTENT] No such mailbox")
        if target == INBOX or target in folders:
            raise No("[ALREADYEXISTS] Target mailbox exists")
        if target.startswith(source + DELIMITER):
            raise No("[CANNOT] A mailbox cannot be moved into itself")
        # Inferior names move along, except under INBOX (RFC 3501 6.3.5).
        moves = [(source, target)]
        if source != INBOX:
            moves += [(f, target + f[len(source):]) for f in folders if f.startswith(source + DELIMITER)]
        if any(new in folders for _, new in moves):
            raise No("[ALREADYEXISTS] Target mailbox exists")
        await self._create_with_parents(target, folders)
        for old, new in moves:
            await self._move_folder_contents(old, new)
            if old != INBOX:
                await self.backend.delete_folder(self.account, old)
                await self.backend.move_special_use(self.account, old, new)
            await self.backend.publish_changed(self.account, old)
        if self.folder in {old for old, _ in moves}:
            self.folder = None
            self.view = []
        self.ok(command)

    async def _move_folder_contents(self, old: str, new: str) -> None:
        """Through the durable path: each message is a new delivery record in ``new`` and a
        tombstone in ``old``, so a rebuilt index shows the rename (renaming INBOX moves its mail
        to the new folder and leaves INBOX empty, RFC 3501 6.3.5)."""
        await self.backend.index.create_folder(self.account, new)
        messages = await self.backend.index.messages(self.account, old)
        for message in messages:
            data = await self._content(message)
            record, seq = await self.backend.store.append(self.account, new, data, sorted(message.flags),
                                                        message.internal_date_ms)
            await self.backend.index.apply(record, M.summarize(data), seq=seq)
        await expunge(self.backend.store, self.backend.index, self.account, old, messages)

    async def cmd_subscribe(self, command: Command) -> None:
        # Every folder is listed in LSUB: subscriptions are accepted and need no state.
        if len(command.args) != 1:
            raise ImapSyntaxError(f"{command.name} needs a mailbox")
        self._folder_name(command.args[0])
        self.ok(command)

    async def cmd_namespace(self, command: Command) -> None:
        self.out(f'* NAMESPACE (("" "{DELIMITER}")) NIL NIL')
        self.ok(command)

    async def cmd_enable(self, command: Command) -> None:
        self.out("* ENABLED")
        self.ok(command)

    async def cmd_append(self, command: Command) -> None:
        args = command.args
        if len(args) < 2 or not isinstance(args[-1], bytes):
            raise ImapSyntaxError("APPEND needs a mailbox and a literal")
        folder = self._folder_name(args[0])
        flags: list[str] = []
        internal_date_ms = 0
        for extra in args[1:-1]:
            if isinstance(extra, list):
                flags = sorted(self._parse_flags(extra))
            elif isinstance(extra, str) and (parsed := _parse_datetime(extra)) is not None:
                internal_date_ms = parsed
            else:
                raise ImapSyntaxError("bad APPEND argument")
        data = args[-1]
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[TRYCREATE] No such mailbox")
        record, seq = await self.backend.store.append(self.account, folder, data, flags, internal_date_ms)
        uids = await self.backend.index.apply(record, M.summarize(data), seq=seq)
        status = await self.backend.index.status(self.account, folder)
        await self.backend.publish_changed(self.account, folder)
        if self.folder == folder:
            await self.refresh(expunges=False)
        self.ok(command, f"[APPENDUID {status.uidvalidity} {uids.get(self.account, 0)}] APPEND completed")

    async def cmd_idle(self, command: Command) -> None:
        await self.stream.send(b"+ idling\r\n")
        self.changed.clear()
        settings = self.backend.settings
        deadline = asyncio.get_running_loop().time() + settings.imap_idle_timeout_seconds
        keepalive_at = asyncio.get_running_loop().time() + settings.idle_keepalive_seconds
        line_task = asyncio.ensure_future(self.stream.readline(R.MAX_LINE))
        self.waiting_for_command = True
        try:
            while True:
                if self.folder is not None:
                    await self.refresh(expunges=True)
                    await self.stream.writer.drain()
                changed_task = asyncio.ensure_future(self.changed.wait())
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    changed_task.cancel()
                    await self.stream.send(R.IMAP_BYE_AUTOLOGOUT.encode() + b"\r\n")
                    raise CloseSession
                done, _ = await asyncio.wait(
                    {line_task, changed_task}, timeout=min(settings.idle_poll_seconds, remaining),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                changed_task.cancel()
                self.changed.clear()
                if line_task in done:
                    break
                if asyncio.get_running_loop().time() >= keepalive_at:
                    self.out(R.IMAP_IDLE_KEEPALIVE)
                    keepalive_at = asyncio.get_running_loop().time() + settings.idle_keepalive_seconds
        finally:
            self.waiting_for_command = False
            if not line_task.done():
                line_task.cancel()
        try:
            line = line_task.result()
        except LineTooLong:
            raise No("Line too long", bad=True) from None
        if line is None:
            raise CloseSession
        if line.strip().upper() != b"DONE":
            raise No("Expected DONE", bad=True)
        self.ok(command, "IDLE terminated")

    # Selected
    async def refresh(self, expunges: bool) -> None:
        """Tell the client what changed since it last looked (RFC 3501 7.3, 7.4.1)."""
        if self.folder is None:
            return
        current = await self.backend.index.messages(self.account, self.folder)
        by_uid = {m.uid: m for m in current}
        if expunges:
            for seq in range(len(self.view), 0, -1):
                if self.view[seq - 1].uid not in by_uid:
                    del self.view[seq - 1]
                    self.out(f"* {seq} EXPUNGE")
        for seq, old in enumerate(self.view, 1):
            new = by_uid.get(old.uid)
            if new is not None and new.flags != old.flags:
                self.view[seq - 1] = new
                self.out(f"* {seq} FETCH (FLAGS {_flags(new.flags)})")
        highest = self.view[-1].uid if self.view else 0
        added = [m for m in current if m.uid > highest]
        if added:
            self.view.extend(added)
            self.out(f"* {len(self.view)} EXISTS")
            # RFC 3501 7.3.2: RECENT accompanies a size change. No message is ever \Recent
            # here (sessions on many replicas cannot agree on "first to see it"): always 0.
            self.out("* 0 RECENT")

    def _select(self, text: str, uid: bool) -> list[tuple[int, IndexedMessage]]:
        if uid:
            largest = self.view[-1].uid if self.view else 0
            ranges = parse_sequence_set(text, largest)
            # RFC 3501 6.4.8: "n:*" always includes the highest UID, even below n.
            return [(i, m) for i, m in enumerate(self.view, 1) if in_sequence_set(m.uid, ranges)
                    or (m is self.view[-1] and _star_range_hits(text, ranges, m.uid))]
        ranges = parse_sequence_set(text, len(self.view))
        if any(high > len(self.view) for _, high in ranges):
            raise No("Invalid message sequence number", bad=True)
        return [(i, m) for i, m in enumerate(self.view, 1) if in_sequence_set(i, ranges)]

    async def _content(self, message: IndexedMessage) -> bytes:
        return M.normalise(await self.backend.store.read_message(message))

    async def _contents(self, messages: list[IndexedMessage]) -> dict[int, bytes | BaseException]:
        """Read several messages at once (a few requests in flight): uid -> bytes or the error."""
        gate = asyncio.Semaphore(FETCH_READS_IN_FLIGHT)

        async def one(message: IndexedMessage) -> bytes | BaseException:
            async with gate:
                try:
                    return await self._content(message)
                except (BlobUnreadable, TimeoutError, OSError, NatsError) as exc:
                    return exc

        results = await asyncio.gather(*(one(m) for m in messages))
        return {m.uid: r for m, r in zip(messages, results, strict=True)}

    async def _search_contents(self, messages: list[IndexedMessage], query: _Query) -> dict[int, bytes]:
        """What SEARCH matches against: the header block from the index when the keys need
        no more, else the message (an unreadable one fails the SEARCH: its answer would be wrong)."""
        header_of: dict[int, bytes] = {}
        if not query.needs_body and self.folder is not None:
            summaries = await self.backend.index.summaries(self.account, self.folder, (m.uid for m in messages))
            header_of = {uid: s.header for uid, s in summaries.items() if s is not None and s.has_header}
        contents = await self._contents([m for m in messages if m.uid not in header_of])
        for uid, read in contents.items():
            if isinstance(read, BaseException):
                raise read
            header_of[uid] = read
        return header_of

    async def cmd_fetch(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ImapSyntaxError("FETCH needs a sequence set and items")
        selected = self._select(text_of(command.args[0]), command.uid)
        items = parse_fetch_items(command.args[1])
        if command.uid and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))
        plan = _FetchPlan(items)
        sets_seen = not self.readonly and any(
            (i.name == "BODY" and i.bracketed) or i.name in ("RFC822", "RFC822.TEXT") for i in items
        )
        unreadable = 0
        for window in _read_windows(selected, plan.needs_body):
            summaries: dict[int, M.MessageSummary | None] = {}
            if plan.needs_summary and self.folder is not None:
                summaries = await self.backend.index.summaries(self.account, self.folder, (m.uid for _, m in window))
            # The body is read only where the index cannot answer (R-MBX-2: a header sync reads no blob).
            to_read = [m for _, m in window if plan.needs_body or (plan.needs_summary and not _answers(
                summaries.get(m.uid), plan))]
            contents = await self._contents(to_read) if to_read else {}
            answer: list[bytes] = []
            for seq, message in window:
                read = contents.get(message.uid)
                if isinstance(read, BaseException):
                    # One unreadable message gets no FETCH line; the others are still served,
                    # and the tagged NO below says so (RFC 3501 7.1.2).
                    log.warning("message not readable: %s", read,
                                extra={"session": self.session_id, "uid": message.uid})
                    unreadable += 1
                    continue
                data = read if read is not None else b""
                summary = summaries.get(message.uid)
                if plan.needs_summary and summary is None and read is not None:
                    summary = M.summarize(data)
                    if self.folder is not None:
                        await self.backend.index.store_summary(self.account, self.folder, message.uid, summary)
                flags_changed = False
                if sets_seen and "\\Seen" not in message.flags:
                    message = await self._add_seen(seq, message)
                    flags_changed = True
                parts = [self._fetch_one(item, message, data, summary) for item in items]
                if flags_changed and not any(i.name == "FLAGS" for i in items):
                    parts.append(f"FLAGS {_flags(message.flags)}".encode())
                answer.append(f"* {seq} FETCH (".encode() + b" ".join(parts) + b")\r\n")
            self.stream.write(b"".join(answer))
            # Backpressure (R-MBX-6): a client that stops reading stops the FETCH, instead of
            # the replica buffering the whole answer.
            if self.stream.writer.transport.get_write_buffer_size() > FETCH_WRITE_HIGH_WATER:
                await self.stream.writer.drain()
        if unreadable:
            raise No(f"[UNAVAILABLE] {unreadable} message(s) could not be read now, try again")
        self.ok(command)

    def _fetch_one(self, item: FetchItem, message: IndexedMessage, data: bytes,
                   summary: M.MessageSummary | None) -> bytes:
        name = item.name
        if name == "UID":
            return f"UID {message.uid}".encode()
        if name == "FLAGS":
            return f"FLAGS {_flags(message.flags)}".encode()
        if name == "RFC822.SIZE":
            return f"RFC822.SIZE {summary.size if summary is not None else message.size}".encode()
        if name == "INTERNALDATE":
            return f'INTERNALDATE "{_internal_date(message.internal_date_ms)}"'.encode()
        if name == "ENVELOPE" and summary is not None:
            return f"ENVELOPE {summary.envelope}".encode()
        if name in ("BODYSTRUCTURE", "BODY") and not item.bracketed and summary is not None:
            return f"{name} {summary.bodystructure if name == 'BODYSTRUCTURE' else summary.body}".encode()
        if name == "RFC822.HEADER":
            header = summary.header if summary is not None and _header_from_summary(summary, data) \
                else M.split_header(data)[0]
            return b"RFC822.HEADER " + literal(header)
        if name == "RFC822":
            return b"RFC822 " + literal(data)
        if name == "RFC822.TEXT":
            return b"RFC822.TEXT " + literal(M.split_header(data)[1])
        if not item.part and item.section in _HEADER_SECTIONS and _header_from_summary(summary, data):
            assert summary is not None
            content = M.section_bytes(summary.header, (), item.section, item.fields)
        else:
            content = M.section_bytes(data, item.part, item.section, item.fields)
        if item.partial is not None:
            start, count = item.partial
            content = content[start : start + count]
        return item.response_name().encode() + b" " + literal(content)

    async def _add_seen(self, seq: int, message: IndexedMessage) -> IndexedMessage:
        assert self.folder is not None
        after = await self.backend.index.change_flags(self.account, self.folder, [message.uid], "add", {"\\Seen"})
        return self._keep_flags(seq, message, after.get(message.uid) or message.flags | {"\\Seen"})

    def _keep_flags(self, seq: int, message: IndexedMessage, flags: frozenset[str]) -> IndexedMessage:
        updated = IndexedMessage(message.uid, message.blob, message.size, message.internal_date_ms,
                                 flags, message.transaction_id)
        self.view[seq - 1] = updated
        return updated

    def _parse_flags(self, tokens: list[Token]) -> set[str]:
        flags: set[str] = set()
        for token in tokens:
            if not isinstance(token, Atom) or not token:
                raise ImapSyntaxError("bad flag")
            flag = str(token)
            if flag.startswith("\\"):
                if flag.upper() == "\\RECENT":
                    continue
                if flag.upper() not in SYSTEM_FLAGS:
                    raise ImapSyntaxError("unknown system flag")
                flag = flag[0] + flag[1].upper() + flag[2:].lower()
            elif any(c in flag for c in "[]") or len(flag) > 64:
                raise ImapSyntaxError("bad keyword")
            flags.add(flag)
        if len(flags) > MAX_FLAGS:
            raise No("[LIMIT] Too many flags")
        return flags

    async def cmd_store(self, command: Command) -> None:
        if len(command.args) != 3 or not isinstance(command.args[1], Atom):
            raise ImapSyntaxError("STORE needs a sequence set, an item and flags")
        if self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        selected = self._select(text_of(command.args[0]), command.uid)
        item = str(command.args[1]).upper()
        silent = item.endswith(".SILENT")
        mode = item.removesuffix(".SILENT")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise ImapSyntaxError("bad STORE item")
        value = command.args[2]
        flags = self._parse_flags(value if isinstance(value, list) else [value])
        if len(flags) > MAX_FLAGS:
            raise No("[LIMIT] Too many flags")
        assert self.folder is not None
        over_limit = False
        change = {"FLAGS": "set", "+FLAGS": "add", "-FLAGS": "remove"}[mode]
        for start in range(0, len(selected), STORE_BATCH):
            batch = selected[start : start + STORE_BATCH]
            # Each message changes atomically in the index (R-MBX-3): another session's flags,
            # set meanwhile, are kept, and the answer shows them.
            after = await self.backend.index.change_flags(
                self.account, self.folder, [m.uid for _, m in batch], change, flags, MAX_FLAGS)
            for seq, message in batch:
                now = after.get(message.uid)
                if now is None:
                    continue  # expunged by another session; its EXPUNGE comes with the next refresh
                if FLAG_LIMIT in now:
                    over_limit, now = True, now - {FLAG_LIMIT}
                message = self._keep_flags(seq, message, now)
                if not silent:
                    uid = f"UID {message.uid} " if command.uid else ""
                    self.out(f"* {seq} FETCH ({uid}FLAGS {_flags(message.flags)})")
        if selected:
            await self.backend.publish_changed(self.account, self.folder)
        if over_limit:
            raise No("[LIMIT] Too many flags")
        self.ok(command)

    async def _expunge(self, doomed: list[tuple[int, IndexedMessage]], announce: bool) -> None:
        assert self.folder is not None
        if not doomed:
            return
        await expunge(self.backend.store, self.backend.index, self.account, self.folder, [m for _, m in doomed])
        for seq, _ in sorted(doomed, key=lambda x: x[0], reverse=True):
            del self.view[seq - 1]
            if announce:
                self.out(f"* {seq} EXPUNGE")
        await self.backend.publish_changed(self.account, self.folder)

    async def cmd_expunge(self, command: Command) -> None:
        if self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        doomed = [(i, m) for i, m in enumerate(self.view, 1) if "\\Deleted" in m.flags]
        if command.uid:
            if len(command.args) != 1:
                raise ImapSyntaxError("UID EXPUNGE needs a UID set")
            wanted = {m.uid for _, m in self._select(text_of(command.args[0]), uid=True)}
            doomed = [(i, m) for i, m in doomed if m.uid in wanted]
        await self._expunge(doomed, announce=True)
        self.ok(command)

    async def cmd_close(self, command: Command) -> None:
        if command.name == "CLOSE" and not self.readonly:
            # RFC 3501 6.4.2: CLOSE expunges silently.
            await self._expunge([(i, m) for i, m in enumerate(self.view, 1) if "\\Deleted" in m.flags],
                                announce=False)
        self.folder = None
        self.view = []
        self.ok(command)

    async def cmd_copy(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ImapSyntaxError(f"{command.name} needs a sequence set and a mailbox")
        if command.name == "MOVE" and self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        selected = self._select(text_of(command.args[0]), command.uid)
        target = self._folder_name(command.args[1])
        if not await self.backend.folder_exists(self.account, target):
            raise No("[TRYCREATE] No such mailbox")
        source_uids, target_uids = [], []
        for _, message in selected:
            data = await self._content(message)
            # RFC 3501 6.4.7: the copy keeps its flags and internal date.
            record, seq = await self.backend.store.append(self.account, target, data, sorted(message.flags),
                                                        message.internal_date_ms)
            uids = await self.backend.index.apply(record, M.summarize(data), seq=seq)
            source_uids.append(message.uid)
            target_uids.append(uids[self.account])
        status = await self.backend.index.status(self.account, target)
        await self.backend.publish_changed(self.account, target)
        code = ""
        if source_uids:
            # RFC 4315: both sets in the same order; UIDs are handed out ascending, so
            # compressing each keeps the pairing.
            code = f"[COPYUID {status.uidvalidity} {compress_numbers(source_uids)} {compress_numbers(target_uids)}] "
        if command.name == "MOVE":
            if code:
                self.out(f"* OK {code}Moved")
            await self._expunge(selected, announce=True)
            self.ok(command)
            return
        self.ok(command, f"{code}{'UID ' if command.uid else ''}COPY completed")

    async def cmd_search(self, command: Command) -> None:
        args = list(command.args)
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
            if text_of(args[1]).upper() not in ("UTF-8", "US-ASCII"):
                raise No("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
            args = args[2:]
        if not args:
            raise ImapSyntaxError("SEARCH needs criteria")
        query = _SearchParser(args, len(self.view), self.view[-1].uid if self.view else 0).parse()
        found: list[int] = []
        numbered = list(enumerate(self.view, 1))
        for window in _read_windows(numbered, query.needs_body) if query.needs_content else [numbered]:
            contents = await self._search_contents([m for _, m in window], query) if query.needs_content else {}
            for seq, message in window:
                if query.match(seq, message, contents.get(message.uid, b"")):
                    found.append(message.uid if command.uid else seq)
        self.out("* SEARCH" + "".join(f" {n}" for n in found))
        self.ok(command)


def _star_range_hits(text: str, ranges: SequenceSet, uid: int) -> bool:
    return "*" in text and any(high == uid for _, high in ranges)


def _flags(flags: frozenset[str]) -> str:
    return "(" + " ".join(sorted(flags)) + ")"


def _internal_date(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return f"{moment.day:02d}-{MONTHS[moment.month - 1]}-{moment.year:04d} {moment:%H:%M:%S} +0000"


def _parse_date(text: str) -> datetime.date | None:
    try:
        day, month, year = text.split("-")
        return datetime.date(int(year), MONTHS.index(month.capitalize()) + 1, int(day))
    except ValueError:
        return None


def _parse_datetime(text: str) -> int | None:
    """An APPEND date-time (RFC 3501 9: ``"dd-Mon-yyyy hh:mm:ss +zzzz"``, day possibly
    space-padded) as Unix milliseconds; it becomes the message's INTERNALDATE (R-MBX-7)."""
    try:
        moment = datetime.datetime.strptime(" ".join(text.split()), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None
    return int(moment.timestamp() * 1000)


class _Query:
    def __init__(self, test: Callable[[int, IndexedMessage, bytes], bool], needs_content: bool,
                 needs_body: bool) -> None:
        self.test = test
        self.needs_content = needs_content
        self.needs_body = needs_body

    def match(self, seq: int, message: IndexedMessage, content: bytes) -> bool:
        return self.test(seq, message, content)


def _flag_test(flag: str, present: bool) -> Callable[[int, IndexedMessage, bytes], bool]:
    return lambda _s, m, _c: (flag in m.flags) == present


def _header_test(name: str, value: str) -> Callable[[int, IndexedMessage, bytes], bool]:
    needle = value.lower()

    def test(_s: int, _m: IndexedMessage, content: bytes) -> bool:
        head = M.split_header(content)[0]
        for field_name, raw in M.header_lines(head):
            if field_name == name.upper():
                text = " ".join(raw.decode("utf-8", "replace").split(":", 1)[-1].split())
                # R-MBX-7: "Café" is found whether the sender wrote it in UTF-8 (RFC 6532) or as
                # an RFC 2047 encoded word.
                if needle in text.lower() or needle in M.decode_words(text).lower():
                    return True
        return False

    return test


def _text_test(value: str, body_only: bool, parser: _SearchParser) -> Callable[[int, IndexedMessage, bytes], bool]:
    """BODY / TEXT: the raw octets, and for messages up to SEARCH_DECODE_LIMIT the decoded text
    parts (base64, quoted-printable, charsets), case-insensitively."""
    parser.needs_content = parser.needs_body = True
    raw_needle = value.lower().encode("utf-8")
    needle = value.casefold()

    def test(_s: int, _m: IndexedMessage, content: bytes) -> bool:
        raw = M.split_header(content)[1] if body_only else content
        if raw_needle in raw.lower():
            return True
        if len(content) > SEARCH_DECODE_LIMIT:
            return False
        return needle in M.text_for_search(content, body_only).casefold()

    return test


def _sent_date_test(key: str, day: datetime.date) -> Callable[[int, IndexedMessage, bytes], bool]:
    """SENT*: the Date header's day, in its own time zone (RFC 3501 6.4.4)."""

    def test(_s: int, _m: IndexedMessage, content: bytes) -> bool:
        head = M.split_header(content)[0]
        value = next((raw.split(b":", 1)[1] for name, raw in M.header_lines(head) if name == "DATE"), None)
        if value is None:
            return False
        try:
            sent = email.utils.parsedate_to_datetime(value.decode("ascii", "replace").strip()).date()
        except (TypeError, ValueError, IndexError):
            return False
        return sent < day if key == "SENTBEFORE" else sent == day if key == "SENTON" else sent >= day

    return test


class _SearchParser:
    """SEARCH keys (RFC 3501 6.4.4), the common ones."""

    def __init__(self, tokens: list[Token], largest_seq: int, largest_uid: int) -> None:
        self.tokens = tokens
        self.pos = 0
        self.largest_seq = largest_seq
        self.largest_uid = largest_uid
        self.needs_content = False  # header fields at least (the index's summary has them)
        self.needs_body = False  # BODY / TEXT: the message itself

    def parse(self) -> _Query:
        tests = []
        while self.pos < len(self.tokens):
            tests.append(self._key())
        return _Query(lambda s, m, c: all(t(s, m, c) for t in tests), self.needs_content, self.needs_body)

    def _next(self) -> Token:
        if self.pos >= len(self.tokens):
            raise ImapSyntaxError("search criteria end too early")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _key(self) -> Callable[[int, IndexedMessage, bytes], bool]:
        token = self._next()
        if isinstance(token, list):
            inner = _SearchParser(token, self.largest_seq, self.largest_uid)
            query = inner.parse()
            self.needs_content |= inner.needs_content
            self.needs_body |= inner.needs_body
            return query.test
        key = text_of(token).upper()
        flags = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "FLAGGED": "\\Flagged", "SEEN": "\\Seen",
                 "DRAFT": "\\Draft"}
        if key == "ALL" or key == "OLD":
            return lambda _s, _m, _c: True
        if key in ("NEW", "RECENT"):
            return lambda _s, _m, _c: False
        if key in flags:
            return _flag_test(flags[key], True)
        if key.startswith("UN") and key[2:] in flags:
            return _flag_test(flags[key[2:]], False)
        if key in ("KEYWORD", "UNKEYWORD"):
            return _flag_test(text_of(self._next()), key == "KEYWORD")
        if key == "NOT":
            negated = self._key()
            return lambda s, m, c: not negated(s, m, c)
        if key == "OR":
            left, right = self._key(), self._key()
            return lambda s, m, c: left(s, m, c) or right(s, m, c)
        if key == "UID":
            ranges = parse_sequence_set(text_of(self._next()), self.largest_uid)
            return lambda _s, m, _c: in_sequence_set(m.uid, ranges)
        if key in ("LARGER", "SMALLER"):
            size_text = text_of(self._next())
            if not size_text.isdigit():
                raise ImapSyntaxError("bad size")
            size = int(size_text)
            if key == "LARGER":
                return lambda _s, m, _c: m.size > size
            return lambda _s, m, _c: m.size < size
        if key in ("BEFORE", "ON", "SINCE"):
            # Internal date (arrival), compared by day in UTC, as RFC 3501 6.4.4 asks.
            date = _parse_date(text_of(self._next()))
            if date is None:
                raise ImapSyntaxError("bad date")
            day = date

            def by_date(_s: int, m: IndexedMessage, _c: bytes) -> bool:
                got = datetime.datetime.fromtimestamp(m.internal_date_ms / 1000, tz=datetime.UTC).date()
                return got < day if key == "BEFORE" else got == day if key == "ON" else got >= day

            return by_date
        if key in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            self.needs_content = True
            return _header_test(key, text_of(self._next()))
        if key == "HEADER":
            name = text_of(self._next())
            self.needs_content = True
            return _header_test(name, text_of(self._next()))
        if key in ("BODY", "TEXT"):
            return _text_test(text_of(self._next()), body_only=key == "BODY", parser=self)
        if key in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            sent = _parse_date(text_of(self._next()))
            if sent is None:
                raise ImapSyntaxError("bad date")
            self.needs_content = True
            return _sent_date_test(key, sent)
        if key[:1].isdigit() or key[:1] == "*":
            ranges = parse_sequence_set(key, self.largest_seq)
            return lambda s, _m, _c: in_sequence_set(s, ranges)
        raise ImapSyntaxError(f"unknown search key {key[:30]}")


__all__ = ["ImapSession", "is_nil"]


# FETCH reads message bodies a window at a time: a few reads in flight, a bounded number of
# bytes held, and the socket drained past a high-water mark (R-MBX-6).
FETCH_READS_IN_FLIGHT = 16
FETCH_WINDOW_MESSAGES = 100
FETCH_WINDOW_BYTES = 4 * 1024 * 1024
FETCH_WRITE_HIGH_WATER = 256 * 1024
_HEADER_SECTIONS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT")


class _FetchPlan:
    """What a FETCH's items need: the index's summary, the message body, or neither."""

    def __init__(self, items: list[FetchItem]) -> None:
        self.needs_body = False
        self.needs_summary = False
        self.needs_header = False
        for item in items:
            if item.name in ("FLAGS", "UID", "INTERNALDATE"):
                continue
            if item.name == "RFC822.SIZE":
                continue  # the index keeps the size
            if item.name == "ENVELOPE" or (item.name in ("BODY", "BODYSTRUCTURE")
                                                            and not item.bracketed):
                self.needs_summary = True
            elif item.name == "RFC822.HEADER" or (item.bracketed and not item.part
                                                   and item.section in _HEADER_SECTIONS):
                self.needs_summary = self.needs_header = True
            else:
                self.needs_body = True


def _answers(summary: M.MessageSummary | None, plan: _FetchPlan) -> bool:
    """Whether the kept summary answers every item (a huge header block is not kept)."""
    return summary is not None and (not plan.needs_header or summary.has_header)


def _header_from_summary(summary: M.MessageSummary | None, data: bytes) -> bool:
    """Header sections come from the summary unless the body was read anyway."""
    return summary is not None and summary.has_header and not data


def _read_windows(
    selected: list[tuple[int, IndexedMessage]], reads_bodies: bool
) -> list[list[tuple[int, IndexedMessage]]]:
    windows: list[list[tuple[int, IndexedMessage]]] = []
    current: list[tuple[int, IndexedMessage]] = []
    held = 0
    for entry in selected:
        size = entry[1].size if reads_bodies else 0
        if current and (len(current) >= FETCH_WINDOW_MESSAGES or held + size > FETCH_WINDOW_BYTES):
            windows.append(current)
            current, held = [], 0
        current.append(entry)
        held += size
    if current:
        windows.append(current)
    return windows
