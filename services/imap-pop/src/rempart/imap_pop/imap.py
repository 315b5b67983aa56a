"""The IMAP session: its command loop, login, selected-state commands; folders, SEARCH and FETCH
rendering have their own modules (imap_folders, imap_search, imap_fetch).

IMAP4rev1 (RFC 3501) with IDLE (2177), UIDPLUS (4315), MOVE (6851), NAMESPACE (2342),
ID (2971), ENABLE (5161), LITERAL+ (7888), SASL-IR (4959), UNSELECT (3691), CHILDREN (3348),
SPECIAL-USE (6154), and AUTHENTICATE PLAIN and SCRAM-SHA-256 (RFC 7677, through the auth service).

A mailbox is the canonical account address the auth service returned; its folders, UIDs and
flags are the Redis index (:class:`MailboxIndex`); message bytes come from the blob store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from rempart.common import mime as M
from rempart.common.edgelogin import LoginDecision, LoginOutcome
from rempart.common.events import mailbox_changed_subject
from rempart.common.mailstore import (
    FLAG_LIMIT,
    FLAG_MODIFIED,
    BlobUnreadable,
    FolderStatus,
    IndexedMessage,
    UidCache,
)
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.sasl import PLAIN, SCRAM_SHA_256, SaslError
from rempart.imap_pop import replies as R
from rempart.imap_pop.imap_fetch import (
    FETCH_READS_IN_FLIGHT,
    FETCH_WRITE_HIGH_WATER,
    FetchPlan,
    flags_text,
    read_windows,
    render_item,
    summary_answers,
)
from rempart.imap_pop.imap_folders import FolderCommands
from rempart.imap_pop.imap_search import SearchParser, SearchQuery
from rempart.imap_pop.imap_view import FolderView, gone, is_gone
from rempart.imap_pop.imapproto import (
    Atom,
    CloseSession,
    Command,
    FetchItem,
    ImapSyntaxError,
    No,
    SequenceSet,
    Token,
    compress_numbers,
    format_ranges,
    intersect_ranges,
    literal_at_end,
    missing_numbers,
    number_ranges,
    parse_fetch_items,
    parse_number,
    parse_sequence_set,
    split_tag,
    text_of,
    tokenize,
)
from rempart.imap_pop.session import Session, verdict_text
from rempart.imap_pop.stream import LineTooLong, StreamDesynchronised
from rempart.imap_pop.traces import imap_command

log = logging.getLogger(__name__)

SYSTEM_FLAGS = {"\\SEEN", "\\ANSWERED", "\\FLAGGED", "\\DELETED", "\\DRAFT"}
FLAGS_LIST = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
MAX_FLAGS = 50
STORE_BATCH = 500  # messages per atomic flag script call
# Pipelined single-message UID FETCH commands looked at ahead of the current one (_read_ahead).
READ_AHEAD = 64
_ONE_UID_FETCH = re.compile(rb"^\S+ UID FETCH (\d{1,10}) .*BODY", re.IGNORECASE)
# SELECT rewrites a folder's saved UIDs once this many changes have piled up since they were saved.
UID_CACHE_RESAVE = 200
ANY_UID = 2**32 - 1  # "*" in a client's known UIDs (QRESYNC): any
MAX_LITERALS_PER_COMMAND = 16
# Distinct data items in one FETCH (after duplicates are merged). Each body section renders a copy
# of (part of) the message and locates its MIME part anew; clients ask for a handful, a bounded
# line could otherwise ask for hundreds per message. Past this, a tagged BAD.
MAX_FETCH_ITEMS = 64
# A content SEARCH (BODY, TEXT: a MIME parse of each message) gives other sessions the event loop
# back at least this often, between messages.
SEARCH_YIELD_SECONDS = 0.02

Handler = Callable[[Command], Awaitable[None]]


class ImapSession(FolderCommands, Session):
    folder: str | None = None
    readonly: bool = False
    view: FolderView
    uidvalidity: int = 0
    # RFC 7162: CONDSTORE is on once a client used it (ENABLE, SELECT (CONDSTORE), MODSEQ,
    # CHANGEDSINCE, UNCHANGEDSINCE); QRESYNC only after ENABLE QRESYNC.
    condstore: bool = False
    qresync: bool = False
    _claim: asyncio.Task[None] | None = None  # renews this session's place among the account's sessions
    seen_modseq: int = 0  # the folder's HIGHESTMODSEQ when the view was last brought up to date
    recent: set[int]  # UIDs that are \Recent in this session (RFC 3501 2.3.2)
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
                "UNSELECT", "CHILDREN", "SPECIAL-USE", "CREATE-SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS",
                "ESEARCH", "CONDSTORE", "QRESYNC",
                "QUOTA", "QUOTA=RES-STORAGE"]
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
        self.view = FolderView()
        self.recent = set()
        self.changed = asyncio.Event()
        verdict = await self.connect_verdict()
        if verdict.action == policy_pb2.ACTION_TEMPFAIL:
            await self.stream.send(R.IMAP_BYE_TEMPFAIL.encode() + b"\r\n")
            return
        if verdict.action in (policy_pb2.ACTION_REJECT, policy_pb2.ACTION_CLOSE):
            await self.stream.send(f"* BYE {verdict_text(verdict)}\r\n".encode())
            return
        self.out(f"* OK [CAPABILITY {self.capabilities()}] {R.IMAP_GREETING}")
        await self.stream.drain()
        subscription = None
        try:
            while not self.closing:
                if self.backend.draining:
                    self.out(R.IMAP_BYE_SHUTDOWN)
                    await self.stream.drain()
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
                if not self.stream.has_line():
                    # Pipelined commands already here are answered first: their answers go
                    # out together (mbsync sends a FETCH per message without waiting).
                    await self.stream.drain()
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
            await self._release_claim()

    async def _keep_claim(self, account: str) -> None:
        """Renew this session's place among the account's sessions while it lives."""
        while True:
            await asyncio.sleep(self.backend.settings.imap_session_claim_seconds / 3)
            try:
                await self.backend.claim_session(account, self.session_id)
            except Exception as exc:  # noqa: BLE001 - Redis away: the place expires by itself
                log.debug("session claim not renewed: %s", exc)

    async def _release_claim(self) -> None:
        if self._claim is None:
            return
        self._claim.cancel()
        self._claim = None
        with contextlib.suppress(Exception):
            await self.backend.release_session(self.account, self.session_id)

    async def _on_changed(self, _msg: Msg) -> None:
        self.changed.set()

    async def _close_with(self, line: str) -> None:
        """Last words, then drop whatever the client still sends for a moment, then close."""
        with contextlib.suppress(OSError, ConnectionError):
            self.out(line)
            await self.stream.drain()
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
                await self.stream.drain()
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
                await self.stream.drain()
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
                await self.stream.drain()
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
            "IDLE": self.cmd_idle, "GETQUOTAROOT": self.cmd_getquotaroot, "GETQUOTA": self.cmd_getquota,
            "SETQUOTA": self.cmd_setquota,
        }
        if self.folder is None:
            return authenticated
        return authenticated | {
            "CHECK": self.cmd_noop, "CLOSE": self.cmd_close, "UNSELECT": self.cmd_close,
            "EXPUNGE": self.cmd_expunge, "SEARCH": self.cmd_search, "FETCH": self.cmd_fetch,
            "STORE": self.cmd_store, "COPY": self.cmd_copy, "MOVE": self.cmd_copy,
        }

    async def _execute(self, command: Command) -> None:
        await imap_command(self, command, self._dispatch)  # in the command's trace span

    async def _dispatch(self, command: Command) -> None:
        handler = self._handlers().get(command.name)
        uid_ok = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"}
        if handler is None or (command.uid and command.name not in uid_ok):
            self.out(f"{command.tag} BAD Unknown command or wrong state")
            await self._count_bad()
            return
        try:
            await handler(command)
            self.view.trim()  # bounded memory between commands, whatever the last one touched
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
            account = self.account
            try:
                claimed = await self.backend.claim_session(account, self.session_id)
            except Exception as exc:  # noqa: BLE001 - Redis away: fail closed, temporarily
                log.warning("session count not available: %s", exc, extra={"session": self.session_id})
                self.account = ""
                self.out(f"{command.tag} {R.IMAP_TEMPFAIL}")
                return
            if not claimed:
                log.info("too many IMAP sessions", extra={"session": self.session_id, "account": account})
                self.account = ""
                self.out(f"{command.tag} {R.IMAP_TOO_MANY_ACCOUNT_SESSIONS}")
                return
            self._claim = asyncio.create_task(self._keep_claim(account), name="imap-claim")
            try:
                await self.backend.mailboxes.provision(self.account)
                await self.backend.mailboxes.recover(self.account)
            except Exception as exc:  # noqa: BLE001 - missing default folders never block a login
                log.warning("default folders not created or journal not recorded: %s", exc,
                            extra={"session": self.session_id})
            self.ok(command, f"[CAPABILITY {self.capabilities()}] Logged in")
            return
        failed = decision.outcome is LoginOutcome.FAILED
        self.out(f"{command.tag} {R.IMAP_AUTH_FAILED if failed else R.IMAP_TEMPFAIL}")
        if decision.close:
            # Policy's own words: "Intrusion prevention active for [ip]" when this login blocked it.
            self.out(f"* BYE {verdict_text(decision.verdict or policy_pb2.Verdict(), 'Connection closed by policy')}")
            await self.stream.drain()
            raise CloseSession


    async def cmd_select(self, command: Command) -> None:
        if not 1 <= len(command.args) <= 2:
            raise ImapSyntaxError("SELECT needs a mailbox")
        resync = self._select_parameters(command.args[1] if len(command.args) == 2 else [])
        if self.folder is not None and self.qresync:
            self.out("* OK [CLOSED] Previous mailbox closed")  # RFC 7162 3.2.11
        self.folder = None
        self.view = FolderView()
        folder = self.folder_name(command.args[0])
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[NONEXISTENT] No such mailbox")
        status = await self.backend.index.status(self.account, folder)
        self.view, first_unseen = await self._open_view(folder, status)
        self.seen_modseq = status.highestmodseq  # read before the messages: nothing after it is missed
        self.folder = folder
        self.readonly = command.name == "EXAMINE"
        self.uidvalidity = status.uidvalidity
        self.changed.clear()
        self.out(f"* FLAGS {FLAGS_LIST}")
        self.out(f"* {len(self.view)} EXISTS")
        if self.readonly:  # EXAMINE takes no message's \Recent away (RFC 3501 6.3.2)
            first = await self.backend.index.recent_from(self.account, folder)
        else:
            first = await self.backend.index.claim_recent(self.account, folder, self._next_uid())
        self.recent = set(self.view.from_uid(first))
        self.out(f"* {len(self.recent)} RECENT")
        unseen = self.view.position(first_unseen) if first_unseen else None
        if unseen is not None:
            self.out(f"* OK [UNSEEN {unseen + 1}] First unseen")
        self.out(f"* OK [UIDVALIDITY {status.uidvalidity}] UIDs valid")
        self.out(f"* OK [UIDNEXT {status.uidnext}] Predicted next UID")
        # RFC 7162 3.1.2.1: mod-sequences are kept for every folder, so always said.
        self.out(f"* OK [HIGHESTMODSEQ {max(status.highestmodseq, 1)}] Highest")  # at least 1 (RFC 7162)
        permanent = "()" if self.readonly else "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
        self.out(f"* OK [PERMANENTFLAGS {permanent}] Limited")
        if resync is not None and resync[0] == status.uidvalidity:
            await self._resynchronise(resync[1], resync[2])
        self.ok(command, f"[{'READ-ONLY' if self.readonly else 'READ-WRITE'}] {command.name} completed")

    def _select_parameters(self, token: Token) -> tuple[int, int, SequenceSet | None] | None:
        """SELECT/EXAMINE parameters (RFC 7162 3.1.8, 3.2.5): CONDSTORE, or QRESYNC (UIDVALIDITY
        MODSEQ [known UIDs [sequence match data]]); the QRESYNC ones are returned."""
        if not isinstance(token, list):
            raise ImapSyntaxError("bad SELECT parameters")
        resync = None
        items = list(token)
        while items:
            name = text_of(items.pop(0)).upper()
            if name == "CONDSTORE":
                self.condstore = True
            elif name == "QRESYNC" and items and isinstance(items[0], list):
                if not self.qresync:
                    raise ImapSyntaxError("QRESYNC is not enabled")
                values = items.pop(0)
                assert isinstance(values, list)
                numbers = [parse_number(str(v)) if isinstance(v, Atom) else None for v in values[:2]]
                if len(numbers) < 2 or numbers[0] is None or numbers[1] is None:
                    raise ImapSyntaxError("bad QRESYNC parameters")
                known = None
                if len(values) >= 3 and not isinstance(values[2], list):
                    known = parse_sequence_set(text_of(values[2]), ANY_UID)
                resync = (numbers[0], numbers[1], known)
            else:
                raise ImapSyntaxError("unknown SELECT parameter")
        return resync

    async def _open_view(self, folder: str, status: FolderStatus) -> tuple[FolderView, int]:
        """The folder's UIDs and its first unseen UID (0: none), from the UIDs a session last
        saved for it plus the changes since (R-MBX-2: SELECT of a large folder costs what
        changed), or read whole when there is nothing to start from. Saved back once enough
        changes piled up (UID_CACHE_RESAVE) or when read whole."""
        index = self.backend.index
        cache = await index.uid_cache(self.account, folder)
        view: FolderView | None = None
        first_unseen = 0
        if cache is not None and cache.uidvalidity == status.uidvalidity:
            if cache.modseq == status.highestmodseq:
                return FolderView(cache.uids), cache.first_unseen
            changed = await index.changed_since(self.account, folder, cache.modseq)
            vanished, complete = await index.vanished(self.account, folder, cache.modseq)
            if changed is not None and complete:
                view = FolderView(cache.uids)
                view.remove(set(vanished))
                highest = view.last_uid
                view.append([m for m in changed if m.uid > highest])
                for message in changed:
                    if view.position(message.uid) is not None:
                        view.put(message)
                first_unseen = cache.first_unseen
                if first_unseen and (view.position(first_unseen) is None or any(
                        m.uid == first_unseen and "\\Seen" in m.flags for m in changed)):
                    first_unseen = await self._first_unseen(folder, first_unseen)
                first_unseen = min([u for u in (first_unseen, *(m.uid for m in changed if "\\Seen" not in m.flags))
                                    if u], default=0)
                if len(changed) + len(vanished) < UID_CACHE_RESAVE:
                    # Kept as it is: the next SELECT applies these few changes again, cheaper
                    # than writing every UID back each time the folder changes.
                    return view, first_unseen
        if view is None:
            view = FolderView(await index.uids(self.account, folder))
            first_unseen = await self._first_unseen(folder, 1)
        await index.save_uid_cache(self.account, folder, UidCache(status.uidvalidity, status.highestmodseq,
                                                                  first_unseen, view.uids))
        return view, first_unseen

    async def _first_unseen(self, folder: str, from_uid: int) -> int:
        """The first UID from ``from_uid`` on without \\Seen (0: none); nothing scanned when
        the folder's counter says every message is seen (a read archive)."""
        if not await self.backend.index.unseen_count(self.account, folder):
            return 0
        return await self.backend.index.first_unseen(self.account, folder, from_uid)

    async def _load(self, indexes: Iterable[int]) -> None:
        """The fields of the view's messages at these indexes, read where not loaded; one
        expunged elsewhere and not yet announced stays in the view, with nothing to read."""
        assert self.folder is not None
        missing = self.view.missing(indexes)
        if missing:
            found = await self.backend.index.messages_by_uid(self.account, self.folder, missing)
            for uid in missing:
                self.view.put(found.get(uid) or gone(uid))

    async def _all(self) -> list[tuple[int, IndexedMessage]]:
        """Every message of the view with its sequence number (SEARCH, EXPUNGE): loaded."""
        await self._load(range(len(self.view)))
        return [(i + 1, self.view.message(i)) for i in range(len(self.view))]

    def _next_uid(self) -> int:
        return self.view.last_uid + 1

    def _shown(self, message: IndexedMessage) -> IndexedMessage:
        """The message as FETCH shows it: with \\Recent when it is recent in this session."""
        return dataclasses.replace(message, flags=message.flags | {"\\Recent"}) if message.uid in self.recent \
            else message

    async def _resynchronise(self, since: int, known: SequenceSet | None) -> None:
        """QRESYNC (RFC 7162 3.2.5.1): what vanished since the client's MODSEQ, then the flags
        of what changed since it."""
        assert self.folder is not None
        await self._send_vanished(since, known, earlier=True)
        changed = await self.backend.index.changed_since(self.account, self.folder, since)
        if changed is None:  # more changes than worth asking for one by one: every message
            for seq, message in await self._all():
                if message.modseq > since:
                    self.out(f"* {seq} FETCH ({self._changed_items(message, command_uid=True)})")
            return
        for message in changed:
            i = self.view.position(message.uid)
            if i is not None and message.modseq > since:
                self.view.put(message)
                self.out(f"* {i + 1} FETCH ({self._changed_items(message, command_uid=True)})")

    async def _send_vanished(self, since: int, within: SequenceSet | None, earlier: bool) -> None:
        """``* VANISHED (EARLIER)`` for the UIDs expunged since ``since`` (in ``within``). When
        the folder forgot that far back, every UID the client may know that is not here."""
        assert self.folder is not None
        uids, complete = await self.backend.index.vanished(self.account, self.folder, since)
        if complete:
            ranges = number_ranges(uids)
        else:
            status = await self.backend.index.status(self.account, self.folder)
            ranges = missing_numbers(list(self.view.uids), status.uidnext)
        if within is not None:
            ranges = intersect_ranges(ranges, within)
        if ranges:
            self.out(f"* VANISHED {'(EARLIER) ' if earlier else ''}{format_ranges(ranges)}")

    async def cmd_enable(self, command: Command) -> None:
        # RFC 5161: ENABLED lists what this command turned on; others are ignored.
        enabled = []
        for token in command.args:
            name = text_of(token).upper()
            if name == "CONDSTORE" and not self.condstore:
                self.condstore = True
                enabled.append(name)
            elif name == "QRESYNC" and not self.qresync:
                self.condstore = self.qresync = True  # RFC 7162 3.2.3: QRESYNC implies CONDSTORE
                enabled.append(name)
        self.out(" ".join(["* ENABLED", *enabled]))
        self.ok(command)

    async def cmd_append(self, command: Command) -> None:
        args = command.args
        if len(args) < 2 or not isinstance(args[-1], bytes):
            raise ImapSyntaxError("APPEND needs a mailbox and a literal")
        folder = self.folder_name(args[0])
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
        await self._check_quota(len(data))
        [placed] = await self.backend.mailboxes.append(self.account, folder, [(data, flags, internal_date_ms)])
        await self.backend.publish_changed(self.account, folder)
        if self.folder == folder:
            await self.refresh(expunges=False)
        self.ok(command, f"[APPENDUID {placed.uidvalidity} {placed.uid}] APPEND completed")

    # Quota (RFC 9208, R-MBX-5): one quota root, "", for the whole account, STORAGE in KiB.
    async def _quota_bytes(self) -> int:
        domain = self.account.rpartition("@")[2]
        return (await self.backend.config.effective(domain, self.account)).limits.mailbox_quota_mb * 1024 * 1024

    async def _check_quota(self, adding: int) -> None:
        limit = await self._quota_bytes()
        if limit and (await self.backend.index.usage(self.account))[0] + adding > limit:
            raise No("[OVERQUOTA] Quota exceeded (mailbox for user is full)")

    async def _send_quota(self) -> None:
        used = (await self.backend.index.usage(self.account))[0]
        limit = await self._quota_bytes()
        self.out(f'* QUOTA "" (STORAGE {(used + 1023) // 1024} {limit // 1024})')

    async def cmd_getquotaroot(self, command: Command) -> None:
        if len(command.args) != 1:
            raise ImapSyntaxError("GETQUOTAROOT needs a mailbox")
        folder = self.folder_name(command.args[0])
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[NONEXISTENT] No such mailbox")
        if not await self._quota_bytes():
            self.out(f"* QUOTAROOT {M.quote(folder)}")  # no quota applies
        else:
            self.out(f'* QUOTAROOT {M.quote(folder)} ""')
            await self._send_quota()
        self.ok(command)

    async def cmd_getquota(self, command: Command) -> None:
        if len(command.args) != 1:
            raise ImapSyntaxError("GETQUOTA needs a quota root")
        if text_of(command.args[0]) != "" or not await self._quota_bytes():
            raise No("[NONEXISTENT] No such quota root")
        await self._send_quota()
        self.ok(command)

    async def cmd_setquota(self, command: Command) -> None:
        raise No("[NOPERM] Quotas are set by the administrator")

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
                await self.stream.drain()  # what changed, and the keepalive
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
        """Tell the client what changed since it last looked (RFC 3501 7.3, 7.4.1). What it costs
        is what changed (R-MBX-2): the folder's MODSEQ first, then only the changed messages
        and the expunged UIDs since the view was last brought up to date."""
        if self.folder is None:
            return
        status = await self.backend.index.status(self.account, self.folder)
        if status.highestmodseq == self.seen_modseq:
            return
        changed = await self.backend.index.changed_since(self.account, self.folder, self.seen_modseq)
        gone: list[int] | None = []
        if expunges:
            uids, complete = await self.backend.index.vanished(self.account, self.folder, self.seen_modseq)
            gone = uids if complete else None
        if changed is None or gone is None:
            await self._reload(expunges, status.highestmodseq)
            return
        if expunges:
            self._forget(gone)
        self._take([m for m in changed if self.view.position(m.uid) is not None])
        highest = self.view.last_uid
        await self._add([m for m in changed if m.uid > highest])
        if expunges:
            # Expunges not yet said keep the view behind: until then the same changes are
            # looked at again (and found already known).
            self.seen_modseq = status.highestmodseq

    async def _reload(self, expunges: bool, highestmodseq: int) -> None:
        """The whole folder compared with the view (too many changes, or history forgotten)."""
        assert self.folder is not None
        current = await self.backend.index.messages(self.account, self.folder)
        by_uid = {m.uid: m for m in current}
        if expunges:
            self._forget([uid for uid in self.view.uids if uid not in by_uid])
        self._take([m for m in current if self.view.position(m.uid) is not None])
        highest = self.view.last_uid
        await self._add([m for m in current if m.uid > highest])
        if expunges:
            self.seen_modseq = highestmodseq

    def _take(self, updates: list[IndexedMessage]) -> None:
        """New flags of messages in the view, said as FETCH (for a message whose fields were
        not loaded, always: it changed after the view was made)."""
        for new in updates:
            i = self.view.position(new.uid)
            if i is None:
                continue
            old = self.view.loaded.get(new.uid)
            if old is None or new.flags != old.flags or new.modseq != old.modseq:
                self.view.put(new)
                if old is None or new.flags != old.flags:
                    self.out(f"* {i + 1} FETCH ({self._changed_items(new, command_uid=False)})")

    async def _add(self, added: list[IndexedMessage]) -> None:
        if added:
            self.view.append(added)
            if not self.readonly and self.folder is not None:
                # The first session told of a message has it as \Recent, on whichever replica.
                first = await self.backend.index.claim_recent(self.account, self.folder, self._next_uid())
                self.recent |= {m.uid for m in added if m.uid >= first}
            self.out(f"* {len(self.view)} EXISTS")
            self.out(f"* {len(self.recent)} RECENT")  # RFC 3501 7.3.2: with a size change

    def _changed_items(self, message: IndexedMessage, command_uid: bool, flags: bool = True) -> str:
        """The items of an unsolicited or STORE FETCH response: UID when asked or with QRESYNC
        (RFC 7162 3.2.4), FLAGS, MODSEQ with CONDSTORE (3.1.4)."""
        items = []
        if command_uid or self.qresync:
            items.append(f"UID {message.uid}")
        if flags:
            items.append(f"FLAGS {flags_text(self._shown(message).flags)}")
        if self.condstore:
            items.append(f"MODSEQ ({message.modseq})")
        return " ".join(items)

    def _forget(self, uids: Iterable[int], announce: bool = True) -> None:
        """Expunged messages leave the view, said (``announce``) as EXPUNGE, or VANISHED with
        QRESYNC (RFC 7162 3.2.10); CLOSE says nothing (RFC 3501 6.4.2)."""
        positions = sorted(((i, uid) for uid in set(uids) if (i := self.view.position(uid)) is not None),
                           reverse=True)
        if not positions:
            return
        if announce and not self.qresync:
            # Highest first: each number is still right when the client reads it (RFC 3501 7.4.1).
            self.out("".join(f"* {i + 1} EXPUNGE\r\n" for i, _ in positions).removesuffix("\r\n"))
        gone_uids = {uid for _, uid in positions}
        self.view.remove(gone_uids)
        self.recent -= gone_uids
        if announce and self.qresync:
            self.out(f"* VANISHED {compress_numbers(sorted(gone_uids))}")

    async def _select(self, text: str, uid: bool) -> list[tuple[int, IndexedMessage]]:
        """The (sequence number, message) pairs of a sequence or UID set, their fields loaded."""
        indexes = self._indexes(text, uid)
        await self._load(indexes)
        return [(i + 1, self.view.message(i)) for i in indexes]

    def _indexes(self, text: str, uid: bool) -> list[int]:
        """The view's indexes of a sequence or UID set: a binary search per range, so one
        message costs O(log n) whatever the folder's size (R-MBX-2)."""
        indexes: list[int] = []
        if uid:
            for low, high in parse_sequence_set(text, self.view.last_uid):
                indexes.extend(self.view.between(low, high))
            # RFC 3501 6.4.8: "n:*" always includes the highest UID, even below n.
            if "*" in text and self.view and (not indexes or indexes[-1] != len(self.view) - 1):
                indexes.append(len(self.view) - 1)
        else:
            ranges = parse_sequence_set(text, len(self.view))
            if any(high > len(self.view) for _, high in ranges):
                raise No("Invalid message sequence number", bad=True)
            indexes = [i - 1 for low, high in ranges for i in range(low, high + 1)]
        return indexes

    async def _read_ahead(self) -> None:
        """mbsync and imapsync send one ``UID FETCH <uid> (BODY.PEEK[])`` per message without
        waiting for the answers: the messages of those already received are read from the store
        now, several at once, while this one is answered (each read would otherwise wait for
        the one before)."""
        uids = [int(m.group(1)) for line in self.stream.lines_ahead(READ_AHEAD)
                if (m := _ONE_UID_FETCH.match(line))]
        indexes = [i for uid in uids if (i := self.view.position(uid)) is not None]
        if not indexes:
            return
        await self._load(indexes)
        for i in indexes:
            message = self.view.message(i)
            if not is_gone(message):
                reading = self.backend.read_ahead(message)
                if reading is not None:  # a failure is met again, and told, by its own FETCH
                    reading.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _changed_among(self, text: str, uid: bool, since: int) -> list[tuple[int, IndexedMessage]]:
        """FETCH (CHANGEDSINCE): the messages of a set changed after ``since``, found from the
        folder's changes (what Thunderbird asks at each folder opening costs what changed, not
        the folder's size), or from every message when too many changed."""
        assert self.folder is not None
        indexes = self._indexes(text, uid)
        changed = await self.backend.index.changed_since(self.account, self.folder, since)
        if changed is None:
            await self._load(indexes)
            return [(i + 1, self.view.message(i)) for i in indexes if self.view.message(i).modseq > since]
        asked = set(indexes)
        out = []
        for message in changed:
            i = self.view.position(message.uid)
            if i is not None and i in asked and message.modseq > since:
                self.view.put(message)
                out.append((i + 1, message))
        return out

    async def read_content(self, message: IndexedMessage) -> bytes:
        return await self.backend.read_content(message)

    async def _contents(self, messages: list[IndexedMessage]) -> dict[int, bytes | BaseException]:
        """Read several messages at once (a few requests in flight): uid -> bytes or the error."""
        gate = asyncio.Semaphore(FETCH_READS_IN_FLIGHT)

        async def one(message: IndexedMessage) -> bytes | BaseException:
            async with gate:
                try:
                    return await self.read_content(message)
                except (BlobUnreadable, TimeoutError, OSError, NatsError) as exc:
                    return exc

        found: dict[int, bytes | BaseException] = {}
        if len(messages) > 1:
            found.update(await self.backend.read_many(messages))  # cached, or read in batches
        rest = [m for m in messages if m.uid not in found]
        results = await asyncio.gather(*(one(m) for m in rest))
        return found | {m.uid: r for m, r in zip(rest, results, strict=True)}

    async def _search_contents(self, messages: list[IndexedMessage], query: SearchQuery) -> dict[int, bytes]:
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
        if len(command.args) not in (2, 3):
            raise ImapSyntaxError("FETCH needs a sequence set and items")
        changed_since, vanished = self._fetch_modifiers(command)
        if changed_since is not None:
            await self.refresh(expunges=False)  # the MODSEQs compared are the current ones
        if changed_since is None:
            selected = await self._select(text_of(command.args[0]), command.uid)
        else:
            selected = await self._changed_among(text_of(command.args[0]), command.uid, changed_since)
        items = distinct_items(parse_fetch_items(command.args[1]))
        if len(items) > MAX_FETCH_ITEMS:
            raise ImapSyntaxError(f"too many FETCH items (at most {MAX_FETCH_ITEMS} different ones)")
        if (command.uid or self.qresync) and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))  # with QRESYNC, every FETCH response (RFC 7162 3.2.4)
        if any(i.name == "MODSEQ" for i in items):
            self.condstore = True
        if changed_since is not None:
            # RFC 7162 3.1.4.1: only what changed since, with its MODSEQ; 3.2.6: and, with
            # VANISHED, what was expunged since among the UIDs asked for.
            if vanished:
                await self._send_vanished(changed_since, parse_sequence_set(
                    text_of(command.args[0]), self.view.last_uid), earlier=True)
            if not any(i.name == "MODSEQ" for i in items):
                items.append(FetchItem("MODSEQ"))
        plan = FetchPlan(items)
        if plan.needs_body and self.stream.has_line() and any(
                self.backend.content_cache.get(m) is None for _, m in selected[:1]):
            await self._read_ahead()  # not ahead of this client (any more): look at what it sent
        sets_seen = not self.readonly and any(
            (i.name == "BODY" and i.bracketed) or i.name in ("RFC822", "RFC822.TEXT") for i in items
        )
        asks_flags = any(i.name == "FLAGS" for i in items)
        expunged = [m for _, m in selected if is_gone(m)]
        if expunged:
            selected = [(seq, m) for seq, m in selected if not is_gone(m)]
        unreadable = 0
        for window in read_windows(selected, plan.needs_body):
            summaries: dict[int, M.MessageSummary | None] = {}
            if plan.needs_summary and self.folder is not None:
                summaries = await self.backend.index.summaries(self.account, self.folder, (m.uid for _, m in window))
            # The body is read only where the index cannot answer (R-MBX-2: a header sync reads no blob).
            to_read = [m for _, m in window if plan.needs_body or (plan.needs_summary and not summary_answers(
                summaries.get(m.uid), plan))]
            contents = await self._contents(to_read) if to_read else {}
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
                # \Recent is added only where flags are shown (a copy of the message each).
                shown = self._shown(message) if asks_flags or flags_changed else message
                extra: list[bytes] = []
                if flags_changed and not any(i.name == "FLAGS" for i in items):
                    extra.append(f"FLAGS {flags_text(shown.flags)}".encode())
                if flags_changed and self.condstore and not any(i.name == "MODSEQ" for i in items):
                    extra.append(f"MODSEQ ({message.modseq})".encode())  # RFC 7162 3.1.4.1
                await self._write_fetch_line(seq, items, shown, data, summary, extra)
        if unreadable:
            raise No(f"[UNAVAILABLE] {unreadable} message(s) could not be read now, try again")
        if expunged:
            # RFC 2180 4.1.2, RFC 5530: expunged by another session; the EXPUNGE follows.
            raise No("[EXPUNGEISSUED] Some of the requested messages no longer exist")
        self.ok(command)

    async def _write_fetch_line(self, seq: int, items: list[FetchItem], message: IndexedMessage, data: bytes,
                                summary: M.MessageSummary | None, extra: list[bytes]) -> None:
        """One ``* n FETCH (...)`` line. Its items are rendered one at a time, and once more than
        FETCH_WRITE_HIGH_WATER of them is held it goes out as it comes (the socket drained inside
        the line): what is held is one item and the output buffer, not the number of items times
        the message's size, and a client that stops reading stops the FETCH (R-MBX-6)."""
        pending: list[bytes] = [f"* {seq} FETCH (".encode()]
        held = 0
        streaming = False  # part of the line is out: a failure now cannot be followed by a tagged reply
        sections = M.Sections(data)  # a part named by several items: its tree parsed once
        try:
            for index, item in enumerate(items):
                part = render_item(item, message, data, summary, sections)
                held += len(part)
                pending += [b" ", part] if index else [part]
                if held > FETCH_WRITE_HIGH_WATER:
                    streaming = True
                    for piece in pending:
                        self.stream.write(piece)
                    pending, held = [], 0
                    if self.stream.buffered() > FETCH_WRITE_HIGH_WATER:
                        await self.stream.drain()
        except (OSError, ConnectionError):
            raise
        except Exception:
            if streaming:
                log.warning("FETCH failed inside a response line", exc_info=True,
                            extra={"session": self.session_id, "uid": message.uid})
                raise CloseSession from None
            raise
        self.stream.write(b"".join([*pending, *(b" " + part for part in extra), b")\r\n"]))
        # Backpressure (R-MBX-6): a client that stops reading stops the FETCH, instead of the
        # replica buffering the whole answer.
        if self.stream.buffered() > FETCH_WRITE_HIGH_WATER:
            await self.stream.drain()

    def _fetch_modifiers(self, command: Command) -> tuple[int | None, bool]:
        """FETCH modifiers (RFC 7162 3.1.4.1, 3.2.6): (CHANGEDSINCE n [VANISHED])."""
        if len(command.args) != 3:
            return None, False
        modifiers = command.args[2]
        if not isinstance(modifiers, list):
            raise ImapSyntaxError("bad FETCH modifiers")
        words = [text_of(m).upper() for m in modifiers if not isinstance(m, list)]
        since = parse_number(words[1]) if len(words) >= 2 else None
        if len(words) != len(modifiers) or words[0] != "CHANGEDSINCE" or since is None:
            raise ImapSyntaxError("bad FETCH modifiers")
        vanished = words[2:] == ["VANISHED"]
        if words[2:] and not vanished:
            raise ImapSyntaxError("bad FETCH modifiers")
        if vanished and not (command.uid and self.qresync):
            raise ImapSyntaxError("VANISHED needs UID FETCH and ENABLE QRESYNC")
        self.condstore = True
        return since, vanished

    async def _add_seen(self, seq: int, message: IndexedMessage) -> IndexedMessage:
        assert self.folder is not None
        after = await self.backend.mailboxes.change_flags(self.account, self.folder, self.uidvalidity, [message.uid],
                                                          "add", {"\\Seen"})
        now = after.get(message.uid)
        if now is None:
            return self._keep_flags(seq, message, message.flags | {"\\Seen"}, message.modseq)
        return self._keep_flags(seq, message, now.flags, now.modseq)

    def _keep_flags(self, seq: int, message: IndexedMessage, flags: frozenset[str], modseq: int) -> IndexedMessage:
        # Only the flags change: the rest (where the body is, inline or a blob) stays as indexed.
        updated = dataclasses.replace(message, flags=flags, modseq=modseq)
        self.view.put(updated)
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
        args = list(command.args)
        unchanged_since = None
        if len(args) == 4 and isinstance(args[1], list):
            # RFC 7162 3.1.3: STORE set (UNCHANGEDSINCE n) item flags
            modifier = args.pop(1)
            assert isinstance(modifier, list)
            unchanged_since = parse_number(text_of(modifier[1])) if len(modifier) == 2 else None
            if unchanged_since is None or text_of(modifier[0]).upper() != "UNCHANGEDSINCE":
                raise ImapSyntaxError("bad STORE modifier")
            self.condstore = True
        if len(args) != 3 or not isinstance(args[1], Atom):
            raise ImapSyntaxError("STORE needs a sequence set, an item and flags")
        if self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        selected = await self._select(text_of(args[0]), command.uid)
        item = str(args[1]).upper()
        silent = item.endswith(".SILENT")
        mode = item.removesuffix(".SILENT")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise ImapSyntaxError("bad STORE item")
        value = args[2]
        flags = self._parse_flags(value if isinstance(value, list) else [value])
        if len(flags) > MAX_FLAGS:
            raise No("[LIMIT] Too many flags")
        assert self.folder is not None
        over_limit = False
        modified: list[int] = []
        change = {"FLAGS": "set", "+FLAGS": "add", "-FLAGS": "remove"}[mode]
        for start in range(0, len(selected), STORE_BATCH):
            batch = selected[start : start + STORE_BATCH]
            # Each message changes atomically in the index (R-MBX-3): another session's flags,
            # set meanwhile, are kept, and the answer shows them.
            after = await self.backend.mailboxes.change_flags(
                self.account, self.folder, self.uidvalidity, [m.uid for _, m in batch], change, flags, MAX_FLAGS,
                unchanged_since)
            for seq, message in batch:
                now = after.get(message.uid)
                if now is None:
                    continue  # expunged by another session; its EXPUNGE comes with the next refresh
                current = now.flags
                if FLAG_MODIFIED in current:
                    modified.append(message.uid if command.uid else seq)
                    current -= {FLAG_MODIFIED}
                if FLAG_LIMIT in current:
                    over_limit, current = True, current - {FLAG_LIMIT}
                message = self._keep_flags(seq, message, current, now.modseq)
                if not silent or self.condstore:
                    # With CONDSTORE, .SILENT still reports the new MODSEQ (RFC 7162 3.1.3).
                    self.out(f"* {seq} FETCH ({self._changed_items(message, command.uid, flags=not silent)})")
        if selected:
            await self.backend.publish_changed(self.account, self.folder)
        if over_limit:
            raise No("[LIMIT] Too many flags")
        if modified:
            self.ok(command, f"[MODIFIED {compress_numbers(sorted(modified))}] Conditional STORE failed")
            return
        self.ok(command)

    async def _expunge(self, doomed: list[tuple[int, IndexedMessage]], announce: bool) -> None:
        assert self.folder is not None
        doomed = [(seq, m) for seq, m in doomed if not is_gone(m)]
        if not doomed:
            return
        await self.backend.mailboxes.expunge(self.account, self.folder, self.uidvalidity, [m for _, m in doomed])
        self._forget((m.uid for _, m in doomed), announce)
        await self.backend.publish_changed(self.account, self.folder)

    async def cmd_expunge(self, command: Command) -> None:
        if self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        if command.uid:
            if len(command.args) != 1:
                raise ImapSyntaxError("UID EXPUNGE needs a UID set")
            candidates = await self._select(text_of(command.args[0]), uid=True)
        else:
            candidates = await self._all()
        doomed = [(i, m) for i, m in candidates if "\\Deleted" in m.flags]
        await self._expunge(doomed, announce=True)
        self.ok(command)

    async def cmd_close(self, command: Command) -> None:
        if command.name == "CLOSE" and not self.readonly:
            # RFC 3501 6.4.2: CLOSE expunges silently.
            await self._expunge([(i, m) for i, m in await self._all() if "\\Deleted" in m.flags], announce=False)
        self.folder = None
        self.view = FolderView()
        self.ok(command)

    async def cmd_copy(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ImapSyntaxError(f"{command.name} needs a sequence set and a mailbox")
        if command.name == "MOVE" and self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        selected = await self._select(text_of(command.args[0]), command.uid)
        target = self.folder_name(command.args[1])
        if not await self.backend.folder_exists(self.account, target):
            raise No("[TRYCREATE] No such mailbox")
        await self._check_quota(sum(m.size for _, m in selected))  # copies count (RFC 9208 5.1)
        # By reference: no message is read or stored again, whatever its size (R-MBX-5).
        try:
            assert self.folder is not None
            copies = await self.backend.mailboxes.copy(self.account, self.folder, target, [m.uid for _, m in selected])
        except KeyError:
            raise No("[TRYCREATE] No such mailbox") from None
        done = [c for c in copies if c.place.uid]
        source_uids, target_uids = [c.source_uid for c in done], [c.place.uid for c in done]
        uidvalidity = done[0].place.uidvalidity if done else 0
        await self.backend.publish_changed(self.account, target)
        code = ""
        if source_uids:
            # RFC 4315: both sets in the same order; UIDs are handed out ascending, so
            # compressing each keeps the pairing.
            code = f"[COPYUID {uidvalidity} {compress_numbers(source_uids)} {compress_numbers(target_uids)}] "
        if command.name == "MOVE":
            if code:
                self.out(f"* OK {code}Moved")
            moved = set(source_uids)
            await self._expunge([(seq, m) for seq, m in selected if m.uid in moved], announce=True)
            self.ok(command)
            return
        self.ok(command, f"{code}{'UID ' if command.uid else ''}COPY completed")

    async def cmd_search(self, command: Command) -> None:
        args = list(command.args)
        returns: list[str] | None = None  # RFC 4731 ESEARCH: SEARCH RETURN (MIN MAX ALL COUNT)
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "RETURN":
            if not isinstance(args[1], list) or any(isinstance(o, list) for o in args[1]):
                raise ImapSyntaxError("SEARCH RETURN needs a list of options")
            returns = [text_of(o).upper() for o in args[1]]
            if any(o not in ESEARCH_RETURNS for o in returns):
                raise ImapSyntaxError("unknown SEARCH RETURN option")
            returns = returns or ["ALL"]  # RFC 4731 3.1: RETURN () means ALL
            args = args[2:]
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
            if text_of(args[1]).upper() not in ("UTF-8", "US-ASCII"):
                raise No("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
            args = args[2:]
        if not args:
            raise ImapSyntaxError("SEARCH needs criteria")
        parser = SearchParser(args, len(self.view), self.view.last_uid, self.recent)
        query = parser.parse()
        if parser.uses_modseq:
            self.condstore = True
            await self.refresh(expunges=False)  # the MODSEQs compared are the current ones
        found: list[int] = []
        highest = 0
        # A message expunged elsewhere (not yet announced) matches nothing: it has nothing to read.
        numbered = [(seq, m) for seq, m in await self._all() if not is_gone(m)]
        yielded = time.monotonic()
        for window in read_windows(numbered, query.needs_body) if query.needs_content else [numbered]:
            contents = await self._search_contents([m for _, m in window], query) if query.needs_content else {}
            for seq, message in window:
                if query.needs_body and time.monotonic() - yielded > SEARCH_YIELD_SECONDS:
                    await asyncio.sleep(0)  # decoding a window of messages: let other sessions run
                    yielded = time.monotonic()
                if query.match(seq, message, contents.get(message.uid, b"")):
                    found.append(message.uid if command.uid else seq)
                    highest = max(highest, message.modseq)
        if returns is not None:
            self.out(esearch_response(command.tag, command.uid, returns, found,
                                      highest if parser.uses_modseq else 0))
            self.ok(command)
            return
        # RFC 7162 3.1.5: with a MODSEQ key, the highest MODSEQ of what matched.
        tail = f" (MODSEQ {highest})" if parser.uses_modseq and found else ""
        self.out("* SEARCH" + "".join(f" {n}" for n in found) + tail)
        self.ok(command)


ESEARCH_RETURNS = ("MIN", "MAX", "ALL", "COUNT")


def distinct_items(items: list[FetchItem]) -> list[FetchItem]:
    """The items of a FETCH with repeats left out, in the order first asked: a repeat would render
    (and hold) the same bytes again, and RFC 3501 and 9051 say nothing of repeats (Dovecot, too,
    answers a repeated FLAGS or UID once). BODY.PEEK[s] and BODY[s] are one item, answered as
    BODY[s]; BODY[s] is kept, so that \\Seen is still set when either form asks for it."""
    seen: dict[FetchItem, FetchItem] = {}
    for item in items:
        key = dataclasses.replace(item, name="BODY") if item.peek else item
        if key not in seen or seen[key].peek:
            seen[key] = item
    return list(seen.values())


def esearch_response(tag: str, uid: bool, returns: list[str], found: list[int], modseq: int) -> str:
    """RFC 4731 3.1: ``* ESEARCH (TAG "a1") UID MIN 2 COUNT 3``; MIN, MAX and ALL are left out
    when nothing matched, COUNT is always given when asked; with a MODSEQ search key, the
    highest MODSEQ of what matched (RFC 7162 3.1.5)."""
    parts = [f'* ESEARCH (TAG "{tag}")'] + (["UID"] if uid else [])
    if found and "MIN" in returns:
        parts.append(f"MIN {min(found)}")
    if found and "MAX" in returns:
        parts.append(f"MAX {max(found)}")
    if found and "ALL" in returns:
        parts.append(f"ALL {compress_numbers(sorted(found))}")
    if "COUNT" in returns:
        parts.append(f"COUNT {len(found)}")
    if found and modseq:
        parts.append(f"MODSEQ {modseq}")
    return " ".join(parts)



def _parse_datetime(text: str) -> int | None:
    """An APPEND date-time (RFC 3501 9: ``"dd-Mon-yyyy hh:mm:ss +zzzz"``, day possibly
    space-padded) as Unix milliseconds; it becomes the message's INTERNALDATE (R-MBX-7)."""
    try:
        moment = datetime.datetime.strptime(" ".join(text.split()), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None
    return int(moment.timestamp() * 1000)
