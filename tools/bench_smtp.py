"""SMTP benchmark (issue 5): Rempart's MX edge against Postfix's smtpd, same load, same machine.

Postfix's own load generator ``smtp-source`` sends N messages of 2 KB over S parallel SMTP
sessions (``-d``: each session carries its share of the messages, as the issue asks; pass
``--connection-per-message`` to reconnect for every message instead) to

* Rempart: the whole suite started by ``rempart.common.devstack.Stack`` (Redis, NATS JetStream
  fsyncing before every ack, the five services), the MX listener, every policy stage, the
  durable accept; then the mailbox index is counted so that a fast run that lost mail fails;
* Postfix: a private instance in a temporary directory (its own main.cf/master.cf/queue),
  ``smtpd`` on a loopback port with ``check_policy_service`` pointing at a trivial policy
  delegation server (SMTPD_POLICY_README protocol) that this script runs, delivering to a
  virtual mailbox under the same directory (counted too).

It prints messages/second for both, the ratio Rempart/Postfix and the edge's peak memory
(VmHWM), at one recipient per message and at five (``--recipients 1,5``: smtp-source ``-r``,
whose extra recipients are ``2peer@``, ``3peer@`` ...: each side has those mailboxes).
``--replicas 1,2`` then runs Rempart again with two smtp-edge and two policy replicas behind
haproxy (``send-proxy-v2``; the edges reach the policies by gRPC round robin, as a headless
Service gives) and prints the ratio to one replica: on 2 cores it cannot double, it shows the
cost of the extra hop; ``--cores N`` pins every server process to N cores (and smtp-source to
the others, when there are more), so that a larger machine prints the scaling from 1 to 4
replicas (``--replicas 1,2,3,4 --cores 4``). ``--profile`` also samples the edge and the policy
service with py-spy during the Rempart run, prints their hottest functions and writes a flame
graph of each (SVG). Needs root for Postfix (apt-get, postfix start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from xml.sax.saxutils import escape

from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo, strong_password
from rempart.common.testing.localstack import free_port, wait_for_port
from rempart.common.testing.replicas import (
    Haproxy,
    Replica,
    start_edge_replica,
    start_haproxy,
    start_policy_replica,
    start_ready,
)

SENDER = "sender@remote.test"
DOMAIN = "example.test"
INBOX = "INBOX"
# Bounds: nothing here waits forever.
POLICY_MAX_ATTRIBUTES = 200
POLICY_MAX_LINE = 8192
POLICY_IDLE_SECONDS = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Frames every stack has (interpreter, event loop): they say nothing about where time goes.
PROFILE_AREAS = {
    "gRPC": "/grpc/", "protobuf": "/google/protobuf/", "NATS client": "/nats/", "Redis client": "/redis/",
    "aiosmtpd": "/aiosmtpd/", "logging": "/logging/", "email parsing": "/email/",
    "socket writes": "_SelectorSocketTransport.write", "metrics": "/prometheus_client/",
    "telemetry": "/opentelemetry/",
}
NOT_SERVER = ("smtp-source", "other processes", "machine")
BORING_FRAMES = ("<frozen", "asyncio/", "threading.py", "selectors.py")


@dataclass
class LoadResult:
    """One smtp-source run."""

    target: str
    messages: int
    sessions: int
    size: int
    per_message_connection: bool
    seconds: float
    exit_code: int
    output_tail: str = ""
    stored: int = -1  # deliveries found in the mailboxes afterwards (messages x recipients)
    extra: dict[str, object] = field(default_factory=dict)
    recipients: int = 1
    replicas: int = 1

    @property
    def label(self) -> str:
        return self.target if self.replicas == 1 else f"{self.target} x{self.replicas}"

    @property
    def accepted(self) -> int:
        # smtp-source stops at the first refusal: then only what reached the mailbox counts.
        return self.messages if self.exit_code == 0 else max(self.stored, 0) // self.recipients

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.stored == self.messages * self.recipients


def log(message: str) -> None:
    print(f"[bench-smtp {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
def ensure_postfix() -> None:
    """Install Debian's postfix (smtp-source, smtpd) without configuring the system instance."""
    if shutil.which("smtp-source") and shutil.which("postfix"):
        return
    if os.geteuid() != 0:
        raise SystemExit("postfix/smtp-source missing and not root: apt-get install postfix first")
    log("installing Debian postfix (smtp-source, smtpd)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                   check=True, timeout=60)
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postfix"]
    if subprocess.run(install, env=env, timeout=600, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, timeout=600, check=True, capture_output=True)
        subprocess.run(install, env=env, timeout=600, check=True, capture_output=True)
    if not (shutil.which("smtp-source") and shutil.which("postfix")):
        raise SystemExit("apt-get installed postfix but smtp-source/postfix are not on PATH")


def recipient_addresses(first: str, count: int) -> list[str]:
    """smtp-source's recipients for ``-r count`` and ``-t first``: first, then 2first ... Nfirst."""
    return [first] + [f"{number}{first}" for number in range(2, count + 1)]


def smtp_source_command(port: int, messages: int, sessions: int, size: int, recipient: str,
                        per_message_connection: bool, recipients: int = 1) -> list[str]:
    # -s sessions in parallel, -m messages in total, -l payload bytes (headers not counted),
    # -d keep the session for the next message, -f/-t envelope, -r recipients per message,
    # -M our HELO name.
    command = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
               "-f", SENDER, "-t", recipient, "-r", str(recipients), "-M", "bench.localhost"]
    if not per_message_connection:
        command.append("-d")
    return [*command, f"127.0.0.1:{port}"]


def run_load(target: str, port: int, args: argparse.Namespace, recipient: str,
             during: Callable[[], None] | None = None, recipients: int = 1) -> LoadResult:
    command = smtp_source_command(port, args.messages, args.sessions, args.size, recipient,
                                  args.connection_per_message, recipients)
    if args.cores:
        command = ["taskset", "-c", cpu_list(load_cores(args.cores)), *command]
    log(f"{target}: {' '.join(command)}")
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if during is not None:
        during()
    try:
        out, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        log(f"{target}: smtp-source still running after {args.timeout}s: killed")
    seconds = time.monotonic() - started
    tail = "\n".join(out.decode(errors="replace").splitlines()[-10:])
    if proc.returncode != 0:
        log(f"{target}: smtp-source exited with {proc.returncode}:\n{tail}")
    return LoadResult(target, args.messages, args.sessions, args.size, args.connection_per_message, seconds,
                      proc.returncode, tail, recipients=recipients)


# ---------------------------------------------------------------------------------------------
# --cores: the server processes on the first N cores, the load generator on the others
# ---------------------------------------------------------------------------------------------
def cpu_list(cores: list[int]) -> str:
    return ",".join(str(core) for core in cores)


def server_cores(count: int) -> list[int]:
    return sorted(os.sched_getaffinity(0))[:count]


def load_cores(count: int) -> list[int]:
    """smtp-source's cores: those the servers do not have, or the same ones on a small machine."""
    return sorted(os.sched_getaffinity(0))[count:] or server_cores(count)


def pin(pids: list[int], count: int) -> None:
    """Every thread of each process (``taskset -a``) onto the servers' cores; the threads and
    children they start later inherit it."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-cp", cpu_list(server_cores(count)), str(pid)],
                       check=True, capture_output=True, timeout=30)


def wait_for_count(what: str, count: Callable[[], int], expected: int, timeout: float) -> int:
    """Poll until ``count()`` reaches ``expected`` or stops moving for 15 s (bounded by timeout)."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = count()
        if now >= expected:
            return now
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > 15:
            break
        time.sleep(0.5)
    log(f"{what}: {last} of {expected} after waiting")
    return last


# ---------------------------------------------------------------------------------------------
# Memory and profile of a running service
# ---------------------------------------------------------------------------------------------
def proc_status_kib(pid: int, field_name: str) -> int:
    """VmRSS / VmHWM (peak resident set, kept by the kernel) of a process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/<pid>/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def reaped_children_cpu_seconds(pid: int) -> float:
    """CPU time of a process's children that have exited and been waited for (cutime + cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def process_tree(root: int) -> list[int]:
    """``root`` and its children (Postfix's master and the daemons it runs now)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(root):
            children.append(int(stat.parent.name))
    return [root, *children]


def process_tree_cpu_seconds(root: int) -> float:
    """A daemon and its children, living or exited (Postfix's master runs short-lived daemons)."""
    return reaped_children_cpu_seconds(root) + sum(cpu_seconds(pid) for pid in process_tree(root))


def own_children_cpu_seconds() -> float:
    """smtp-source's CPU time once it has been waited for (this process's reaped children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds per part (a process, a process tree, smtp-source) and for the whole machine.

    The machine total minus the parts is whatever else ran meanwhile: on a shared machine that
    tells whether the figures are clean.
    """

    def __init__(self, parts: dict[str, Callable[[], float]]) -> None:
        self.parts = parts | {"smtp-source": own_children_cpu_seconds}
        self.start = {name: read() for name, read in self.parts.items()}
        self.machine_start = machine_busy_seconds()

    def used(self) -> dict[str, float]:
        out = {name: round(read() - self.start[name], 2) for name, read in self.parts.items()}
        machine = machine_busy_seconds() - self.machine_start
        out["other processes"] = round(machine - sum(out.values()), 2)
        out["machine"] = round(machine, 2)
        return out


def process_cpu(pid: int) -> Callable[[], float]:
    return lambda: cpu_seconds(pid)


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profiles(pids: dict[str, int], seconds: int, outdir: Path,
                   native: bool) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
    spy = py_spy()
    if spy is None:
        log("--profile: py-spy not found (pip install py-spy); no profile")
        return []
    running = []
    for name, pid in pids.items():
        out = outdir / f"{name}.collapsed"
        # --nonblocking keeps the profiler from pausing the service; native unwinding needs pauses.
        pausing = [] if native else ["--nonblocking"]
        command = [spy, "record", *pausing, "--full-filenames", "--format", "raw", "-r", "100",
                   "-d", str(seconds), "-p", str(pid), "-o", str(out), *(["--native"] if native else [])]
        running.append((name, out, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    return running


def hot_functions(collapsed: Path, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]], Counter[str]]:
    """From py-spy's collapsed stacks: total samples, top functions by self and by inclusive
    samples, and samples per library area (a sample counts for every area on its stack)."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for area, marker in PROFILE_AREAS.items():
            if marker in stack:
                areas[area] += count
        frames = [short_frame(f) for f in stack.split(";") if f]
        if frames:
            self_samples[frames[-1]] += count
        for frame in set(frames):
            if not any(boring in frame for boring in BORING_FRAMES):
                inclusive[frame] += count
    return total, self_samples.most_common(top), inclusive.most_common(top), areas


def short_frame(frame: str) -> str:
    """"f (/venv/.../site-packages/grpc/aio/_call.py:12)" -> "f (grpc/aio/_call.py)"."""
    name, _, where = frame.partition(" (")
    parts = where.rstrip(")").rsplit(":", 1)[0].split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1:]
    elif "rempart" in parts:
        parts = parts[len(parts) - parts[::-1].index("rempart"):]
    else:
        parts = parts[-2:]
    return f"{name} ({'/'.join(parts)})"


def report_profiles(running: list[tuple[str, Path, subprocess.Popen[bytes]]], top: int) -> dict[str, object]:
    found: dict[str, object] = {}
    for name, out, proc in running:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not out.exists():
            log(f"py-spy on {name} wrote nothing: {err.decode(errors='replace').strip()[-400:]}")
            continue
        total, by_self, by_inclusive, areas = hot_functions(out, top)
        svg = out.with_suffix(".svg")
        svg.write_text(flame_graph_svg(out, f"{name}: {total} samples (py-spy, 100 Hz, idle excluded)"))
        print(f"\nProfile of {name}: {total} samples (py-spy, 100 Hz, idle excluded); raw stacks: {out}; "
              f"flame graph: {svg}")
        print("  self %   function (leaf frame)")
        for frame, count in by_self:
            print(f"  {100 * count / max(total, 1):6.1f}   {frame}")
        print("  incl %   function (anywhere on the stack; event-loop frames left out)")
        for frame, count in by_inclusive:
            print(f"  {100 * count / max(total, 1):6.1f}   {frame}")
        print("  by area (share of samples with that library on the stack): " + ", ".join(
            f"{area} {100 * count / max(total, 1):.1f}%" for area, count in areas.most_common()))
        found[name] = {"samples": total, "self": by_self, "inclusive": by_inclusive, "areas": dict(areas)}
    return found


FLAME_WIDTH = 1200.0
FLAME_ROW = 16
FLAME_MIN_WIDTH = 0.3  # pixels: narrower frames are left out (they would be invisible anyway)


@dataclass
class FlameNode:
    name: str
    value: int = 0
    children: dict[str, FlameNode] = field(default_factory=dict)


def flame_graph_svg(collapsed: Path, title: str) -> str:
    """A flame graph (root at the bottom, callees above, width = samples) of py-spy's collapsed
    stacks, as a standalone SVG: each frame's name, samples and share in its tooltip."""
    root = FlameNode("all")
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        node = root
        node.value += int(count_text)
        for frame in (f for f in stack.split(";") if f):
            node = node.children.setdefault(frame, FlameNode(short_frame(frame)))
            node.value += int(count_text)
    scale = FLAME_WIDTH / max(root.value, 1)
    boxes: list[tuple[FlameNode, float, int]] = []  # node, x, depth
    pending = [(root, 0.0, 0)]
    while pending:
        node, x, depth = pending.pop()
        if node.value * scale < FLAME_MIN_WIDTH:
            continue
        boxes.append((node, x, depth))
        for child in sorted(node.children.values(), key=lambda c: c.name):
            pending.append((child, x, depth + 1))
            x += child.value * scale
    height = (max(depth for _, _, depth in boxes) + 1) * FLAME_ROW + 40 if boxes else 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{FLAME_WIDTH:.0f}" height="{height}" '
             f'font-family="monospace" font-size="11">', f'<text x="4" y="16" font-size="13">{escape(title)}</text>']
    for node, x, depth in boxes:
        width = node.value * scale
        y = height - (depth + 1) * FLAME_ROW - 10
        hue = 20 + sum(node.name.encode()) * 7 % 40  # warm colours, stable per function
        fits = int(width / 7) - 1  # characters of 7 px that fit
        label = node.name if len(node.name) <= fits else (node.name[:fits - 2] + ".." if fits > 3 else "")
        parts.append(f'<g><title>{escape(f"{node.name}: {node.value} samples, {100 * node.value / root.value:.1f}%")}'
                     f'</title><rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{FLAME_ROW - 1}" '
                     f'fill="hsl({hue},85%,60%)"/><text x="{x + 3:.1f}" y="{y + FLAME_ROW - 4}">{escape(label)}'
                     "</text></g>")
    return "\n".join([*parts, "</svg>"]) + "\n"


# ---------------------------------------------------------------------------------------------
# Rempart
# ---------------------------------------------------------------------------------------------
def mailbox_count(redis_url: str, mailboxes: list[str]) -> Callable[[], int]:
    import redis

    from rempart.common import keys

    client = redis.Redis.from_url(redis_url, socket_timeout=5)

    def count() -> int:
        return sum(int(client.zcard(keys.mailbox_uids(mailbox, INBOX))) for mailbox in mailboxes)

    return count


def haproxy_config(edges: list[Replica], port: int) -> str:
    """TCP round robin over the edges' MX listeners with PROXY v2, as in front of the chart."""
    servers = "\n".join(f"    server {e.instance} 127.0.0.1:{e.ports['smtp']} send-proxy-v2" for e in edges)
    return f"""global
    nbthread 1
    maxconn 2000

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend mx
    bind 127.0.0.1:{port}
    default_backend edges

backend edges
    balance roundrobin
{servers}
"""


@dataclass
class Replicated:
    """``--replicas N``: N smtp-edge and N policy processes (the stack's policy and N-1 more),
    haproxy in front of the edges. The stack's own edge is stopped."""

    edges: list[Replica]
    policies: list[Replica]
    haproxy: Haproxy
    port: int

    def stop(self) -> None:
        self.haproxy.stop()
        for replica in self.edges + self.policies:
            replica.stop()


def start_replicas(stack: Stack, count: int) -> Replicated:
    edges: list[Replica] = []
    policies: list[Replica] = []
    try:
        for n in range(1, count):
            policies.append(start_ready(partial(start_policy_replica, stack, f"policy-{n}")))
        target = "ipv4:" + ",".join([f"127.0.0.1:{stack.ports['policy.grpc']}",
                                     *(f"127.0.0.1:{p.ports['grpc']}" for p in policies)])
        stack.stop_service("smtp-edge")
        env = {"REMPART_POLICY_TARGET": target, "REMPART_PROXY_PROTOCOL_CIDRS": "127.0.0.1/32",
               "REMPART_LOG_FORMAT": "text"}
        for n in range(count):
            edges.append(start_ready(partial(start_edge_replica, stack, f"smtp-edge-{n}", env)))
        port = free_port()
        haproxy = start_haproxy(stack.workdir / "haproxy", haproxy_config(edges, port), [port])
        return Replicated(edges, policies, haproxy, port)
    except BaseException:
        for replica in edges + policies:
            replica.stop()
        raise


def bench_rempart(args: argparse.Namespace, workdir: Path, recipients: int = 1, replicas: int = 1,
                  profile: bool = False) -> LoadResult:
    stack = Stack(workdir=workdir / f"rempart-r{recipients}-x{replicas}")
    replicated: Replicated | None = None
    try:
        log(f"starting the Rempart suite (logs in {stack.workdir})")
        stack.start()
        demo = bootstrap_demo(stack, DOMAIN)
        api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
        api.login(stack.admin_email, stack.admin_password)
        mailboxes = recipient_addresses(demo["peer"], recipients)
        for address in mailboxes[1:]:
            api.create_account(DOMAIN, address, strong_password())
        # 127.0.0.1 is a trusted host (never counted), but say so explicitly: intrusion
        # prevention must not be what limits the benchmark.
        status, body = api.call("PATCH", "/v1/settings", {"ips": {"whitelist": ["127.0.0.1/32", "::1/128"]}})
        if status != 200:
            raise RuntimeError(f"PATCH /v1/settings failed: {status} {body}")
        time.sleep(1.0)  # config.changed reaches every service well within this
        count = mailbox_count(stack.redis.url if stack.redis else "", mailboxes)
        before = count()
        port = stack.ports["smtp-edge.smtp"]
        edges = {"smtp-edge": stack.procs["smtp-edge"].pid}
        policies = {"policy": stack.procs["policy"].pid}
        processes = {name: proc.pid for name, proc in stack.procs.items()}
        if replicas > 1:
            replicated = start_replicas(stack, replicas)
            port = replicated.port
            edges = {e.instance: e.proc.pid for e in replicated.edges}
            policies |= {p.instance: p.proc.pid for p in replicated.policies}
            processes = {name: pid for name, pid in processes.items() if name != "smtp-edge"}
            processes |= edges | policies | {"haproxy": replicated.haproxy.proc.pid}
        if stack.redis is not None and stack.nats is not None:
            processes |= {"redis": stack.redis.proc.pid, "nats": stack.nats.proc.pid}
        if args.cores:
            pin(list(processes.values()), args.cores)
        watched = edges | policies | {"imap-pop": stack.procs["imap-pop"].pid}
        rss_before = {name: proc_status_kib(pid, "VmRSS") for name, pid in watched.items()}
        profiles: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

        def start_profiling() -> None:
            if profile:
                time.sleep(min(2.0, args.profile))  # skip the connection ramp-up
                args.profile_dir.mkdir(parents=True, exist_ok=True)
                profiles.extend(start_profiles({"smtp-edge": edges["smtp-edge"], "policy": policies["policy"],
                                                "imap-pop": stack.procs["imap-pop"].pid},
                                               args.profile, args.profile_dir, args.profile_native))

        meter = CpuMeter({name: process_cpu(pid) for name, pid in processes.items()})
        result = run_load("rempart", port, args, demo["peer"], start_profiling, recipients)
        result.replicas = replicas
        cpu = meter.used()  # before waiting for the indexer: the load's own cost
        expected = args.messages * recipients
        result.stored = wait_for_count("rempart mailboxes", lambda: count() - before, expected, args.timeout)
        peaks = {name: proc_status_kib(pid, "VmHWM") for name, pid in watched.items()}
        result.extra = {
            "edge_peak_rss_mib": round(max(peaks[name] for name in edges) / 1024, 1),
            "edge_rss_before_mib": round(max(rss_before[name] for name in edges) / 1024, 1),
            "policy_peak_rss_mib": round(max(peaks[name] for name in policies) / 1024, 1),
            "imap_pop_peak_rss_mib": round(peaks["imap-pop"] / 1024, 1),
            "cpu_seconds": cpu,
        }
        if profiles:
            result.extra["profile"] = report_profiles(profiles, args.profile_top)
        for name in ("policy", "imap-pop") if replicated else ("smtp-edge", "policy", "imap-pop"):
            if stack.procs[name].poll() is not None:
                raise RuntimeError(f"{name} died during the benchmark:\n{stack.log_tail(name)}")
        if replicated is not None:
            for replica in replicated.edges + replicated.policies:
                if replica.proc.poll() is not None:
                    raise RuntimeError(f"{replica.instance} died during the benchmark:\n{replica.log_tail()}")
        return result
    finally:
        if replicated is not None:
            replicated.stop()
        stack.stop()


# ---------------------------------------------------------------------------------------------
# Postfix
# ---------------------------------------------------------------------------------------------
class PolicyDelegationServer:
    """The trivial SMTPD_POLICY_README server: ``name=value`` lines, an empty line, ``action=DUNNO``."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-delegation", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("policy delegation server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0, limit=POLICY_MAX_LINE))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # smtpd keeps the connection for many requests; each request ends with an empty line.
        try:
            attributes = 0
            while True:
                line = await asyncio.wait_for(reader.readline(), POLICY_IDLE_SECONDS)
                if not line:
                    return
                if line.strip():
                    attributes += 1
                    if attributes > POLICY_MAX_ATTRIBUTES:
                        return
                    continue
                attributes = 0
                self.requests += 1
                writer.write(b"action=DUNNO\n\n")
                await writer.drain()
        except (TimeoutError, ValueError, ConnectionError):
            return
        finally:
            writer.close()


def postfix_main_cf(base: Path, policy_port: int, delivery: str = "", tool: str = "tools/bench_smtp.py") -> str:
    """A private instance's main.cf: ``delivery`` says where mail goes (by default into
    mailboxes of DOMAIN, and nothing out); the policy delegation server checks every RCPT."""
    delivery = delivery or f"""\
default_transport = error:benchmark instance: no outbound mail
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = texthash:{base}/etc/vmailbox
virtual_uid_maps = static:{pwd.getpwnam("nobody").pw_uid}
virtual_gid_maps = static:{pwd.getpwnam("nobody").pw_gid}
"""
    return f"""\
# Private benchmark instance ({tool}); not the system Postfix.
compatibility_level = 3.6
config_directory = {base}/etc
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination = localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
relayhost =
biff = no
{delivery}smtpd_recipient_restrictions =
    check_policy_service inet:127.0.0.1:{policy_port},
    permit_mynetworks,
    reject_unauth_destination
"""


def postfix_master_cf(smtp_port: int) -> str:
    # No chroot: a chroot would need copies of /etc files inside the queue directory.
    services = [
        f"127.0.0.1:{smtp_port} inet n - n - - smtpd",
        "pickup unix n - n 60 1 pickup",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "proxywrite unix - - n - 1 proxymap",
        "smtp unix - - n - - smtp",
        "relay unix - - n - - smtp",
        "showq unix n - n - - showq",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "local unix - n n - - local",
        "virtual unix - n n - - virtual",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
        "postlog unix-dgram n - n - 1 postlogd",
    ]
    return "\n".join(services) + "\n"


def maildir_count(directory: Path) -> Callable[[], int]:
    def count() -> int:
        try:
            return sum(1 for _ in (directory / "new").iterdir()) + sum(1 for _ in (directory / "cur").iterdir())
        except FileNotFoundError:
            return 0

    return count


def bench_postfix(args: argparse.Namespace, workdir: Path, recipients: int = 1) -> LoadResult:
    base = workdir / f"postfix-r{recipients}"
    etc, mail = base / "etc", base / "mail"
    for directory in (base, etc, base / "queue", base / "data", mail):
        directory.mkdir(parents=True, exist_ok=True)
    # Postfix insists that its directories are not writable by others and traversable by its users.
    for directory in (workdir, base, etc, base / "queue"):
        directory.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(mail, nobody.pw_uid, nobody.pw_gid)
    postfix_user = pwd.getpwnam("postfix")
    os.chown(base / "data", postfix_user.pw_uid, postfix_user.pw_gid)
    policy = PolicyDelegationServer()
    policy.start()
    smtp_port = free_port()
    (etc / "main.cf").write_text(postfix_main_cf(base, policy.port))
    (etc / "master.cf").write_text(postfix_master_cf(smtp_port))
    mailboxes = recipient_addresses(f"peer@{DOMAIN}", recipients)
    (etc / "vmailbox").write_text("".join(f"{a} {DOMAIN}/{a.split('@')[0]}/\n" for a in mailboxes))
    postfix = ["postfix", "-c", str(etc)]
    started = False
    try:
        for verb in ("check", "start"):
            # Postfix prints its fatal errors to stderr only on a terminal (else to the log).
            done = subprocess.run([*postfix, verb], capture_output=True, timeout=120)
            if done.returncode != 0:
                logged = (base / "maillog").read_text(errors="replace")[-2000:] if (base / "maillog").exists() else ""
                raise RuntimeError(f"`{' '.join([*postfix, verb])}` failed ({done.returncode}); run it in a "
                                   f"terminal to see why. {(done.stdout + done.stderr).decode(errors='replace')}"
                                   f"{logged}")
            started = started or verb == "start"
        wait_for_port("127.0.0.1", smtp_port, timeout=30)
        log(f"private Postfix up (config {etc}, smtpd on {smtp_port}, policy server on {policy.port})")
        master = int((base / "queue" / "pid" / "master.pid").read_text().split()[0])
        if args.cores:
            pin(process_tree(master), args.cores)  # the daemons it starts later inherit it
        meter = CpuMeter({"postfix (master and its daemons)": lambda: process_tree_cpu_seconds(master),
                          "policy delegation server (this process)": process_cpu(os.getpid())})
        result = run_load("postfix", smtp_port, args, f"peer@{DOMAIN}", recipients=recipients)
        cpu = meter.used()
        counts = [maildir_count(mail / DOMAIN / a.split("@")[0]) for a in mailboxes]
        result.stored = wait_for_count("postfix maildirs", lambda: sum(c() for c in counts),
                                       args.messages * recipients, args.timeout)
        result.extra = {"policy_requests": policy.requests, "cpu_seconds": cpu}
        return result
    finally:
        if started:
            subprocess.run([*postfix, "stop"], capture_output=True, timeout=120)
        policy.stop()


# ---------------------------------------------------------------------------------------------
def print_table(results: list[LoadResult], replica_note: str = "") -> None:
    print()
    first = results[0]
    mode = "a new connection per message" if first.per_message_connection else "each session kept (-d)"
    cores = os.cpu_count() or 1
    print(f"SMTP benchmark: smtp-source, {first.messages} messages of {first.size} bytes over "
          f"{first.sessions} parallel sessions, {mode}; {cores} cores = {1000 * cores} CPU ms/s")
    print("CPU ms/msg: every server-side process (not smtp-source, not unrelated load); "
          "stored: deliveries counted in the mailboxes (messages x recipients)")
    print(f"{'target':<12} {'rcpt':>4} {'seconds':>9} {'accepted':>9} {'msg/s':>9} {'stored':>9} {'CPU ms/msg':>11}"
          "  checks")
    for r in results:
        expected = r.messages * r.recipients
        if r.exit_code != 0:
            check = "not checkable (smtp-source stopped early; 'accepted' is what was stored)"
        else:
            check = "ok" if r.stored == expected else f"MISMATCH: {expected - r.stored} accepted but not stored"
        cpu = r.extra.get("cpu_seconds")
        server = sum(float(v) for k, v in cpu.items() if k not in NOT_SERVER) if isinstance(cpu, dict) else 0.0
        per_message = 1000 * server / max(r.accepted, 1)
        print(f"{r.label:<12} {r.recipients:>4} {r.seconds:>9.1f} {r.accepted:>9} {r.rate:>9.1f} {r.stored:>9} "
              f"{per_message:>11.2f}  smtp-source exit {r.exit_code}, count {check}")
        if r.exit_code != 0:
            print(f"{'':<12} smtp-source: {r.output_tail.splitlines()[-1] if r.output_tail else '?'}")
    single = {(r.target, r.recipients): r for r in results if r.replicas == 1}
    for recipients in sorted({r.recipients for r in results}):
        ours, theirs = single.get(("rempart", recipients)), single.get(("postfix", recipients))
        if ours is not None and theirs is not None and theirs.rate > 0:
            print(f"ratio rempart/postfix at -r {recipients}: {ours.rate / theirs.rate:.3f}")
    base = single.get(("rempart", 1))
    for r in results:
        if r.replicas > 1 and base is not None and base.rate > 0:
            print(f"ratio rempart x{r.replicas} (haproxy, send-proxy-v2) / one replica at -r 1: "
                  f"{r.rate / base.rate:.3f}")
    if replica_note:
        print(replica_note)
    for r in results:
        if r.target == "rempart":
            print(f"smtp-edge peak RSS (VmHWM) {r.label} -r {r.recipients}: {r.extra.get('edge_peak_rss_mib')} MiB "
                  f"(before the load: {r.extra.get('edge_rss_before_mib')} MiB); "
                  f"policy peak: {r.extra.get('policy_peak_rss_mib')} MiB")
    for r in results:
        cpu = r.extra.get("cpu_seconds")
        if isinstance(cpu, dict) and r.accepted:
            shares = ", ".join(f"{name} {1000 * float(value) / r.accepted:.2f}"
                               for name, value in cpu.items() if name != "machine")
            print(f"{r.label} -r {r.recipients} CPU ms per message: {shares}")


def number_list(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers: {text!r}") from exc
    if not values or values[0] < 1 or values[-1] > 50:
        raise argparse.ArgumentTypeError(f"numbers from 1 to 50: {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20000, help="messages in total (default 20000)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (default 20)")
    parser.add_argument("--size", type=int, default=2048, help="payload bytes per message (default 2048)")
    parser.add_argument("--recipients", type=number_list, default=[1, 5],
                        help="recipients per message, one run each (smtp-source -r; default 1,5)")
    parser.add_argument("--replicas", type=number_list, default=[1, 2],
                        help="Rempart runs at -r 1 with this many smtp-edge and policy replicas behind haproxy "
                             "(default 1,2; 1 is the plain run)")
    parser.add_argument("--cores", type=int, default=0,
                        help="pin every server process to the first N cores, smtp-source to the others")
    parser.add_argument("--quick", action="store_true", help="2000 messages (a smoke run)")
    parser.add_argument("--only", choices=("rempart", "postfix"), help="run one side only")
    parser.add_argument("--connection-per-message", action="store_true",
                        help="reconnect for every message (smtp-source without -d)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound on each load run, seconds")
    parser.add_argument("--profile", type=int, nargs="?", const=20, default=0, metavar="SECONDS",
                        help="py-spy the edge and the policy service for SECONDS (default 20) during the "
                             "Rempart run at the first --recipients: hottest functions and a flame graph (SVG) of each")
    parser.add_argument("--profile-dir", type=Path, default=Path(".run/bench-profiles"),
                        help="where the profiles and flame graphs go (default .run/bench-profiles)")
    parser.add_argument("--profile-native", action="store_true",
                        help="also sample native frames (Cython/C: gRPC core), at a higher cost")
    parser.add_argument("--profile-top", type=int, default=12, help="functions listed per profile")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stacks)")
    args = parser.parse_args(argv)
    if args.quick and args.messages == 20000:
        args.messages = 2000
    if args.messages < 1 or args.sessions < 1 or args.size < 1 or args.sessions > 1000:
        parser.error("--messages, --sessions and --size must be positive (sessions at most 1000)")
    available = len(os.sched_getaffinity(0))
    if args.cores < 0 or args.cores > available:
        parser.error(f"--cores must be between 1 and the {available} cores this process may use")
    if args.cores and shutil.which("taskset") is None:
        parser.error("--cores needs taskset (Debian package util-linux)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_postfix()
    workdir = Path(tempfile.mkdtemp(prefix="rempart-bench-smtp-"))
    results: list[LoadResult] = []
    replica_note = ""
    failed = False
    try:
        for recipients in args.recipients:
            if args.only in (None, "rempart"):
                profiled = bool(args.profile) and recipients == args.recipients[0]
                results.append(bench_rempart(args, workdir, recipients, profile=profiled))
            if args.only in (None, "postfix"):
                results.append(bench_postfix(args, workdir, recipients))
        more = [n for n in args.replicas if n > 1] if args.only in (None, "rempart") else []
        if more and shutil.which("haproxy") is None:
            replica_note = "replicas: not run, haproxy is not installed (Debian package haproxy)"
            more = []
        for replicas in more:
            results.append(bench_rempart(args, workdir, 1, replicas))
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        log(f"failed: {exc}")
        failed = True
    finally:
        if results:
            print_table(results, replica_note)
        if args.json is not None:
            args.json.write_text(json.dumps([asdict(r) | {"rate": r.rate} for r in results], indent=2, default=str))
        if args.keep or failed or not all(r.ok for r in results):
            log(f"kept {workdir} (logs, configs, profiles)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed or not all(r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
