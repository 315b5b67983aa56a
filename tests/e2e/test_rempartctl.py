"""rempartctl (R-ADM-6): the daily tasks over the real admin API, as an administrator types them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack

pytestmark = pytest.mark.timeout(120)


def ctl(stack: Stack, home: Path, *args: str, token: str = "", stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, REMPART_API_URL=f"http://127.0.0.1:{stack.ports['admin-api.http']}",
               XDG_CONFIG_HOME=str(home))
    env.pop("REMPART_API_TOKEN", None)
    if token:
        env["REMPART_API_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "rempart.admin_api.ctl", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=60)


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
