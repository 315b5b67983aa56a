"""Rolling update of every Deployment under mail load (R-OPS-7, issue 13), in the chart-as-processes
harness (test_chart_processes.py): the chart's pods as the kubelet would run them, as many of
each as the rendered Deployment's replicas.

A client-facing Service is a TCP proxy in this test standing for kube-proxy and the Service's
Endpoints: a connection goes to one of the pods that passed their readiness probe and are not
terminating. A headless gRPC Service is one address per replica (a proxy to that pod), all of them
in the peers' target, as the Service's DNS answer gives a client one address per pod; the clients'
round_robin and health checking work over them as in a cluster. Then every Deployment is replaced
pod by pod, as a RollingUpdate with maxUnavailable 0 does: the new pod starts, its startup and
readiness probes pass, it takes the old pod's place in the endpoints; the old pod gets SIGTERM and
has terminationGracePeriodSeconds (read from the rendered Deployment) to exit, else SIGKILL.
Meanwhile SMTP clients submit mail without pause (one keeps its session, one opens a session per
message) and IMAP clients poll the INBOX; each reconnects when its server goes. Counted and
printed: messages answered 250, tempfails, reconnects, and every 250 found in the mailbox
afterwards (0 lost).
"""

from __future__ import annotations

import imaplib
import itertools
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_chart_processes import (  # the chart harness
    COMPONENTS,
    RENDER_ARGS,
    Backing,
    Pod,
    component_of,
    container_env,
    plan_pods,
    probe_once,
    probe_until,
    render,
    secret_value,
    start_backing,
    start_pod,
    stop_pod,
)

from rempart.common.testing.polling import wait_until

pytestmark = pytest.mark.timeout(600)
STARTUP_DEADLINE = 60.0
LOAD_BEFORE_ROLL = 3.0  # seconds of load before the first pod is replaced
# The Services whose ports the clients and peers use, by component and container port name.
SERVICE_PORTS = {
    "smtp-edge": ("smtp", "submission", "smtps"),
    "imap-pop": ("imap", "imaps", "pop3", "pop3s"),
    "policy": ("grpc",),
    "auth": ("grpc",),
    "admin-api": ("http",),
}


# kube-proxy and Endpoints ------------------------------------------------------------------------
class ServiceProxy:
    """One Service port: accepts on a fixed loopback port and forwards each connection to one of
    the ready endpoints (round robin), both ways, until either side closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.endpoints: list[int] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.turn = itertools.count()
        self.closed = False
        self.connections = 0
        self.no_endpoint = 0
        threading.Thread(target=self._accept, name=f"proxy-{name}", daemon=True).start()

    def set_endpoints(self, ports: list[int]) -> None:
        with self.lock:
            self.endpoints = list(ports)

    def _pick(self) -> int | None:
        with self.lock:
            if not self.endpoints:
                return None
            return self.endpoints[next(self.turn) % len(self.endpoints)]

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            port = self._pick()
            if port is None:
                self.no_endpoint += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # The other direction ends too: a closed pod closes its clients' connections.
            for sock in (sink, source):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@dataclass
class Cluster:
    objects: list[dict[str, Any]]
    workdir: Path
    backing: Backing
    # Client-facing Service ports: (component, port name) -> proxy to every ready pod.
    proxies: dict[tuple[str, str], ServiceProxy]
    # The headless gRPC Services: one address per replica (component, slot) -> proxy to that pod.
    slots: dict[tuple[str, int], ServiceProxy]
    pods: dict[str, list[Pod]] = field(default_factory=dict)  # the serving pods of each Deployment
    gone: list[Pod] = field(default_factory=list)  # the pods replaced
    drain_greetings: list[str] = field(default_factory=list)  # a draining edge's first line
    ordinals: Iterator[int] = field(default_factory=itertools.count)
    events: list[str] = field(default_factory=list)

    def replicas(self, component: str) -> int:
        deployment = next(o for o in self.objects if o["kind"] == "Deployment" and component_of(o) == component)
        return int(deployment["spec"].get("replicas", 1))

    def plan(self, component: str) -> Pod:
        """A new pod of ``component``: its own ports; its gRPC peers are every replica's address
        (the headless Service's DNS answer, one address per pod, round_robin over them)."""
        ordinal = next(self.ordinals)
        pods = plan_pods(self.objects, self.workdir / f"pods-{ordinal}", self.backing, move_all_ports=True,
                         ordinal=ordinal)
        by_local_port = {local: c for c, p in pods.items() for _, local in p.ports.values()}
        pod = pods[component]
        for var, value in list(pod.env.items()):
            if var.endswith("_TARGET") and value.startswith("dns:///127.0.0.1:"):
                peer = by_local_port[int(value.rsplit(":", 1)[1])]
                addresses = [f"127.0.0.1:{self.slots[(peer, slot)].port}" for slot in range(self.replicas(peer))]
                pod.env[var] = "ipv4:" + ",".join(addresses)
        return pod

    def start(self, pod: Pod, deadline: float) -> None:
        start_pod(pod, self.workdir)
        probe_until(pod, "startupProbe", pod.container["startupProbe"], deadline)
        probe_until(pod, "readinessProbe", pod.container["readinessProbe"], deadline)

    def serve(self, component: str) -> None:
        """The Endpoints: every serving pod behind the Service ports; each replica's address."""
        pods = self.pods[component]
        for name in SERVICE_PORTS.get(component, ()):
            if name == "grpc":
                for slot, pod in enumerate(pods):
                    self.slots[(component, slot)].set_endpoints([pod.port(name)])
            else:
                self.proxies[(component, name)].set_endpoints([pod.port(name) for pod in pods])

    def terminate(self, pod: Pod) -> tuple[float, int]:
        """The kubelet's stop: SIGTERM, SIGKILL after the grace period; (seconds, exit code).
        Right after SIGTERM, as a client that raced the endpoints' update: the pod is not ready
        any more, and an edge greets a new SMTP connection with 421 4.3.2 (stop accepting)."""
        assert pod.proc is not None
        started = time.monotonic()
        os.killpg(pod.proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        ready, answer = probe_once(pod, pod.container["readinessProbe"])
        assert not ready, f"{pod.name} still ready after SIGTERM: {answer}"
        if pod.component == "smtp-edge":
            try:
                with socket.create_connection(("127.0.0.1", pod.port("smtp")), timeout=5) as sock:
                    greeting = sock.makefile("rb").readline().decode(errors="replace").strip()
            except OSError as exc:
                greeting = f"no connection: {exc}"
            self.drain_greetings.append(greeting)
        try:
            code = pod.proc.wait(pod.grace)
        except subprocess.TimeoutExpired:
            stop_pod(pod)
            raise AssertionError(f"{pod.name} still running {pod.grace}s after SIGTERM: SIGKILLed\n{pod.log()}") from None
        return time.monotonic() - started, code

    def roll(self, component: str) -> list[str]:
        """The Deployment's RollingUpdate with maxUnavailable 0, one pod at a time: a new pod
        ready first, then it takes the old one's place in the endpoints and the old one goes."""
        lines = []
        for slot in range(len(self.pods[component])):
            old = self.pods[component][slot]
            new = self.plan(component)
            self.start(new, time.monotonic() + STARTUP_DEADLINE)
            self.pods[component][slot] = new
            self.serve(component)  # the new pod in, the terminating one out
            seconds, code = self.terminate(old)
            self.gone.append(old)
            assert code == 0, f"{old.name} exited {code} on SIGTERM:\n{old.log()}"
            lines.append(f"{component}: {old.name} -> {new.name}, old pod gone {seconds:.1f} s after SIGTERM "
                         f"(grace {old.grace} s)")
        self.events += lines
        return lines


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    objects = render(*RENDER_ARGS)
    policy = next(o for o in objects if o["kind"] == "Deployment" and component_of(o) == "policy")
    env = container_env(objects, policy["spec"]["template"]["spec"]["containers"][0], "credentials")
    backing = start_backing(tmp_path, env["REMPART_REDIS_URL"], env["REMPART_NATS_URL"])
    proxies = {(c, name): ServiceProxy(f"{c}-{name}") for c, names in SERVICE_PORTS.items()
               for name in names if name != "grpc"}
    cluster = Cluster(objects, tmp_path, backing, proxies, {})
    for c, names in SERVICE_PORTS.items():
        if "grpc" in names:
            for slot in range(cluster.replicas(c)):
                cluster.slots[(c, slot)] = ServiceProxy(f"{c}-{slot}")
    started: list[Pod] = []
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        for component in COMPONENTS:
            cluster.pods[component] = []
            for _ in range(cluster.replicas(component)):
                pod = cluster.plan(component)
                start_pod(pod, tmp_path)
                started.append(pod)
                cluster.pods[component].append(pod)
        for component in COMPONENTS:
            for pod in cluster.pods[component]:
                probe_until(pod, "startupProbe", pod.container["startupProbe"], deadline)
            cluster.serve(component)
        for component in COMPONENTS:
            for pod in cluster.pods[component]:
                probe_until(pod, "readinessProbe", pod.container["readinessProbe"], deadline)
        yield cluster
    finally:
        for pod in [*started, *(p for pods in cluster.pods.values() for p in pods)]:
            stop_pod(pod)
        for proxy in [*proxies.values(), *cluster.slots.values()]:
            proxy.close()
        backing.stop()


# The load ------------------------------------------------------------------------------------------
@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)  # ids answered 250
    outcomes: Counter[str] = field(default_factory=Counter)
    permanent: list[str] = field(default_factory=list)  # 5xx or other surprises: must stay empty
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            self.outcomes[what] += 1


class SmtpLoad(threading.Thread):
    """Submits mail to ``address`` without pause; reconnects on 421, a 4xx, a lost connection."""

    def __init__(self, name: str, port: int, ctx: ssl.SSLContext, address: str, password: str,
                 persistent: bool, tally: Tally, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.port, self.ctx, self.address, self.password = port, ctx, address, password
        self.persistent, self.tally, self.stop_event = persistent, tally, stop

    def connect(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        client.starttls(context=self.ctx)
        client.login(self.address, self.password)
        return client

    def run(self) -> None:
        client: smtplib.SMTP | None = None
        for number in itertools.count():
            if self.stop_event.is_set():
                break
            message_id = f"{self.name}-{number}-{uuid.uuid4().hex[:8]}"
            try:
                if client is None:
                    client = self.connect()
                client.sendmail(self.address, [self.address],
                                f"From: {self.address}\r\nTo: {self.address}\r\nSubject: roll {message_id}\r\n"
                                f"\r\nrolling update load {message_id}\r\n".encode())
                with self.tally.lock:
                    self.tally.accepted.append(message_id)
                    self.tally.outcomes[f"{self.name} 250"] += 1
                if not self.persistent:
                    client.quit()
                    client = None
            except smtplib.SMTPResponseException as exc:
                self._drop(client)
                client = None
                if 400 <= exc.smtp_code < 500:
                    self.tally.count(f"{self.name} {exc.smtp_code}")
                else:
                    self.tally.permanent.append(f"{message_id}: {exc.smtp_code} {exc.smtp_error!r}")
            except smtplib.SMTPRecipientsRefused as exc:
                self._drop(client)
                client = None
                codes = {code for code, _ in exc.recipients.values()}
                if all(400 <= c < 500 for c in codes):
                    self.tally.count(f"{self.name} RCPT {sorted(codes)}")
                else:
                    self.tally.permanent.append(f"{message_id}: RCPT {exc.recipients}")
            except (smtplib.SMTPServerDisconnected, OSError, ssl.SSLError):
                self._drop(client)
                client = None
                self.tally.count(f"{self.name} reconnect")
                time.sleep(0.1)
        self._drop(client)

    @staticmethod
    def _drop(client: smtplib.SMTP | None) -> None:
        if client is not None:
            try:
                client.close()
            except OSError:
                pass


class ImapLoad(threading.Thread):
    """Polls the INBOX (NOOP, SELECT, a FETCH of the newest) like a mail client; reconnects when
    the server says BYE or the connection goes."""

    def __init__(self, name: str, port: int, ctx: ssl.SSLContext, address: str, password: str,
                 tally: Tally, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.port, self.ctx, self.address, self.password = port, ctx, address, password
        self.tally, self.stop_event = tally, stop
        self.commands_ok = 0
        self.last_ok = 0.0

    def run(self) -> None:
        client: imaplib.IMAP4_SSL | None = None
        while not self.stop_event.is_set():
            try:
                if client is None:
                    client = imaplib.IMAP4_SSL("127.0.0.1", self.port, ssl_context=self.ctx, timeout=30)
                    client.login(self.address, self.password)
                    self.tally.count("imap login")
                status, data = client.select("INBOX", readonly=True)
                assert status == "OK", data
                if data[0] not in (b"0", None):
                    status, _ = client.fetch(data[0].decode(), "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                    assert status == "OK"
                client.noop()
                self.commands_ok += 1
                self.last_ok = time.monotonic()
                time.sleep(0.2)
            except (imaplib.IMAP4.abort, OSError, ssl.SSLError):
                # BYE (the server is draining) or the connection went: a client logs in again.
                if client is not None:
                    try:
                        client.shutdown()
                    except OSError:
                        pass
                client = None
                self.tally.count("imap reconnect")
                time.sleep(0.1)
            except (imaplib.IMAP4.error, AssertionError) as exc:
                self.tally.permanent.append(f"IMAP: {exc}")
                client = None
                time.sleep(0.5)
        if client is not None:
            try:
                client.logout()
            except (imaplib.IMAP4.error, OSError):
                pass


def inbox_subjects(port: int, ctx: ssl.SSLContext, address: str, password: str) -> set[str]:
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=60)
    try:
        client.login(address, password)
        status, data = client.select("INBOX", readonly=True)
        assert status == "OK", data
        if data[0] == b"0":
            return set()
        status, items = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert status == "OK", items
        subjects = set()
        for item in items:
            if isinstance(item, tuple):
                line = item[1].decode(errors="replace").strip()
                if line.lower().startswith("subject: roll "):
                    subjects.add(line.split("roll ", 1)[1].strip())
        return subjects
    finally:
        client.logout()


# The test ------------------------------------------------------------------------------------------
def test_r_ops_7_rolling_update_of_every_deployment_under_load_loses_no_accepted_message(cluster: Cluster) -> None:
    admin_env = cluster.pods["admin-api"][0].env
    address, password = admin_env["REMPART_BOOTSTRAP_ADMIN_EMAIL"], admin_env["REMPART_BOOTSTRAP_ADMIN_PASSWORD"]
    tls_secret = next(v for v in cluster.pods["smtp-edge"][0].deployment["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "tls")["secret"]["secretName"]
    ca_file = cluster.workdir / "ca.pem"
    ca_file.write_text(secret_value(cluster.objects, tls_secret, "tls.crt"))
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False  # the proxy's address, not the mail host name
    submission = cluster.proxies[("smtp-edge", "submission")].port
    imaps = cluster.proxies[("imap-pop", "imaps")].port

    # The bootstrap admin's mailbox is the test account: it exists once admin-api made it.
    def can_log_in() -> bool:
        try:
            SmtpLoad("probe", submission, ctx, address, password, True, Tally(), threading.Event()).connect().quit()
            return True
        except (smtplib.SMTPException, OSError):
            return False

    wait_until(can_log_in, timeout=60, what="the bootstrap admin's first SMTP login", every=0.5)

    tally, stop = Tally(), threading.Event()
    clients: list[threading.Thread] = [
        SmtpLoad("smtp-session", submission, ctx, address, password, True, tally, stop),
        SmtpLoad("smtp-each", submission, ctx, address, password, False, tally, stop),
    ]
    imap_clients = [ImapLoad(f"imap-{n}", imaps, ctx, address, password, tally, stop) for n in range(2)]
    for client in [*clients, *imap_clients]:
        client.start()
    rolled: list[str] = []
    try:
        time.sleep(LOAD_BEFORE_ROLL)
        before = len(tally.accepted)
        assert before > 0, f"no message accepted before the roll: {dict(tally.outcomes)} {tally.permanent}"
        for component in COMPONENTS:
            for line in cluster.roll(component):
                rolled.append(line)
                print(line)
        # The load goes on through the new pods.
        after_roll = len(tally.accepted)
        wait_until(lambda: len(tally.accepted) > after_roll + 5, timeout=30, what="mail accepted after the roll")
        wait_until(lambda: all(c.last_ok > time.monotonic() - 5 for c in imap_clients), timeout=30,
                   what="every IMAP client answered by the new imap-pop")
    finally:
        stop.set()
        for client in [*clients, *imap_clients]:
            client.join(60)

    accepted = list(tally.accepted)
    found: set[str] = set()

    def all_indexed() -> bool:
        found.clear()
        found.update(inbox_subjects(imaps, ctx, address, password))
        return set(accepted) <= found

    try:
        wait_until(all_indexed, timeout=60, what="every accepted message in the mailbox", every=2)
    except AssertionError:
        pass  # counted and reported below
    lost = sorted(set(accepted) - found)
    print(f"rolling update of {len(COMPONENTS)} Deployments, {len(rolled)} pods: {len(accepted)} messages answered 250, "
          f"{len(set(accepted) & found)} in the mailbox, {len(lost)} lost; "
          f"SMTP/IMAP outcomes {dict(tally.outcomes)}; IMAP commands answered "
          f"{[c.commands_ok for c in imap_clients]}; permanent errors {len(tally.permanent)}")
    assert not lost, f"{len(lost)} accepted messages are not in the mailbox: {lost[:10]}"
    assert not tally.permanent, tally.permanent[:10]
    # The sessions kept on an old edge were told 421 at their next transaction (RFC 5321 3.8),
    # and sent it again through the other replica.
    assert tally.outcomes["smtp-session 421"] >= 1, dict(tally.outcomes)
    print(f"a new connection to the draining edge: {cluster.drain_greetings}")
    # A connection that reached the draining edge was greeted with 421 4.3.2; an old edge whose
    # sessions have ended exits at once (within a second here), and then nothing listens any
    # more. The 421 greeting itself: test_smtp_edge's drain test.
    assert all(g.startswith(("421 4.3.2", "no connection")) for g in cluster.drain_greetings), cluster.drain_greetings
    # Nothing went wrong inside the old pods while they drained.
    for pod in cluster.gone:
        bad = [line for line in pod.log(100_000).splitlines() if "Traceback" in line or "UsageError" in line
               or '"level": "error"' in line]
        assert not bad, f"{pod.name} while draining:\n" + "\n".join(bad[:10])
    assert tally.outcomes["imap reconnect"] >= len(imap_clients), "imap-pop was replaced but no IMAP client reconnected"
    assert tally.outcomes["imap login"] >= 2 * len(imap_clients)
    assert len(accepted) > before
