"""Relay benchmark (issue 10): mail that leaves, Rempart's relay beside Postfix, to the same sink.

The same load goes through each system to Debian's ``smtp-sink`` (the postfix package) on a
loopback port, started afresh for each run, which counts every message it receives (``-c``):

* Postfix's ``smtp-source`` submits N messages of 2 KB (``-l``), one remote recipient each
  (``rcpt@remote.test``), from ``demo@example.test`` over S parallel sessions kept open (``-d``),
  from 127.0.0.1, a client allowed to relay on both systems (Rempart's default trusted hosts,
  R-REL-1; Postfix's ``mynetworks``), to port 25;
* Rempart: the whole suite started by ``rempart.common.devstack.Stack`` with its relay
  (``python -m rempart.smtp_edge.relay``): the MX listener, every policy stage, the fsynced
  accept into JetStream, then the relay's consumer, queue state in Redis, MX lookup through the
  relay's resolvers (a loopback DNS server answering ``remote.test MX 10 mx.remote.test``,
  ``mx.remote.test A 127.0.0.1``; the sink's port is ``REMPART_MX_PORT``) and the SMTP session
  to the sink. ``--route smarthost`` routes ``remote.test`` to ``[127.0.0.1]:<sink>`` through
  the outbound transports setting instead (no MX or MTA-STS lookup);
* Postfix: a private instance in a temporary directory (its own main.cf/master.cf/queue), smtpd
  with the trivial policy delegation server of ``bench_smtp.py``, cleanup, qmgr and the ``smtp``
  client, ``remote.test`` routed to ``smtp:[127.0.0.1]:<sink>`` by a transport map (Postfix
  resolves through the system resolver, which cannot be pointed at a loopback port), at most 10
  connections to the destination (Rempart's default ``max_connections_per_domain``), STARTTLS
  when offered (``smtp_tls_security_level = may``; smtp-sink offers none, so both speak plain).

Each run starts with 20 warm-up messages (caches, connections, lazy imports), then measures
messages/second from the start of the submission to the moment the sink has counted the last
message, and the CPU time of every process meanwhile, per message: Rempart's relay process (and
the suite's other processes); Postfix's delivery side (qmgr and the ``smtp`` processes, sampled
from /proc while they live) and its whole process tree. It prints both, and the ratio
Rempart/Postfix (issue 10's target: 0.5 at least).

``--dkim`` measures Rempart a second time, in the same suite, after adding DKIM keys to the
sender's domain through the admin API (``POST /v1/domains/{domain}/dkim-keys``: RSA-2048 by
default, ``--dkim both`` adds Ed25519): every message then leaves signed. Postfix has no DKIM
signing of its own (it needs a milter such as OpenDKIM), so that figure has no Postfix
equivalent and no ratio. ``--profile SECONDS`` samples the relay with py-spy during the
(unsigned) Rempart run and prints its hottest functions. Needs root for Postfix (apt-get,
``postfix start``). On a shared machine the figures move with other load: the table gives the
CPU the whole machine spent besides the measured processes.

    tools/bench_relay.py [--quick] [--messages N] [--dkim [rsa|both]] [--route mx|smarthost]
                         [--only rempart|postfix] [--profile SECONDS] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# tools/ is on sys.path when a benchmark runs as a script: Postfix's installation, the CPU
# accounting, the policy delegation server and the py-spy helpers are bench_smtp's.
import bench_smtp
from bench_smtp import (
    CpuMeter,
    PolicyDelegationServer,
    cpu_seconds,
    ensure_postfix,
    postfix_master_cf,
    proc_status_kib,
    process_cpu,
    process_tree_cpu_seconds,
    report_profiles,
    start_profiles,
)

from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.localstack import free_port, stop_process, wait_for_port

DOMAIN = "example.test"
SENDER = f"demo@{DOMAIN}"
REMOTE = "remote.test"
RECIPIENT = f"rcpt@{REMOTE}"
MX_HOST = f"mx.{REMOTE}"
WARMUP = 20
POSTFIX_CONCURRENCY = 10  # Rempart's default max_connections_per_domain
STALL_SECONDS = 20.0  # no delivery for this long: the run is over, short of its count
# Not server work: the load generator, the sink, whatever else ran on the machine.
NOT_SERVER = ("smtp-source", "smtp-sink", "other processes", "machine")
bench_smtp.PROFILE_AREAS.update({
    "aiosmtplib": "/aiosmtplib/", "dnspython": "/dns/", "dkimpy": "/dkim/", "ssl": "/ssl.py",
    "json": "/json/", "uvloop": "/uvloop/",
})


def log(message: str) -> None:
    print(f"[bench-relay {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class RunResult:
    """One measured run: N messages from the first submission to the sink's last."""

    target: str
    messages: int
    sessions: int
    size: int
    delivered: int = 0
    seconds: float = 0.0  # submission start -> last message counted by the sink
    submit_seconds: float = 0.0  # submission start -> smtp-source's exit
    source_exit: int = -1
    source_tail: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    relay_parts: tuple[str, ...] = ()  # the parts of `cpu` that are the relaying process(es)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.source_exit == 0 and self.delivered == self.messages

    def per_message_ms(self, parts: tuple[str, ...] | None = None) -> float:
        if parts is None:
            seconds = sum(v for k, v in self.cpu.items() if k not in NOT_SERVER)
        else:
            seconds = sum(self.cpu.get(p, 0.0) for p in parts)
        return 1000 * seconds / max(self.delivered, 1)


# ---------------------------------------------------------------------------------------------
# The receiving side: smtp-sink, and the DNS server that names it as remote.test's MX
# ---------------------------------------------------------------------------------------------
class SmtpSink:
    """Debian's ``smtp-sink`` on 127.0.0.1:<port>, its running counters (``-c``: ``sess=N quit=N
    mesg=N`` after every session end, QUIT and final dot) read as they come."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.count = 0
        self.sessions = 0  # SMTP sessions ended so far
        self.first_at = 0.0
        self.last_at = 0.0
        self._changed = threading.Condition()
        command = ["smtp-sink", "-c", "-4", "-m", "1024", "-h", MX_HOST]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # required when started by root
        self._stderr = open(workdir / f"smtp-sink-{port}.err", "wb")
        self.proc = subprocess.Popen([*command, f"127.0.0.1:{port}", "1024"], stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        self._reader = threading.Thread(target=self._read, name="smtp-sink-counter", daemon=True)
        self._reader.start()
        wait_for_port("127.0.0.1", port, timeout=15)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        # os.read: whatever the pipe holds now (a counter update is a few bytes, then a pause).
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            now = time.monotonic()
            pending += chunk
            *done, pending = pending.split(b"\r")
            for update in done:
                match = re.search(rb"sess=(\d+) .*mesg=(\d+)", update)
                if match is None:
                    continue
                with self._changed:
                    self.sessions = int(match.group(1))
                    count = int(match.group(2))
                    if count > self.count:
                        self.first_at = self.first_at or now
                        self.count, self.last_at = count, now
                        self._changed.notify_all()

    def wait_for(self, expected: int, timeout: float) -> int:
        """Until the sink has counted ``expected`` messages, or none came for STALL_SECONDS."""
        deadline = time.monotonic() + timeout
        with self._changed:
            last, last_change = self.count, time.monotonic()
            while self.count < expected:
                now = time.monotonic()
                if now > deadline or now - last_change > STALL_SECONDS:
                    log(f"smtp-sink: {self.count} of {expected} messages, then nothing for "
                        f"{now - last_change:.0f} s")
                    break
                self._changed.wait(0.5)
                if self.count != last:
                    last, last_change = self.count, time.monotonic()
            return self.count

    def stop(self) -> None:
        stop_process(self.proc)
        self._reader.join(5)
        self._stderr.close()


class DnsThread:
    """The repository's loopback DNS server, on its own event loop in a daemon thread."""

    def __init__(self, zone: dict[str, dict[str, list[str]]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-dns", daemon=True)
        self.thread.start()
        self.server = LoopbackDnsServer(zone, ttl=3600)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    @property
    def address(self) -> str:
        return self.server.address

    def queries(self) -> int:
        async def count() -> int:
            return len(self.server.queries)
        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ---------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------
def smtp_source(port: int, messages: int, sessions: int, size: int) -> list[str]:
    return ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size), "-d",
            "-f", SENDER, "-t", RECIPIENT, "-M", "bench.localhost", f"127.0.0.1:{port}"]


def submit(port: int, messages: int, sessions: int, size: int, timeout: float,
           during: Callable[[], None] | None = None) -> tuple[int, float, str]:
    """smtp-source's exit code, its seconds and the tail of its output."""
    started = time.monotonic()
    proc = subprocess.Popen(smtp_source(port, messages, sessions, size), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    if during is not None:
        during()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    tail = "\n".join(out.decode(errors="replace").splitlines()[-5:])
    if proc.returncode != 0:
        log(f"smtp-source exited with {proc.returncode}: {tail}")
    return proc.returncode, time.monotonic() - started, tail


def measure(target: str, sink: SmtpSink, smtp_port: int, args: argparse.Namespace,
            parts: dict[str, Callable[[], float]], relay_parts: tuple[str, ...],
            during: Callable[[], None] | None = None) -> RunResult:
    """Warm up, then the measured load: from smtp-source's start to the sink's last count."""
    base = sink.count
    code, _seconds, tail = submit(smtp_port, WARMUP, min(args.sessions, WARMUP), args.size, args.timeout)
    if code != 0 or sink.wait_for(base + WARMUP, 120) < base + WARMUP:
        raise RuntimeError(f"{target}: the warm-up messages did not all reach the sink ({tail})")
    base, sessions_before = sink.count, sink.sessions
    log(f"{target}: {' '.join(smtp_source(smtp_port, args.messages, args.sessions, args.size))}")
    meter = CpuMeter(parts | {"smtp-sink": process_cpu(sink.proc.pid)})
    started = time.monotonic()
    code, submit_seconds, tail = submit(smtp_port, args.messages, args.sessions, args.size, args.timeout, during)
    count = sink.wait_for(base + args.messages, args.timeout)
    cpu = meter.used()
    delivered = count - base
    result = RunResult(target, args.messages, args.sessions, args.size, delivered,
                       max(sink.last_at - started, 1e-6), submit_seconds, code, tail, cpu, relay_parts)
    result.extra["sink_sessions"] = sink.sessions - sessions_before  # ended ones: kept ones add later
    if delivered > args.messages:
        result.notes.append(f"{delivered - args.messages} more messages than were submitted (duplicates)")
    log(f"{target}: {delivered} delivered in {result.seconds:.1f} s ({result.rate:.1f} msg/s); "
        f"submission took {submit_seconds:.1f} s")
    return result


# ---------------------------------------------------------------------------------------------
# Rempart
# ---------------------------------------------------------------------------------------------
def bench_rempart(args: argparse.Namespace, workdir: Path) -> list[RunResult]:
    dns = DnsThread({REMOTE: {"MX": [f"10 {MX_HOST}."]}, MX_HOST: {"A": ["127.0.0.1"]}})
    sink = SmtpSink(free_port(), workdir)
    stack = Stack(workdir=workdir / "rempart", relay=True)
    # The relay reads both; the other services read the resolvers too (SPF and the like answer
    # NXDOMAIN from loopback at once) and ignore the MX port.
    stack.extra_env = {"REMPART_DNS_NAMESERVERS": dns.address, "REMPART_MX_PORT": str(sink.port)}
    results: list[RunResult] = []
    try:
        log(f"starting the Rempart suite with its relay (logs in {stack.workdir}); smtp-sink on {sink.port}, "
            f"DNS on {dns.address}")
        stack.start()
        bootstrap_demo(stack, DOMAIN)
        api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
        api.login(stack.admin_email, stack.admin_password)
        settings: dict[str, object] = {"ips": {"whitelist": ["127.0.0.1/32", "::1/128"]}}
        if args.route == "smarthost":
            settings["outbound"] = {"transports": {REMOTE: {"host": f"[127.0.0.1]:{sink.port}"}}}
        status, body = api.call("PATCH", "/v1/settings", settings)
        if status != 200:
            raise RuntimeError(f"PATCH /v1/settings failed: {status} {body}")
        time.sleep(1.5)  # config.changed reaches every service well within this
        processes = {name: proc.pid for name, proc in stack.procs.items()}
        if stack.redis is not None and stack.nats is not None:
            processes |= {"redis": stack.redis.proc.pid, "nats": stack.nats.proc.pid}
        relay_pid = processes["relay"]
        parts = {name: process_cpu(pid) for name, pid in processes.items()}
        profiles: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

        def start_profiling() -> None:
            if args.profile:
                time.sleep(min(2.0, args.profile / 4))  # past the ramp-up
                targets = {"relay": relay_pid} | ({"smtp-edge": processes["smtp-edge"]} if args.profile_edge else {})
                profiles.extend(start_profiles(targets, args.profile, workdir, native=False))

        dns_before = dns.queries()
        result = measure("rempart", sink, stack.ports["smtp-edge.smtp"], args, parts, ("relay",), start_profiling)
        result.extra |= {"relay_peak_rss_mib": round(proc_status_kib(relay_pid, "VmHWM") / 1024, 1),
                        "dns_queries": dns.queries() - dns_before, "route": args.route}
        if profiles:
            result.extra["profile"] = report_profiles(profiles, args.profile_top)
        results.append(result)
        if args.dkim:
            algorithms = ["rsa-sha256"] + (["ed25519-sha256"] if args.dkim == "both" else [])
            for algorithm in algorithms:
                status, body = api.call("POST", f"/v1/domains/{DOMAIN}/dkim-keys", {"algorithm": algorithm})
                if status != 201:
                    raise RuntimeError(f"creating a {algorithm} DKIM key failed: {status} {body}")
            time.sleep(2.0)  # the relay rereads a domain's keys within a second or two
            signed = measure("rempart+dkim", sink, stack.ports["smtp-edge.smtp"], args, parts, ("relay",))
            signed.extra |= {"dkim": algorithms, "route": args.route}
            signed.notes.append(f"DKIM {' + '.join(algorithms)}: no Postfix equivalent (Postfix signs "
                                "only through a milter such as OpenDKIM)")
            results.append(signed)
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} died during the benchmark:\n{stack.log_tail(name)}")
        return results
    finally:
        stack.stop()
        sink.stop()
        dns.close()


# ---------------------------------------------------------------------------------------------
# Postfix
# ---------------------------------------------------------------------------------------------
def postfix_main_cf(base: Path, policy_port: int) -> str:
    """bench_smtp's private instance, relaying everything for REMOTE to the sink (transport map)."""
    return bench_smtp.postfix_main_cf(base, policy_port, tool="tools/bench_relay.py", delivery=f"""\
transport_maps = texthash:{base}/etc/transport
default_transport = error:benchmark instance: only {REMOTE} leaves
smtp_tls_security_level = may
smtp_destination_concurrency_limit = {POSTFIX_CONCURRENCY}
""")


def children_of(pid: int) -> dict[int, tuple[str, float]]:
    """Living children of ``pid``: their command name and CPU seconds so far."""
    out: dict[int, tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1:text.rfind(")")]
        fields = text.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid):
            child = int(stat.parent.name)
            out[child] = (name, cpu_seconds(child))
    return out


class DaemonSampler:
    """CPU per Postfix daemon name, for the daemons that lived during the run: each child of
    master is sampled from /proc every 0.2 s, so one that exits (after max_use requests, or
    idle) keeps what it had used at its last sample; the rest of the tree's CPU is reported as
    not attributed."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.start = children_of(master)
        self.last = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postfix-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.last.update(children_of(self.master))

    def by_name(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        self.last.update(children_of(self.master))
        out: dict[str, float] = {}
        for pid, (name, used) in self.last.items():
            out[name] = out.get(name, 0.0) + used - self.start.get(pid, (name, 0.0))[1]
        return out


def bench_postfix(args: argparse.Namespace, workdir: Path) -> RunResult:
    base = workdir / "postfix"
    etc = base / "etc"
    for directory in (base, etc, base / "queue", base / "data"):
        directory.mkdir(parents=True, exist_ok=True)
    # Postfix insists that its directories are not writable by others and traversable by its users.
    for directory in (workdir, base, etc, base / "queue"):
        directory.chmod(0o755)
    postfix_user = pwd.getpwnam("postfix")
    os.chown(base / "data", postfix_user.pw_uid, postfix_user.pw_gid)
    sink = SmtpSink(free_port(), workdir)
    policy = PolicyDelegationServer()
    policy.start()
    smtp_port = free_port()
    (etc / "main.cf").write_text(postfix_main_cf(base, policy.port))
    (etc / "master.cf").write_text(postfix_master_cf(smtp_port) + "tlsmgr unix - - n 1000? 1 tlsmgr\n")
    (etc / "transport").write_text(f"{REMOTE} smtp:[127.0.0.1]:{sink.port}\n")
    postfix = ["postfix", "-c", str(etc)]
    started = False
    try:
        for verb in ("check", "start"):
            done = subprocess.run([*postfix, verb], capture_output=True, timeout=120)
            if done.returncode != 0:
                logged = (base / "maillog").read_text(errors="replace")[-2000:] if (base / "maillog").exists() else ""
                raise RuntimeError(f"`{' '.join([*postfix, verb])}` failed ({done.returncode}): "
                                   f"{(done.stdout + done.stderr).decode(errors='replace')}{logged}")
            started = started or verb == "start"
        wait_for_port("127.0.0.1", smtp_port, timeout=30)
        master = int((base / "queue" / "pid" / "master.pid").read_text().split()[0])
        log(f"private Postfix up (config {etc}, smtpd on {smtp_port}, smtp-sink on {sink.port})")
        holder: dict[str, DaemonSampler] = {}

        def start_sampling() -> None:
            holder["sampler"] = DaemonSampler(master)

        tree = "postfix (master and its daemons)"
        parts = {tree: lambda: process_tree_cpu_seconds(master),
                 "policy delegation server (this process)": process_cpu(os.getpid())}
        result = measure("postfix", sink, smtp_port, args, parts, (), start_sampling)
        daemons = holder["sampler"].by_name() if "sampler" in holder else {}
        delivery = {k: v for k, v in daemons.items() if k in ("qmgr", "smtp")}
        result.extra |= {"daemons_cpu_seconds": {k: round(v, 2) for k, v in sorted(daemons.items())},
                        "policy_requests": policy.requests}
        # The relaying processes: qmgr and the smtp clients (as sampled), beside the whole tree.
        for name, used in delivery.items():
            result.cpu[f"postfix {name}"] = round(used, 2)
        result.relay_parts = tuple(f"postfix {name}" for name in delivery)
        result.cpu[tree] = round(result.cpu[tree] - sum(delivery.values()), 2)
        if (base / "maillog").exists():
            deferred = (base / "maillog").read_text(errors="replace").count("status=deferred")
            if deferred:
                result.notes.append(f"{deferred} deferrals in Postfix's log")
        return result
    finally:
        if started:
            subprocess.run([*postfix, "stop"], capture_output=True, timeout=120)
        policy.stop()
        sink.stop()


# ---------------------------------------------------------------------------------------------
def print_table(results: list[RunResult], args: argparse.Namespace) -> None:
    first = results[0]
    cores = os.cpu_count() or 1
    route = ("MX remote.test -> mx.remote.test via the loopback DNS server" if args.route == "mx"
             else "outbound transport remote.test -> [127.0.0.1]:<sink>")
    print()
    print(f"Relay benchmark: smtp-source -> MTA -> smtp-sink, {first.messages} messages of {first.size} bytes, "
          f"one remote recipient each, {first.sessions} submitting sessions kept open; {cores} cores")
    print(f"Rempart route: {route}; Postfix: transport map to smtp:[127.0.0.1]:<sink>, "
          f"{POSTFIX_CONCURRENCY} connections at most")
    print("msg/s: from the first submission to the last message counted by smtp-sink. CPU ms/msg: "
          "'relay' is Rempart's relay process, Postfix's qmgr + smtp; 'server' is every server-side process")
    print(f"{'target':<13} {'seconds':>8} {'delivered':>9} {'msg/s':>8} {'submit/s':>9} {'relay ms':>9} "
          f"{'server ms':>10}  checks")
    for r in results:
        check = "ok" if r.ok else (f"smtp-source exit {r.source_exit}" if r.source_exit != 0
                                   else f"MISMATCH: {r.delivered} of {r.messages} at the sink")
        submit_rate = r.messages / r.submit_seconds if r.submit_seconds > 0 else 0.0
        print(f"{r.target:<13} {r.seconds:>8.1f} {r.delivered:>9} {r.rate:>8.1f} {submit_rate:>9.1f} "
              f"{r.per_message_ms(r.relay_parts):>9.2f} {r.per_message_ms():>10.2f}  {check}")
    for r in results:
        shares = ", ".join(f"{name} {1000 * value / max(r.delivered, 1):.2f}"
                           for name, value in r.cpu.items() if name != "machine")
        print(f"[{r.target}] CPU ms per message: {shares}")
        daemons = r.extra.get("daemons_cpu_seconds")
        if isinstance(daemons, dict):
            print(f"[{r.target}] daemons, CPU ms per message (sampled while they lived): " + ", ".join(
                f"{name} {1000 * float(value) / max(r.delivered, 1):.2f}" for name, value in daemons.items()))
        print(f"[{r.target}] SMTP sessions ended at the sink during the run: {r.extra.get('sink_sessions')}")
        for note in r.notes:
            print(f"[{r.target}] {note}")
    by_name = {r.target: r for r in results}
    rempart, postfix, signed = by_name.get("rempart"), by_name.get("postfix"), by_name.get("rempart+dkim")
    if rempart is not None:
        print(f"rempart relay: {rempart.rate:.1f} msg/s end to end, relay {rempart.per_message_ms(('relay',)):.2f} "
              f"CPU ms/msg, suite {rempart.per_message_ms():.2f} CPU ms/msg, relay peak RSS "
              f"{rempart.extra.get('relay_peak_rss_mib')} MiB, DNS queries {rempart.extra.get('dns_queries')}")
    if postfix is not None:
        print(f"postfix relay: {postfix.rate:.1f} msg/s end to end, qmgr+smtp "
              f"{postfix.per_message_ms(postfix.relay_parts):.2f} CPU ms/msg, all daemons "
              f"{postfix.per_message_ms():.2f} CPU ms/msg")
    if rempart is not None and postfix is not None and postfix.rate > 0:
        print(f"ratio rempart/postfix (relay, msg/s): {rempart.rate / postfix.rate:.3f} (target >= 0.5)")
    if signed is not None:
        algorithms = signed.extra.get("dkim")
        print(f"rempart relay with DKIM ({' + '.join(algorithms) if isinstance(algorithms, list) else '?'}): "
              f"{signed.rate:.1f} msg/s, relay {signed.per_message_ms(('relay',)):.2f} CPU ms/msg; "
              "no Postfix equivalent (Postfix signs only through a milter), so no ratio")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=5000, help="messages in the measured load (default 5000)")
    parser.add_argument("--quick", action="store_true", help="1000 messages (a smoke run)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel submitting sessions (default 20)")
    parser.add_argument("--size", type=int, default=2048, help="payload bytes per message (default 2048)")
    parser.add_argument("--route", choices=("mx", "smarthost"), default="mx",
                        help="how Rempart finds the sink: MX through the loopback DNS server, or a transport")
    parser.add_argument("--dkim", nargs="?", const="rsa", choices=("rsa", "both"),
                        help="also measure Rempart with DKIM keys (RSA-2048; 'both' adds Ed25519)")
    parser.add_argument("--only", choices=("rempart", "postfix"), help="run one side only")
    parser.add_argument("--timeout", type=float, default=1200.0, help="bound on each load, seconds")
    parser.add_argument("--profile", type=int, nargs="?", const=20, default=0, metavar="SECONDS",
                        help="py-spy the relay for SECONDS (default 20) during the Rempart run; flame graphs too")
    parser.add_argument("--profile-edge", action="store_true", help="with --profile, the smtp-edge too")
    parser.add_argument("--profile-top", type=int, default=15, help="functions listed per profile")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.quick and args.messages == 5000:
        args.messages = 1000
    if args.messages < 1 or args.sessions < 1 or args.size < 1 or args.sessions > 1000:
        parser.error("--messages, --sessions and --size must be positive (sessions at most 1000)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_postfix()
    if shutil.which("smtp-sink") is None:
        raise SystemExit("smtp-sink is missing (Debian's postfix package)")
    workdir = Path(tempfile.mkdtemp(prefix="rempart-bench-relay-"))
    results: list[RunResult] = []
    failed = False
    try:
        if args.only in (None, "rempart"):
            results.extend(bench_rempart(args, workdir))
        if args.only in (None, "postfix"):
            results.append(bench_postfix(args, workdir))
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        log(f"failed: {exc}")
        failed = True
    finally:
        if results:
            print_table(results, args)
        if args.json is not None:
            args.json.write_text(json.dumps([asdict(r) | {"rate": r.rate} for r in results], indent=2, default=str))
        if args.keep or failed or not all(r.ok for r in results):
            log(f"kept {workdir} (logs, configs, profiles)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed or not all(r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
