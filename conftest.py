"""Fixtures shared by every test: real Redis and NATS JetStream servers on free ports.

Each test session starts its own servers (never the machine's standard ports), and each test
gets a clean Redis database and fresh streams, so tests pass on a bare machine and in any order.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from rempart.common.events import connect_nats, ensure_streams
from rempart.common.redisconn import connect_redis
from rempart.common.testing.localstack import LocalServer, start_nats, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


async def _reset_nats(url: str) -> None:
    nc = await connect_nats(url, "test-reset")
    js = nc.jetstream()
    try:
        for name in await js.streams_info():
            await js.delete_stream(name.config.name)
    finally:
        await nc.close()


@pytest.fixture
async def redis_url(redis_server: LocalServer) -> AsyncIterator[str]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
async def nats_url(nats_server: LocalServer) -> AsyncIterator[str]:
    await _reset_nats(nats_server.url)
    yield nats_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def nats_conn(nats_url: str) -> AsyncIterator[NATS]:
    nc = await connect_nats(nats_url, "test")
    await ensure_streams(nc.jetstream())
    yield nc
    await nc.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from rempart.common.tls import write_self_signed

    pair = write_self_signed(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1"])
    return pair.cert_file, pair.key_file


def which(tool: str) -> str | None:
    return shutil.which(tool)


__all__ = ["Path", "asyncio", "which"]
