"""The outbound relay's process settings (``REMPART_*``). The mail-policy side of the relay
(STARTTLS, lifetimes, backoff, smarthosts, rates) is ``MailSettings.outbound``, changeable at
run time through the admin API."""

from __future__ import annotations

from pydantic import Field, SecretStr

from rempart.common.settings import ServiceSettings


class RelaySettings(ServiceSettings):
    ops_port: int = 9106
    # Resolvers of the MX lookups (host or host:port, comma-separated; empty = resolv.conf).
    dns_nameservers: str = ""
    dns_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # The port of MX hosts (RFC 5321: 25); tests point it at their loopback sinks.
    mx_port: int = Field(default=25, ge=1, le=65535)
    # The durable JetStream consumer every replica shares.
    consumer: str = "relay"
    max_parallel_messages: int = Field(default=64, ge=1, le=10_000)
    # Deferred messages stay unacknowledged until due: this bounds how many may wait at once.
    max_ack_pending: int = Field(default=200_000, ge=100)
    ack_wait_seconds: float = Field(default=60.0, ge=5)
    connect_timeout_seconds: float = Field(default=30.0, gt=0)
    # RFC 5321 4.5.3.2: the client waits 5 minutes for MAIL/RCPT replies, 10 for the final dot.
    command_timeout_seconds: float = Field(default=600.0, gt=0)
    # A session that ended its transaction cleanly is kept this long for the next message to the
    # same host (Postfix's smtp_connection_cache_time_limit is 2 s; 0: a session per message),
    # at most this many idle per destination. Kept sessions are open connections beside the
    # outbound.max_connections_per_domain in use, as with Postfix's connection cache.
    connection_cache_seconds: float = Field(default=2.0, ge=0, le=300)
    connection_cache_per_destination: int = Field(default=8, ge=1, le=1000)
    # R-LIM-6 counts messages per minute; tests shorten the window to keep fast.
    rate_window_seconds: float = Field(default=60.0, gt=0)
    # Extra trust anchors for outbound certificate checks (PEM file), besides the system's: MX
    # hosts' certificates and the MTA-STS policy hosts' (https://mta-sts.<domain>).
    tls_ca_file: str = ""
    # MTA-STS (RFC 8461): look up and apply destinations' policies. The policy host's port is
    # 443 (RFC 8461 3.3); tests point it at a loopback HTTPS server.
    outbound_mta_sts: bool = True
    outbound_mta_sts_port: int = Field(default=443, ge=1, le=65535)
    outbound_mta_sts_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Smarthost AUTH passwords by transport key (the domain, or "*"), as JSON:
    # REMPART_SMARTHOST_PASSWORDS='{"example.net": "..."}' (a Kubernetes Secret in the chart).
    smarthost_passwords: dict[str, SecretStr] = Field(default_factory=dict)

    def nameservers(self) -> list[str]:
        return [n.strip() for n in self.dns_nameservers.split(",") if n.strip()]
