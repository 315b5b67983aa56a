"""The mailbox survives its service and its index (R-MBX-1, DESIGN "The mailbox: one change log").

imap-pop is killed with SIGKILL while IMAP clients APPEND, STORE and MOVE; every command that got
its OK is still true after the restart (counted). Then the Redis index is rebuilt from JetStream
(``python -m rempart.common.reindex``) and an IMAP client sees exactly what it saw before:
folders, UIDVALIDITY, UIDNEXT, UIDs, flags and subscriptions.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from rempart.common.events import MAIL_STREAM, connect_nats
from rempart.common.testing.devstack import AdminApi, Stack, strong_password

pytestmark = pytest.mark.timeout(240)

MESSAGES = 100  # delivered to INBOX first; the first 20 get STOREs (round after round), the rest MOVEs
STORED = 20
# The catch-up indexer's consumer redelivers what a killed replica had in hand after its ack wait
# (NATS' default, 30 s); for this test it is made this short (and put back afterwards), so that
# the wait for every delivery to be filed again is not mostly that timer.
INDEXER_ACK_WAIT = 3.0


def tls_context(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=stack.cert_file)


def connect(stack: Stack, address: str, password: str) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("127.0.0.1", stack.ports["imap-pop.imaps"], ssl_context=tls_context(stack), timeout=10)
    imap.login(address, password)
    return imap


@dataclass
class Outcomes:
    """What the server said OK to, and so must still be true."""

    appended: list[tuple[int, int, str]] = field(default_factory=list)  # UIDVALIDITY, UID, subject
    flagged: list[tuple[int, str]] = field(default_factory=list)  # INBOX UID, keyword given
    moved: list[tuple[int, int]] = field(default_factory=list)  # INBOX UID -> Archive UID
    errors: int = 0  # commands cut by the kill (no OK: nothing promised)


def worker(stack: Stack, address: str, password: str, kind: str, stop: threading.Event, out: Outcomes,
           lock: threading.Lock) -> None:
    pending = list(range(STORED + 1, MESSAGES + 1))
    n = 0
    imap: imaplib.IMAP4_SSL | None = None
    while not stop.is_set():
        try:
            if imap is None:
                imap = connect(stack, address, password)
                if kind != "append":
                    imap.select("INBOX")
            if kind == "append":
                n += 1
                subject = f"appended {n} {uuid.uuid4().hex[:6]}"
                typ, data = imap.append("Work", "(\\Seen)", None,
                                        f"Subject: {subject}\r\n\r\nbody {n}\r\n".encode())
                code = imap.untagged_responses.pop("APPENDUID", [b""])[-1] if typ == "OK" else b""
                match = re.search(rb"APPENDUID (\d+) (\d+)", data[0] or b"") or re.match(rb"(\d+) (\d+)", code)
                assert typ == "OK" and match, (typ, data)
                with lock:
                    out.appended.append((int(match.group(1)), int(match.group(2)), subject))
            elif kind == "store":
                uid, keyword = n % STORED + 1, f"$Round{n // STORED}"
                if n // STORED >= 40:  # under the 50 flags a message may carry
                    time.sleep(0.05)
                    continue
                typ, data = imap.uid("STORE", str(uid), "+FLAGS.SILENT", f"({keyword})")
                assert typ == "OK", data
                with lock:
                    out.flagged.append((uid, keyword))
                n += 1
            elif pending:
                uid = pending[0]
                typ, data = imap.uid("MOVE", str(uid), "Archive")
                assert typ == "OK", data
                copyuid = [line for line in imap.untagged_responses.pop("OK", []) if b"COPYUID" in line]
                match = re.search(rb"COPYUID \d+ (\d+) (\d+)", copyuid[-1] if copyuid else b"")
                assert match, copyuid
                with lock:
                    out.moved.append((int(match.group(1)), int(match.group(2))))
                pending.pop(0)
            else:
                time.sleep(0.05)
        except (imaplib.IMAP4.abort, OSError, imaplib.IMAP4.error) as exc:
            if isinstance(exc, imaplib.IMAP4.error) and not isinstance(exc, imaplib.IMAP4.abort) \
                    and "UNAVAILABLE" not in str(exc):
                raise
            with lock:
                out.errors += 1
            imap = None
            time.sleep(0.2)
    if imap is not None:
        try:
            imap.logout()
        except (imaplib.IMAP4.abort, OSError):
            pass


def set_indexer_ack_wait(stack: Stack, seconds: float) -> float:
    """Give the catch-up indexer's durable consumer this ack wait; returns the one it had."""

    async def update() -> float:
        nc = await connect_nats(stack.nats_url, "test-durability")
        try:
            js = nc.jetstream()
            config = (await js.consumer_info(MAIL_STREAM, "mailbox-indexer")).config
            before = float(config.ack_wait or 30.0)
            # The legacy durable create (no name): an update of the consumer's ack wait.
            updated = await js.add_consumer(MAIL_STREAM, config.evolve(ack_wait=seconds, name=None))
            assert updated.config.ack_wait == seconds, updated.config
            return before
        finally:
            await nc.close()

    return asyncio.run(update())


def indexer_caught_up(stack: Stack, timeout: float = 60.0) -> None:
    """Every delivery record filed: a record the killed replica had in hand comes back to the
    catch-up indexer after its ack wait (INDEXER_ACK_WAIT here)."""

    async def pending() -> int:
        nc = await connect_nats(stack.nats_url, "test-durability")
        try:
            info = await nc.jetstream().consumer_info(MAIL_STREAM, "mailbox-indexer")
            return int(info.num_pending) + int(info.num_ack_pending)
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while asyncio.run(pending()):
        assert time.monotonic() < deadline, "the catch-up indexer did not file every delivery"
        time.sleep(0.5)


def snapshot(stack: Stack, address: str, password: str) -> dict[str, object]:
    """What an IMAP client knows of the mailbox's state (UIDNEXT aside: see uidnexts)."""
    imap = connect(stack, address, password)
    try:
        folders = sorted(line.rsplit(b' "/" ', 1)[1].strip(b'"').decode() for line in imap.list()[1] if line)
        subscribed = sorted(line.rsplit(b' "/" ', 1)[1].strip(b'"').decode() for line in imap.lsub()[1] if line)
        state = {}
        for folder in folders:
            status = imap.status(f'"{folder}"', "(MESSAGES UIDVALIDITY)")[1][0]
            imap.select(f'"{folder}"', readonly=True)
            typ, data = imap.uid("FETCH", "1:*", "(FLAGS)")
            # \Recent is session state (RFC 3501 2.3.2), not the mailbox's: a rebuild keeps none.
            messages = sorted(line.replace(b" \\Recent", b"").replace(b"\\Recent ", b"").replace(b"\\Recent", b"")
                              for line in data if isinstance(line, bytes)) if typ == "OK" else []
            state[folder] = (status.split(b"(", 1)[1], messages)
        return {"folders": state, "subscribed": subscribed}
    finally:
        imap.logout()


def differences(before: dict[str, object], after: dict[str, object]) -> list[object]:
    """What differs between two snapshots: per folder its status, and per message (UID) the
    flags only before and only after."""
    def flags(lines: list[bytes]) -> dict[int, set[str]]:
        out = {}
        for line in lines:
            match = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", line)
            if match:
                out[int(match.group(1))] = set(match.group(2).decode().split())
        return out

    out: list[object] = []
    old, new = before["folders"], after["folders"]
    assert isinstance(old, dict) and isinstance(new, dict)
    for folder in sorted(set(old) | set(new)):
        if old.get(folder) != new.get(folder):
            (s1, m1), (s2, m2) = old.get(folder, (b"", [])), new.get(folder, (b"", []))
            f1, f2 = flags(m1), flags(m2)
            out.append((folder, s1, s2, {uid: (sorted(f1.get(uid, set()) - f2.get(uid, set())),
                                               sorted(f2.get(uid, set()) - f1.get(uid, set())))
                                         for uid in set(f1) | set(f2) if f1.get(uid) != f2.get(uid)}))
    if before["subscribed"] != after["subscribed"]:
        out.append(("subscribed", before["subscribed"], after["subscribed"]))
    return out


def uidnexts(stack: Stack, address: str, password: str) -> dict[str, int]:
    imap = connect(stack, address, password)
    try:
        folders = [line.rsplit(b' "/" ', 1)[1].strip(b'"').decode() for line in imap.list()[1] if line]
        return {f: int(re.search(rb"UIDNEXT (\d+)", imap.status(f'"{f}"', "(UIDNEXT)")[1][0]).group(1))  # type: ignore[union-attr]
                for f in folders}
    finally:
        imap.logout()


def messages_in(stack: Stack, address: str, password: str, folder: str) -> dict[int, tuple[str, str]]:
    """UID -> (subject, flags) of a folder."""
    imap = connect(stack, address, password)
    try:
        imap.select(folder, readonly=True)
        typ, data = imap.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK", data
        out = {}
        for item in data:
            if isinstance(item, tuple):
                uid = int(re.search(rb"UID (\d+)", item[0]).group(1))  # type: ignore[union-attr]
                flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode()  # type: ignore[union-attr]
                out[uid] = (item[1].decode().strip().removeprefix("Subject: "), flags)
        return out
    finally:
        imap.logout()


@pytest.fixture
def short_indexer_ack_wait(stack: Stack) -> Iterator[None]:
    before = set_indexer_ack_wait(stack, INDEXER_ACK_WAIT)
    try:
        yield
    finally:
        set_indexer_ack_wait(stack, before)


def wait_for(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.02)


def test_r_mbx_1_kill_9_during_append_store_move_then_rebuild_loses_nothing(
    stack: Stack, demo: dict[str, str], admin: AdminApi, short_indexer_ack_wait: None
) -> None:
    domain = f"durable-{uuid.uuid4().hex[:8]}.test"
    assert admin.call("POST", "/v1/domains", {"name": domain})[0] == 201
    address, password = f"keeper@{domain}", strong_password()
    assert admin.call("POST", f"/v1/domains/{domain}/accounts", {"address": address, "password": password})[0] == 201
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30) as client:
        client.starttls(context=tls_context(stack))
        client.login(address, password)
        for n in range(1, MESSAGES + 1):
            client.sendmail(address, [address], f"Subject: inbox {n}\r\n\r\nmessage {n}\r\n".encode())
    imap = connect(stack, address, password)
    for folder in ("Work", "Archive"):
        assert imap.create(folder)[0] == "OK"
        assert imap.subscribe(folder)[0] == "OK"
    assert imap.unsubscribe("Junk")[0] == "OK"
    deadline = time.monotonic() + 30
    while int(imap.select("INBOX")[1][0]) < MESSAGES:
        assert time.monotonic() < deadline, "the deliveries did not all reach INBOX"
        time.sleep(0.2)
    imap.logout()

    out, lock, stop = Outcomes(), threading.Lock(), threading.Event()
    threads = [threading.Thread(target=worker, args=(stack, address, password, kind, stop, out, lock), daemon=True)
               for kind in ("append", "store", "move")]
    for thread in threads:
        thread.start()

    def counts() -> tuple[int, int, int]:
        with lock:
            return len(out.appended), len(out.flagged), len(out.moved)

    # The kill comes once each kind of command has had OKs (a few of each: it lands mid-stream).
    wait_for(lambda: min(counts()) >= 3, 30, lambda: f"the commands did not all get going: {counts()}")
    stack.stop_service("imap-pop", signal.SIGKILL)
    done_at_kill = counts()
    stack.start_service("imap-pop")
    stack.wait_ready(names=("imap-pop",))
    # Then appends and stores get OKs again from the restarted service.
    wait_for(lambda: counts()[0] > done_at_kill[0] + 2 and counts()[1] > done_at_kill[1] + 2, 30,
             lambda: f"no APPEND or STORE OK'd after the restart: {done_at_kill} then {counts()}")
    stop.set()
    for thread in threads:
        thread.join(30)
    assert all(not t.is_alive() for t in threads)
    assert out.errors >= 1, "the kill cut no command: it proved nothing"
    print(f"OK'd before the kill (APPEND, STORE, MOVE): {done_at_kill}; in all: "
          f"{(len(out.appended), len(out.flagged), len(out.moved))}; commands cut: {out.errors}")
    # Each kind of command ran before the kill, and appends and stores after it too.
    assert all(done_at_kill), done_at_kill
    assert len(out.appended) > done_at_kill[0] and len(out.flagged) > done_at_kill[1], (done_at_kill, out)

    def check_outcomes() -> None:
        work = messages_in(stack, address, password, "Work")
        inbox = messages_in(stack, address, password, "INBOX")
        archive = messages_in(stack, address, password, "Archive")
        lost_appends = [(uid, s) for _, uid, s in out.appended if work.get(uid, ("", ""))[0] != s]
        lost_flags = [(uid, k) for uid, k in out.flagged if k not in inbox.get(uid, ("", ""))[1].split()]
        not_moved = [(src, dst) for src, dst in out.moved
                     if src in inbox or archive.get(dst, ("", ""))[0] != f"inbox {src}"]
        assert (lost_appends, lost_flags, not_moved) == ([], [], [])
        assert all("\\Seen" in work[uid][1] for _, uid, _ in out.appended)
        assert len({v for v, _, _ in out.appended}) == 1  # one UIDVALIDITY throughout: no renumbering

    indexer_caught_up(stack)
    check_outcomes()
    before, next_before = snapshot(stack, address, password), uidnexts(stack, address, password)

    # The index is lost (rebuilt from nothing), with the service stopped as the README says.
    stack.stop_service("imap-pop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMPART_")} | stack.env_for("imap-pop")
    run = subprocess.run([sys.executable, "-m", "rempart.common.reindex"], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    stack.start_service("imap-pop")
    stack.wait_ready(names=("imap-pop",))

    after, next_after = snapshot(stack, address, password), uidnexts(stack, address, password)
    assert after == before, differences(before, after)
    # UIDNEXT restarts at the mark the log reserved: never lower (RFC 3501 2.3.1.1).
    assert next_after.keys() == next_before.keys()
    assert all(next_after[f] >= next_before[f] for f in next_before), (next_before, next_after)
    assert after["subscribed"] == sorted(["Archive", "Drafts", "INBOX", "Sent", "Trash", "Work"])
    check_outcomes()
