"""R-LOG-2: user name or full address, % and / conversion, aliases."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from rempart.common.directory import Account
from rempart.common.pb.auth.v1 import auth_pb2

if TYPE_CHECKING:
    from conftest import AuthHarness

GOOD = "Blue-Heron-42-Quiet"
BOB = "bob@example.org"
OK = auth_pb2.AUTH_STATUS_OK
INVALID = auth_pb2.AUTH_STATUS_INVALID


async def test_r_log_2_full_address_case_insensitive(auth: AuthHarness) -> None:
    reply = await auth.login("  Bob@Example.ORG ", GOOD)
    assert reply.status == OK and reply.account == BOB and reply.role == "user"


async def test_r_log_2_bare_name_when_one_domain_has_it(auth: AuthHarness) -> None:
    reply = await auth.login("bob", GOOD)
    assert reply.status == OK and reply.account == BOB


async def test_r_log_2_bare_name_ambiguous_across_domains_matches_nothing(auth: AuthHarness) -> None:
    await auth.directory.add_domain("example.net")
    await auth.directory.add_account("bob@example.net")
    assert (await auth.set_password("bob@example.net", "Other-Heron-43-Loud")).ok
    assert (await auth.login("bob", GOOD)).status == INVALID
    assert (await auth.login("bob@example.net", "Other-Heron-43-Loud")).status == OK


async def test_r_log_2_address_only_refuses_bare_names(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": 0, "login_with": "address_only"}})
    assert (await auth.login("bob", GOOD)).status == INVALID
    assert (await auth.login(BOB, GOOD)).status == OK


async def test_r_log_2_percent_and_slash_convert_to_at(auth: AuthHarness) -> None:
    for login in ("bob%example.org", "bob/example.org"):
        reply = await auth.login(login, GOOD)
        assert reply.status == OK and reply.account == BOB, login


async def test_r_log_2_conversion_can_be_turned_off(auth: AuthHarness) -> None:
    await auth.server_settings({"login": {"failure_delay_ms": 0, "convert_percent_slash": False}})
    assert (await auth.login("bob%example.org", GOOD)).status == INVALID
    assert (await auth.login("bob/example.org", GOOD)).status == INVALID


async def test_r_log_2_domain_alias_logs_in_as_the_account(auth: AuthHarness) -> None:
    await auth.directory.add_domain_alias("example.com", "example.org")
    reply = await auth.login("bob@example.com", GOOD)
    assert reply.status == OK and reply.account == BOB


async def test_r_log_2_alias_address_only_with_aliases_as_login(auth: AuthHarness) -> None:
    await auth.directory.add_alias("robert@example.org", [BOB])
    assert (await auth.login("robert@example.org", GOOD)).status == INVALID
    await auth.server_settings({"login": {"failure_delay_ms": 0, "aliases_as_login": True}})
    reply = await auth.login("robert@example.org", GOOD)
    assert reply.status == OK and reply.account == BOB


async def test_r_log_2_alias_to_several_accounts_is_no_login(auth: AuthHarness) -> None:
    await auth.directory.add_account("alice@example.org")
    await auth.directory.add_alias("team@example.org", [BOB, "alice@example.org"])
    await auth.server_settings({"login": {"failure_delay_ms": 0, "aliases_as_login": True}})
    assert (await auth.login("team@example.org", GOOD)).status == INVALID


async def test_r_log_2_oversized_or_garbage_login_is_invalid(auth: AuthHarness) -> None:
    assert (await auth.login("b" * 5000 + "@example.org", GOOD)).status == INVALID
    assert (await auth.login("bob\r\n@example.org", GOOD)).status == INVALID
    assert (await auth.login("", GOOD)).status == INVALID
    assert (await auth.login(BOB, "x" * 5000)).status == INVALID


async def test_r_log_2_reply_carries_the_directory_role(auth: AuthHarness) -> None:
    await auth.directory.add_account("root@example.org", role="superadmin")
    assert (await auth.set_password("root@example.org", "Granite-Owl-71-Sky")).ok
    reply = await auth.login("root@example.org", "Granite-Owl-71-Sky", protocol="admin")
    assert (reply.status, reply.account, reply.role) == (OK, "root@example.org", "superadmin")


async def test_r_log_2_a_login_reads_the_account_record_once(
    auth: AuthHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await auth.directory.add_alias("robert@example.org", [BOB])
    await auth.server_settings({"login": {"failure_delay_ms": 0, "aliases_as_login": True}})
    directory = auth.service.servicer.login.directory
    real = directory.get_account
    reads: list[str] = []

    async def counting(address: str) -> Account | None:
        reads.append(address)
        return await real(address)

    monkeypatch.setattr(directory, "get_account", counting)
    for typed in (BOB, "robert@example.org"):
        reads.clear()
        reply = await auth.login(typed, GOOD)
        assert reply.status == OK and reply.account == BOB and reply.role == "user"
        assert reads.count(BOB) == 1, (typed, reads)
    reads.clear()
    reply = await auth.login("bob", GOOD)  # a bare name is matched without reading the record
    assert reply.status == OK and reply.account == BOB
    assert reads == [BOB]


async def test_r_log_4_an_account_disabled_during_the_slow_down_wait_is_refused(
    make_auth: Callable[..., Awaitable[AuthHarness]],
) -> None:
    auth = await make_auth(slow_down_step_ms=600)
    await auth.server_settings({"login": {"failure_delay_ms": 0, "lockout_mode": "slow_down"}})
    await auth.directory.add_domain("example.org")
    await auth.directory.add_account(BOB)
    assert (await auth.set_password(BOB, GOOD)).ok
    assert (await auth.login(BOB, "Wrong-Guess-77-Unique")).status == INVALID  # the next login waits 0.6 s
    login = asyncio.create_task(auth.login(BOB, GOOD))
    await asyncio.sleep(0.2)  # the login has read the account and waits in the slow-down
    await auth.directory.set_account_enabled(BOB, False)
    assert (await login).status == INVALID
    await auth.directory.set_account_enabled(BOB, True)
    assert (await auth.login(BOB, GOOD)).status == OK
