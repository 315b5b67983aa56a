"""IMAP's folder commands (RFC 3501 6.3: LIST, LSUB, STATUS, CREATE, DELETE, RENAME, SUBSCRIBE,
NAMESPACE; SPECIAL-USE, RFC 6154), mixed into :class:`rempart.imap_pop.imap.ImapSession`.

Every change to folders and subscriptions goes through the mailbox write path
(:class:`rempart.common.mailbox.Mailboxes`), which records it in the change log, so a rebuilt
index shows the same folders.
"""

from __future__ import annotations

from bisect import bisect_left

from rempart.common.mailstore import INBOX, FolderCounts
from rempart.common.mime import quote
from rempart.imap_pop.imap_view import FolderView
from rempart.imap_pop.imapproto import Atom, Command, ImapSyntaxError, ListPatterns, No, Token, text_of
from rempart.imap_pop.session import Backend

MAX_FOLDERS = 1000
STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ")
# RFC 5258 LIST-EXTENDED (REMOTE: no remote mailboxes here, so it changes nothing), RFC 6154.
LIST_SELECTION = {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
LIST_RETURNS = {"SUBSCRIBED", "CHILDREN", "SPECIAL-USE"}
# RFC 6154 CREATE-SPECIAL-USE: the uses a folder can be made with (\All and \Flagged name
# virtual folders, which this store does not have).
CREATABLE_USES = {"\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash"}
MAX_FOLDER_NAME = 200
MAX_LIST_PATTERN = 2 * MAX_FOLDER_NAME + 20
MAX_LIST_PATTERNS = 20  # RFC 5258 lets one LIST carry a list of patterns; more are ignored
# What one LIST may cost, counted before any output: name characters walked x distinct
# patterns, plus LIST_LINE_WORK per name to list. One pattern over the largest store (MAX_FOLDERS
# names of MAX_FOLDER_NAME characters, each listed) fits, and so do 20 patterns over 20,000
# characters of names. Beyond, the event loop was blocked for seconds: 20 long patterns over
# the largest store, or "*" over 1,000 deep names whose 97,000 parents do not exist (each
# listed, as RFC 3501 6.3.8 wants); such a LIST is refused with a tagged NO.
MAX_LIST_WORK = 2 * MAX_FOLDERS * MAX_FOLDER_NAME
LIST_LINE_WORK = 50  # a line's attributes, quoting and writing cost about 35 characters walked
DELIMITER = "/"


class FolderCommands:
    """The session state these commands read and change; ImapSession provides it."""

    backend: Backend
    account: str
    folder: str | None
    view: FolderView

    def out(self, line: str | bytes) -> None:
        raise NotImplementedError

    def ok(self, command: Command, text: str = "") -> None:
        raise NotImplementedError

    def folder_name(self, token: Token) -> str:
        name = text_of(token)
        if name.upper() == "INBOX":
            return INBOX
        if (not name or len(name) > MAX_FOLDER_NAME or any(c in name for c in "*%{}\r\n\0\\\"")
                or name.startswith(DELIMITER) or name.endswith(DELIMITER) or "//" in name):
            raise No("[CANNOT] Invalid mailbox name")
        return name

    async def cmd_list(self, command: Command) -> None:
        # RFC 5258 syntax is accepted (clients that know SPECIAL-USE send "LIST (SPECIAL-USE)
        # ..."): selection options, a list of patterns, RETURN options.
        args = list(command.args)
        selection: set[str] = set()
        returns: set[str] = set()
        status_items: list[str] | None = None  # RFC 5819 LIST-STATUS
        if command.name == "LIST" and args and isinstance(args[0], list):
            options = args.pop(0)
            assert isinstance(options, list)
            if any(isinstance(o, list) for o in options):
                raise ImapSyntaxError("LIST selection options are atoms")
            selection = {text_of(o).upper() for o in options}
            # RFC 5258 3.1: an unknown option is an error; RECURSIVEMATCH needs another one.
            if selection - LIST_SELECTION or selection == {"RECURSIVEMATCH"}:
                raise ImapSyntaxError("unknown LIST selection option")
        if command.name == "LIST" and len(args) == 4 and isinstance(args[2], Atom) and args[2].upper() == "RETURN":
            if not isinstance(args[3], list):
                raise ImapSyntaxError("LIST RETURN needs a list")
            options = list(args[3])
            while options:
                option = options.pop(0)
                if isinstance(option, list):
                    raise ImapSyntaxError("misplaced list in LIST RETURN")
                name = text_of(option).upper()
                if name == "STATUS":
                    if not options or not isinstance(options[0], list):
                        raise ImapSyntaxError("RETURN STATUS needs a list of items")
                    items = options.pop(0)
                    assert isinstance(items, list)
                    status_items = self._status_items(items)  # checked before any output
                elif name in LIST_RETURNS:
                    returns.add(name)
                else:
                    raise ImapSyntaxError("unknown LIST RETURN option")
            args = args[:2]
        if len(args) != 2:
            raise ImapSyntaxError(f"{command.name} needs reference and pattern")
        reference = text_of(args[0])
        given = args[1][:MAX_LIST_PATTERNS] if isinstance(args[1], list) else [args[1]]
        patterns = [text_of(p) for p in given]
        if len(reference) + max((len(p) for p in patterns), default=0) > MAX_LIST_PATTERN:
            # No folder name is longer: such a pattern can only cost time (matching is
            # pattern x name per folder).
            raise ImapSyntaxError("LIST pattern too long")
        if patterns == [""]:
            self.out(f'* {command.name} (\\Noselect) "{DELIMITER}" ""')
            self.ok(command)
            return
        folders = set((await self.backend.index.folders(self.account))[:MAX_FOLDERS])
        uses = await self.backend.index.special_uses(self.account)
        only_subscribed = command.name == "LSUB" or "SUBSCRIBED" in selection
        subscribed: set[str] = set()
        if only_subscribed or "SUBSCRIBED" in returns:
            subscribed = set(sorted(await self.backend.mailboxes.subscriptions(self.account))[:MAX_FOLDERS])
        # LSUB and LIST (SUBSCRIBED) list subscriptions, existing or not (RFC 3501 6.3.9, RFC
        # 5258 3.1); LIST lists folders.
        names = subscribed if only_subscribed else folders
        # A name whose parent is not listed (deleted, or never subscribed) still needs its
        # parent shown, as \Noselect, for "%" listings (RFC 3501 6.3.8, 6.3.9): the matcher
        # answers for each name's parents while walking the name, so they are neither built nor
        # walked again (a deep name has up to 100 of them). Repeated patterns are matched once.
        matcher = ListPatterns(dict.fromkeys(reference + p for p in patterns), DELIMITER)
        listed: set[str] = set()
        for name in names:
            listed.update(matcher.matching(name))
            if matcher.work + len(listed) * LIST_LINE_WORK > MAX_LIST_WORK:
                raise No("[LIMIT] LIST too costly for this many mailboxes; use fewer or narrower patterns")
        if any(p.upper() == "INBOX" for p in patterns) and any(
                n == INBOX or n.startswith(INBOX + DELIMITER) for n in names):
            listed.add(INBOX)
        recursive = "RECURSIVEMATCH" in selection and only_subscribed
        # Each folder's children found by bisection, not by a scan of all folders per line.
        in_order = sorted(folders)
        lines: list[tuple[str, str | None]] = []  # a LIST line, and the folder whose STATUS follows it
        for folder in sorted(listed, key=lambda n: (n != INBOX, n)):
            if "SPECIAL-USE" in selection and folder not in uses:
                continue
            extended = ""
            if recursive and folder not in names:
                # RFC 5258 3.5: a parent listed because a child matched the selection (every
                # listed name not in names is the parent of one).
                extended = ' ("CHILDINFO" ("SUBSCRIBED"))'
            attributes = []
            if command.name == "LSUB":
                if folder not in names or folder not in folders:
                    attributes.append("\\Noselect")
            else:
                if folder not in folders:
                    attributes.append("\\NonExistent" if folder in names else "\\Noselect")
                children = self._has_children(in_order, folder)
                attributes.append("\\HasChildren" if children else "\\HasNoChildren")
                if folder in subscribed:
                    attributes.append("\\Subscribed")
                if folder in uses:
                    attributes.append(uses[folder])
            if only_subscribed and folder not in names and command.name != "LSUB" and not extended:
                continue  # RFC 5258: LIST (SUBSCRIBED) names only subscriptions
            lines.append((f'* {command.name} ({" ".join(attributes)}) "{DELIMITER}" {quote(folder)}{extended}',
                          folder if status_items is not None and folder in folders else None))
        # RFC 5819: the STATUS of each selectable folder listed, right after its line; read for
        # all of them at once (a round trip per page of folders, not several per folder).
        wanted = [f for _, f in lines if f is not None]
        counts = await self.backend.index.counts(self.account, wanted) if wanted else {}
        for line, status_of in lines:
            self.out(line)
            if status_of is not None:
                assert status_items is not None
                self.out(f"* STATUS {quote(status_of)} ({self._status_text(counts[status_of], status_items)})")
        self.ok(command)

    @staticmethod
    def _has_children(in_order: list[str], folder: str) -> bool:
        """Whether a folder of the sorted list is under this one: names that start with
        ``folder/`` sort together, from where ``folder/`` would be."""
        prefix = folder + DELIMITER
        at = bisect_left(in_order, prefix)
        return at < len(in_order) and in_order[at].startswith(prefix)

    async def cmd_status(self, command: Command) -> None:
        if len(command.args) != 2 or not isinstance(command.args[1], list):
            raise ImapSyntaxError("STATUS needs a mailbox and a list")
        folder = self.folder_name(command.args[0])
        items = self._status_items(command.args[1])
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[NONEXISTENT] No such mailbox")
        counts = await self.backend.index.counts(self.account, [folder])
        self.out(f"* STATUS {quote(folder)} ({self._status_text(counts[folder], items)})")
        self.ok(command)

    @staticmethod
    def _status_items(items: list[Token]) -> list[str]:
        names = [text_of(item).upper() if not isinstance(item, list) else "" for item in items]
        if not names or any(n not in STATUS_ITEMS for n in names):
            raise ImapSyntaxError("unknown STATUS item")
        return names

    @staticmethod
    def _status_text(counts: FolderCounts, items: list[str]) -> str:
        """The STATUS items of a folder (RFC 3501 6.3.10, RFC 7162 3.1.9), in the order asked, as
        STATUS and LIST RETURN (STATUS) give them."""
        status = counts.status
        values = {"MESSAGES": status.exists, "RECENT": counts.recent, "UIDNEXT": status.uidnext,
                  "UIDVALIDITY": status.uidvalidity, "UNSEEN": counts.unseen,
                  "HIGHESTMODSEQ": max(status.highestmodseq, 1)}  # RFC 7162 3.1.9: at least 1
        return " ".join(f"{name} {values[name]}" for name in items)

    async def cmd_create(self, command: Command) -> None:
        if len(command.args) not in (1, 2):
            raise ImapSyntaxError("CREATE needs a mailbox")
        folder = self.folder_name(command.args[0])
        use = self._create_use(command.args[1]) if len(command.args) == 2 else ""
        folders = await self.backend.index.folders(self.account)
        if folder in folders:
            raise No("[ALREADYEXISTS] Mailbox exists")
        await self._create_with_parents(folder, folders, use)
        self.ok(command)

    @staticmethod
    def _create_use(parameters: Token) -> str:
        """RFC 6154 3: ``CREATE name (USE (\\Archive))``; one use per folder here."""
        if (not isinstance(parameters, list) or len(parameters) != 2 or isinstance(parameters[0], list)
                or text_of(parameters[0]).upper() != "USE" or not isinstance(parameters[1], list)):
            raise ImapSyntaxError("CREATE takes (USE (attribute))")
        uses = [text_of(a) if not isinstance(a, list) else "" for a in parameters[1]]
        known = {u.lower(): u for u in CREATABLE_USES}
        if len(uses) != 1 or uses[0].lower() not in known:
            raise No("[USEATTR] Special-use attribute not supported (one of "
                     f"{' '.join(sorted(CREATABLE_USES))})")
        return known[uses[0].lower()]

    async def _create_with_parents(self, folder: str, folders: list[str], use: str = "") -> None:
        """RFC 3501 6.3.3: creating a/b/c also creates a and a/b when they are missing."""
        pieces = folder.split(DELIMITER)
        wanted = [DELIMITER.join(pieces[:i]) for i in range(1, len(pieces) + 1)]
        missing = [name for name in wanted if name not in folders and name.upper() != INBOX]
        if len(folders) + len(missing) > MAX_FOLDERS:
            raise No("[LIMIT] Too many mailboxes")
        for name in missing:
            await self.backend.mailboxes.create_folder(self.account, name, use if name == folder else "")

    async def cmd_delete(self, command: Command) -> None:
        if len(command.args) != 1:
            raise ImapSyntaxError("DELETE needs a mailbox")
        folder = self.folder_name(command.args[0])
        if folder == INBOX:
            raise No("[CANNOT] INBOX cannot be deleted")
        if not await self.backend.folder_exists(self.account, folder):
            raise No("[NONEXISTENT] No such mailbox")
        # RFC 3501 6.3.4: the mailbox goes with its messages (Thunderbird's "Empty Trash"
        # deletes folders that still hold mail); the deletion is recorded before it is done.
        await self.backend.mailboxes.delete_folder(self.account, folder)
        if self.folder == folder:
            self.folder = None
            self.view = FolderView()
        await self.backend.publish_changed(self.account, folder)
        self.ok(command)

    async def cmd_rename(self, command: Command) -> None:
        if len(command.args) != 2:
            raise ImapSyntaxError("RENAME needs two mailbox names")
        source = self.folder_name(command.args[0])
        target = self.folder_name(command.args[1])
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
        if any(len(new) > MAX_FOLDER_NAME for _, new in moves):
            # The inferiors' names grow by the difference: renamed again and again they would
            # grow without end, and every LIST walks them.
            raise No("[LIMIT] Mailbox name too long for an inferior mailbox")
        # Parents of the new name are created; the folders themselves move with their
        # messages, UIDs and UIDVALIDITY (one change each, no message copied).
        await self._create_with_parents(DELIMITER.join(target.split(DELIMITER)[:-1]) or INBOX, folders)
        for old, new in moves:
            await self.backend.mailboxes.rename_folder(self.account, old, new)
            await self.backend.publish_changed(self.account, old)
        if self.folder in {old for old, _ in moves}:
            self.folder = None
            self.view = FolderView()
        self.ok(command)

    async def cmd_subscribe(self, command: Command) -> None:
        # SUBSCRIBE and UNSUBSCRIBE (RFC 3501 6.3.6, 6.3.7): a name may be subscribed whether or
        # not the folder exists; the change is recorded before the OK.
        if len(command.args) != 1:
            raise ImapSyntaxError(f"{command.name} needs a mailbox")
        folder = self.folder_name(command.args[0])
        subscribed = await self.backend.mailboxes.subscriptions(self.account)
        if command.name == "SUBSCRIBE" and folder not in subscribed and len(subscribed) >= MAX_FOLDERS:
            raise No("[LIMIT] Too many subscriptions")
        # Recorded even when Redis has it already: a retry after a crash must land in the log.
        await self.backend.mailboxes.subscribe(self.account, [folder], command.name == "SUBSCRIBE")
        self.ok(command)

    async def cmd_namespace(self, command: Command) -> None:
        self.out(f'* NAMESPACE (("" "{DELIMITER}")) NIL NIL')
        self.ok(command)
