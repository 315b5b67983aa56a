"""Waiting for a condition in a test: poll it until a deadline, and say what never happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from rempart.common.events import MAIL_STREAM

POLL_SECONDS = 0.05
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 20.0,
                     what: str = "condition") -> None:
    """Return once ``check()`` (plain or awaitable) is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, what: str = "condition",
               every: float = 0.2) -> T:
    """The first true value of ``predicate()``; fail after ``timeout`` seconds with the last one."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


async def indexed(js: JetStreamContext, durable: str = "mailbox-indexer", timeout: float = 20.0) -> None:
    """Return once the indexer (``rempart.common.mailbox.run_indexer``) has filed and acked
    every delivery record on the MAIL stream: what a 250 accepted is then in its mailboxes."""

    async def caught_up() -> bool:
        try:
            info = await js.consumer_info(MAIL_STREAM, durable)
        except NotFoundError:
            return False  # the indexer has not subscribed yet
        return not info.num_pending and not info.num_ack_pending

    await eventually(caught_up, timeout, what=f"the indexer {durable!r} to file every delivery")
