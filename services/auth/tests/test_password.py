"""R-PWD-1 (policy, each rule named) and R-PWD-2 (Argon2id, never in clear), through gRPC."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from argon2 import PasswordHasher, Type

from rempart.common import keys
from rempart.common.pb.auth.v1 import auth_pb2

if TYPE_CHECKING:
    from conftest import AuthHarness

GOOD = "Blue-Heron-42-Quiet"
BOB = "bob@example.org"


async def violations(auth: AuthHarness, password: str) -> list[str]:
    reply = await auth.set_password(BOB, password)
    assert not reply.ok
    return list(reply.violations)


async def test_r_pwd_1_every_failed_rule_is_named(auth: AuthHarness) -> None:
    found = await violations(auth, "short")
    assert "must be at least 10 characters long" in found
    assert "must contain at least one digit" in found
    assert "must contain at least one character that is not a letter or a digit" in found
    assert "must contain at least one upper-case letter" in found
    assert "must contain at least one lower-case letter" not in found
    assert any(v.startswith("is too easy to guess") for v in found)


async def test_r_pwd_1_lower_case_required(auth: AuthHarness) -> None:
    assert await violations(auth, "BLUE-HERON-42-QUIET") == ["must contain at least one lower-case letter"]


async def test_r_pwd_1_must_not_contain_user_or_domain_name(auth: AuthHarness) -> None:
    assert "must not contain the user name" in await violations(auth, "Xq7-BOB-lantern-92")
    assert "must not contain the domain name" in await violations(auth, "Xq7-Example-lantern-92")
    assert "must not contain the domain name" in await violations(auth, "Xq7-lantern-example.org")


async def test_r_pwd_1_strength_rule(auth: AuthHarness) -> None:
    found = await violations(auth, "Password1!")
    assert found == ["is too easy to guess (strength 1 of 4, at least 2 required)"]


async def test_r_pwd_1_policy_follows_the_settings_store(auth: AuthHarness) -> None:
    assert (await auth.set_password(BOB, GOOD)).ok
    await auth.server_settings({"login": {"failure_delay_ms": 0}, "password": {"min_length": 24}})
    assert await violations(auth, GOOD) == ["must be at least 24 characters long"]
    await auth.server_settings(
        {
            "password": {
                "min_length": 4,
                "require_digit": False,
                "require_non_alnum": False,
                "require_upper": False,
                "min_strength": 0,
            }
        }
    )
    assert (await auth.set_password(BOB, "tulips")).ok


async def test_r_pwd_1_skip_policy_for_imports_but_never_empty(auth: AuthHarness) -> None:
    assert (await auth.set_password(BOB, "short", skip_policy=True)).ok
    assert (await auth.login(BOB, "short")).status == auth_pb2.AUTH_STATUS_OK
    reply = await auth.set_password(BOB, "", skip_policy=True)
    assert not reply.ok and list(reply.violations) == ["must not be empty"]


async def test_r_pwd_1_unknown_account_is_not_found(auth: AuthHarness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await auth.set_password("nobody@example.org", GOOD)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_r_pwd_2_hash_is_argon2id_and_no_plaintext(auth: AuthHarness) -> None:
    wrong = "Wrong-Guess-77-Unique"
    assert (await auth.login(BOB, wrong)).status == auth_pb2.AUTH_STATUS_INVALID
    stored = await auth.redis.hgetall(keys.credentials(BOB))
    assert stored["hash"].startswith("$argon2id$")
    # Neither the password nor a failed guess appears anywhere in Redis.
    for key in await auth.redis.keys("*"):
        kind = await auth.redis.type(key)
        if kind == "string":
            dump = str(await auth.redis.get(key))
        elif kind == "hash":
            dump = str(await auth.redis.hgetall(key))
        elif kind == "zset":
            dump = str(await auth.redis.zrange(key, 0, -1, withscores=True))
        elif kind == "set":
            dump = str(await auth.redis.smembers(key))
        else:
            dump = str(await auth.redis.lrange(key, 0, -1))
        assert GOOD not in dump and wrong not in dump, key


async def test_r_pwd_2_rehash_when_parameters_changed(auth: AuthHarness) -> None:
    old = PasswordHasher(time_cost=2, memory_cost=512, parallelism=1, type=Type.ID).hash(GOOD)
    await auth.redis.hset(keys.credentials(BOB), "hash", old)
    assert (await auth.login(BOB, GOOD)).status == auth_pb2.AUTH_STATUS_OK
    upgraded = await auth.redis.hget(keys.credentials(BOB), "hash")
    assert upgraded != old and "m=1024,t=1,p=1" in upgraded
    assert (await auth.login(BOB, GOOD)).status == auth_pb2.AUTH_STATUS_OK
