"""gRPC server and client helpers (DESIGN.md "Contracts").

Servers carry the standard ``grpc.health.v1`` service. Clients use ``dns:///`` targets with
round_robin across a headless Service's pod IPs, a deadline on every call, and keepalives so
that a dead peer is noticed. A failed or late call is the caller's cue to fail closed. When
tracing is on, both carry the trace interceptors (:mod:`rempart.common.tracing`): a span per
call on each side, the trace context in the call's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rempart.common import tracing

ReadinessFn = Callable[[], Awaitable[None]]

_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
)


def client_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 20000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.dns_min_time_between_resolutions_ms", 5000),
        ],
        interceptors=tracing.client_interceptors(),
    )


def new_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10000),
        ],
        interceptors=tracing.server_interceptors(),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool, *services: str) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *services):
        await health_servicer.set(name, status)


def channel_check(channel: grpc.aio.Channel) -> ReadinessFn:
    """Readiness: the peer answers the standard health check."""

    async def check() -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.5)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionError("peer not serving")

    return check

