"""What one LIST may cost (finding 5 of the denial-of-service review): the patterns of a LIST
matched together, each name walked once with its parents answered on the way, and a tagged NO
once the walk would exceed its budget.

Before: a pattern like ``"*a" * 200 + "b"`` kept 200 positions alive per name character (13.7
ms per 200-character name), and every parent of every name was built and matched again (a
199-character ``fNNN/a/a/.../a`` has 97 of them): 40 such folders took 6.8 s for one pattern,
1,000 folders and 20 patterns (RFC 5258) far longer, the event loop blocked throughout.

The LIST command runs here against a stub backend (folders, subscriptions and special uses are
all LIST reads), so the timings are the matching alone; one test sends the refused LIST over the
wire to the real service.
"""

from __future__ import annotations

import asyncio
import timeit
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from test_imap_pop_attacks import imap_logged_in, still_serving

from rempart.imap_pop.imap_folders import (
    LIST_LINE_WORK,
    MAX_FOLDER_NAME,
    MAX_FOLDERS,
    MAX_LIST_PATTERNS,
    MAX_LIST_WORK,
    FolderCommands,
)
from rempart.imap_pop.imapproto import Command, ListPatterns, No, tokenize, wildcard_match

REFUSED = "NO [LIMIT] LIST too costly for this many mailboxes; use fewer or narrower patterns"


@dataclass
class Store:
    folders: list[str]
    subscriptions: list[str] = field(default_factory=list)
    uses: dict[str, str] = field(default_factory=dict)

    async def folders_of(self, account: str) -> list[str]:
        return list(self.folders)

    async def special_uses(self, account: str) -> dict[str, str]:
        return dict(self.uses)

    async def subscriptions_of(self, account: str) -> set[str]:
        return set(self.subscriptions)


class ListSession(FolderCommands):
    """FolderCommands with what LIST and LSUB read: the lines it writes are kept."""

    def __init__(self, store: Store) -> None:
        index = SimpleNamespace(folders=store.folders_of, special_uses=store.special_uses)
        self.backend: Any = SimpleNamespace(index=index,
                                            mailboxes=SimpleNamespace(subscriptions=store.subscriptions_of))
        self.account = "bob@example.org"
        self.lines: list[str] = []

    def out(self, line: str | bytes) -> None:
        self.lines.append(line if isinstance(line, str) else line.decode())

    def ok(self, command: Command, text: str = "") -> None:
        self.lines.append(f"{command.tag} OK {text or command.name + ' completed'}")


def run(store: Store, line: str) -> list[str]:
    """One command line as the session dispatches it (a refusal is the tagged reply)."""
    tokens = tokenize([line.encode()])
    tag, name = str(tokens[0]), str(tokens[1]).upper()
    session = ListSession(store)
    try:
        asyncio.run(session.cmd_list(Command(tag, name, tokens[2:])))
    except No as exc:
        session.lines.append(f"{tag} {'BAD' if exc.bad else 'NO'} {exc.text}")
    return session.lines


def deep_folders(count: int, depth: int) -> list[str]:
    """``fNNN/a/a/.../a``: each with depth - 1 parents, which do not exist."""
    return [f"f{i:03d}" + "/a" * depth for i in range(count)]


def ratio(small: Any, large: Any) -> float:
    # Best of interleaved repeats: a pause on a busy machine slows one sample, not the minimum.
    timings = [(timeit.timeit(small, number=1), timeit.timeit(large, number=1)) for _ in range(7)]
    return min(t for _, t in timings) / min(t for t, _ in timings)


def test_list_time_grows_linearly_with_the_depth_of_names() -> None:
    # 8 times deeper names: 8 times the characters and 8 times the implied parents. The walk is
    # linear in the characters (about 8 times); matching each parent again costs the square, and
    # with a position alive per wildcard walked, the cube.
    pattern = '"' + "*a" * 200 + 'b"'
    shallow, deep = Store(deep_folders(8, 12)), Store(deep_folders(8, 96))
    assert run(deep, f't LIST "" {pattern}') == ["t OK LIST completed"]
    assert ratio(lambda: run(shallow, f'a LIST "" {pattern}'), lambda: run(deep, f'a LIST "" {pattern}')) < 24


def test_list_time_does_not_multiply_by_the_wildcards() -> None:
    # 64 times as many wildcards, each keeping a position alive along names of "a": the same
    # few integer operations per name character (about 1.6 times as long, the wider integers),
    # where a set of positions walked one by one took about 19 times as long.
    store = Store([first + "a" * (MAX_FOLDER_NAME - 1) for first in "abcd"])
    few, many = '"' + "*a" * 3 + 'b"', '"' + "*a" * 200 + 'b"'
    assert ratio(lambda: run(store, f'a LIST "" {few}'), lambda: run(store, f'a LIST "" {many}')) < 6


def test_parents_of_deep_names_are_listed_as_before() -> None:
    # The parents answered while walking a name are those RFC 3501 6.3.8 lists: "%" levels
    # shown \Noselect, "*" all of them, children found among the folders.
    store = Store(["INBOX", "Work/2024/q1", "Work/2024/q2", "Archive"], subscriptions=["Work/2024/q1", "Gone/x"],
                  uses={"Archive": "\\Archive"})
    assert run(store, 'a LIST "" "%"') == [
        '* LIST (\\HasNoChildren) "/" "INBOX"',
        '* LIST (\\HasNoChildren \\Archive) "/" "Archive"',
        '* LIST (\\Noselect \\HasChildren) "/" "Work"',
        "a OK LIST completed"]
    assert run(store, 'a LIST "Work/" "%/q%"') == [
        '* LIST (\\HasNoChildren) "/" "Work/2024/q1"',
        '* LIST (\\HasNoChildren) "/" "Work/2024/q2"',
        "a OK LIST completed"]
    assert run(store, 'a LIST "" ("Work/*" "inbox" "Work/*")') == [
        '* LIST (\\HasNoChildren) "/" "INBOX"',
        '* LIST (\\Noselect \\HasChildren) "/" "Work/2024"',
        '* LIST (\\HasNoChildren) "/" "Work/2024/q1"',
        '* LIST (\\HasNoChildren) "/" "Work/2024/q2"',
        "a OK LIST completed"]
    assert run(store, 'a LSUB "" "*"') == [
        '* LSUB (\\Noselect) "/" "Gone"',
        '* LSUB (\\Noselect) "/" "Gone/x"',
        '* LSUB (\\Noselect) "/" "Work"',
        '* LSUB (\\Noselect) "/" "Work/2024"',
        '* LSUB () "/" "Work/2024/q1"',
        "a OK LSUB completed"]
    assert run(store, 'a LIST (SUBSCRIBED RECURSIVEMATCH) "" "Work/%"') == [
        '* LIST (\\Noselect \\HasChildren) "/" "Work/2024" ("CHILDINFO" ("SUBSCRIBED"))',
        "a OK LIST completed"]
    # Several patterns matched at once answer like each alone.
    names = ["a", "a/b", "a/b/c", "ab/c", "b/a", "", "a//b"]
    patterns = ["a%", "*c", "%/%", "a/*/c", "", "*", "%"]
    together = ListPatterns(patterns)
    for name in names:
        cut = [name[:i] for i, char in enumerate(name) if char == "/"] + [name]
        assert together.matching(name) == [n for n in cut if any(wildcard_match(p, n) for p in patterns)]


def test_the_largest_store_answers_one_pattern_and_refuses_twenty() -> None:
    # MAX_FOLDERS names of the longest length, each a chain of parents that do not exist: any
    # one pattern is walked; 20 distinct long patterns would walk every name 20 times over, and
    # "*" would list 99,000 parents (seconds of a blocked event loop): both refused before any
    # output. The same pattern 20 times is matched once.
    store = Store(deep_folders(MAX_FOLDERS, (MAX_FOLDER_NAME - 4) // 2))
    assert all(len(f) == MAX_FOLDER_NAME for f in store.folders)
    long = "*a" * 200
    assert run(store, f'a LIST "" "{long}b"') == ["a OK LIST completed"]
    same = " ".join([f'"{long}b"'] * MAX_LIST_PATTERNS)
    assert run(store, f'a LIST "" ({same})') == ["a OK LIST completed"]
    distinct = " ".join(f'"{long}{n}"' for n in range(MAX_LIST_PATTERNS))
    assert run(store, f'a LIST "" ({distinct})') == [f"a {REFUSED}"]
    assert run(store, f'a LSUB "" ({distinct})') == ["a OK LSUB completed"]  # no subscriptions: no work
    assert run(store, 'a LIST "" "*"') == [f"a {REFUSED}"]
    listed = run(store, 'a LIST "" "f007/a/a/%"')
    assert listed == ['* LIST (\\Noselect \\HasChildren) "/" "f007/a/a/a"', "a OK LIST completed"]
    # The largest store whose names all exist: "*" lists every one.
    flat = Store([f"f{i:03d}" + "a" * (MAX_FOLDER_NAME - 4) for i in range(MAX_FOLDERS)])
    listed = run(flat, 'a LIST "" "*"')
    assert listed[-1] == "a OK LIST completed" and len(listed) == 1 + MAX_FOLDERS
    assert MAX_FOLDERS * (MAX_FOLDER_NAME + LIST_LINE_WORK) <= MAX_LIST_WORK


def test_rename_cannot_grow_inferior_names_past_the_longest() -> None:
    # Renaming a parent to a longer name lengthened its inferiors with no check; renamed again
    # and again they grew without end, and every LIST walks them.
    moved: list[tuple[str, str]] = []
    store = Store(["p", "p/" + "c" * 190])

    async def rename_folder(account: str, old: str, new: str) -> None:
        moved.append((old, new))

    async def nothing(*args: Any) -> None:
        return None

    session = ListSession(store)
    session.backend.mailboxes.rename_folder = rename_folder
    session.backend.mailboxes.create_folder = nothing
    session.backend.publish_changed = nothing
    session.folder = None
    with pytest.raises(No, match=r"\[LIMIT\]"):
        asyncio.run(session.cmd_rename(Command("a", "RENAME", ["p", "q" * 20])))
    assert moved == []
    asyncio.run(session.cmd_rename(Command("a", "RENAME", ["p", "q" * 9])))
    assert moved == [("p", "q" * 9), ("p/" + "c" * 190, "q" * 9 + "/" + "c" * 190)]


@pytest.mark.timeout(60)
async def test_costly_list_is_refused_on_the_wire(service) -> None:  # type: ignore[no-untyped-def]
    # Subscriptions need no folder: names of 190 characters, then 20 distinct patterns that keep
    # walking every character. The server says NO and goes on serving.
    count = MAX_LIST_WORK // (MAX_LIST_PATTERNS * 190) + 10
    distinct = " ".join(f'"{"*a" * 100}{n}"' for n in range(MAX_LIST_PATTERNS))

    def session() -> tuple[list[bytes], list[bytes]]:
        raw = imap_logged_in(service.ports["imap"])
        raw.send(b"".join(b"s%d SUBSCRIBE f%03d%s\r\n" % (n, n, b"/a" * 93) for n in range(count)))
        for n in range(count):
            assert raw.until(b"s%d " % n)[-1].startswith(b"s%d OK" % n)
        raw.send(f'l LSUB "" ({distinct})\r\n'.encode())
        refused = raw.until(b"l ")
        raw.send(b'm LSUB "" "f000/a/%"\r\n')
        answered = raw.until(b"m ")
        raw.sock.close()
        return refused, answered

    refused, answered = await asyncio.to_thread(session)
    assert refused == [f"l {REFUSED}".encode()]
    assert answered == [b'* LSUB (\\Noselect) "/" "f000/a/a"', b"m OK LSUB completed"]
    assert await asyncio.to_thread(still_serving, service.ports["imap"]) == b"z OK NOOP completed"

