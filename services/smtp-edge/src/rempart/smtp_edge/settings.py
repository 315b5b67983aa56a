"""The SMTP edge's process settings (``REMPART_*``)."""

from __future__ import annotations

from pydantic import Field

from rempart.common.settings import EdgeSettings


class SmtpEdgeSettings(EdgeSettings):
    ops_port: int = 9101
    smtp_port: int = 2525
    submission_port: int = 2587
    smtps_port: int = 2465
    # RFC 5321 4.5.3.2: a server should wait at least 5 minutes for the next command.
    command_timeout_seconds: float = Field(default=300.0, gt=0)
    max_sessions: int = Field(default=2000, ge=1)
    proxy_protocol_timeout_seconds: float = Field(default=5.0, ge=3.0)
    # Resolvers for the Received header's rDNS (host or host:port, comma-separated; empty =
    # the system's resolv.conf). The chart passes the same value to the policy service.
    dns_nameservers: str = ""

    def nameservers(self) -> list[str]:
        return [n.strip() for n in self.dns_nameservers.split(",") if n.strip()]
