"""The whole suite as local processes: ``make run`` and the e2e tests.

Starts a throwaway Redis and NATS JetStream, writes a self-signed certificate, runs the five
services with the environment their Deployments get in the chart, waits until every ``/readyz``
says ready, and stops everything it started (process groups, so nothing is left behind): the
services first, all at once, then Redis and NATS, so that no service spends its shutdown
reconnecting to a server that is already gone. :meth:`Stack.stop` is bounded by
``SERVICE_STOP_GRACE + SERVER_STOP_GRACE`` seconds, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rempart.common.testing.localstack import LocalServer, free_port, start_nats, start_redis
from rempart.common.tls import write_self_signed

SERVICES = ("policy", "auth", "smtp-edge", "imap-pop", "admin-api")
# Seconds from SIGTERM to SIGKILL: the services drain for REMPART_SHUTDOWN_GRACE_SECONDS (3)
# and close their clients within seconds; Redis and NATS stop last. `make run` promises every
# process gone within 10 s of Ctrl-C.
SERVICE_STOP_GRACE = 6.0
SERVER_STOP_GRACE = 2.0
MODULES = {name: "rempart." + name.replace("-", "_") for name in SERVICES} | {"relay": "rempart.smtp_edge.relay"}

FIXED_PORTS = {
    "policy.grpc": 50051, "auth.grpc": 50052, "smtp-edge.smtp": 2525, "smtp-edge.submission": 2587,
    "smtp-edge.smtps": 2465, "imap-pop.imap": 2143, "imap-pop.imaps": 2993, "imap-pop.pop3": 2110,
    "imap-pop.pop3s": 2995, "admin-api.http": 8080, "smtp-edge.ops": 9101, "imap-pop.ops": 9102,
    "policy.ops": 9103, "auth.ops": 9104, "admin-api.ops": 9105, "relay.ops": 9106,
}


def strong_password(length: int = 20) -> str:
    """Random, and meets every default rule of R-PWD-1 (digit, symbol, upper, lower)."""
    alphabet = string.ascii_letters + string.digits + "-_.!#%+"
    while True:
        # Starts with a letter or digit: a leading "-" would read as an option on command lines.
        candidate = secrets.choice(string.ascii_letters + string.digits) + "".join(
            secrets.choice(alphabet) for _ in range(length - 1))
        if (any(c.isdigit() for c in candidate) and any(c.isupper() for c in candidate)
                and any(c.islower() for c in candidate) and any(not c.isalnum() for c in candidate)):
            return candidate


@dataclass
class Stack:
    """The suite as local processes. ``ports.json`` in ``workdir`` lists the ports in use."""

    workdir: Path
    fixed_ports: bool = False
    hostname: str = "localhost"
    admin_email: str = "admin@example.test"
    admin_password: str = field(default_factory=strong_password)
    log_format: str = "text"
    extra_env: dict[str, str] = field(default_factory=dict)
    redis: LocalServer | None = None
    nats: LocalServer | None = None
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    cert_file: str = ""
    key_file: str = ""
    interrupted: bool = False
    # The outbound relay (mail to other domains leaves): on for `make run`; off for the e2e
    # tests, which start their own relay against loopback MX hosts.
    relay: bool = False
    # Redis and NATS started by someone else (the HA test's Sentinels and NATS cluster): with a
    # URL here the stack starts no server of its own for it, and leaves it running at stop.
    external_redis_url: str = ""
    external_nats_url: str = ""

    _raise_on_interrupt: bool = field(default=False, repr=False)

    def interrupt(self) -> None:
        """Make a start in progress give up (called from a signal handler).

        While the start only polls over HTTP (readiness, the demo accounts), this raises
        :class:`StackInterrupted` at once, out of whatever call is waiting; elsewhere the start
        gives up at its next step, so that no process it is launching escapes :meth:`stop`.
        """
        self.interrupted = True
        if self._raise_on_interrupt:
            self._raise_on_interrupt = False
            raise StackInterrupted("interrupted while starting")

    def check_interrupted(self) -> None:
        if self.interrupted:
            raise StackInterrupted("interrupted while starting")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch of polling that a signal may cut short (see :meth:`interrupt`)."""
        self.check_interrupted()
        self._raise_on_interrupt = True
        try:
            yield
        finally:
            self._raise_on_interrupt = False

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {k: (v if self.fixed_ports else free_port()) for k, v in FIXED_PORTS.items()}
        (self.workdir / "ports.json").write_text(json.dumps(self.ports, indent=1, sort_keys=True) + "\n")
        if not self.external_redis_url:
            self.redis = start_redis(self.workdir / "redis")
        if not self.external_nats_url:
            self.nats = start_nats(self.workdir / "nats")
        pair = write_self_signed(self.workdir / "tls", [self.hostname, "localhost", "127.0.0.1"])
        self.cert_file, self.key_file = pair.cert_file, pair.key_file
        names = self.names
        for name in names:
            self.check_interrupted()
            self.start_service(name)
        self.wait_ready(names=names)

    @property
    def names(self) -> tuple[str, ...]:
        """The services this stack runs (the relay when it is on)."""
        return SERVICES + (("relay",) if self.relay else ())

    @property
    def redis_url(self) -> str:
        if self.external_redis_url:
            return self.external_redis_url
        assert self.redis is not None, "the stack is not started"
        return self.redis.url

    @property
    def nats_url(self) -> str:
        if self.external_nats_url:
            return self.external_nats_url
        assert self.nats is not None, "the stack is not started"
        return self.nats.url

    def env_for(self, name: str) -> dict[str, str]:
        p = self.ports
        env = {
            "REMPART_ENVIRONMENT": "dev",
            "REMPART_REDIS_URL": self.redis_url,
            "REMPART_NATS_URL": self.nats_url,
            "REMPART_OPS_HOST": "127.0.0.1",
            "REMPART_OPS_PORT": str(p[f"{name}.ops"]),
            "REMPART_LOG_FORMAT": self.log_format,
            "REMPART_HOSTNAME": self.hostname,
            "REMPART_SECRET_KEY": "local-dev-key-" + self.workdir.name,
            "REMPART_INSTANCE": f"{name}-0",
            "REMPART_SHUTDOWN_GRACE_SECONDS": "3",
        }
        targets = {
            "REMPART_POLICY_TARGET": f"127.0.0.1:{p['policy.grpc']}",
            "REMPART_AUTH_TARGET": f"127.0.0.1:{p['auth.grpc']}",
        }
        tls = {"REMPART_TLS_CERT_FILE": self.cert_file, "REMPART_TLS_KEY_FILE": self.key_file,
               "REMPART_LISTEN_HOST": "127.0.0.1"}
        if name == "policy":
            env |= {"REMPART_GRPC_PORT": str(p["policy.grpc"]), "REMPART_GRPC_HOST": "127.0.0.1"}
        elif name == "auth":
            env |= {"REMPART_GRPC_PORT": str(p["auth.grpc"]), "REMPART_GRPC_HOST": "127.0.0.1"}
        elif name == "smtp-edge":
            env |= targets | tls | {
                "REMPART_SMTP_PORT": str(p["smtp-edge.smtp"]),
                "REMPART_SUBMISSION_PORT": str(p["smtp-edge.submission"]),
                "REMPART_SMTPS_PORT": str(p["smtp-edge.smtps"]),
            }
        elif name == "imap-pop":
            env |= targets | tls | {
                "REMPART_IMAP_PORT": str(p["imap-pop.imap"]), "REMPART_IMAPS_PORT": str(p["imap-pop.imaps"]),
                "REMPART_POP3_PORT": str(p["imap-pop.pop3"]), "REMPART_POP3S_PORT": str(p["imap-pop.pop3s"]),
            }
        elif name == "admin-api":
            env |= {
                "REMPART_AUTH_TARGET": targets["REMPART_AUTH_TARGET"],
                "REMPART_HTTP_PORT": str(p["admin-api.http"]),
                "REMPART_HTTP_HOST": "127.0.0.1",
                "REMPART_BOOTSTRAP_ADMIN_EMAIL": self.admin_email,
                "REMPART_BOOTSTRAP_ADMIN_PASSWORD": self.admin_password,
                # The console's status page: every other service's /readyz (no cluster view here).
                "REMPART_STATUS_READINESS_URLS": json.dumps({
                    other: f"http://127.0.0.1:{p[other + '.ops']}/readyz" for other in self.names if other != name}),
            }
        return env | self.extra_env

    def start_service(self, name: str) -> None:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("REMPART_")]:
            del env[key]
        env |= self.env_for(name)
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", MODULES[name]], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready(self, name: str) -> tuple[bool, str]:
        url = f"http://127.0.0.1:{self.ports[name + '.ops']}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status == 200, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return False, exc.read().decode()
        except OSError as exc:
            return False, str(exc)

    def wait_ready(self, timeout: float = 60.0, names: tuple[str, ...] = SERVICES) -> None:
        deadline = time.monotonic() + timeout
        pending = list(names)
        last = ""
        with self.interruptible():
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    proc = self.procs[name]
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                           f"{self.workdir / (name + '.log')}:\n" + self.log_tail(name))
                    ok, last = self.ready(name)
                    if ok:
                        pending.remove(name)
                time.sleep(0.2)
        if pending:
            raise TimeoutError(f"not ready after {timeout}s: {pending}; last: {last}\n"
                               + "\n".join(self.log_tail(n) for n in pending))

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            _signal_group(proc, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        return int(proc.returncode)

    def stop(self, grace: float = SERVICE_STOP_GRACE, server_grace: float = SERVER_STOP_GRACE) -> None:
        """SIGTERM to every service at once (they drain in parallel), SIGKILL what is left after
        ``grace`` seconds; then the same for Redis and NATS, which the services needed until then."""
        running = [p for p in self.procs.values() if p.poll() is None]
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        servers = [s for s in (self.nats, self.redis) if s is not None]
        for server in servers:
            server.terminate()
        deadline = time.monotonic() + server_grace
        for server in servers:
            server.wait_or_kill(deadline)


class StackInterrupted(Exception):
    """A signal asked the stack to stop while it was starting."""


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # Each service leads its own process group (start_new_session): the signal reaches any
    # helper process it started too.
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# TOTP secrets of the admins this process enrolled, per admin API and address, with the last
# time step used: any AdminApi object of this process can log in again (R-2FA-1).
_TOTP_STATE: dict[tuple[str, str], tuple[str, int]] = {}
TOTP_STEP_SECONDS = 30


def totp_secret_for(base_url: str, email: str) -> str:
    """The TOTP secret this process enrolled for ``email`` ("" if none): ``make run`` prints it."""
    return _TOTP_STATE.get((base_url, email), ("", 0))[0]


class AdminApi:
    """A tiny client of the admin API, for the launcher and the e2e tests.

    Admins need TOTP by default (R-2FA-1): when a login answers
    ``second_factor_enrolment_required``, :meth:`login` enrols with pyotp, confirms (which turns
    the session into a full one) and keeps the secret for later logins. A code works once, so a
    later login uses the next time step, waiting for it when both usable steps are spent.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.token = ""
        self.recovery_codes: list[str] = []

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        import json

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)  # noqa: S310
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as resp:  # noqa: S310 - loopback only
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def totp_code(self, email: str) -> str:
        """A code for the next unused time step of ``email``'s enrolled secret ("" if none)."""
        import pyotp

        secret, last_step = _TOTP_STATE.get((self.base_url, email), ("", 0))
        if not secret:
            return ""
        now_step = int(time.time() // TOTP_STEP_SECONDS)
        step = max(now_step, last_step + 1)
        if step > now_step + 1:
            # The server accepts the next step early (+-1 window); beyond it, wait for time to move.
            time.sleep(max(0.0, (step - 1) * TOTP_STEP_SECONDS - time.time()) + 0.05)
        _TOTP_STATE[(self.base_url, email)] = (secret, step)
        return str(pyotp.TOTP(secret).at(step * TOTP_STEP_SECONDS))

    def login(self, email: str, password: str) -> None:
        self.token = ""
        request: dict[str, str] = {"email": email, "password": password}
        code = self.totp_code(email)
        if code:
            request["totp_code"] = code
        status, body = self.call("POST", "/v1/auth/login", request)
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"admin login failed: {status} {body}")
        self.token = str(body.get("token") or body.get("access_token"))
        if body.get("second_factor_enrolment_required"):
            self.enrol_totp(email)

    def enrol_totp(self, email: str) -> None:
        """Enrol and confirm TOTP for the logged-in account; the session becomes a full one."""
        import pyotp

        status, body = self.call("POST", "/v1/me/totp")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"TOTP enrolment failed: {status} {body}")
        secret = str(body["secret"])
        step = int(time.time() // TOTP_STEP_SECONDS)
        code = pyotp.TOTP(secret).at(step * TOTP_STEP_SECONDS)
        status, body = self.call("POST", "/v1/me/totp/confirm", {"code": code})
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"TOTP confirmation failed: {status} {body}")
        _TOTP_STATE[(self.base_url, email)] = (secret, step)
        self.recovery_codes = [str(c) for c in body.get("recovery_codes", [])]

    def create_account(self, domain: str, address: str, password: str) -> None:
        status, body = self.call("POST", f"/v1/domains/{domain}/accounts", {"address": address, "password": password})
        if status not in (200, 201, 409):
            raise RuntimeError(f"creating {address} failed: {status} {body}")


def bootstrap_demo(stack: Stack, domain: str = "example.test") -> dict[str, str]:
    """Log in as the bootstrap admin; create the demo domain and two users."""
    with stack.interruptible():
        return _create_demo(stack, domain)


def _create_demo(stack: Stack, domain: str) -> dict[str, str]:
    api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
    # The admin API creates the bootstrap admin in the background once auth answers: poll.
    deadline = time.monotonic() + 60
    while True:
        try:
            api.login(stack.admin_email, stack.admin_password)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    status, body = api.call("POST", "/v1/domains", {"name": domain})
    if status not in (200, 201, 409):
        raise RuntimeError(f"creating domain {domain} failed: {status} {body}")
    demo = {"user": f"demo@{domain}", "user_password": strong_password(),
            "peer": f"peer@{domain}", "peer_password": strong_password()}
    api.create_account(domain, demo["user"], demo["user_password"])
    api.create_account(domain, demo["peer"], demo["peer_password"])
    return demo
