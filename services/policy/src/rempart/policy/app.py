"""Running the policy service: the gRPC server inside a :class:`ServiceRuntime`.

:func:`running_policy` is what ``serve()`` and the tests both use, so that the tests start the
service exactly as production does (on port 0).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from rempart.common.grpcutil import new_server, set_serving
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc
from rempart.common.runtime import ServiceRuntime
from rempart.policy.resolver import CachingResolver
from rempart.policy.servicer import PolicyServicer
from rempart.policy.settings import PolicySettings
from rempart.policy.srs import SrsKeys

log = logging.getLogger(__name__)

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


@dataclass
class RunningPolicy:
    runtime: ServiceRuntime
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    servicer: PolicyServicer

    async def stop(self, grace: float) -> None:
        """Drain: report NOT_SERVING so that clients move away, end the session streams between
        their stages (the edges go on through another replica), then finish calls in flight."""
        await set_serving(self.health, False, SERVICE_NAME)
        ended = self.servicer.end_sessions()
        log.info("ended %d idle session streams", ended)
        await self.server.stop(grace)


@asynccontextmanager
async def running_policy(settings: PolicySettings) -> AsyncIterator[RunningPolicy]:
    async with ServiceRuntime("policy", settings) as rt:
        server, health_servicer = new_server()
        resolver = CachingResolver(settings.dns_nameservers, settings.dns_cache_entries)
        srs = SrsKeys(settings.secret_key.get_secret_value())
        servicer = PolicyServicer(rt.redis, rt.config, rt.events, resolver, srs, settings.hostname)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        if port == 0:
            raise RuntimeError(f"cannot listen on {settings.grpc_host}:{settings.grpc_port}")
        await server.start()
        await set_serving(health_servicer, True, SERVICE_NAME)
        log.info("policy listening", extra={"grpc_port": port})
        running = RunningPolicy(rt, server, health_servicer, port, servicer)
        try:
            yield running
        finally:
            await running.stop(settings.shutdown_grace_seconds)
            await servicer.stats.close()  # the last second's counts (GET /v1/stats)


async def serve(settings: PolicySettings) -> None:
    async with running_policy(settings) as running:
        await running.runtime.wait_for_shutdown()
        log.info("draining within %ss", settings.shutdown_grace_seconds)
