"""A service's stop under load (R-OPS-7): NATS is drained within its bound, then closed, and
nothing is left behind for asyncio to report as an error once the process exits."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

from nats.aio.msg import Msg

from rempart.common.events import NATS_DRAIN_SECONDS
from rempart.common.runtime import NATS_CLOSE_SECONDS, ServiceRuntime
from rempart.common.settings import ServiceSettings


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)


async def test_r_ops_7_a_stop_with_a_busy_subscription_is_bounded_and_leaves_no_unretrieved_error(
    redis_url: str, nats_url: str
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    settings = ServiceSettings(redis_url=redis_url, nats_url=nats_url, ops_host="127.0.0.1",
                               environment="test", log_format="text")
    busy = asyncio.Event()
    records = Records()

    async def slow(_msg: Msg) -> None:
        # A handler still at work when SIGTERM comes, with more messages queued behind it: the
        # drain cannot finish, as an imap-pop under a rolling update's load.
        busy.set()
        await asyncio.sleep(30)

    try:
        async with ServiceRuntime("stop-test", settings) as runtime:
            await runtime.nc.subscribe("test.stop.slow", cb=slow)
            for _ in range(5):
                await runtime.nc.publish("test.stop.slow", b"x")
            await runtime.nc.flush()
            await asyncio.wait_for(busy.wait(), 5)
            # The service's logging is set up by the runtime: listen on the loggers themselves.
            for name in ("rempart", "nats", "asyncio"):
                logging.getLogger(name).addHandler(records)
            stopping = loop.time()
        took = loop.time() - stopping
        assert runtime.nc.is_closed
        # What asyncio reports of a future nobody awaited is reported when it is collected.
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
        for name in ("rempart", "nats", "asyncio"):
            logging.getLogger(name).removeHandler(records)
    assert took < NATS_DRAIN_SECONDS + NATS_CLOSE_SECONDS, f"stop took {took:.1f} s"
    assert reported == [], [c.get("message") for c in reported]
    assert any("NATS drain did not finish" in r.getMessage() and r.levelno == logging.WARNING
               for r in records.seen), [r.getMessage() for r in records.seen]
    assert not [r for r in records.seen if r.levelno >= logging.ERROR], [r.getMessage() for r in records.seen]


def test_r_ops_7_a_stop_that_overruns_its_drain_dumps_its_stacks_and_exits(redis_url: str, nats_url: str) -> None:
    """A process whose drain never ends (a stall somewhere) does not wait for the orchestrator's
    SIGKILL: past its grace and the overrun it writes every thread's stack to stderr (where the
    stall is) and exits 1."""
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(f"""
        import asyncio
        from rempart.common import runtime
        from rempart.common.settings import ServiceSettings
        runtime.STOP_OVERRUN_SECONDS = 0.5

        async def main():
            settings = ServiceSettings(redis_url={redis_url!r}, nats_url={nats_url!r}, ops_host="127.0.0.1",
                                       ops_port=0, environment="test", log_format="text",
                                       shutdown_grace_seconds=0.5)
            async with runtime.ServiceRuntime("stuck", settings) as rt:
                print("ready", flush=True)
                await rt.wait_for_shutdown()
                await asyncio.Event().wait()  # a drain that never ends

        runtime.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        started = time.monotonic()
        proc.terminate()
        code = proc.wait(20)
        elapsed = time.monotonic() - started
    finally:
        proc.kill()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 1 and elapsed < 10, (code, elapsed, stderr[-2000:])
    assert "stuck still running" in stderr, stderr[-2000:]
    assert "Thread 0x" in stderr or "Current thread 0x" in stderr, stderr[-2000:]
