"""What every service process sets up and tears down: logging, tracing, Redis, NATS with the
JetStream streams, the settings cache, the event bus, the ops server, and SIGTERM draining.

    async with ServiceRuntime("policy", settings) as rt:
        ...start serving...
        await rt.wait_for_shutdown()   # SIGTERM or SIGINT
        ...stop accepting, drain within settings.shutdown_grace_seconds...

A signal that arrives while the runtime is still connecting (NATS or Redis not there yet: the
client retries forever) ends the process at once with status 0, and the teardown never waits
on a server that went away, so an orchestrator's SIGTERM is always honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from rempart.common.config import SettingsCache
from rempart.common.events import CONFIG_CHANGED, NATS_DRAIN_SECONDS, EventBus, connect_nats, ensure_streams
from rempart.common.ops import OpsServer, nats_check, redis_check
from rempart.common.redisconn import connect_redis
from rempart.common.settings import ServiceSettings
from rempart.common.telemetry import setup_logging, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

# Teardown bounds: SIGTERM must end the process well within Kubernetes' default 30 s grace and
# `make run`'s 10 s, after the service's own drain (settings.shutdown_grace_seconds).
NATS_CLOSE_SECONDS = 2.0
# Past its drain (shutdown_grace_seconds), a stopping process has this long to exit.
STOP_OVERRUN_SECONDS = 15.0


def _stop_overrun(service: str) -> None:
    log.error("%s still running %.0f s past its drain: thread stacks on stderr, exiting", service,
              STOP_OVERRUN_SECONDS)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(1)


class ServiceRuntime:
    def __init__(self, service: str, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        self.instance = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self._shutdown = asyncio.Event()
        self._watchdog: threading.Timer | None = None
        self.redis: aioredis.Redis
        self.nc: NATS
        self.js: JetStreamContext
        self.events: EventBus
        self.config: SettingsCache
        self.ops = OpsServer(settings.ops_host, settings.ops_port)
        self._teardown = contextlib.AsyncExitStack()
        self._starting: asyncio.Task[object] | None = None

    async def __aenter__(self) -> ServiceRuntime:
        setup_logging(self.service, self.settings.log_level, self.settings.log_format)
        if setup_tracing(self.service):
            # Registered first, so it runs last: the spans of the teardown itself are sent too.
            self._teardown.callback(shutdown_tracing)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._starting = asyncio.current_task()
        try:
            await self._open()
        except asyncio.CancelledError:
            if not self._shutdown.is_set():
                raise
            await self._teardown.aclose()
            log.info("%s stopped before it was ready", self.service)
            # Nothing was served yet, so there is nothing to drain: a clean exit, not a traceback.
            raise SystemExit(0) from None
        finally:
            self._starting = None
        log.info("%s started", self.service, extra={"ops_port": self.ops.port, "instance": self.instance})
        return self

    async def _open(self) -> None:
        # Each resource registers its teardown as soon as it exists: a signal mid-start closes
        # exactly what was opened (AsyncExitStack runs them last-in, first-out).
        self.redis = connect_redis(self.settings.redis_url)
        self._teardown.push_async_callback(self.redis.aclose)
        self.nc = await connect_nats(self.settings.nats_url, f"rempart-{self.service}-{self.instance}")
        self._teardown.push_async_callback(self._close_nats)
        self.js = self.nc.jetstream(timeout=10)
        await ensure_streams(self.js, self.settings.stream_replicas)
        self.events = EventBus(self.nc, self.service)
        self.config = SettingsCache(self.redis)
        await self.config.refresh(force=True)
        self.config.start_polling()
        self._teardown.push_async_callback(self.config.stop)
        await self.nc.subscribe(CONFIG_CHANGED, cb=self._on_config_changed)
        self.ops.add_check("redis", redis_check(self.redis))
        self.ops.add_check("nats", nats_check(self.nc))
        await self.ops.start()
        self._teardown.push_async_callback(self.ops.stop)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._teardown.aclose()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()  # stopped in time (a test's process goes on)
        log.info("%s stopped", self.service)

    async def _close_nats(self) -> None:
        """Drain what this process still has in flight, then close, bounded.

        nats-py's drain stops waiting for the subscriptions after NATS_DRAIN_SECONDS (the
        connection's drain_timeout, see connect_nats) and then flushes and closes; a flush to a
        server that has just gone away can wait 10 s more, and a client in its reconnect loop never
        stops by itself: close() ends both, so the process exits however NATS is doing.
        """
        drain: asyncio.Future[None] | None = None
        if self.nc.is_connected:
            drain = asyncio.ensure_future(self.nc.drain())
            await asyncio.wait({drain}, timeout=NATS_DRAIN_SECONDS + NATS_CLOSE_SECONDS)
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), NATS_CLOSE_SECONDS)
        if drain is not None:
            if not drain.done():
                log.warning("NATS drain and close did not finish within %.0f s: closed",
                            NATS_DRAIN_SECONDS + NATS_CLOSE_SECONDS)
                drain.cancel()
                await asyncio.wait({drain}, timeout=NATS_CLOSE_SECONDS)
            if drain.done() and not drain.cancelled() and drain.exception() is not None:
                log.debug("NATS drain at shutdown: %s", drain.exception())

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s: draining", sig.name)
        if self._watchdog is None:
            # A stop that overruns its drain by STOP_OVERRUN_SECONDS is a bug somewhere: say where
            # every thread stands (stderr), then exit, instead of waiting for the SIGKILL.
            self._watchdog = threading.Timer(self.settings.shutdown_grace_seconds + STOP_OVERRUN_SECONDS,
                                             _stop_overrun, (self.service,))
            self._watchdog.daemon = True
            self._watchdog.start()
        self.ops.draining = True
        self._shutdown.set()
        if self._starting is not None:
            # Still connecting (maybe retrying a NATS or Redis that is gone): stop trying.
            self._starting.cancel()

    async def wait_for_shutdown(self) -> None:
        await self._shutdown.wait()

    async def _on_config_changed(self, _msg: Msg) -> None:
        try:
            await self.config.refresh()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("settings reload failed: %s", exc)


def run(main: Coroutine[Any, Any, object]) -> None:
    """Run a service's main coroutine on uvloop (a cheaper event loop: issue 11), or on
    asyncio's own when uvloop is not installed. Every ``python -m rempart.<service>`` uses it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(main)
        return
    uvloop.run(main)
