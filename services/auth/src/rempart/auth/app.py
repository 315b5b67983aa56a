"""Process wiring: runtime, gRPC server with health, and draining on SIGTERM."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from rempart.auth.servicer import SERVICE_NAME, AuthServicer
from rempart.auth.settings import AuthSettings
from rempart.common.grpcutil import new_server, set_serving
from rempart.common.pb.auth.v1 import auth_pb2_grpc
from rempart.common.runtime import ServiceRuntime

log = logging.getLogger(__name__)


@dataclass
class RunningAuth:
    runtime: ServiceRuntime
    server: grpc.aio.Server
    servicer: AuthServicer
    grpc_port: int


@asynccontextmanager
async def running(settings: AuthSettings) -> AsyncIterator[RunningAuth]:
    """The service, started and SERVING; on exit NOT_SERVING first, then a graceful stop."""
    async with ServiceRuntime("auth", settings) as rt:
        servicer = AuthServicer(settings, rt)
        await servicer.start()
        server, health = new_server()
        auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        await server.start()
        await set_serving(health, True, SERVICE_NAME)
        log.info("auth serving", extra={"grpc_port": port})
        try:
            yield RunningAuth(rt, server, servicer, port)
        finally:
            # Leave the load balancer's rotation first, then let calls in flight finish.
            await set_serving(health, False, SERVICE_NAME)
            await server.stop(settings.shutdown_grace_seconds)
            await servicer.login.stats.close()  # the last second's counts (GET /v1/stats)


async def serve(settings: AuthSettings) -> None:
    async with running(settings) as service:
        await service.runtime.wait_for_shutdown()
