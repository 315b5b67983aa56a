"""What every service process sets up and tears down: logging, tracing, Redis, NATS with the
JetStream streams, the settings cache, the event bus, the ops server, and SIGTERM draining.

    async with ServiceRuntime("policy", settings) as rt:
        ...start serving...
        await rt.wait_for_shutdown()   # SIGTERM or SIGINT
        ...stop accepting, drain within settings.shutdown_grace_seconds...
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from types import TracebackType

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from rempart.common.config import SettingsCache
from rempart.common.events import CONFIG_CHANGED, EventBus, connect_nats, ensure_streams
from rempart.common.ops import OpsServer, nats_check, redis_check
from rempart.common.redisconn import connect_redis
from rempart.common.settings import ServiceSettings
from rempart.common.telemetry import setup_logging, setup_tracing

log = logging.getLogger(__name__)


class ServiceRuntime:
    def __init__(self, service: str, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        self.instance = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self._shutdown = asyncio.Event()
        self.redis: aioredis.Redis
        self.nc: NATS
        self.js: JetStreamContext
        self.events: EventBus
        self.config: SettingsCache
        self.ops = OpsServer(settings.ops_host, settings.ops_port)

    async def __aenter__(self) -> ServiceRuntime:
        setup_logging(self.service, self.settings.log_level, self.settings.log_format)
        setup_tracing(self.service)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.redis = connect_redis(self.settings.redis_url)
        self.nc = await connect_nats(self.settings.nats_url, f"rempart-{self.service}-{self.instance}")
        self.js = self.nc.jetstream(timeout=10)
        await ensure_streams(self.js)
        self.events = EventBus(self.nc, self.service)
        self.config = SettingsCache(self.redis)
        await self.config.refresh(force=True)
        self.config.start_polling()
        await self.nc.subscribe(CONFIG_CHANGED, cb=self._on_config_changed)
        self.ops.add_check("redis", redis_check(self.redis))
        self.ops.add_check("nats", nats_check(self.nc))
        await self.ops.start()
        log.info("%s started", self.service, extra={"ops_port": self.ops.port, "instance": self.instance})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.config.stop()
        await self.ops.stop()
        try:
            await self.nc.drain()
        except Exception as exc:  # noqa: BLE001 - already closed or unreachable at shutdown
            log.debug("NATS drain at shutdown: %s", exc)
        await self.redis.aclose()
        log.info("%s stopped", self.service)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s: draining", sig.name)
        self.ops.draining = True
        self._shutdown.set()

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def wait_for_shutdown(self) -> None:
        await self._shutdown.wait()

    async def _on_config_changed(self, _msg: Msg) -> None:
        try:
            await self.config.refresh()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("settings reload failed: %s", exc)
