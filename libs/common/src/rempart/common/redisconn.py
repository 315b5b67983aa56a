"""The Redis connection every service uses.

``REMPART_REDIS_URL`` is either a plain Redis URL (``redis://``, ``rediss://``, ``unix://``),
handed to redis-py unchanged, or a Sentinel URL naming the Sentinels and the monitored service,
for Redis with replication and automatic failover (R-OPS-6)::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<service>[/<db>][?options]

The password (and user) authenticate to the Redis primary; the Sentinels' own password, if
they have one, is the ``sentinel_password`` option (``sentinel_username`` too). A host without
a port means 26379. ``rediss+sentinel://`` speaks TLS to the Sentinels and to Redis.
Example: ``redis+sentinel://:s3cret@redis-sentinel-0:26379,redis-sentinel-1:26379/mymaster/0``.

With Sentinels, every new connection asks them which server is the primary now: after a
failover, calls fail (a 4xx for the mail client) only until the Sentinels have promoted a
replica, and the pool follows it without a restart.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_OPTIONS = {"sentinel_password", "sentinel_username"}

# Short timeouts: a Redis that hangs must become a 4xx quickly, not a stuck session.
# A blocking pool: under a burst, a call waits (briefly) for a free connection instead of
# failing at once with "Too many connections" and turning into a 451.
POOL_OPTIONS: dict[str, Any] = {
    "max_connections": 256,
    "timeout": 2.0,
}
CONNECTION_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_timeout": 2.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 15,
    "retry_on_timeout": False,
}


class RedisUrlError(ValueError):
    """REMPART_REDIS_URL cannot be understood (the message never repeats the password)."""


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise RedisUrlError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    # urlsplit cannot take several host:port pairs, so the authority is split by hand.
    authority, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, hostlist = authority.rpartition("@")
    if not at:
        hostlist = authority
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    sentinels = [_host_port(item) for item in hostlist.split(",") if item.strip()]
    if not sentinels:
        raise RedisUrlError("a Sentinel URL names at least one Sentinel host")
    parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise RedisUrlError("a Sentinel URL's path is /<service name>[/<db>]")
    service_name = parts[0]
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise RedisUrlError(f"the database in a Sentinel URL is a number, not {parts[1]!r}") from None
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - SENTINEL_OPTIONS
    if unknown:
        raise RedisUrlError(f"unknown Sentinel URL option(s): {', '.join(sorted(unknown))}")
    return SentinelUrl(
        sentinels=sentinels,
        service_name=service_name,
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        tls=SENTINEL_SCHEMES[scheme.lower()],
        options=options,
    )


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, after = item[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise RedisUrlError(f"empty Sentinel host in {item!r}")
    try:
        port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise RedisUrlError(f"bad Sentinel port in {item!r}") from None
    if not 0 < port < 65536:
        raise RedisUrlError(f"bad Sentinel port in {item!r}")
    return host, port


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The Sentinel pool (connections go to the current primary) with the blocking pool's
    wait-for-a-free-connection behaviour that plain URLs get."""


class SentinelRedis(aioredis.Redis):
    """A client of the primary the Sentinels name; closing it closes the Sentinel clients too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                await self.sentinel_manager.aclose()


def connect_redis(url: str, max_connections: int = 0) -> aioredis.Redis:
    """The client every service uses; ``max_connections=1`` makes one ordered connection (WAIT
    then covers every write made before it)."""
    pool_options = {**POOL_OPTIONS, **({"max_connections": max_connections} if max_connections else {})}
    if is_sentinel_url(url):
        return connect_sentinel(parse_sentinel_url(url), pool_options)
    pool = aioredis.BlockingConnectionPool.from_url(url, **pool_options, **CONNECTION_OPTIONS)
    return aioredis.Redis(connection_pool=pool)


def connect_sentinel(target: SentinelUrl, pool_options: dict[str, Any] | None = None) -> aioredis.Redis:
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": CONNECTION_OPTIONS["socket_timeout"],
        "socket_connect_timeout": CONNECTION_OPTIONS["socket_connect_timeout"],
        "decode_responses": True,
    }
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    if target.sentinel_username:
        sentinel_kwargs["username"] = target.sentinel_username
    if target.tls:
        sentinel_kwargs["ssl"] = True
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: SentinelRedis = sentinel.master_for(
        target.service_name,
        redis_class=SentinelRedis,
        connection_pool_class=BlockingSentinelConnectionPool,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        # A connection to a server that is no longer the primary is dropped at once (the pool
        # asks the Sentinels again), not kept for writes that would fail with READONLY.
        check_connection=True,
        **(pool_options or POOL_OPTIONS),
        **CONNECTION_OPTIONS,
    )
    client.sentinel_manager = sentinel
    return client


async def run_scripts(redis: aioredis.Redis, calls: list[tuple[AsyncScript, list[Any], list[Any]]],
                      before: Callable[[Pipeline], None] | None = None) -> list[Any]:
    """Several Lua script calls (``(script, keys, args)``), and the plain commands ``before``
    queues ahead of them, in one round trip. redis-py's own way (a script called with
    ``client=pipeline``) first asks ``SCRIPT EXISTS`` in a round trip of its own on every
    execution; here the scripts are called by their SHA and loaded only when Redis answers
    NOSCRIPT (a restarted or failed-over Redis), then the whole pipeline is sent again. Each
    script call is atomic; the pipeline is not a transaction. Errors of the commands raise."""
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            if before is not None:
                before(pipe)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt == 2:
                    raise
            for script in {id(s): s for s, _, _ in calls}.values():
                script.sha = await redis.script_load(script.script)
    raise AssertionError("unreachable")
