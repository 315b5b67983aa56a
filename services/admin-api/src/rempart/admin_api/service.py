"""The admin API process: ServiceRuntime (Redis, NATS, ops port) plus uvicorn, drained on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator

import uvicorn

from rempart.admin_api.app import create_app
from rempart.admin_api.backend import Backend
from rempart.admin_api.bootstrap import run_bootstrap
from rempart.admin_api.sessions import SessionStore
from rempart.admin_api.settings import AdminApiSettings
from rempart.common.audit import AuditRetention
from rempart.common.clients import AuthClient
from rempart.common.grpcutil import channel_check
from rempart.common.runtime import ServiceRuntime

log = logging.getLogger(__name__)


class _HttpServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # ServiceRuntime owns SIGTERM/SIGINT; on shutdown we set should_exit ourselves.
        yield


async def serve(settings: AdminApiSettings, started: asyncio.Event | None = None) -> None:
    async with ServiceRuntime("admin-api", settings) as runtime:
        auth = AuthClient(settings.auth_target, settings.grpc_timeout_seconds)
        runtime.ops.add_check("auth", channel_check(auth.channel))
        backend = Backend(
            redis=runtime.redis,
            js=runtime.js,
            events=runtime.events,
            auth=auth,
            sessions=SessionStore(runtime.redis, settings.session_ttl_seconds),
            audit_retention=AuditRetention(settings.audit_max_age_days, settings.audit_max_bytes,
                                           settings.stream_replicas),
        )
        await backend.audit.ensure()  # the configured retention, applied to an existing stream too
        config = uvicorn.Config(
            create_app(settings, backend),
            host=settings.http_host,
            port=settings.http_port,
            lifespan="off",
            log_config=None,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
            limit_concurrency=1000,
        )
        server = _HttpServer(config)
        http = asyncio.create_task(server.serve(), name="admin-http")
        bootstrap = asyncio.create_task(run_bootstrap(settings, backend), name="admin-bootstrap")
        shutdown = asyncio.create_task(runtime.wait_for_shutdown(), name="admin-shutdown")
        while not server.started and not http.done():
            await asyncio.sleep(0.02)
        if started is not None:
            started.set()
        await asyncio.wait({http, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True  # stop accepting; in-flight requests finish within the grace period
        await http
        for task in (bootstrap, shutdown):
            task.cancel()
        await asyncio.gather(bootstrap, shutdown, return_exceptions=True)
        await auth.close()
