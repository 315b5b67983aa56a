"""Extra service replicas next to the e2e ``stack``, and an haproxy in front of them.

A replica shares the stack's Redis, NATS, policy and auth (``Stack.env_for``) and gets its own
ports, instance name and log file, so that tests can show what several pods behind one load
balancer do. Logs are JSON (as in the chart), so tests can read every field a line carries.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rempart.common.testing.devstack import MODULES, Stack
from rempart.common.testing.localstack import free_port, stop_process

EDGE_PORT_VARS = {"smtp": "REMPART_SMTP_PORT", "submission": "REMPART_SUBMISSION_PORT",
                  "smtps": "REMPART_SMTPS_PORT", "ops": "REMPART_OPS_PORT"}


@dataclass
class Replica:
    service: str
    instance: str
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]
    log_path: Path
    terminated: bool = False

    def log_records(self, since: int = 0) -> list[dict[str, Any]]:
        """The JSON log lines written after byte offset ``since`` (other lines as ``{"raw": ...}``)."""
        records: list[dict[str, Any]] = []
        with open(self.log_path, "rb") as log:
            log.seek(since)
            for line in log.read().decode(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"raw": line}
                records.append(record if isinstance(record, dict) else {"raw": line})
        return records

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def ready(self) -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['ops']}/readyz", timeout=3) as resp:
                return resp.status == 200, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return False, exc.read().decode()
        except OSError as exc:
            return False, str(exc)

    def terminate(self) -> None:
        """One SIGTERM, as the kubelet sends: a second one could land after the process has put
        its handler back to the default action on the way out."""
        if self.proc.poll() is None and not self.terminated:
            self.terminated = True
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the replica drains), then SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return int(self.proc.returncode)


def start_edge_replica(stack: Stack, instance: str, extra_env: dict[str, str] | None = None) -> Replica:
    """One more smtp-edge process on free ports, wired to the stack's backends."""
    ports = {name: free_port() for name in EDGE_PORT_VARS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMPART_")}
    env |= stack.env_for("smtp-edge")
    env |= {var: str(ports[name]) for name, var in EDGE_PORT_VARS.items()}
    env |= {"REMPART_INSTANCE": instance, "REMPART_LOG_FORMAT": "json"} | (extra_env or {})
    log_path = stack.workdir / f"{instance}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", MODULES["smtp-edge"]], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Replica("smtp-edge", instance, ports, proc, log_path)


def start_policy_replica(stack: Stack, instance: str) -> Replica:
    """One more policy process on free ports, sharing the stack's Redis and NATS."""
    ports = {"grpc": free_port(), "ops": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMPART_")}
    env |= stack.env_for("policy")
    # Loopback only: a wildcard bind also collides with any client socket on that port number.
    env |= {"REMPART_GRPC_HOST": "127.0.0.1", "REMPART_GRPC_PORT": str(ports["grpc"]),
            "REMPART_OPS_PORT": str(ports["ops"]), "REMPART_INSTANCE": instance, "REMPART_LOG_FORMAT": "json"}
    log_path = stack.workdir / f"{instance}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", MODULES["policy"]], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Replica("policy", instance, ports, proc, log_path)


def start_ready(start: Callable[[], Replica], attempts: int = 3) -> Replica:
    """Start a replica and wait until it is ready; a replica that exits at once (its free port
    was taken meanwhile by some other socket: free_port cannot reserve) is started again."""
    for attempt in range(1, attempts + 1):
        replica = start()
        try:
            wait_ready([replica])
            return replica
        except RuntimeError:
            replica.stop()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def wait_ready(replicas: list[Replica], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(replicas)
    last = ""
    while pending:
        for replica in list(pending):
            if replica.proc.poll() is not None:
                raise RuntimeError(f"{replica.instance} exited with {replica.proc.returncode}:\n"
                                   + replica.log_tail())
            ok, last = replica.ready()
            if ok:
                pending.remove(replica)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{[r.instance for r in pending]} not ready after {timeout}s: {last}\n"
                               + "\n".join(r.log_tail() for r in pending))
        time.sleep(0.2)


@dataclass
class Haproxy:
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def haproxy_binary() -> str | None:
    return shutil.which("haproxy")


def start_haproxy(workdir: Path, config: str, listen_ports: list[int]) -> Haproxy:
    """haproxy in the foreground (``-db``) with ``config``; waits until it listens on every port.
    The configuration is checked first (``-c``) so that a mistake reads as such."""
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError("haproxy is not installed (Debian package haproxy)")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "haproxy.cfg"
    config_path.write_text(config)
    checked = subprocess.run([binary, "-c", "-f", str(config_path)], capture_output=True, text=True,
                             timeout=30, check=False)
    if checked.returncode != 0:
        raise RuntimeError(f"haproxy -c refused the configuration:\n{checked.stdout}{checked.stderr}\n{config}")
    log_path = workdir / "haproxy.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, "-db", "-f", str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    haproxy = Haproxy(proc, config_path, log_path)
    try:
        for port in listen_ports:
            wait_listening(port, proc)
    except (RuntimeError, TimeoutError) as exc:
        haproxy.stop()
        raise RuntimeError(f"haproxy did not start: {exc}\n{haproxy.log_tail()}") from exc
    return haproxy


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Waits until something holds ``port``, without connecting: a test connection through a load
    balancer would reach a backend, shift the round robin and leave its own log lines."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)
