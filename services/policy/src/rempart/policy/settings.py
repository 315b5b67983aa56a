"""The policy service's process settings (``REMPART_*``); mail-policy settings live in the store."""

from __future__ import annotations

from pydantic import Field

from rempart.common.settings import ServiceSettings


class PolicySettings(ServiceSettings):
    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    ops_port: int = 9103
