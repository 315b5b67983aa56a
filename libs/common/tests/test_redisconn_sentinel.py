"""REMPART_REDIS_URL with Sentinels (R-OPS-6): the URL form, and a real failover followed."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rempart.common.redisconn import (
    BlockingSentinelConnectionPool,
    RedisUrlError,
    SentinelRedis,
    connect_redis,
    parse_sentinel_url,
)
from rempart.common.testing.localstack import start_redis_sentinel_group

pytestmark = pytest.mark.timeout(90)


def test_sentinel_url_hosts_service_db_and_passwords() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://:p%40ss@s0.redis:26380,s1.redis,[fd00::1]:26381/mymaster/3?sentinel_password=sp")
    assert target.sentinels == [("s0.redis", 26380), ("s1.redis", 26379), ("fd00::1", 26381)]
    assert (target.service_name, target.db) == ("mymaster", 3)
    assert (target.username, target.password, target.sentinel_password) == (None, "p@ss", "sp")
    assert target.tls is False
    plain = parse_sentinel_url("rediss+sentinel://user:pw@h:1/svc")
    assert (plain.db, plain.username, plain.password, plain.tls) == (0, "user", "pw", True)


@pytest.mark.parametrize("url", [
    "redis+sentinel://:hunter2@/mymaster/0",            # no Sentinel
    "redis+sentinel://:hunter2@h:26379",                # no service name
    "redis+sentinel://:hunter2@h:26379/svc/zero",       # db not a number
    "redis+sentinel://:hunter2@h:99999/svc",            # port out of range
    "redis+sentinel://:hunter2@h:26379/svc/0/extra",    # too many path parts
    "redis+sentinel://:hunter2@h/svc?sentinel_pasword=hunter2",  # misspelt option
])
def test_bad_sentinel_urls_are_refused_without_echoing_secrets(url: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_sentinel_url(url)
    assert "hunter2" not in str(caught.value)


async def test_plain_urls_keep_the_blocking_pool(redis_url: str) -> None:
    client = connect_redis(redis_url)
    try:
        assert not isinstance(client, SentinelRedis)
        assert isinstance(client.connection_pool, aioredis.BlockingConnectionPool)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_r_ops_6_the_client_follows_a_sentinel_failover(tmp_path: Path) -> None:
    group = start_redis_sentinel_group(tmp_path, replicas=1, sentinels=3, password="s3cret-pw")
    client = connect_redis(group.url)
    try:
        assert isinstance(client, SentinelRedis)
        assert isinstance(client.connection_pool, BlockingSentinelConnectionPool)
        await client.set("before", "1")
        assert await client.wait(1, 2000) == 1  # on the replica before the primary dies
        old = group.primary_port()
        group.server_on(old).proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        errors = 0
        while True:
            try:
                await client.set("after", "2")
                break
            except (aioredis.ConnectionError, aioredis.TimeoutError, aioredis.ReadOnlyError):
                errors += 1
                assert time.monotonic() - started < 30, "no new primary within 30 s"
                await asyncio.sleep(0.2)
        assert group.primary_port() != old
        assert await client.get("before") == "1" and await client.get("after") == "2"
        print(f"failover followed in {time.monotonic() - started:.1f} s after {errors} failed writes")
    finally:
        await client.aclose()
        group.stop()
