"""The Redis connection every service uses."""

from __future__ import annotations

import redis.asyncio as aioredis


def connect_redis(url: str) -> aioredis.Redis:
    # Short timeouts: a Redis that hangs must become a 4xx quickly, not a stuck session.
    # A blocking pool: under a burst, a call waits (briefly) for a free connection instead of
    # failing at once with "Too many connections" and turning into a 451.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=256,
        timeout=2.0,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry_on_timeout=False,
    )
    return aioredis.Redis(connection_pool=pool)
