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


async def test_a_probe_cut_short_by_the_process_stopping_logs_no_error() -> None:
    """A /readyz in flight when the process stops (its handler task cancelled): the connection
    closes, and asyncio logs no "Exception in callback" error (Python 3.11's stream callback
    reads a cancelled handler's exception; a rolling update found one in a draining edge)."""
    async def slow() -> None:
        await asyncio.sleep(10)

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    ops = OpsServer("127.0.0.1", 0)
    ops.add_check("slow", slow)
    await ops.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        handlers = [t for t in asyncio.all_tasks() if "_handle" in repr(t.get_coro())]
        assert handlers, "the probe's handler is running"
        for task in handlers:
            task.cancel()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        await asyncio.sleep(0.1)
        assert errors == []
        writer.close()
    finally:
        loop.set_exception_handler(None)
        await ops.stop()
