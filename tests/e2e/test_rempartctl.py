"""rempartctl (R-ADM-6): the daily tasks over the real admin API, as an administrator types them."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest

from rempart.common.testing.devstack import AdminApi, Stack

pytestmark = pytest.mark.timeout(120)


# rempartctl imports its dependencies for about a second (typer, httpx, the settings models): the
# commands run as a person runs them, each in its own process with its own environment, standard
# input and output and exit code, but forked from one process that made those imports once. The
# entry point itself (``python -m rempart.admin_api.ctl``) runs as a fresh interpreter in
# test_r_adm_6_login_keeps_the_token_private_and_errors_are_clear and in _enrol_totp.
FORKSERVER = r"""
import json, os, sys, traceback
import httpx
import typer
import rempart.admin_api.ctl as ctl
httpx.Client().close()  # what a client imports on first use (httpcore and the rest)
typer.main.get_command(ctl.app)
requests = os.fdopen(0, "r")
replies = os.fdopen(1, "w")
for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.clear()
            os.environ.update(request["env"])
            for fd, path, flags in ((0, request["stdin"], os.O_RDONLY),
                                    (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                    (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                opened = os.open(path, flags, 0o600)
                os.dup2(opened, fd)
                os.close(opened)
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            try:
                code = ctl.main(request["args"])
            except SystemExit as exc:  # as the interpreter turns sys.exit() into an exit code
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    replies.flush()
"""


class CtlRunner:
    """Runs rempartctl commands, each a process forked from one that imported it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runs = 0
        self.proc = subprocess.Popen([sys.executable, "-c", FORKSERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, args: list[str], env: dict[str, str], stdin: str) -> subprocess.CompletedProcess[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.runs += 1
        paths = {name: self.workdir / f"{self.runs}.{name}" for name in ("stdin", "stdout", "stderr")}
        paths["stdin"].write_text(stdin)
        self.proc.stdin.write(json.dumps({"args": args, "env": env, **{k: str(v) for k, v in paths.items()}}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, f"the rempartctl fork server exited with {self.proc.wait(10)}"
        return subprocess.CompletedProcess(["rempartctl", *args], int(json.loads(reply)),
                                           paths["stdout"].read_text(), paths["stderr"].read_text())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


_runner: CtlRunner | None = None


@pytest.fixture(scope="module", autouse=True)
def _ctl_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    global _runner
    _runner = CtlRunner(tmp_path_factory.mktemp("rempartctl-runs"))
    try:
        yield
    finally:
        _runner.close()
        _runner = None


def ctl(stack: Stack, home: Path, *args: str, token: str = "", stdin: str = "") -> subprocess.CompletedProcess[str]:
    _, env = _ctl_command(stack, home, token)
    assert _runner is not None, "the module's fork server (_ctl_runner)"
    return _runner.run(list(args), env, stdin)


def test_r_adm_6_daily_tasks(stack: Stack, admin: AdminApi, demo: dict[str, str], tmp_path: Path) -> None:
    def run(*args: str, stdin: str = "") -> str:
        done = ctl(stack, tmp_path, *args, token=admin.token, stdin=stdin)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    assert run("domains", "add", "ctl.test") == "domain ctl.test added\n"
    assert "ctl.test" in run("domains", "list").split()
    assert run("accounts", "add", "dora@ctl.test", stdin="Quartz-9-Meadow-Lantern!\n") == "account dora@ctl.test added\n"
    assert run("accounts", "list", "ctl.test").split() == ["dora@ctl.test"]
    assert run("aliases", "add", "sales@ctl.test", "dora@ctl.test") == "alias sales@ctl.test -> dora@ctl.test\n"
    assert "sales@ctl.test" in run("aliases", "list", "ctl.test")
    assert run("accounts", "disable", "dora@ctl.test") == "account dora@ctl.test disabled\n"
    assert '"enabled": false' in run("accounts", "show", "dora@ctl.test")
    assert run("accounts", "unlock", "dora@ctl.test") == "dora@ctl.test unlocked\n"
    # Settings: the change is sent with the ETag it read (If-Match), and it takes.
    assert run("settings", "set", "ips.block_minutes=90") == "settings changed\n"
    assert '"block_minutes": 90' in run("settings", "get")
    assert run("settings", "--scope", "domain:ctl.test", "set", "limits.max_message_size=5242880") == "settings changed\n"
    assert '"max_message_size": 5242880' in run("settings", "--scope", "domain:ctl.test", "get")
    run("settings", "set", "ips.block_minutes=1440")
    # A refusal is the API's problem in one line, exit code 1; a usage error is 2.
    refused = ctl(stack, tmp_path, "domains", "add", "not a domain", token=admin.token)
    assert refused.returncode == 1 and refused.stderr.startswith("rempartctl: 422 ")
    assert ctl(stack, tmp_path, "domains", "add", token=admin.token).returncode == 2
    assert run("accounts", "delete", "dora@ctl.test") == "account dora@ctl.test deleted\n"
    assert run("domains", "delete", "ctl.test") == "domain ctl.test deleted\n"


def test_r_adm_6_login_keeps_the_token_private_and_errors_are_clear(
    stack: Stack, demo: dict[str, str], tmp_path: Path
) -> None:
    user, password = demo["user"], demo["user_password"]
    wrong = ctl(stack, tmp_path, "login", user, stdin="not-the-password\n")
    assert (wrong.returncode, wrong.stderr.strip()) == (1, "rempartctl: 401 Unknown user or incorrect password")
    done = ctl(stack, tmp_path, "login", user, stdin=password + "\n")
    assert done.returncode == 0 and done.stdout == f"logged in as {user}\n"
    token_file = tmp_path / "rempart" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert password not in done.stdout + done.stderr and token_file.read_text() not in done.stdout
    # A user is not an administrator: the API's answer, in one line.
    other = ctl(stack, tmp_path, "accounts", "list", "example.test")
    assert other.returncode == 1 and other.stderr.startswith("rempartctl: 403 ")
    assert ctl(stack, tmp_path, "logout").stdout == "logged out\n"
    after = ctl(stack, tmp_path, "accounts", "list", "example.test")
    assert "not logged in" in after.stderr
    unreachable = subprocess.run([sys.executable, "-m", "rempart.admin_api.ctl", "domains", "list"],
                                 env=dict(os.environ, REMPART_API_URL="http://127.0.0.1:9", XDG_CONFIG_HOME=str(tmp_path)),
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 2 and "cannot reach the admin API" in unreachable.stderr


def test_r_adm_6_r_2fa_1_an_administrator_logs_in_with_a_totp_code(
    stack: Stack, admin: AdminApi, tmp_path: Path
) -> None:
    code = admin.totp_code(stack.admin_email)
    assert code, "the e2e admin has TOTP enrolled"
    done = ctl(stack, tmp_path, "login", stack.admin_email, stdin=f"{stack.admin_password}\n{code}\n")
    assert done.returncode == 0, done.stderr
    assert "example.test" in ctl(stack, tmp_path, "domains", "list").stdout.split()


def _ctl_command(stack: Stack, home: Path, token: str = "") -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, REMPART_API_URL=f"http://127.0.0.1:{stack.ports['admin-api.http']}",
               XDG_CONFIG_HOME=str(home))
    env.pop("REMPART_API_TOKEN", None)
    if token:
        env["REMPART_API_TOKEN"] = token
    return [sys.executable, "-m", "rempart.admin_api.ctl"], env


def _enrol_totp(stack: Stack, home: Path) -> str:
    """`rempartctl totp enrol` as a person does it: read the key it shows, type the app's code."""
    command, env = _ctl_command(stack, home)
    with subprocess.Popen([*command, "totp", "enrol"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None and proc.stdin is not None and proc.stdout is not None
        first = proc.stderr.readline()
        assert first.startswith("key: "), first
        secret = first.removeprefix("key: ").strip()
        proc.stdin.write(pyotp.TOTP(secret).now() + "\n")
        proc.stdin.close()
        recovery = proc.stdout.read().split()
        assert proc.wait(60) == 0, proc.stderr.read()
    assert len(recovery) >= 5, "the recovery codes are printed once"
    return secret


def _rcpt_replies(stack: Stack, recipients: list[str]) -> list[str]:
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.smtp"], timeout=20) as client:
        client.ehlo("ctl.test")
        client.mail("someone@remote.test")
        replies = [f"{code} {text.decode()}" for code, text in (client.rcpt(r) for r in recipients)]
        client.rset()
    return replies


def test_r_adm_6_an_administrators_first_ten_minutes(
    stack: Stack, admin: AdminApi, demo: dict[str, str], tmp_path: Path
) -> None:
    """The README's first ten minutes, all with rempartctl: a new administrator logs in, enrols
    TOTP, adds a domain and a user, sends a test message, reads the events; then a settings
    change through rempartctl changes what the running edge answers within 2 seconds."""
    password = "Quartz-9-Meadow-Lantern-Boss!"
    boss = f"boss-{uuid.uuid4().hex[:6]}@example.test"
    made = ctl(stack, tmp_path / "root", "accounts", "add", boss, "--role", "superadmin", token=admin.token,
               stdin=password + "\n")
    assert made.returncode == 0, made.stderr
    home = tmp_path / "boss"
    first = ctl(stack, home, "login", boss, stdin=password + "\n")
    assert first.returncode == 0 and first.stdout == f"logged in as {boss}\n"
    assert "rempartctl totp enrol" in first.stderr
    secret = _enrol_totp(stack, home)
    assert ctl(stack, home, "logout").returncode == 0
    # The next code (the server takes the next time step; the enrolment spent this one).
    code = pyotp.TOTP(secret).at(time.time() + 30)
    again = ctl(stack, home, "login", boss, stdin=f"{password}\n{code}\n")
    assert again.returncode == 0, again.stderr

    def run(*args: str, stdin: str = "") -> str:
        done = ctl(stack, home, *args, stdin=stdin)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    domain = f"first-{uuid.uuid4().hex[:6]}.test"
    assert run("domains", "add", domain) == f"domain {domain} added\n"
    assert run("accounts", "add", f"ann@{domain}", stdin="Copper-7-Harbour-Violet!\n") == f"account ann@{domain} added\n"
    sent = run("send-test", f"ann@{domain}", "--smtp", f"127.0.0.1:{stack.ports['smtp-edge.smtp']}")
    assert sent.startswith(f"sent to ann@{domain}: 250 2.0.0 Ok: queued as "), sent
    queue_id = sent.split("queued as ")[1].split()[0]
    events_out = run("events", "--area", "mail", "--limit", "50")
    assert any("mail/accepted" in line and queue_id in line for line in events_out.splitlines()), events_out
    assert f"domain:{domain}" in run("audit", "--kind", "domain")

    # R-OPS-1 through rempartctl: two recipients are fine, then max_recipients=1 takes within 2 s.
    recipients = [demo["user"], demo["peer"]]
    assert _rcpt_replies(stack, recipients) == ["250 2.1.5 Ok"] * 2
    before = json.loads(run("settings", "get"))["settings"]["limits"]["max_recipients"]
    try:
        assert run("settings", "set", "limits.max_recipients=1") == "settings changed\n"
        changed = time.monotonic()
        assert "limits.max_recipients: 32768 -> 1" in run("settings", "diff").splitlines()
        while _rcpt_replies(stack, recipients)[1] != "452 4.5.3 Too many recipients":
            assert time.monotonic() - changed < 2.0, "the running edge still takes two recipients after 2 s"
            time.sleep(0.05)
    finally:
        run("settings", "set", f"limits.max_recipients={before}")
