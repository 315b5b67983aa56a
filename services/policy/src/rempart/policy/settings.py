"""The policy service's process settings (``REMPART_*``); mail-policy settings live in the store."""

from __future__ import annotations

from pydantic import Field, field_validator

from rempart.common.settings import ServiceSettings
from rempart.policy.resolver import parse_nameservers


class PolicySettings(ServiceSettings):
    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    ops_port: int = 9103
    # R-DNS: "host" or "host:port" (IPv6 as "[addr]:port"), comma separated; empty = resolv.conf.
    dns_nameservers: str = ""
    dns_cache_entries: int = Field(default=20000, ge=100, le=1_000_000)

    @field_validator("dns_nameservers")
    @classmethod
    def _nameservers_are_addresses(cls, value: str) -> str:
        parse_nameservers(value)
        return value
