"""R-LOG-3: logins allowed only from listed IPs, per domain and per account, applied live."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from rempart.common.events import EventBus
from rempart.common.pb.auth.v1 import auth_pb2

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from conftest import AuthHarness, EventTap

GOOD = "Blue-Heron-42-Quiet"
BOB = "bob@example.org"
OK = auth_pb2.AUTH_STATUS_OK
RESTRICTED = auth_pb2.AUTH_STATUS_IP_RESTRICTED


async def until_status(auth: AuthHarness, status: int, client_ip: str, timeout: float = 5.0) -> None:
    """The service reloads on rempart.config.changed (or by polling): wait with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = (await auth.login(BOB, GOOD, client_ip=client_ip)).status
        if last == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"status {last} from {client_ip}, wanted {status}")


async def test_r_log_3_ip_restriction(auth: AuthHarness, nats_conn: NATS, auth_events: EventTap) -> None:
    bus = EventBus(nats_conn, "test-admin")
    assert (await auth.login(BOB, GOOD, client_ip="198.51.100.7")).status == OK
    # Domain scope: the cached settings reload on the change event.
    version = await auth.store.put_doc(
        "domain:example.org", {"login": {"allowed_ips": ["10.0.0.0/8", "2001:db8::/32"]}}
    )
    await bus.config_changed("domain:example.org", version)
    await until_status(auth, RESTRICTED, "198.51.100.7")
    assert (await auth.login(BOB, GOOD, client_ip="10.1.2.3")).status == OK
    assert (await auth.login(BOB, GOOD, client_ip="::ffff:10.1.2.3")).status == OK
    assert (await auth.login(BOB, GOOD, client_ip="2001:db8::5")).status == OK
    assert (await auth.login(BOB, GOOD, client_ip="")).status == RESTRICTED
    # An unknown name in that domain is refused the same way: the restriction reveals no account.
    assert (await auth.login("nobody@example.org", GOOD, client_ip="198.51.100.7")).status == RESTRICTED
    event = (await auth_events.wait_for("login_failed"))[0]
    assert event.reason == "ip_restricted" and event.account == BOB
    # Account scope beats the domain's list.
    version = await auth.store.put_doc(f"account:{BOB}", {"login": {"allowed_ips": ["198.51.100.0/24"]}})
    await bus.config_changed(f"account:{BOB}", version)
    await until_status(auth, OK, "198.51.100.7")
    assert (await auth.login(BOB, GOOD, client_ip="10.1.2.3")).status == RESTRICTED


async def test_r_log_3_restricted_login_computes_no_hash_and_counts_no_failure(auth: AuthHarness) -> None:
    await auth.store.put_doc("domain:example.org", {"login": {"allowed_ips": ["10.0.0.0/8"]}})
    await auth.service.runtime.config.refresh()
    before = auth.service.servicer.hasher.hash_calls
    for i in range(8):
        assert (await auth.login(BOB, f"guess-{i}", client_ip="198.51.100.7")).status == RESTRICTED
    assert auth.service.servicer.hasher.hash_calls == before
    assert (await auth.login(BOB, GOOD, client_ip="10.9.9.9")).status == OK
