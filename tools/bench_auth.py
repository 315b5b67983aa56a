"""Auth benchmark (issue 4): IMAP logins per second on Rempart and on Dovecot, same Argon2id cost.

Rempart: the whole suite started by ``rempart.common.devstack.Stack`` (free ports, a temporary
directory) with the demo domain. Measured over IMAPS, each attempt a new connection:

* successful logins per second: connect, TLS, ``LOGIN``, ``LOGOUT`` (N attempts, K in flight);
  127.0.0.1 is put on the intrusion-prevention whitelist so that only authentication is measured;
* refusals per second for a locked account (the right password, refused before any hash) and
  for a blocked IP (refused at connect, on IMAPS and on plain IMAP before any TLS). For these two
  the R-LOG-4 answer floor (``login.failure_delay_ms``, 1 s by default) is set to 0, so that the
  figure is the server's capacity to refuse rather than in-flight / 1 s.

Dovecot (Debian ``dovecot-imapd``, installed with apt-get when missing): a private instance in a
temporary directory (its own base_dir, listener, log, maildirs), IMAPS with a certificate of the
same kind, one user in a passwd-file whose password is an ``{ARGON2ID}`` hash with the auth
service's default cost (t=3, m=64 MiB, p=1), no auth cache; the same successful-login load.

Prints each rate, the server-side CPU per attempt, and the ratio Rempart/Dovecot for logins.
Needs root for Dovecot (apt-get, and Dovecot's own privilege separation).
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher, Type

from rempart.auth.settings import AuthSettings
from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo, strong_password
from rempart.common.testing.localstack import free_port, stop_process, wait_for_port
from rempart.common.tls import write_self_signed

DOMAIN = "example.test"
CLIENT_IP = "127.0.0.1"
ATTACKER_IP = "127.0.0.9"  # not trusted, not whitelisted: the one the blocked-IP run uses
CONNECTION_TIMEOUT = 30.0  # one attempt, connect to close
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DOVECOT_USER = "bench"


def log(message: str) -> None:
    print(f"[bench-auth {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The load: one IMAP connection per attempt
# ---------------------------------------------------------------------------------------------
@dataclass
class Measure:
    target: str
    what: str
    attempts: int
    in_flight: int
    seconds: float
    outcomes: Counter[str]
    expected: str
    cpu_seconds: float = 0.0
    other_cores: float = 0.0  # CPU used meanwhile by everything but the target and this client

    @property
    def done(self) -> int:
        return self.outcomes[self.expected]

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.done == self.attempts

    def line(self) -> str:
        per_attempt = 1000 * self.cpu_seconds / max(self.done, 1)
        cpu = f", server CPU {per_attempt:.1f} ms per attempt" if self.cpu_seconds else ""
        extra = "" if self.ok else f"; UNEXPECTED outcomes: {dict(self.outcomes)}"
        # Other processes on the machine slow the target down: say how busy they were.
        other = f", other load {self.other_cores:.2f} cores" if self.other_cores >= 0.05 else ""
        return (f"RESULT {self.target} {self.what}: {self.rate:.1f}/s ({self.done}/{self.attempts} in "
                f"{self.seconds:.1f} s, {self.in_flight} in flight{cpu}{other}){extra}")


async def imap_attempt(host: str, port: int, ctx: ssl.SSLContext | None, source_ip: str, user: str,
                       password: str) -> str:
    """One connection: greeting, LOGIN, LOGOUT. Returns ``ok``, ``refused`` (NO to LOGIN),
    ``refused_at_connect`` (BYE instead of a greeting) or what went wrong."""
    async with asyncio.timeout(CONNECTION_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname="localhost" if ctx else None, local_addr=(source_ip, 0)
        )
        try:
            greeting = await reader.readline()
            if greeting.startswith(b"* BYE"):
                return "refused_at_connect"
            if not greeting.startswith(b"* OK"):
                return f"greeting {greeting[:80]!r}"
            writer.write(f'a LOGIN "{user}" "{password}"\r\n'.encode())
            reply = await tagged(reader, b"a ")
            if reply.startswith(b"a NO [UNAVAILABLE]"):
                return "tempfail"  # fail closed: the auth or policy call did not answer in time
            if reply.startswith(b"a NO"):
                return "refused"
            if not reply.startswith(b"a OK"):
                return f"login {reply[:80]!r}"
            writer.write(b"b LOGOUT\r\n")
            reply = await tagged(reader, b"b ")
            return "ok" if reply.startswith(b"b OK") else f"logout {reply[:80]!r}"
        finally:
            writer.close()
            try:
                async with asyncio.timeout(5):
                    await writer.wait_closed()
            except (OSError, ssl.SSLError, TimeoutError):
                pass


async def tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line.startswith(tag):
            return line


async def run_load(host: str, port: int, ctx: ssl.SSLContext | None, attempts: list[tuple[str, str, str]],
                   in_flight: int) -> tuple[Counter[str], float]:
    slots = asyncio.Semaphore(in_flight)

    async def one(source_ip: str, user: str, password: str) -> str:
        async with slots:
            try:
                return await imap_attempt(host, port, ctx, source_ip, user, password)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                return f"error {type(exc).__name__}"

    started = time.perf_counter()
    outcomes = Counter(await asyncio.gather(*(one(*a) for a in attempts)))
    return outcomes, time.perf_counter() - started


def measure(target: str, what: str, port: int, ctx: ssl.SSLContext | None, attempts: list[tuple[str, str, str]],
            in_flight: int, expected: str, cpu: Callable[[], float], timeout: float) -> Measure:
    log(f"{target}: {what}, {len(attempts)} attempts, {in_flight} in flight")
    cpu_before, machine_before, own_before = cpu(), machine_busy_seconds(), own_cpu_seconds()
    outcomes, seconds = asyncio.run(asyncio.wait_for(run_load("127.0.0.1", port, ctx, attempts, in_flight), timeout))
    used = cpu() - cpu_before
    other = machine_busy_seconds() - machine_before - used - (own_cpu_seconds() - own_before)
    result = Measure(target, what, len(attempts), in_flight, seconds, outcomes, expected, used,
                     max(other, 0.0) / seconds if seconds > 0 else 0.0)
    print(result.line(), flush=True)
    return result


def warm_up(port: int, ctx: ssl.SSLContext, user: str, password: str, target: str) -> None:
    """A few logins first (first-login work, process pools): they must all succeed."""
    outcomes = asyncio.run(run_load("127.0.0.1", port, ctx, [(CLIENT_IP, user, password)] * 5, 5))[0]
    if outcomes["ok"] != 5:
        raise RuntimeError(f"{target}: warm-up logins failed: {dict(outcomes)}")


# ---------------------------------------------------------------------------------------------
# CPU of a process tree (live processes and the children they reaped)
# ---------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "


def machine_busy_seconds() -> float:
    """CPU time every core spent not idle since boot (/proc/stat: user..steal, not idle/iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))
    return busy / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """This process: the load generator."""
    times = os.times()
    return times.user + times.system


def tree_cpu_seconds(roots: list[int]) -> float:
    """utime+stime+cutime+cstime of every live process under ``roots``: a reaped process is in
    its parent's c-times and nowhere else, so nothing counts twice."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    wanted = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    ticks = 0
    for pid in wanted:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


# ---------------------------------------------------------------------------------------------
# Rempart
# ---------------------------------------------------------------------------------------------
def client_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    return ctx


def patch_settings(api: AdminApi, doc: dict[str, object]) -> None:
    status, body = api.call("PATCH", "/v1/settings", doc)
    if status != 200:
        raise RuntimeError(f"PATCH /v1/settings failed: {status} {body}")
    time.sleep(1.5)  # config.changed reaches every service well within this (R-OPS-1)


def bench_rempart(args: argparse.Namespace, workdir: Path) -> list[Measure]:
    stack = Stack(workdir=workdir / "rempart")
    results: list[Measure] = []
    try:
        log(f"starting the Rempart suite (logs in {stack.workdir})")
        stack.start()
        demo = bootstrap_demo(stack, DOMAIN)
        api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
        api.login(stack.admin_email, stack.admin_password)
        patch_settings(api, {"ips": {"whitelist": ["127.0.0.1/32", "::1/128"]}})
        roots = [proc.pid for proc in stack.procs.values()]
        roots += [server.proc.pid for server in (stack.redis, stack.nats) if server is not None]

        def cpu() -> float:
            return tree_cpu_seconds(roots)

        ctx = client_context(stack.cert_file)
        imaps, imap = stack.ports["imap-pop.imaps"], stack.ports["imap-pop.imap"]
        user, password = demo["user"], demo["user_password"]
        warm_up(imaps, ctx, user, password, "rempart")
        results.append(measure("rempart", "IMAPS logins", imaps, ctx, [(CLIENT_IP, user, password)] * args.logins,
                               args.in_flight, "ok", cpu, args.timeout))

        # Refusals: without the R-LOG-4 floor, so that the figure is the cost of refusing.
        patch_settings(api, {"login": {"failure_delay_ms": 0}})
        locked, locked_password = demo["peer"], demo["peer_password"]
        lock = [(CLIENT_IP, locked, f"wrong-{n}-{strong_password()}") for n in range(6)]
        outcome = asyncio.run(run_load("127.0.0.1", imaps, ctx, lock, 1))[0]
        if outcome["refused"] != len(lock):
            raise RuntimeError(f"locking {locked} failed: {dict(outcome)}")
        results.append(measure("rempart", "refusals, locked account (right password)", imaps, ctx,
                               [(CLIENT_IP, locked, locked_password)] * args.refusals, args.in_flight, "refused",
                               cpu, args.timeout))

        # Block an IP the way an attacker gets blocked: more than max_failed_logins (R-IPS-2).
        block_ip(imaps, ctx, ATTACKER_IP, f"nobody@{DOMAIN}", args.timeout)
        refusals = [(ATTACKER_IP, user, password)] * args.refusals
        results.append(measure("rempart", "refusals, blocked IP (IMAPS)", imaps, ctx, refusals, args.in_flight,
                               "refused_at_connect", cpu, args.timeout))
        results.append(measure("rempart", "refusals, blocked IP (IMAP, before TLS)", imap, None, refusals,
                               args.in_flight, "refused_at_connect", cpu, args.timeout))
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} died during the benchmark:\n{stack.log_tail(name)}")
        return results
    finally:
        stack.stop()


def block_ip(port: int, ctx: ssl.SSLContext, ip: str, user: str, timeout: float) -> None:
    """Fail logins from ``ip`` on one connection until policy closes it, then check the block."""

    async def attempt_failures() -> int:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost",
                                                          local_addr=(ip, 0))
            try:
                await reader.readline()
                for n in range(1, 50):
                    writer.write(f'f{n} LOGIN "{user}" "wrong-{n}"\r\n'.encode())
                    reply = await tagged(reader, f"f{n} ".encode())
                    if not reply.startswith(f"f{n} NO".encode()):
                        raise RuntimeError(f"unexpected reply while failing logins from {ip}: {reply!r}")
                    # The failure that blocks the IP is followed at once by BYE and the close.
                    try:
                        after = await asyncio.wait_for(reader.readline(), 0.3)
                    except TimeoutError:
                        continue
                    if not after or after.startswith(b"* BYE"):
                        return n
                return -1
            finally:
                writer.close()

    failures = asyncio.run(attempt_failures())
    outcome = asyncio.run(run_load("127.0.0.1", port, ctx, [(ip, user, "x")], 1))[0]
    if outcome["refused_at_connect"] != 1:
        raise RuntimeError(f"{ip} is not refused at connect after {failures} failed logins: {dict(outcome)}")
    log(f"{ip} blocked by intrusion prevention after {failures} failed logins on one connection")


# ---------------------------------------------------------------------------------------------
# Dovecot
# ---------------------------------------------------------------------------------------------
def ensure_dovecot() -> str:
    found = shutil.which("dovecot")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("dovecot missing and not root: apt-get install dovecot-imapd first")
    log("installing Debian dovecot-imapd")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "dovecot-imapd"]
    if subprocess.run(install, env=env, timeout=600, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, timeout=600, check=True, capture_output=True)
        subprocess.run(install, env=env, timeout=600, check=True, capture_output=True)
    found = shutil.which("dovecot")
    if not found:
        raise SystemExit("apt-get installed dovecot-imapd but dovecot is not on PATH")
    return found


def service_hasher() -> PasswordHasher:
    """Argon2id at the auth service's default cost (t=3, m=64 MiB, p=1)."""
    defaults = AuthSettings.model_fields
    return PasswordHasher(
        time_cost=int(defaults["argon2_time_cost"].default),
        memory_cost=int(defaults["argon2_memory_kib"].default),
        parallelism=int(defaults["argon2_parallelism"].default),
        hash_len=32, salt_len=16, type=Type.ID,
    )


def dovecot_passwd_line(user: str, password: str) -> str:
    """A passwd-file line for a private Dovecot (bench_auth and bench_imap): the password as an
    ``{ARGON2ID}`` hash at the auth service's default cost, so that a login costs both servers
    the same hash."""
    return f"{user}:{{ARGON2ID}}{service_hasher().hash(password)}\n"


def dovecot_conf(base: Path, port: int, cert_file: str, key_file: str, passwd: Path, uid: int, gid: int) -> str:
    """A private Dovecot (bench_auth and bench_imap): as many connections per user and IP as a
    benchmark opens, and no cache of verified passwords."""
    return f"""# Private benchmark instance (tools/bench_*.py); nothing system-wide is touched.
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
ssl = required
ssl_cert = <{cert_file}
ssl_key = <{key_file}
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
disable_plaintext_auth = no
# Every login verifies the Argon2id hash, as Rempart does: no cache of verified passwords.
auth_cache_size = 0
mail_location = maildir:~/Maildir
first_valid_uid = {uid}
first_valid_gid = {gid}
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
protocol imap {{
  mail_max_userip_connections = 10000
}}
"""


def bench_dovecot(args: argparse.Namespace, workdir: Path) -> Measure:
    binary = ensure_dovecot()
    base = workdir / "dovecot"
    for sub in ("run", "state", "home"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    # The auth process (user dovecot) reads the passwd-file; the mail process (nobody) owns home.
    for path in (workdir, base):
        path.chmod(0o755)
    os.chown(base / "home", uid, gid)
    pair = write_self_signed(base / "tls", ["localhost", "127.0.0.1"])
    hasher = service_hasher()
    password = strong_password()
    passwd = base / "passwd"
    passwd.write_text(dovecot_passwd_line(DOVECOT_USER, password))
    passwd.chmod(0o644)
    port = free_port()
    conf = base / "dovecot.conf"
    conf.write_text(dovecot_conf(base, port, pair.cert_file, pair.key_file, passwd, uid, gid))
    log(f"starting Dovecot on 127.0.0.1:{port} (config {conf}); hash parameters "
        f"t={hasher.time_cost} m={hasher.memory_cost} KiB p={hasher.parallelism}")
    with open(base / "stdout.log", "wb") as out:
        proc = subprocess.Popen([binary, "-F", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout=20, proc=proc)
        except (TimeoutError, RuntimeError) as exc:
            tail = (base / "dovecot.log").read_text(errors="replace")[-2000:] if (base / "dovecot.log").exists() else ""
            raise RuntimeError(f"Dovecot did not start: {exc}\n{tail}") from exc
        ctx = client_context(pair.cert_file)

        def cpu() -> float:
            return tree_cpu_seconds([proc.pid])

        warm_up(port, ctx, DOVECOT_USER, password, f"dovecot (see {base / 'dovecot.log'})")
        return measure("dovecot", "IMAPS logins", port, ctx, [(CLIENT_IP, DOVECOT_USER, password)] * args.logins,
                       args.in_flight, "ok", cpu, args.timeout)
    finally:
        stop_process(proc, group=True)


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--logins", type=int, default=300, help="successful logins per target (default 300)")
    parser.add_argument("--refusals", type=int, default=1000, help="attempts per refusal run (default 1000)")
    parser.add_argument("--in-flight", type=int, default=10, help="connections at once (default 10)")
    parser.add_argument("--quick", action="store_true", help="60 logins, 200 refusals (a smoke run)")
    parser.add_argument("--only", choices=("rempart", "dovecot"), help="run one side only")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on each run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.logins = min(args.logins, 60)
        args.refusals = min(args.refusals, 200)
    if min(args.logins, args.refusals, args.in_flight) < 1 or args.in_flight > 500:
        parser.error("--logins, --refusals and --in-flight must be positive (in flight at most 500)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rempart-bench-auth-"))
    results: list[Measure] = []
    failed = False
    try:
        if args.only in (None, "rempart"):
            results += bench_rempart(args, workdir)
        if args.only in (None, "dovecot"):
            results.append(bench_dovecot(args, workdir))
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        log(f"failed: {exc}")
        failed = True
    finally:
        print(f"\nAuth benchmark: one IMAP connection per attempt, {args.in_flight} in flight, "
              f"{os.cpu_count()} cores; Argon2id t=3 m=64 MiB p=1 on both sides")
        for result in results:
            print(result.line())
        logins = {r.target: r for r in results if r.what == "IMAPS logins"}
        if "rempart" in logins and "dovecot" in logins and logins["dovecot"].rate > 0:
            print(f"ratio rempart/dovecot IMAPS logins/s: {logins['rempart'].rate / logins['dovecot'].rate:.2f}")
        ok = not failed and all(r.ok for r in results)
        if args.keep or not ok:
            log(f"kept {workdir} (logs, configs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
