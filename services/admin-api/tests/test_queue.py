"""The outbound queue as an admin resource (R-OUT-2, R-ADM-1, R-ADM-2, R-ADM-5): the relay's own
state, shown, retried and deleted through the API. The first test runs the real relay against an
aiosmtpd receiving server on loopback (found through the loopback DNS server) that answers 451
first; the others seed the queue the way the relay fills it (queue_support)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session
from nats.aio.client import Client as NATS

from rempart.admin_api import ctl as rempartctl
from rempart.common.mailstore import MessageStore
from rempart.common.outqueue import OutboundQueue, RecipientState
from rempart.common.runtime import ServiceRuntime
from rempart.common.testing.dnsserver import LoopbackDnsServer
from rempart.common.testing.localstack import free_port
from rempart.common.testing.polling import eventually
from rempart.smtp_edge.relay.app import Relay
from rempart.smtp_edge.relay.settings import RelaySettings

from .conftest import ADMIN, Harness
from .queue_support import MESSAGE, queued

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
BOSS = "boss@example.org"  # domain admin of example.org
GREYLISTED = "451 4.7.1 greylisted, come back later"
MISSING_ID = "0190000000000000deadbeefdeadbeef"


# A receiving MTA and the relay, on loopback --------------------------------------------------------
@dataclass
class RemoteMx:
    """Answers RCPT from a script per recipient (then 250), and keeps what arrives."""

    refusals: dict[str, list[str]] = field(default_factory=dict)
    rcpt_seen: list[str] = field(default_factory=list)
    received: list[tuple[list[str], bytes]] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpt_seen.append(address)
        script = self.refusals.get(address)
        if script:
            return script.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append((list(envelope.rcpt_tos), bytes(envelope.original_content or b"")))
        return "250 2.0.0 Ok: queued"


@contextlib.asynccontextmanager
async def remote_mx(handler: RemoteMx) -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(handler, hostname="mx.remote.test"),
                                                            host="127.0.0.1", port=0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


@contextlib.asynccontextmanager
async def running_relay(redis_url: str, nats_url: str, dns: LoopbackDnsServer, mx_port: int) -> AsyncIterator[Relay]:
    settings = RelaySettings(
        redis_url=redis_url, nats_url=nats_url, ops_port=0, ops_host="127.0.0.1", dns_nameservers=dns.address,
        dns_timeout_seconds=2.0, mx_port=mx_port, hostname="relay.example.org", environment="test",
        log_format="text", ack_wait_seconds=5.0, connect_timeout_seconds=3.0, command_timeout_seconds=10.0,
    )
    async with ServiceRuntime("relay", settings) as runtime:
        relay = Relay(runtime, settings)
        await relay.start()
        try:
            yield relay
        finally:
            await relay.drain(2)


def rfc3339(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def problem(reply: Any) -> dict[str, Any]:
    """A problem answer without its instance (the path differs between two ids)."""
    assert reply.headers["content-type"] == "application/problem+json", reply.text
    return {k: v for k, v in reply.json().items() if k != "instance"}


async def admin_events(harness: Harness, headers: dict[str, str], what: str) -> list[dict[str, Any]]:
    reply = await harness.http.get("/v1/events", params={"area": "admin", "what": what}, headers=headers)
    events: list[dict[str, Any]] = reply.json()["events"]
    return events


# Tests ----------------------------------------------------------------------------------------------
async def test_r_out_2_deferred_message_is_shown_retried_at_once_and_deleted_for_good(
        harness: Harness, admin_headers: dict[str, str], redis_url: str, nats_url: str, nats_conn: NATS) -> None:
    http = harness.http
    remote = RemoteMx(refusals={"bob@remote.test": [GREYLISTED], "carol@remote.test": [GREYLISTED]})
    hour = await http.patch("/v1/settings", json={"outbound": {"retry_backoff_seconds": [3600]}}, headers=admin_headers)
    assert hour.status_code == 200, hour.text
    zone = {"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.1"]}}
    store = await MessageStore.open(nats_conn.jetstream())
    async with LoopbackDnsServer(zone) as dns, remote_mx(remote) as port, \
            running_relay(redis_url, nats_url, dns, port) as relay:
        record, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                       remote_recipients=["bob@remote.test"])
        txn = record.transaction_id

        async def listed_as_deferred() -> bool:
            page = await http.get("/v1/queue", params={"state": "deferred"}, headers=admin_headers)
            return [m["id"] for m in page.json()["messages"]] == [txn]

        await eventually(listed_as_deferred, what="the deferred message in the list")
        shown = await http.get(f"/v1/queue/{txn}", headers=admin_headers)
        assert shown.status_code == 200, shown.text
        view = shown.json()
        (bob,) = view["recipients"]
        assert {k: bob[k] for k in ("address", "state", "attempts", "reply_code", "enhanced_status", "reply_text",
                                    "reply_from_remote", "remote_mta")} == {
            "address": "bob@remote.test", "state": "deferred", "attempts": 1, "reply_code": 451,
            "enhanced_status": "4.7.1", "reply_text": "greylisted, come back later", "reply_from_remote": True,
            "remote_mta": "mx.remote.test"}
        assert rfc3339(bob["next_attempt"]) > time.time() + 3000  # an hour's backoff
        assert view["sender"] == "alice@example.org" and view["size"] == len(MESSAGE)
        assert view["destinations"] == ["remote.test"] and view["attempts"] == 1
        assert abs(rfc3339(view["first_seen"]) - record.received_unix_ms / 1000) < 0.01
        assert view["headers"] == {"subject": "Quarterly résumé", "from": "Alice <alice@example.org>",
                                   "to": "Bob <bob@remote.test>", "message_id": "<q1@example.org>",
                                   "date": "Sat, 05 Dec 2026 10:00:00 +0000"}
        assert "SECRET-BODY-TEXT" not in shown.text  # never the body

        # Retry now: with a stale ETag nothing happens; with the current one the relay goes at once.
        stale = await http.post(f"/v1/queue/{txn}/retry", headers={**admin_headers, "If-Match": '"0123"'})
        assert stale.status_code == 412 and stale.headers["etag"] == shown.headers["etag"]
        asked = time.monotonic()
        retried = await http.post(f"/v1/queue/{txn}/retry", headers={**admin_headers, "If-Match": shown.headers["etag"]})
        assert retried.status_code == 202, retried.text
        assert retried.json()["recipients_due"] == ["bob@remote.test"]
        await eventually(lambda: len(remote.received) == 1, timeout=10, what="the retried delivery")
        assert time.monotonic() - asked < 5
        assert remote.received[0][0] == ["bob@remote.test"]

        async def gone(queue_id: str) -> bool:
            return (await http.get(f"/v1/queue/{queue_id}", headers=admin_headers)).status_code == 404

        await eventually(lambda: gone(txn), what="the delivered message out of the queue")

        # Delete: a message deferred for 1.5 s, which the remote would accept at the next try.
        short = await http.patch("/v1/settings", json={"outbound": {"retry_backoff_seconds": [1.5]}},
                                 headers=admin_headers)
        assert short.status_code == 200
        await eventually(lambda: relay.runtime.config.server.outbound.retry_backoff_seconds == [1.5],
                         what="the relay on the new backoff")
        dropped, _ = await store.accept(MESSAGE, mail_from="alice@example.org", local_mailboxes=[],
                                        remote_recipients=["carol@remote.test"])

        async def deferred_once() -> bool:
            reply = await http.get(f"/v1/queue/{dropped.transaction_id}", headers=admin_headers)
            return reply.status_code == 200 and reply.json()["recipients"][0]["state"] == "deferred"

        await eventually(deferred_once, what="the second message deferred")
        etag = (await http.get(f"/v1/queue/{dropped.transaction_id}", headers=admin_headers)).headers["etag"]
        deleted = await http.delete(f"/v1/queue/{dropped.transaction_id}", headers={**admin_headers, "If-Match": etag})
        assert deleted.status_code == 204, deleted.text
        assert await gone(dropped.transaction_id)
        assert (await http.get("/v1/queue", headers=admin_headers)).json() == {"messages": [], "next_cursor": None}

        async def dropped_by_the_relay() -> bool:
            states = await OutboundQueue(harness.backend.redis).load(dropped.transaction_id)
            return states["carol@remote.test"].state == "dropped"  # then the record is acknowledged

        await eventually(dropped_by_the_relay, timeout=10, what="the relay dropping the deleted message")
        await asyncio.sleep(2)  # past the next attempt it would have had
    assert [r[0] for r in remote.received] == [["bob@remote.test"]]  # carol's copy never left
    assert remote.rcpt_seen.count("carol@remote.test") == 1
    # Each write is an audit event with the actor and what changed.
    retry_events = await admin_events(harness, admin_headers, "queue_message_retried")
    assert retry_events[0]["account"] == ADMIN and retry_events[0]["attributes"]["target"] == txn
    assert retry_events[0]["attributes"]["recipients_due"] == "bob@remote.test"
    (delete_event,) = await admin_events(harness, admin_headers, "queue_message_deleted")
    assert delete_event["attributes"] == {"actor": ADMIN, "target": dropped.transaction_id,
                                          "recipients_not_delivered": "carol@remote.test",
                                          "sender": "alice@example.org"}
    assert delete_event["client_ip"]


async def run_ctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """rempartctl in this process (off the event loop): its exit code, standard output and error."""
    capsys.readouterr()
    code = await asyncio.to_thread(rempartctl.main, list(args))
    out, err = capsys.readouterr()
    return code, out, err

async def test_r_adm_1_domain_admin_sees_only_its_senders_messages(
        harness: Harness, admin_headers: dict[str, str]) -> None:
    backend, http = harness.backend, harness.http
    await harness.add_account(BOSS, GOOD_PASSWORD, "domain_admin")
    await harness.add_account("ursula@example.org", GOOD_PASSWORD)
    await harness.add_account("frank@other.example", GOOD_PASSWORD)
    await backend.directory.add_domain_alias("example.net", "example.org")
    mine = await queued(backend, "gina@example.org", ["x@remote.test"], received_ms=1_796_500_000_000)
    aliased = await queued(backend, "Gina@Example.NET", ["y@remote.test"], received_ms=1_796_500_000_001)
    theirs = await queued(backend, "frank@other.example", ["z@remote.test"], received_ms=1_796_500_000_002)
    bounce = await queued(backend, "", ["w@remote.test"], received_ms=1_796_500_000_003)
    boss = await harness.login(BOSS, GOOD_PASSWORD)
    user = await harness.login("ursula@example.org", GOOD_PASSWORD)

    everything = (await http.get("/v1/queue", headers=admin_headers)).json()["messages"]
    assert [m["id"] for m in everything] == [mine, aliased, theirs, bounce]
    assert [m["sender"] for m in everything][-1] == ""
    own = (await http.get("/v1/queue", headers=boss)).json()
    assert [m["id"] for m in own["messages"]] == [mine, aliased] and own["next_cursor"] is None
    assert (await http.get("/v1/queue", params={"sender_domain": "other.example"}, headers=boss)).json()[
        "messages"] == []
    before = await OutboundQueue(backend.redis).get(theirs)
    for queue_id in (theirs, bounce):
        for method, path in (("GET", f"/v1/queue/{queue_id}"), ("POST", f"/v1/queue/{queue_id}/retry"),
                             ("DELETE", f"/v1/queue/{queue_id}")):
            hidden = await http.request(method, path, headers=boss)
            missing = await http.request(method, path.replace(queue_id, MISSING_ID), headers=boss)
            assert hidden.status_code == missing.status_code == 404, (method, path, hidden.text)
            assert problem(hidden) == problem(missing)  # existing or not, the same answer
    assert await OutboundQueue(backend.redis).get(theirs) == before
    assert (await http.post(f"/v1/queue/{mine}/retry", headers=boss)).status_code == 202
    assert (await http.delete(f"/v1/queue/{aliased}", headers=boss)).status_code == 204
    for method, path in (("GET", "/v1/queue"), ("GET", f"/v1/queue/{mine}"), ("POST", f"/v1/queue/{mine}/retry"),
                         ("DELETE", f"/v1/queue/{mine}")):
        assert (await http.request(method, path, headers=user)).status_code == 403, (method, path)
    assert [m["id"] for m in (await http.get("/v1/queue", headers=admin_headers)).json()["messages"]] == [
        mine, theirs, bounce]


async def test_r_adm_2_queue_filters_cursor_pages_and_etags(harness: Harness, admin_headers: dict[str, str]) -> None:
    backend, http = harness.backend, harness.http
    now = int(time.time() * 1000)
    greylisted = RecipientState("pending", attempts=2, next_ms=now + 600_000, reply=GREYLISTED, remote_reply=True,
                                mta="mx.b.test", last_ms=now - 60_000)
    a = await queued(backend, "alice@example.org", ["bob@a.test"], received_ms=now - 7_200_000)
    b = await queued(backend, "alice@example.org", ["carol@b.test"], received_ms=now - 3_600_000,
                     states={"carol@b.test": greylisted})
    c = await queued(backend, "dave@example.org", ["d@a.test", "e@b.test"], received_ms=now - 1_000,
                     states={"d@a.test": RecipientState("delivered", reply="250 2.0.0 Ok", remote_reply=True),
                             "e@b.test": RecipientState("sending")})
    d = await queued(backend, "", ["bounce@c.test"], received_ms=now)

    async def ids(**params: Any) -> list[str]:
        reply = await http.get("/v1/queue", params=params, headers=admin_headers)
        assert reply.status_code == 200, reply.text
        return [m["id"] for m in reply.json()["messages"]]

    assert await ids() == [a, b, c, d]
    assert await ids(sender="alice@example.org") == await ids(sender="ALICE@example.org") == [a, b]
    assert await ids(sender="<>") == [d]
    assert await ids(sender_domain="example.org") == [a, b, c]
    assert await ids(recipient_domain="a.test") == [a]  # c's recipient there is delivered already
    assert await ids(recipient_domain="b.test") == [b, c]
    assert await ids(state="deferred") == [b]
    assert await ids(state="sending") == [c]
    assert await ids(state="pending") == [a, d]
    assert await ids(older_than=1800) == [a, b]
    assert await ids(older_than=1800, state="deferred") == [b]
    # One message per page: every message once, in order, then the end.
    walked: list[str] = []
    cursor = None
    for _ in range(10):
        page = (await http.get("/v1/queue", params={"limit": 1, **({"cursor": cursor} if cursor else {})},
                               headers=admin_headers)).json()
        walked += [m["id"] for m in page["messages"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert walked == [a, b, c, d]
    bad = await http.get("/v1/queue", params={"cursor": "not-a-cursor"}, headers=admin_headers)
    assert bad.status_code == 422
    assert [(e["field"], e["location"]) for e in problem(bad)["errors"]] == [("cursor", "query")]
    assert (await http.get("/v1/queue", params={"state": "exploded"}, headers=admin_headers)).status_code == 422
    # The view of a deferred recipient, and of one on its way.
    (carol,) = (await http.get(f"/v1/queue/{b}", headers=admin_headers)).json()["recipients"]
    assert (carol["state"], carol["attempts"], carol["reply_code"], carol["reply_text"]) == (
        "deferred", 2, 451, "greylisted, come back later")
    assert abs(rfc3339(carol["next_attempt"]) - (now + 600_000) / 1000) < 0.01
    shown = (await http.get(f"/v1/queue/{c}", headers=admin_headers)).json()
    assert [(r["address"], r["state"]) for r in shown["recipients"]] == [("d@a.test", "delivered"),
                                                                          ("e@b.test", "sending")]
    assert shown["destinations"] == ["b.test"] and shown["next_attempt"] is None
    # Nothing waits for a retry while the one recipient left is on its way.
    busy = await http.post(f"/v1/queue/{c}/retry", headers=admin_headers)
    assert busy.status_code == 409 and busy.headers["content-type"] == "application/problem+json"
    # The ETag follows the relay's state: a write based on an older view is refused.
    etag = (await http.get(f"/v1/queue/{a}", headers=admin_headers)).headers["etag"]
    await OutboundQueue(backend.redis).save(a, {"bob@a.test": greylisted})
    refused = await http.delete(f"/v1/queue/{a}", headers={**admin_headers, "If-Match": etag})
    assert refused.status_code == 412
    assert await OutboundQueue(backend.redis).get(a) is not None


async def test_r_out_2_headers_of_a_large_message_come_from_its_blob_without_the_body(
        harness: Harness, admin_headers: dict[str, str]) -> None:
    large = MESSAGE + b"x" * 300_000 + b"\r\nEND-OF-LARGE-BODY\r\n"
    txn = await queued(harness.backend, "alice@example.org", ["bob@remote.test"], message=large)
    shown = await harness.http.get(f"/v1/queue/{txn}", headers=admin_headers)
    assert shown.status_code == 200, shown.text
    assert shown.json()["headers"]["subject"] == "Quarterly résumé" and shown.json()["size"] == len(large)
    assert "SECRET-BODY-TEXT" not in shown.text and "END-OF-LARGE-BODY" not in shown.text


@contextlib.asynccontextmanager
async def serving(harness: Harness) -> AsyncIterator[str]:
    """The API over real HTTP on loopback, in this event loop (rempartctl runs in a thread)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(harness.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, what="uvicorn listening")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_r_adm_6_rempartctl_lists_shows_retries_and_deletes_queued_messages(
        harness: Harness, admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    waiting = await queued(harness.backend, "alice@example.org", ["bob@remote.test"], received_ms=now - 7_200_000,
                           states={"bob@remote.test": RecipientState("pending", attempts=1, next_ms=now + 600_000,
                                                                     reply=GREYLISTED, remote_reply=True)})
    fresh = await queued(harness.backend, "", ["carol@remote.test"], received_ms=now)
    monkeypatch.setenv("REMPART_API_TOKEN", admin_headers["Authorization"].removeprefix("Bearer "))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))

    async with serving(harness) as url:
        monkeypatch.setenv("REMPART_API_URL", url)

        ctl = partial(run_ctl, capsys)

        code, out, _ = await ctl("queue", "list")
        lines = out.splitlines()
        assert code == 0 and [line.split()[0] for line in lines] == [waiting, fresh]
        assert "alice@example.org  1 waiting (deferred) for remote.test  451 greylisted, come back later" in lines[0]
        assert "  <>  " in lines[1]
        assert (await ctl("queue", "list", "--state", "deferred", "--older-than", "1h"))[1].split()[0] == waiting
        code, out, _ = await ctl("queue", "list", "--sender", "<>", "--json")
        assert code == 0 and [m["id"] for m in json.loads(out)] == [fresh]
        code, out, _ = await ctl("queue", "show", waiting)
        assert code == 0 and json.loads(out)["headers"]["subject"] == "Quarterly résumé"
        assert await ctl("queue", "retry", waiting) == (0, f"{waiting}: retrying now for bob@remote.test\n", "")
        code, out, _ = await ctl("queue", "delete", fresh)
        assert code == 0 and out == f"{fresh} deleted from the queue (not delivered, no bounce to the sender)\n"
        assert await ctl("queue", "show", fresh) == (1, "", "rempartctl: 404 Queued message not found\n")
        assert (await ctl("queue", "retry"))[0] == 2
        assert (await ctl("queue", "list", "--older-than", "soon"))[0] == 2
