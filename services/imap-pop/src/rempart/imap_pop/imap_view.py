"""The selected folder as one IMAP session numbers it (RFC 3501 2.3.1.2), at the cost of what a
command touches (R-MBX-2).

Every UID of the folder is held, ascending, in a compact array (4 bytes a message: 400 KB for
100,000), which is what sequence numbers need. A message's fields (flags, MODSEQ, size, where
its body is) are loaded when a command touches it and kept while few; any of them may be
dropped at any time, being only a copy of the index. SELECT starts from the UIDs a session last
saved for the folder (``MailboxIndex.uid_cache``) plus the changes since, so a 100,000-message
folder opens in about the time a small one does.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Iterable

from rempart.common.mailstore import IndexedMessage

# Loaded messages kept between commands; past this the copies are dropped (they are re-read
# when a later command touches them).
LOADED_KEPT = 10_000


def gone(uid: int) -> IndexedMessage:
    """What the session shows of a message expunged elsewhere and not yet announced to it
    (RFC 2180 4.1): its number and UID, nothing to read."""
    return IndexedMessage(uid=uid, blob="", size=0, internal_date_ms=0, flags=frozenset(), transaction_id="")


def is_gone(message: IndexedMessage) -> bool:
    return not message.transaction_id


class FolderView:
    def __init__(self, uids: Iterable[int] = (), messages: Iterable[IndexedMessage] = ()) -> None:
        self.uids: array.array[int] = uids if isinstance(uids, array.array) else array.array("I", uids)
        self.loaded: dict[int, IndexedMessage] = {}
        for message in messages:
            self.uids.append(message.uid)
            self.loaded[message.uid] = message

    def __len__(self) -> int:
        return len(self.uids)

    def __bool__(self) -> bool:
        return bool(self.uids)

    @property
    def last_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def position(self, uid: int) -> int | None:
        """The index (sequence number - 1) of a UID, or None."""
        i = bisect.bisect_left(self.uids, uid)
        return i if i < len(self.uids) and self.uids[i] == uid else None

    def between(self, low: int, high: int) -> range:
        """The indexes of the UIDs from ``low`` to ``high``."""
        return range(bisect.bisect_left(self.uids, low), bisect.bisect_right(self.uids, high))

    def from_uid(self, uid: int) -> array.array[int]:
        """The UIDs at or above ``uid``."""
        return self.uids[bisect.bisect_left(self.uids, uid):]

    def message(self, index: int) -> IndexedMessage:
        """A loaded message (a command loads what it touches first: see ``missing``)."""
        return self.loaded[self.uids[index]]

    def missing(self, indexes: Iterable[int]) -> list[int]:
        """The UIDs among these indexes whose fields are not loaded."""
        return [self.uids[i] for i in indexes if self.uids[i] not in self.loaded]

    def put(self, message: IndexedMessage) -> None:
        self.loaded[message.uid] = message

    def append(self, messages: Iterable[IndexedMessage]) -> None:
        for message in messages:
            self.uids.append(message.uid)
            self.loaded[message.uid] = message

    def remove(self, uids: set[int]) -> None:
        """Drop some UIDs in one pass (an EXPUNGE of 50,000 messages is one copy of the array)."""
        if uids:
            self.uids = array.array("I", (u for u in self.uids if u not in uids))
            for uid in uids:
                self.loaded.pop(uid, None)

    def trim(self) -> None:
        """Between commands: past LOADED_KEPT copies, drop them all (they are re-read on use)."""
        if len(self.loaded) > LOADED_KEPT:
            self.loaded.clear()
