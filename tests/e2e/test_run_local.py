"""``make run`` and Ctrl-C (issue 8 §1): every process it started is gone within 10 seconds.

The launcher runs as a real process in a session of its own, and the test sends SIGINT to that
whole process group, as a terminal does on Ctrl-C. Once when the listeners are up but the
launcher is still creating the demo accounts (the moment ``fresh-machine run-check`` presses
Ctrl-C), once when the suite is fully up and a client is idling on IMAP.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_SECONDS = 10.0
START_TIMEOUT_SECONDS = 180.0
# What a user connects to; the ops and gRPC ports are up earlier.
CLIENT_PORTS = ("smtp-edge.smtp", "smtp-edge.submission", "smtp-edge.smtps", "imap-pop.imap",
                "imap-pop.imaps", "imap-pop.pop3", "imap-pop.pop3s", "admin-api.http")


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[1])


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; it only waits for its (new) parent to collect the status.
    return state[state.rindex(")") + 2] != "Z"


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Launcher:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.output = state_dir.parent / "run_local.out"
        with self.output.open("wb") as out:
            # A session of its own: killpg below reaches exactly what a terminal's Ctrl-C would.
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tools" / "run_local.py"), "--state-dir", str(state_dir),
                 "--free-ports"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, what: str, predicate: object) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"run_local exited with {self.proc.returncode} before {what}:\n{self.text()[-3000:]}")
            if callable(predicate) and predicate():
                return
            time.sleep(0.2)
        pytest.fail(f"no {what} after {START_TIMEOUT_SECONDS}s:\n{self.text()[-3000:]}")

    def ports(self) -> dict[str, int]:
        path = self.state_dir / "ports.json"
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}

    def kill_leftovers(self, pids: dict[int, str]) -> None:
        for pid in [self.proc.pid, *pids]:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(5)


@pytest.mark.timeout(START_TIMEOUT_SECONDS + 60)
@pytest.mark.parametrize("moment", ["listeners-up", "running-with-idle-client"])
def test_ctrl_c_stops_every_process_within_10_seconds(tmp_path: Path, moment: str) -> None:
    launcher = Launcher(tmp_path / "run")
    children: dict[int, str] = {}
    client: imaplib.IMAP4 | None = None
    try:
        launcher.wait_for("ports.json", lambda: (launcher.state_dir / "ports.json").exists())
        ports = launcher.ports()
        launcher.wait_for("listeners", lambda: all(listening(ports[name]) for name in CLIENT_PORTS))
        if moment == "running-with-idle-client":
            launcher.wait_for("the credentials banner", lambda: "Rempart is running" in launcher.text())
            found = re.search(r"Demo user:\s+(\S+)\s+password: (\S+)", launcher.text())
            assert found, launcher.text()
            client = imaplib.IMAP4("127.0.0.1", ports["imap-pop.imap"], timeout=10)
            client.login(found.group(1), found.group(2))
            client.select("INBOX")
            client.send(b"I1 IDLE\r\n")
        children = descendants(launcher.proc.pid)
        commands = " ".join(children.values())
        for expected in ("redis-server", "nats-server", "rempart.policy", "rempart.auth",
                         "rempart.smtp_edge", "rempart.imap_pop", "rempart.admin_api"):
            assert expected in commands, f"{expected} is not running under the launcher: {children}"

        started = time.monotonic()
        os.killpg(launcher.proc.pid, signal.SIGINT)
        while time.monotonic() - started < STOP_WITHIN_SECONDS:
            left = {pid: cmd for pid, cmd in children.items() if alive(pid)}
            if not left and launcher.proc.poll() is not None:
                break
            time.sleep(0.1)
        took = time.monotonic() - started
        left = {pid: cmd for pid, cmd in children.items() if alive(pid)}
        assert not left and launcher.proc.poll() is not None, (
            f"{len(left)} process(es) still running {took:.1f}s after Ctrl-C: {left}; launcher "
            f"exit={launcher.proc.poll()}\n{launcher.text()[-2000:]}")
        assert launcher.proc.returncode == 0, launcher.text()[-2000:]
    finally:
        if client is not None:
            try:
                client.shutdown()
            except OSError:
                pass
        launcher.kill_leftovers(children)
