"""R-ADM-6: rempartctl over real HTTP: the audit trail, API keys (made, used, revoked), blocks by
hand, and lists longer than one page."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import pytest

from rempart.admin_api import ctl as rempartctl
from rempart.common.events import EVENTS_STREAM
from rempart.common.testing.polling import eventually

from .conftest import ADMIN, Harness
from .test_queue import run_ctl, serving

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"


async def test_r_adm_6_rempartctl_audit_api_keys_blocks_and_long_lists(
        harness: Harness, admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("REMPART_API_TOKEN", admin_headers["Authorization"].removeprefix("Bearer "))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for n in range(1005):  # more than one page of the API (1,000)
        await harness.backend.directory.add_account(f"user{n:04d}@example.org")

    async with serving(harness) as url:
        monkeypatch.setenv("REMPART_API_URL", url)

        ctl = partial(run_ctl, capsys)

        code, out, _ = await ctl("accounts", "list", "example.org")
        assert code == 0 and len(out.split()) == 1006 and out.split()[-1] == "user1004@example.org"
        code, out, _ = await ctl("blocks", "add", "192.0.2.7", "--reason", "abuse report", "--minutes", "60")
        assert code == 0 and out.startswith("192.0.2.7 blocked until ")
        assert (await ctl("blocks", "add", "192.0.2.0/24", "--reason", "x"))[2].startswith(
            "rempartctl: 422 Only single IPv4 addresses are blocked (ip: ")
        assert (await ctl("blocks", "add", "192.0.2.8"))[0] == 2  # no reason
        code, out, _ = await ctl("blocks", "list")
        assert code == 0 and out.startswith("192.0.2.7  abuse report  until ")
        code, out, _ = await ctl("blocks", "list", "--json")
        assert [b["reason"] for b in json.loads(out)["blocks"]] == ["abuse report"]
        code, key, err = await ctl("api-keys", "create", "backup", "--scope", "read", "--expires", "30d")
        assert code == 0 and key.startswith("rpk_") and "shown once" in err
        code, out, _ = await ctl("api-keys", "list")
        key_id, name, scope = out.split()[:3]
        assert (name, scope) == ("backup", "read") and "last used never" in out
        # The key, used by rempartctl itself: reads work, writes are refused.
        monkeypatch.setenv("REMPART_API_TOKEN", key.strip())
        assert (await ctl("domains", "list"))[1].split() == ["example.org"]
        assert await ctl("domains", "add", "new.example") == (1, "", "rempartctl: 403 This API key may only read\n")
        monkeypatch.setenv("REMPART_API_TOKEN", admin_headers["Authorization"].removeprefix("Bearer "))
        assert (await ctl("api-keys", "list"))[1].count("last used 20") == 1
        code, out, _ = await ctl("audit", "--kind", "ip_block")
        assert code == 0 and f"{ADMIN} from 127.0.0.1" in out and "ip_blocked  ip_block:192.0.2.7" in out
        code, out, _ = await ctl("audit", "--since", "1h", "--json")
        assert [r["action"] for r in json.loads(out)] == ["api_key_created", "ip_blocked"]
        assert await ctl("api-keys", "revoke", key_id) == (0, f"API key {key_id} revoked\n", "")
        monkeypatch.setenv("REMPART_API_TOKEN", key.strip())
        assert (await ctl("domains", "list"))[0] == 1  # revoked: not logged in


async def test_r_adm_6_events_follow_reads_every_event_of_a_burst_longer_than_a_page(
        harness: Harness, admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`rempartctl events --follow` looks every 2 s: 1,500 events in between (three of the API's
    pages of 500) all come back, none twice."""
    monkeypatch.setenv("REMPART_API_TOKEN", admin_headers["Authorization"].removeprefix("Bearer "))
    await harness.backend.events.publish("test", "before")
    async with serving(harness) as url:
        api = rempartctl.Api(url, admin_headers["Authorization"].removeprefix("Bearer "))
        last = max(int(e["seq"]) for e in (await asyncio.to_thread(
            api.json, "GET", "/v1/events", params={"area": "test"}))["events"])
        for n in range(1500):
            await harness.backend.events.publish("test", "burst", reason=str(n))
        await harness.backend.events.connection.flush()
        # Core publishes: JetStream stores them a moment later.
        await eventually(lambda: _stored_after(harness, last + 1500), what="1,500 events stored")
        burst = await asyncio.to_thread(rempartctl._events_after, api, {"area": "test"}, last)
    got = sorted(burst, key=lambda e: int(e["seq"]))
    assert [e["reason"] for e in got] == [str(n) for n in range(1500)]


async def _stored_after(harness: Harness, seq: int) -> bool:
    return int((await harness.backend.js.stream_info(EVENTS_STREAM)).state.last_seq) >= seq
