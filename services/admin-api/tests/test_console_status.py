"""The console's status page outside Kubernetes: the other services' ``/readyz`` from
``REMPART_STATUS_READINESS_URLS`` (what ``make run``'s stack sets), each shown up or DOWN with
the reason, next to the direct checks of Redis, NATS and the auth service."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rempart.admin_api.settings import MAX_STATUS_URLS
from rempart.common.ops import OpsServer
from rempart.common.testing.devstack import FIXED_PORTS, Stack
from rempart.common.testing.localstack import free_port

from .conftest import ADMIN, ADMIN_PASSWORD, Harness, make_settings
from .console_support import Browser, auth_server, browsers, new_browser

__all__ = ["auth_server", "browsers"]  # fixtures used by name

ROW = re.compile(r'<tr class="(ok|refused)"><th scope="row">([^<]+)</th><td>(up|DOWN)</td><td>([^<]*)</td></tr>')


def _stack(tmp_path: Path, relay: bool) -> Stack:
    """A stack as `make run` builds it (its ports chosen, nothing started)."""
    stack = Stack(workdir=tmp_path / "stack", relay=relay, external_redis_url="redis://127.0.0.1:1",
                  external_nats_url="nats://127.0.0.1:1")
    stack.ports = {name: free_port() for name in FIXED_PORTS}
    return stack


def test_the_local_stack_tells_the_admin_api_every_other_services_readyz(tmp_path: Path) -> None:
    for relay, names in ((False, ["auth", "imap-pop", "policy", "smtp-edge"]),
                         (True, ["auth", "imap-pop", "policy", "relay", "smtp-edge"])):
        stack = _stack(tmp_path, relay)
        urls = json.loads(stack.env_for("admin-api")["REMPART_STATUS_READINESS_URLS"])
        assert sorted(urls) == names
        assert urls["smtp-edge"] == f"http://127.0.0.1:{stack.ports['smtp-edge.ops']}/readyz"
        assert "REMPART_STATUS_READINESS_URLS" not in stack.env_for("policy")


def test_readiness_urls_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_settings("redis://x", "nats://x").status_readiness_urls == {}
    for bad, why in (({"edge": "ftp://127.0.0.1/readyz"}, "not an http"), ({"edge": "http:///readyz"}, "not an http"),
                     ({"": "http://127.0.0.1/readyz"}, "name"), ({"x" * 65: "http://h/readyz"}, "name"),
                     ({f"s{n}": "http://h/readyz" for n in range(MAX_STATUS_URLS + 1)}, "at most")):
        monkeypatch.setenv("REMPART_STATUS_READINESS_URLS", json.dumps(bad))
        with pytest.raises(ValueError, match=why):
            make_settings("redis://x", "nats://x")
    monkeypatch.setenv("REMPART_STATUS_READINESS_URLS", "not json")
    with pytest.raises(ValueError):
        make_settings("redis://x", "nats://x")


async def _failing_redis() -> None:
    raise ConnectionError("redis went away")


async def _passing() -> None:
    return None


@pytest.fixture
async def ops_servers(tmp_path: Path) -> AsyncIterator[tuple[Stack, list[OpsServer]]]:
    """The stack's ops endpoints: policy, imap-pop and the relay ready, auth answering 503 (its
    Redis gone), smtp-edge not running (its port closed)."""
    stack = _stack(tmp_path, relay=True)
    servers = []
    for name, ready in (("policy", True), ("imap-pop", True), ("relay", True), ("auth", False)):
        server = OpsServer("127.0.0.1", stack.ports[f"{name}.ops"])
        server.add_check("redis", _passing if ready else _failing_redis)
        server.add_check("nats", _passing)
        await server.start()
        servers.append(server)
    yield stack, servers
    for server in servers:
        await server.stop()


async def test_status_page_shows_every_services_readyz_and_why_one_is_down(
    harness: Harness, browsers: list[Browser], ops_servers: tuple[Stack, list[OpsServer]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack, _ = ops_servers
    env = stack.env_for("admin-api")
    monkeypatch.setenv("REMPART_STATUS_READINESS_URLS", env["REMPART_STATUS_READINESS_URLS"])
    harness.app.state.settings = make_settings(harness.settings.redis_url, harness.settings.nats_url,
                                               auth_target=harness.settings.auth_target)
    admin = new_browser(harness, browsers)
    assert (await admin.login(ADMIN, ADMIN_PASSWORD)).status_code == 303
    page = await admin.get("/admin/status")
    assert page.status_code == 200
    rows = {name: (state, detail) for _, name, state, detail in ROW.findall(page.text)}
    assert rows["Redis"][0] == "up" and rows["NATS JetStream"][0] == "up" and rows["Auth service"][0] == "up"
    for name in ("policy", "imap-pop", "relay"):
        assert rows[name][0] == "up" and re.fullmatch(r"ready \(2 checks ok\) \(\d+ ms\)", rows[name][1]), rows[name]
    assert rows["auth"] == ("DOWN", "HTTP 503: redis: ConnectionError: redis went away")
    assert rows["smtp-edge"] == ("DOWN", "connection refused")
    assert "127.0.0.1:" not in page.text.split('id="checks"')[1].split("</table>")[0]  # no URL shown
