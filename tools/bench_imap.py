"""IMAP read benchmark (issue 15): a 10,000-message INBOX read over one connection, Rempart beside Dovecot.

Both servers hold the same messages (about 2 KB each, generated from a fixed seed, none \\Seen):

* Rempart: the whole suite started by ``rempart.common.devstack.Stack`` (free ports, a temporary
  directory); the messages reach the demo user's INBOX by IMAP ``APPEND`` with LITERAL+
  (pipelined on one connection), so they take the path of any client's upload: blob and record
  fsynced in JetStream, the Redis index written.
* Dovecot (Debian ``dovecot-imapd``, installed with apt-get when missing): a private instance
  in a temporary directory (its own base_dir, listener, log), one user whose INBOX is a maildir
  written directly with the same bytes, one file per message.

On one IMAPS connection to each: ``SELECT INBOX``, then twice each (the first run is cold for the
server: Dovecot builds its index and header cache, Rempart reads its index and JetStream for
the first time; the files are in the OS page cache on both sides, having just been written)

* header sync: ``FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])``;
* full bodies: ``FETCH 1:* BODY.PEEK[]``.

Then, on fresh connections (issue 9), with the INBOX's UIDs read by ``UID SEARCH ALL`` (1..N on
both: Rempart numbers a new account's APPENDs from 1, Dovecot a new maildir's files from 1):

* one message per round trip: 20 connections at once, each logged in with INBOX selected, send
  ``UID FETCH <uid> (FLAGS BODY.PEEK[])`` for UIDs drawn from a fixed seed, one command at a time,
  ``--round-trips`` commands each (100 with ``--quick``, 300 otherwise); messages per second from
  the first command to the last reply, and the commands that failed;
* ``SELECT INBOX`` then ``UID FETCH <middle UID> (FLAGS BODY.PEEK[HEADER])``, timed together on a
  new connection just logged in, 5 times (a new connection each time); the median in ms.

Last (issue 9), a real client: ``mbsync`` (Debian ``isync`` with ``libsasl2-modules``, installed
with apt-get when missing) makes a first sync of the whole INBOX into an empty local Maildir, over
IMAPS with the server's certificate as the only one it trusts (``CertificateFile``,
``SystemCertificates no``), logging in with SASL PLAIN, ``Sync Pull``; timed from its start to
its exit, after which the Maildir must hold exactly the INBOX's messages. mbsync's own fsync per
message is off (``FSync no``): the client's disk would otherwise weigh more than the server.

Both servers verify an Argon2id hash at the auth service's default cost at each login (Dovecot's
passwd-file entry is ``{ARGON2ID}``, as in bench_auth), so a login costs both the same hash; only
mbsync's time includes a login.

Prints messages per second (and MB/s of literal data) for each run and the ratio
Rempart/Dovecot (for the SELECT latency and mbsync's seconds Dovecot/Rempart, so that above 1 is
Rempart ahead there too), and the servers' peak memory over the reads: the imap-pop process's
VmHWM (reset once the INBOX is filled), and for Dovecot the largest ``imap`` process's VmHWM,
the peak of all of them together, and with the ``imap-login`` processes, which hold the TLS
sessions (Dovecot runs one of each per connection): sums of PSS, so that shared pages count
once, sampled every 0.2 s.
A FETCH that ends in ``NO``/``BAD``, returns fewer messages than the mailbox holds, loses
its connection or runs out of time (an mbsync that fails or leaves another count) is reported as
FAILED with what arrived before, and the benchmark goes on with the next measurement (exit code
1 at the end). Needs root for Dovecot (apt-get, and Dovecot's own privilege separation).

    tools/bench_imap.py [--quick] [--messages N] [--round-trips N] [--only rempart|dovecot] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import grp
import os
import pwd
import random
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

# Installing Debian's Dovecot is the IMAP login benchmark's; one copy serves both (tools/ is on
# sys.path when a benchmark runs as a script).
from bench_auth import dovecot_conf, dovecot_passwd_line, ensure_dovecot

from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo, strong_password
from rempart.common.testing.localstack import free_port, stop_process, wait_for_port
from rempart.common.tls import write_self_signed

DOMAIN = "example.test"
DOVECOT_USER = "bench"
HEADER_FIELDS = "FROM TO SUBJECT DATE MESSAGE-ID"
FETCHES = {
    "header sync": f"FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS ({HEADER_FIELDS})])",
    "full bodies": "FETCH 1:* BODY.PEEK[]",
}
RUNS = ("first", "repeat")
APPEND_WINDOW = 64  # APPENDs in flight on the filling connection (LITERAL+: no round trip each)
LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
FETCH_LINE = re.compile(rb"^\* \d+ FETCH ")
ROUND_TRIP_CONNECTIONS = 20
ROUND_TRIP_SEED = 9  # the UIDs each connection fetches: the same sequence on both servers
ROUND_TRIP_WHAT = f"UID FETCH one message per round trip, {ROUND_TRIP_CONNECTIONS} connections"
LATENCY_SAMPLES = 5
LATENCY_WHAT = "SELECT + single-UID FETCH"
# Issue 9 (d): the same on a folder this small, so that the INBOX's figure shows what its size costs.
SMALL_FOLDER, SMALL_MESSAGES = "Small", 10
MBSYNC_WHAT = "mbsync first sync of INBOX"
RSS_SAMPLE_SECONDS = 0.2
WORDS = ("mail relay policy header mailbox index stream replica folder message account server "
         "client session fetch flags archive report quarter budget meeting draft review notes").split()


def log(message: str) -> None:
    print(f"[bench-imap {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The messages
# ---------------------------------------------------------------------------------------------
def make_messages(count: int, seed: int = 15) -> list[bytes]:
    """``count`` plain-text messages of 1.8-2.2 KB with CRLF line ends, the same on every run."""
    rng = random.Random(seed)
    start = 1_780_000_000
    messages = []
    for n in range(count):
        sender = f"sender{rng.randrange(200)}@example.net"
        subject = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))
        head = (f"From: Sender {n % 200} <{sender}>\r\n"
                f"To: Demo <demo@{DOMAIN}>\r\n"
                f"Subject: {subject} #{n}\r\n"
                f"Date: {email.utils.formatdate(start + 37 * n)}\r\n"
                f"Message-ID: <bench.{seed}.{n}@example.net>\r\n"
                "MIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=us-ascii\r\n"
                "\r\n")
        target = rng.randrange(1800, 2200)
        lines: list[str] = []
        size = len(head)
        while size < target:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 12)))
            lines.append(line)
            size += len(line) + 2
        messages.append((head + "\r\n".join(lines) + "\r\n").encode())
    return messages


# ---------------------------------------------------------------------------------------------
# A small IMAP client: one connection, responses read with their literals
# ---------------------------------------------------------------------------------------------
class ImapError(Exception):
    """The server refused a command we need (login, select, append)."""


@dataclass
class Response:
    tagged: bytes  # b"" when the connection ended first
    untagged: int  # untagged FETCH responses
    literal_bytes: int
    seconds: float


class ImapConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.tag_number = 0

    @classmethod
    async def open(cls, port: int, cafile: str) -> ImapConnection:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.check_hostname = False
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost",
                                                       limit=1 << 22)
        connection = cls(reader, writer)
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"greeting: {greeting[:200]!r}")
        return connection

    def next_tag(self) -> str:
        self.tag_number += 1
        return f"b{self.tag_number}"

    async def read_response(self, tag: str) -> Response:
        """Everything up to the tagged reply of ``tag``, literals included; counts FETCH lines."""
        started = time.perf_counter()
        untagged = literal_bytes = 0
        prefix = tag.encode() + b" "
        while True:
            line = await self.reader.readline()
            if not line:
                return Response(b"", untagged, literal_bytes, time.perf_counter() - started)
            first = line
            # A response line may carry several literals: "... {n}\r\n<n bytes>rest of the line".
            while (literal := LITERAL.search(line)) is not None:
                size = int(literal.group(1))
                await self.reader.readexactly(size)
                literal_bytes += size
                line = await self.reader.readline()
                if not line:
                    return Response(b"", untagged, literal_bytes, time.perf_counter() - started)
            if FETCH_LINE.match(first):
                untagged += 1
            elif first.startswith(prefix):
                return Response(first.rstrip(), untagged, literal_bytes, time.perf_counter() - started)

    async def command(self, text: str) -> Response:
        tag = self.next_tag()
        self.writer.write(f"{tag} {text}\r\n".encode())
        return await self.read_response(tag)

    async def must(self, text: str) -> Response:
        response = await self.command(text)
        if not response.tagged.split(b" ", 2)[1:2] == [b"OK"]:
            shown = text if not text.startswith("LOGIN") else "LOGIN ..."
            raise ImapError(f"{shown}: {response.tagged[:300]!r}")
        return response

    async def login(self, user: str, password: str) -> None:
        await self.must(f'LOGIN "{user}" "{password}"')

    async def select(self, folder: str = "INBOX") -> tuple[int, float]:
        """Selects ``folder``; returns its EXISTS count and the seconds SELECT took."""
        tag = self.next_tag()
        started = time.perf_counter()
        self.writer.write(f"{tag} SELECT {folder}\r\n".encode())
        exists = -1
        while True:
            line = await self.reader.readline()
            if not line:
                raise ImapError("connection closed during SELECT")
            found = re.match(rb"^\* (\d+) EXISTS", line)
            if found:
                exists = int(found.group(1))
            if line.startswith(tag.encode() + b" "):
                if not line.startswith(tag.encode() + b" OK"):
                    raise ImapError(f"SELECT {folder}: {line[:300]!r}")
                return exists, time.perf_counter() - started

    async def uid_search_all(self) -> list[int]:
        """``UID SEARCH ALL`` in the selected folder: its UIDs, ascending."""
        tag = self.next_tag()
        self.writer.write(f"{tag} UID SEARCH ALL\r\n".encode())
        uids: list[int] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ImapError("connection closed during UID SEARCH")
            if line.startswith(b"* SEARCH"):
                uids += (int(word) for word in line.split()[2:] if word.isdigit())
            elif line.startswith(tag.encode() + b" "):
                if not line.startswith(tag.encode() + b" OK"):
                    raise ImapError(f"UID SEARCH ALL: {line[:300]!r}")
                return sorted(uids)

    async def append_all(self, folder: str, messages: list[bytes]) -> float:
        """APPEND every message with LITERAL+, ``APPEND_WINDOW`` in flight; returns the seconds."""
        started = time.perf_counter()
        pending: list[str] = []
        done = 0

        async def settle(oldest: str) -> None:
            response = await self.read_response(oldest)
            if not response.tagged.startswith(f"{oldest} OK".encode()):
                raise ImapError(f"APPEND {done + 1} of {len(messages)}: {response.tagged[:300]!r}")

        for message in messages:
            tag = self.next_tag()
            self.writer.write(f"{tag} APPEND {folder} {{{len(message)}+}}\r\n".encode() + message + b"\r\n")
            pending.append(tag)
            if len(pending) >= APPEND_WINDOW:
                await self.writer.drain()
                await settle(pending.pop(0))
                done += 1
                if done % 1000 == 0:
                    log(f"  {done} appended ({done / (time.perf_counter() - started):.0f}/s)")
        await self.writer.drain()
        while pending:
            await settle(pending.pop(0))
            done += 1
        return time.perf_counter() - started

    async def close(self) -> None:
        try:
            async with asyncio.timeout(5):
                await self.command("LOGOUT")
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        self.writer.close()
        try:
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            pass


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------
@dataclass
class Measure:
    target: str
    what: str
    run: str
    expected: int
    messages: int = 0
    literal_bytes: int = 0
    seconds: float = 0.0
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure and self.messages == self.expected

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        megabytes = self.literal_bytes / 1e6
        figures = (f"{self.rate:,.0f} msg/s ({self.messages:,}/{self.expected:,} in {self.seconds:.2f} s; "
                   f"literals {megabytes:.2f} MB, {megabytes / max(self.seconds, 1e-9):.1f} MB/s)")
        if self.ok:
            return f"RESULT {self.target} {self.what} ({self.run}): {figures}"
        reason = self.failure or f"only {self.messages:,} of {self.expected:,} messages answered"
        return f"RESULT {self.target} {self.what} ({self.run}): FAILED: {reason}; before that: {figures}"


async def measure_fetches(target: str, port: int, cafile: str, user: str, password: str, expected: int,
                          timeout: float) -> list[Measure]:
    """One connection: SELECT, then each FETCH of FETCHES once per run. A failed FETCH is
    recorded; when the connection is lost with it, a new one is opened for the next."""
    results: list[Measure] = []
    connection: ImapConnection | None = None
    try:
        for run in RUNS:
            for what, command in FETCHES.items():
                if connection is None:
                    connection = await ImapConnection.open(port, cafile)
                    await connection.login(user, password)
                    exists, select_seconds = await connection.select()
                    log(f"{target}: SELECT INBOX: {exists:,} messages in {select_seconds:.2f} s")
                    if exists != expected:
                        log(f"{target}: WARNING: INBOX holds {exists:,} messages, {expected:,} expected")
                result = Measure(target, what, run, expected)
                load = os.getloadavg()[0]
                try:
                    async with asyncio.timeout(timeout):
                        response = await connection.command(command)
                except TimeoutError:
                    result.failure = f"no tagged reply within {timeout:.0f} s"
                    response = None
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ValueError) as exc:
                    result.failure = f"connection error: {type(exc).__name__}: {exc}"
                    response = None
                if response is not None:
                    result.messages, result.literal_bytes = response.untagged, response.literal_bytes
                    result.seconds = response.seconds
                    if not response.tagged:
                        result.failure = "connection closed before the tagged reply"
                    elif not response.tagged.split(b" ", 2)[1:2] == [b"OK"]:
                        result.failure = f"server answered {response.tagged.decode(errors='replace')[:300]}"
                if result.failure:
                    # The stream may be mid-response: start over on a fresh connection.
                    connection.writer.close()
                    connection = None
                log(f"{result.line().removeprefix('RESULT ')} (load average {load:.1f})")
                results.append(result)
    finally:
        if connection is not None:
            await connection.close()
    return results


# ---------------------------------------------------------------------------------------------
# One message per round trip over many connections, and SELECT latency (issue 9)
# ---------------------------------------------------------------------------------------------
CONNECTION_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ImapError)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass
class RoundTrips:
    """``UID FETCH`` of one message per command, one command at a time on each connection."""

    target: str
    per_connection: int
    messages: int = 0  # commands answered OK with one message
    failed: int = 0  # commands answered otherwise, or never (their connection lost)
    literal_bytes: int = 0
    seconds: float = 0.0  # from the first command to the last reply
    failure: str = ""  # why the measurement did not start or did not finish
    first_error: str = ""

    @property
    def expected(self) -> int:
        return ROUND_TRIP_CONNECTIONS * self.per_connection

    @property
    def ok(self) -> bool:
        return not self.failure and not self.failed and self.messages == self.expected

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def fail(self, commands: int, reason: str) -> None:
        self.failed += commands
        self.first_error = self.first_error or reason

    def line(self) -> str:
        figures = (f"{self.rate:,.0f} msg/s ({self.messages:,}/{self.expected:,} in {self.seconds:.2f} s, "
                   f"{self.failed:,} failed; {self.per_connection:,} per connection, "
                   f"literals {self.literal_bytes / 1e6:.2f} MB)")
        if self.ok:
            return f"RESULT {self.target} {ROUND_TRIP_WHAT}: {figures}"
        if self.failure:
            reason = self.failure
        elif self.failed:
            reason = f"{self.failed:,} commands failed, the first: {self.first_error}"
        else:
            reason = f"only {self.messages:,} of {self.expected:,} messages answered"
        return f"RESULT {self.target} {ROUND_TRIP_WHAT}: FAILED: {reason}; before that: {figures}"


@dataclass
class Latency:
    """``SELECT INBOX`` and one ``UID FETCH``, timed together, on connections just logged in."""

    target: str
    folder: str = "INBOX"
    samples: list[float] = field(default_factory=list)  # seconds, SELECT and UID FETCH together
    selects: list[float] = field(default_factory=list)  # seconds, SELECT alone
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure and len(self.samples) == LATENCY_SAMPLES

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000 if self.samples else 0.0

    def line(self) -> str:
        figures = "no sample"
        if self.samples:
            figures = (f"median {self.median_ms:.1f} ms over {len(self.samples)} new connections "
                       f"(min {min(self.samples) * 1000:.1f}, max {max(self.samples) * 1000:.1f}; "
                       f"SELECT alone median {statistics.median(self.selects) * 1000:.1f} ms)")
        what = LATENCY_WHAT if self.folder == "INBOX" else f"{LATENCY_WHAT} in {SMALL_MESSAGES}-message {self.folder}"
        if self.ok:
            return f"RESULT {self.target} {what}: {figures}"
        reason = self.failure or f"only {len(self.samples)} of {LATENCY_SAMPLES} samples"
        return f"RESULT {self.target} {what}: FAILED: {reason}; before that: {figures}"


# ---------------------------------------------------------------------------------------------
# A real client's first sync: mbsync (issue 9)
# ---------------------------------------------------------------------------------------------
@dataclass
class Mbsync:
    """One ``mbsync`` run from an empty Maildir: seconds from start to exit, messages it left."""

    target: str
    expected: int
    synced: int = 0  # message files in the Maildir's cur/ and new/ after the run
    seconds: float = 0.0
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure and self.synced == self.expected

    def line(self) -> str:
        rate = self.synced / self.seconds if self.seconds > 0 else 0.0
        figures = f"{self.seconds:.2f} s ({self.synced:,}/{self.expected:,} messages, {rate:,.0f} msg/s)"
        if self.ok:
            return f"RESULT {self.target} {MBSYNC_WHAT}: {figures}"
        reason = self.failure or f"the Maildir holds {self.synced:,} messages, {self.expected:,} expected"
        return f"RESULT {self.target} {MBSYNC_WHAT}: FAILED: {reason}; before that: {figures}"


def sasl_plain_installed() -> bool:
    """Cyrus SASL's PLAIN module (Debian's libsasl2-modules), which mbsync needs for AUTHENTICATE PLAIN."""
    return any(Path("/usr/lib").glob("*/sasl2/libplain.so*")) or any(Path("/usr/lib/sasl2").glob("libplain.so*"))


def ensure_mbsync() -> str:
    """mbsync and the SASL PLAIN module, installed from Debian (isync, libsasl2-modules) when missing."""
    found = shutil.which("mbsync")
    if found and sasl_plain_installed():
        return found
    if os.geteuid() != 0:
        raise RuntimeError("mbsync or Cyrus SASL's PLAIN module missing and not root: "
                           "apt-get install isync libsasl2-modules first")
    log("installing Debian isync and libsasl2-modules")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "isync", "libsasl2-modules"]
    if subprocess.run(install, env=env, timeout=600, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, timeout=600, check=True, capture_output=True)
        subprocess.run(install, env=env, timeout=600, check=True, capture_output=True)
    found = shutil.which("mbsync")
    if not found or not sasl_plain_installed():
        raise RuntimeError("apt-get installed isync and libsasl2-modules but mbsync or the PLAIN module is missing")
    return found


def mbsync_config(port: int, cafile: str, user: str, password_file: Path, maildir: Path) -> str:
    """The INBOX over IMAPS into a Maildir, trusting only the server's certificate (whose DNS name is
    localhost: mbsync matches names, not IP addresses); SASL PLAIN."""
    return f"""# Private benchmark configuration (tools/bench_imap.py)
FSync no

IMAPAccount bench
Host localhost
Port {port}
User "{user}"
PassCmd "cat {password_file}"
SSLType IMAPS
CertificateFile {cafile}
SystemCertificates no
AuthMechs PLAIN
Timeout 120

IMAPStore remote
Account bench

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Sync Pull
SyncState *
"""


def maildir_count(folder: Path) -> int:
    return sum(1 for sub in ("cur", "new") if (folder / sub).is_dir()
               for entry in (folder / sub).iterdir() if entry.is_file())


def measure_mbsync(target: str, port: int, cafile: str, user: str, password: str, expected: int,
                   workdir: Path, timeout: float) -> Mbsync:
    """A fresh ``mbsync`` of the whole INBOX into an empty Maildir; its output goes to a log file."""
    result = Mbsync(target, expected)
    try:
        binary = ensure_mbsync()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        result.failure = f"mbsync not available: {describe(exc)}"
        return result
    base = workdir / f"mbsync-{target}"
    maildir = base / "Mail"
    maildir.mkdir(parents=True)  # mbsync creates the folder, not the store
    password_file = base / "password"
    password_file.write_text(password)
    password_file.chmod(0o600)
    config = base / "mbsyncrc"
    config.write_text(mbsync_config(port, cafile, user, password_file, maildir))
    output = base / "mbsync.log"
    load = os.getloadavg()[0]
    with open(output, "wb") as out:
        started = time.perf_counter()
        try:
            code = subprocess.run([binary, "-c", str(config), "inbox"], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False,
                                  env={"HOME": str(base), "PATH": "/usr/bin:/bin"}).returncode
        except subprocess.TimeoutExpired:
            code = None
        result.seconds = time.perf_counter() - started
    result.synced = maildir_count(maildir / "INBOX")
    if code is None:
        result.failure = f"not done within {timeout:.0f} s"
    elif code != 0:
        tail = " | ".join(output.read_text(errors="replace").strip().splitlines()[-4:])
        result.failure = f"mbsync exited with {code}: {tail[:400] or 'no output'} (see {output})"
    log(f"{result.line().removeprefix('RESULT ')} (load average {load:.1f})")
    return result


# ---------------------------------------------------------------------------------------------
# Peak memory of the serving processes
# ---------------------------------------------------------------------------------------------
def status_kib(pid: int, name: str) -> int | None:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM), or None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """The proportional set size of ``pid`` (pages shared with N processes count 1/N), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_tree(roots: list[int]) -> dict[int, str]:
    """Every live process under ``roots`` (included), with its command name."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        parents[int(entry)] = (int(raw[raw.rindex(")") + 2:].split()[1]), comm)
    wanted = {pid for pid in roots if pid in parents}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    return {pid: parents[pid][1] for pid in wanted}


def reset_peak(pid: int) -> bool:
    """Restart the kernel's VmHWM of ``pid`` from its current RSS (clear_refs 5, Linux 4.0+, root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakRss:
    """Peak resident memory of a server's processes named ``comm`` (all of its tree if empty)."""

    target: str
    what: str  # the processes measured, for the report
    largest_kib: int = 0  # the largest VmHWM of one such process
    together_kib: int = 0  # the largest sampled sum of their PSS
    most_processes: int = 0
    wider_kib: int = 0  # the same sum over the ``wider`` processes too (Dovecot: imap-login, the TLS side)
    wider: str = ""  # what those are, for the report
    note: str = ""

    @property
    def ok(self) -> bool:
        return True  # a figure, not a test: an unreadable /proc shows as 0

    def line(self) -> str:
        together = ""
        if self.most_processes > 1:
            together = f"; all together {self.together_kib / 1024:.1f} MiB (up to {self.most_processes} at once)"
        if self.wider:
            together += f"; with {self.wider} {self.wider_kib / 1024:.1f} MiB"
        if together:
            together += (f" at most: sums of PSS, shared pages counted once, sampled every "
                         f"{RSS_SAMPLE_SECONDS:g} s")
        note = f"; {self.note}" if self.note else ""
        kind = "largest VmHWM of one" if self.most_processes > 1 else "VmHWM"
        return (f"RESULT {self.target} peak RSS: {self.what} {self.largest_kib / 1024:.1f} MiB "
                f"({kind}{together}{note})")


class RssSampler:
    """Follows a server's process tree in a thread: each process's VmHWM (kept after it exits,
    as last seen) and the largest sums of PSS seen at once (Dovecot's processes share pages:
    adding their RSS would count libdovecot once per process)."""

    def __init__(self, result: PeakRss, roots: list[int], comm: str = "", wider: str = "") -> None:
        self.result = result
        self.roots = roots
        self.comm = comm  # only processes of this name ("": every process of the tree)
        self.wider = wider  # another name, counted in wider_kib with those
        self.peaks: dict[int, int] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"rss-{result.target}", daemon=True)

    def __enter__(self) -> RssSampler:
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(10)
        self.sample()

    def _run(self) -> None:
        while not self.stop_event.wait(RSS_SAMPLE_SECONDS):
            self.sample()

    def sample(self) -> None:
        together = wider = count = 0
        for pid, comm in process_tree(self.roots).items():
            if self.comm and comm not in (self.comm, self.wider):
                continue
            pss = pss_kib(pid)
            if pss is None:
                continue
            wider += pss
            if self.comm and comm != self.comm:
                continue
            peak = status_kib(pid, "VmHWM")
            if peak is None:
                continue
            together += pss
            count += 1
            self.peaks[pid] = max(self.peaks.get(pid, 0), peak)
        self.result.together_kib = max(self.result.together_kib, together)
        self.result.wider_kib = max(self.result.wider_kib, wider)
        self.result.most_processes = max(self.result.most_processes, count)
        self.result.largest_kib = max(self.peaks.values(), default=0)


Result: TypeAlias = Measure | RoundTrips | Latency | Mbsync | PeakRss


async def open_selected(port: int, cafile: str, user: str, password: str) -> ImapConnection:
    """A new connection, logged in, with INBOX selected."""
    connection = await ImapConnection.open(port, cafile)
    try:
        await connection.login(user, password)
        await connection.select()
    except BaseException:
        connection.writer.close()
        raise
    return connection


async def inbox_uids(port: int, cafile: str, user: str, password: str) -> list[int]:
    connection = await open_selected(port, cafile, user, password)
    try:
        return await connection.uid_search_all()
    finally:
        await connection.close()


async def fetch_one_per_round_trip(connection: ImapConnection, uids: list[int], result: RoundTrips,
                                   start: asyncio.Event) -> float:
    """Once ``start`` is set, ``UID FETCH`` each of ``uids`` in turn; returns the time of the last reply."""
    await start.wait()
    for done, uid in enumerate(uids):
        try:
            response = await connection.command(f"UID FETCH {uid} (FLAGS BODY.PEEK[])")
        except CONNECTION_ERRORS as exc:
            result.fail(len(uids) - done, f"UID FETCH {uid}: connection error: {describe(exc)}")
            break
        if not response.tagged:
            result.fail(len(uids) - done, f"UID FETCH {uid}: connection closed before the tagged reply")
            break
        if response.tagged.split(b" ", 2)[1:2] == [b"OK"] and response.untagged == 1:
            result.messages += 1
            result.literal_bytes += response.literal_bytes
        else:
            result.fail(1, f"UID FETCH {uid}: {response.untagged} FETCH responses, "
                           f"{response.tagged.decode(errors='replace')[:300]}")
    return time.perf_counter()


async def measure_round_trips(target: str, port: int, cafile: str, user: str, password: str, uids: list[int],
                              per_connection: int, timeout: float) -> RoundTrips:
    """``ROUND_TRIP_CONNECTIONS`` connections log in and select, then all fetch at once, one message
    per command; the UIDs come from a fixed seed per connection (the same on both servers).

    The connections log in one after the other: 20 Argon2id verifications at once on 2 cores
    outlast Rempart's deadline for its call to auth (some logins then get ``NO [UNAVAILABLE]``),
    and logins are bench_auth's measurement, not this one's."""
    result = RoundTrips(target, per_connection)
    picks = [random.Random(ROUND_TRIP_SEED + n).choices(uids, k=per_connection)
             for n in range(ROUND_TRIP_CONNECTIONS)]
    connections: list[ImapConnection] = []
    started: float | None = None
    try:
        async with asyncio.timeout(timeout):
            for _ in picks:
                connections.append(await open_selected(port, cafile, user, password))
            start = asyncio.Event()
            workers = [asyncio.create_task(fetch_one_per_round_trip(connection, chosen, result, start))
                       for connection, chosen in zip(connections, picks, strict=True)]
            started = time.perf_counter()
            start.set()
            result.seconds = max(await asyncio.gather(*workers)) - started
    except TimeoutError:
        result.failure = f"not done within {timeout:.0f} s"
        if started is not None:
            result.seconds = time.perf_counter() - started
    except CONNECTION_ERRORS as exc:  # only while opening: the workers catch their own
        result.failure = (f"connection {len(connections) + 1} of {len(picks)} could not log in and select: "
                          f"{describe(exc)}")
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
    return result


async def measure_latency(target: str, port: int, cafile: str, user: str, password: str, uid: int,
                          timeout: float, folder: str = "INBOX") -> Latency:
    """``LATENCY_SAMPLES`` times, on a new connection once logged in: ``SELECT INBOX`` then
    ``UID FETCH uid (FLAGS BODY.PEEK[HEADER])``, timed from sending SELECT to the FETCH's tagged reply."""
    result = Latency(target, folder)
    try:
        for _ in range(LATENCY_SAMPLES):
            async with asyncio.timeout(timeout):
                connection = await ImapConnection.open(port, cafile)
                try:
                    await connection.login(user, password)
                    started = time.perf_counter()
                    _, select_seconds = await connection.select(folder)
                    response = await connection.command(f"UID FETCH {uid} (FLAGS BODY.PEEK[HEADER])")
                    seconds = time.perf_counter() - started
                finally:
                    await connection.close()
            if response.tagged.split(b" ", 2)[1:2] != [b"OK"] or response.untagged != 1:
                result.failure = (f"UID FETCH {uid}: {response.untagged} FETCH responses, "
                                  f"{response.tagged.decode(errors='replace')[:300] or 'connection closed'}")
                break
            result.samples.append(seconds)
            result.selects.append(select_seconds)
    except TimeoutError:
        result.failure = f"a sample took over {timeout:.0f} s"
    except CONNECTION_ERRORS as exc:
        result.failure = describe(exc)
    return result


async def measure_round_trips_and_latency(target: str, port: int, cafile: str, user: str, password: str,
                                          expected: int, args: argparse.Namespace) -> list[Result]:
    round_trips, latency = RoundTrips(target, args.round_trips), Latency(target)
    uids: list[int] = []
    try:
        async with asyncio.timeout(args.timeout):
            uids = await inbox_uids(port, cafile, user, password)
    except CONNECTION_ERRORS as exc:  # TimeoutError included
        round_trips.failure = latency.failure = f"UID SEARCH ALL: {describe(exc)}"
    if uids == list(range(1, expected + 1)):
        log(f"{target}: UID SEARCH ALL: UIDs 1..{expected:,}")
    elif uids:
        log(f"{target}: WARNING: UID SEARCH ALL: {len(uids):,} UIDs from {uids[0]} to {uids[-1]}, "
            f"not 1..{expected:,}; fetching those")
    elif not round_trips.failure:
        round_trips.failure = latency.failure = "UID SEARCH ALL found no message"
    if uids:
        load = os.getloadavg()[0]
        round_trips = await measure_round_trips(target, port, cafile, user, password, uids, args.round_trips,
                                                args.timeout)
        log(f"{round_trips.line().removeprefix('RESULT ')} (load average {load:.1f})")
        load = os.getloadavg()[0]
        latency = await measure_latency(target, port, cafile, user, password, uids[len(uids) // 2], args.timeout)
        log(f"{latency.line().removeprefix('RESULT ')} (load average {load:.1f})")
        small = await measure_latency(target, port, cafile, user, password, SMALL_MESSAGES // 2, args.timeout,
                                      SMALL_FOLDER)
        log(f"{small.line().removeprefix('RESULT ')}")
        return [round_trips, latency, small]
    return [round_trips, latency]


async def measure_target(target: str, port: int, cafile: str, user: str, password: str, expected: int,
                         args: argparse.Namespace) -> list[Result]:
    """Every measurement on one server: the FETCH 1:* runs, then the round trips and the latency."""
    results: list[Result] = [*await measure_fetches(target, port, cafile, user, password, expected, args.timeout)]
    return results + await measure_round_trips_and_latency(target, port, cafile, user, password, expected, args)


# ---------------------------------------------------------------------------------------------
# Rempart
# ---------------------------------------------------------------------------------------------
def bench_rempart(args: argparse.Namespace, workdir: Path, messages: list[bytes]) -> list[Result]:
    stack = Stack(workdir=workdir / "rempart")
    try:
        log(f"starting the Rempart suite (logs in {stack.workdir})")
        stack.start()
        demo = bootstrap_demo(stack, DOMAIN)
        api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
        api.login(stack.admin_email, stack.admin_password)
        # Only reading is measured: intrusion prevention's connection limits stay out of the way.
        status, body = api.call("PATCH", "/v1/settings", {"ips": {"whitelist": ["127.0.0.1/32", "::1/128"]}})
        if status != 200:
            raise RuntimeError(f"PATCH /v1/settings failed: {status} {body}")
        time.sleep(1.5)  # config.changed reaches every service well within this (R-OPS-1)
        port, user, password = stack.ports["imap-pop.imaps"], demo["user"], demo["user_password"]

        async def fill() -> float:
            connection = await ImapConnection.open(port, stack.cert_file)
            try:
                await connection.login(user, password)
                seconds = await connection.append_all("INBOX", messages)
                await connection.command(f"CREATE {SMALL_FOLDER}")
                await connection.append_all(SMALL_FOLDER, messages[:SMALL_MESSAGES])
                return seconds
            finally:
                await connection.close()

        log(f"rempart: APPEND {len(messages):,} messages to {user}'s INBOX")
        seconds = asyncio.run(asyncio.wait_for(fill(), args.timeout))
        log(f"rempart: filled in {seconds:.1f} s ({len(messages) / seconds:.0f} APPEND/s)")
        imap_pop = stack.procs["imap-pop"].pid
        rss = PeakRss("rempart", "imap-pop process")
        before = status_kib(imap_pop, "VmRSS") or 0
        # The peak of the reads, not of the APPENDs that filled the INBOX (Dovecot's is written directly).
        rss.note = (f"since the INBOX was filled, when it held {before / 1024:.1f} MiB" if reset_peak(imap_pop)
                    else "includes filling the INBOX (VmHWM could not be reset)")
        with RssSampler(rss, [imap_pop]):
            results = asyncio.run(measure_target("rempart", port, stack.cert_file, user, password, len(messages),
                                                 args))
            results.append(measure_mbsync("rempart", port, stack.cert_file, user, password, len(messages),
                                          workdir, args.timeout))
        results.append(rss)
        log(rss.line().removeprefix("RESULT "))
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} died during the benchmark:\n{stack.log_tail(name)}")
        return results
    finally:
        stack.stop()


# ---------------------------------------------------------------------------------------------
# Dovecot
# ---------------------------------------------------------------------------------------------
def write_maildir(home: Path, messages: list[bytes], uid: int, gid: int, folder: str = "") -> None:
    """The INBOX (or a Maildir++ ``folder``) as a maildir: one file per message in cur/, no flags
    (":2,"), sizes in the name."""
    maildir = home / "Maildir" / folder if folder else home / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    received = 1_780_000_000
    for n, message in enumerate(messages):
        path = maildir / "cur" / f"{received + n}.M{n}P1.bench,S={len(message)}:2,"
        path.write_bytes(message)
        os.utime(path, (received + n, received + n))  # arrival order = file time order
    for path in [home, *home.rglob("*")]:
        os.chown(path, uid, gid)


def bench_dovecot(args: argparse.Namespace, workdir: Path, messages: list[bytes]) -> list[Result]:
    binary = ensure_dovecot()
    base = workdir / "dovecot"
    for sub in ("run", "state", "home"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    for path in (workdir, base):
        path.chmod(0o755)
    pair = write_self_signed(base / "tls", ["localhost", "127.0.0.1"])
    password = strong_password()
    passwd = base / "passwd"
    passwd.write_text(dovecot_passwd_line(DOVECOT_USER, password))
    passwd.chmod(0o644)
    log(f"dovecot: writing {len(messages):,} messages to a maildir")
    write_maildir(base / "home" / DOVECOT_USER, messages, uid, gid)
    write_maildir(base / "home" / DOVECOT_USER, messages[:SMALL_MESSAGES], uid, gid, f".{SMALL_FOLDER}")
    os.chown(base / "home", uid, gid)
    port = free_port()
    conf = base / "dovecot.conf"
    conf.write_text(dovecot_conf(base, port, pair.cert_file, pair.key_file, passwd, uid, gid))
    log(f"dovecot: starting on 127.0.0.1:{port} (config {conf})")
    with open(base / "stdout.log", "wb") as out:
        proc = subprocess.Popen([binary, "-F", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout=20, proc=proc)
        except (TimeoutError, RuntimeError) as exc:
            log_file = base / "dovecot.log"
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"Dovecot did not start: {exc}\n{tail}") from exc
        rss = PeakRss("dovecot", "imap processes", wider="the imap-login processes (TLS)")
        with RssSampler(rss, [proc.pid], comm="imap", wider="imap-login"):
            results = asyncio.run(measure_target("dovecot", port, pair.cert_file, DOVECOT_USER, password,
                                                 len(messages), args))
            results.append(measure_mbsync("dovecot", port, pair.cert_file, DOVECOT_USER, password, len(messages),
                                          workdir, args.timeout))
        log(rss.line().removeprefix("RESULT "))
        return [*results, rss]
    finally:
        stop_process(proc, group=True)


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=10_000, help="messages in the INBOX (default 10,000)")
    parser.add_argument("--quick", action="store_true", help="1,000 messages (a smoke run)")
    parser.add_argument("--round-trips", type=int,
                        help=f"UID FETCH commands per connection in the {ROUND_TRIP_CONNECTIONS}-connection "
                             "measurement (default 300, 100 with --quick)")
    parser.add_argument("--only", choices=("rempart", "dovecot"), help="run one side only")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on each FETCH, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 1_000)
    if args.messages < 1:
        parser.error("--messages must be positive")
    if args.round_trips is None:
        args.round_trips = 100 if args.quick else 300
    if args.round_trips < 1:
        parser.error("--round-trips must be positive")
    return args


def summary(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\nIMAP read benchmark: one IMAPS connection, {args.messages:,} messages of about 2 KB in INBOX, "
          f"{os.cpu_count()} cores")
    measures = [r for r in results if isinstance(r, Measure)]
    for result in measures:
        print(result.line())
    by_key = {(r.target, r.what, r.run): r for r in measures}
    for what in FETCHES:
        for run in RUNS:
            ours, theirs = by_key.get(("rempart", what, run)), by_key.get(("dovecot", what, run))
            if ours is None or theirs is None:
                continue
            if ours.ok and theirs.ok and theirs.rate > 0:
                print(f"ratio rempart/dovecot {what} ({run}): {ours.rate / theirs.rate:.2f} "
                      f"({ours.rate:,.0f} vs {theirs.rate:,.0f} msg/s)")
            else:
                failed = " and ".join(m.target for m in (ours, theirs) if not m.ok)
                print(f"ratio rempart/dovecot {what} ({run}): none, the FETCH failed on {failed}")
    summary_round_trips_and_latency(results)
    summary_mbsync_and_memory(results)


def summary_mbsync_and_memory(results: list[Result]) -> None:
    syncs = {r.target: r for r in results if isinstance(r, Mbsync)}
    for sync in syncs.values():
        print(sync.line())
    mine, other = syncs.get("rempart"), syncs.get("dovecot")
    if mine is not None and other is not None:
        # Seconds: lower is better, so Dovecot/Rempart, above 1 meaning Rempart ahead.
        if mine.ok and other.ok and mine.seconds > 0:
            print(f"ratio dovecot/rempart {MBSYNC_WHAT} time: {other.seconds / mine.seconds:.2f} "
                  f"({mine.seconds:.2f} vs {other.seconds:.2f} s: Rempart takes "
                  f"{mine.seconds / max(other.seconds, 1e-9):.2f} times Dovecot's time)")
        else:
            failed = " and ".join(m.target for m in (mine, other) if not m.ok)
            print(f"ratio dovecot/rempart {MBSYNC_WHAT} time: none, it failed on {failed}")
    for rss in (r for r in results if isinstance(r, PeakRss)):
        print(rss.line())


def summary_round_trips_and_latency(results: list[Result]) -> None:
    round_trips = {r.target: r for r in results if isinstance(r, RoundTrips)}
    latencies = {r.target: r for r in results if isinstance(r, Latency) and r.folder == "INBOX"}
    small = {r.target: r for r in results if isinstance(r, Latency) and r.folder != "INBOX"}
    for line in [r.line() for r in round_trips.values()] + [r.line() for r in [*latencies.values(), *small.values()]]:
        print(line)
    for target, whole in latencies.items():
        few = small.get(target)
        if whole.ok and few is not None and few.ok and few.median_ms > 0:
            # Issue 9 (d): within 3x of a small folder.
            print(f"{target}: {LATENCY_WHAT} in the INBOX takes {whole.median_ms / few.median_ms:.2f} times "
                  f"its time in a {SMALL_MESSAGES}-message folder ({whole.median_ms:.1f} vs {few.median_ms:.1f} ms)")
    ours, theirs = round_trips.get("rempart"), round_trips.get("dovecot")
    if ours is not None and theirs is not None:
        if ours.ok and theirs.ok and theirs.rate > 0:
            print(f"ratio rempart/dovecot {ROUND_TRIP_WHAT}: {ours.rate / theirs.rate:.2f} "
                  f"({ours.rate:,.0f} vs {theirs.rate:,.0f} msg/s)")
        else:
            failed = " and ".join(m.target for m in (ours, theirs) if not m.ok)
            print(f"ratio rempart/dovecot {ROUND_TRIP_WHAT}: none, it failed on {failed}")
    mine, other = latencies.get("rempart"), latencies.get("dovecot")
    if mine is not None and other is not None:
        # Lower is better here: Dovecot/Rempart, so that above 1 means Rempart ahead, as in the other ratios.
        if mine.ok and other.ok and mine.median_ms > 0:
            print(f"ratio dovecot/rempart {LATENCY_WHAT} latency: {other.median_ms / mine.median_ms:.2f} "
                  f"(median {mine.median_ms:.1f} vs {other.median_ms:.1f} ms: Rempart takes "
                  f"{mine.median_ms / max(other.median_ms, 1e-9):.2f} times Dovecot's time)")
        else:
            failed = " and ".join(m.target for m in (mine, other) if not m.ok)
            print(f"ratio dovecot/rempart {LATENCY_WHAT} latency: none, it failed on {failed}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rempart-bench-imap-"))
    messages = make_messages(args.messages)
    log(f"{len(messages):,} messages, {sum(map(len, messages)) / len(messages):,.0f} bytes on average")
    results: list[Result] = []
    failed = False
    sides = [("rempart", bench_rempart), ("dovecot", bench_dovecot)]
    try:
        for name, bench in sides:
            if args.only in (None, name):
                try:
                    results += bench(args, workdir, messages)
                except (RuntimeError, TimeoutError, OSError, ImapError, subprocess.SubprocessError) as exc:
                    log(f"{name} failed: {type(exc).__name__}: {exc}")
                    failed = True
    finally:
        summary(results, args)
        ok = not failed and bool(results) and all(r.ok for r in results)
        if args.keep or not ok:
            log(f"kept {workdir} (logs, configs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
