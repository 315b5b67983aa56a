"""Fixtures: the policy service running in-process on port 0 against the real Redis and NATS."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

# Tests import their helpers from policy_testkit (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from policy_testkit import BASE_ZONE, Policy, make_directory, started_policy

from rempart.common.testing.dnsserver import LoopbackDnsServer


@pytest.fixture
async def dns_server() -> AsyncIterator[LoopbackDnsServer]:
    """A real DNS server on loopback; tests add the records they need."""
    async with LoopbackDnsServer(BASE_ZONE) as server:
        yield server


@pytest.fixture
async def policy(
    redis_url: str, nats_url: str, redis: aioredis.Redis, dns_server: LoopbackDnsServer
) -> AsyncIterator[Policy]:
    await make_directory(redis)
    async with started_policy(redis_url, nats_url, redis, dns_server.address) as running:
        yield running
