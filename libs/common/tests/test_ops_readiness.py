"""/readyz while a service stops: a check whose gRPC call its closing channel cancelled is "not
ready", never an exception in the event loop (seen in the rolling-update test)."""

from __future__ import annotations

import asyncio

import pytest

from rempart.common.grpcutil import channel_check, client_channel
from rempart.common.ops import OpsServer


async def test_a_check_cancelled_by_its_closing_channel_is_not_ready() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers: the health call waits

    peer = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = peer.sockets[0].getsockname()[1]
    channel = client_channel(f"127.0.0.1:{port}")
    ops = OpsServer("127.0.0.1", 0)
    ops.add_check("peer", channel_check(channel))
    try:
        asking = asyncio.ensure_future(ops.readiness())
        await asyncio.sleep(0.3)
        await channel.close()  # the service stopping closes its channels under the call
        results = await asking
        assert results["peer"].startswith("CancelledError"), results
    finally:
        await channel.close()
        peer.close()


async def test_a_cancelled_readiness_request_stays_cancelled() -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    ops = OpsServer("127.0.0.1", 0)
    ops.add_check("slow", slow)
    task = asyncio.ensure_future(ops.readiness())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
