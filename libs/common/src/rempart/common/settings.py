"""Process settings read from ``REMPART_*`` environment variables.

Each service subclasses :class:`ServiceSettings`, builds it once in ``main()`` and passes it
down; nothing else reads the environment. Mail-policy settings (SPEC.md) are not here: they
live in the versioned settings store (:mod:`rempart.common.config`) so they change at run time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET_KEY = "dev-only-insecure-key-change-me"  # noqa: S105 - refused outside dev


class ServiceSettings(BaseSettings):
    """Settings every Rempart service shares."""

    model_config = SettingsConfigDict(env_prefix="REMPART_", extra="ignore")

    environment: Literal["dev", "test", "prod"] = "dev"
    redis_url: str = "redis://127.0.0.1:6379/0"
    nats_url: str = "nats://127.0.0.1:4222"
    ops_host: str = "0.0.0.0"
    ops_port: int = 0
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    hostname: str = "localhost"
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    instance: str = ""
    shutdown_grace_seconds: float = 20.0
    # JetStream replicas of the streams a service creates (3 on a NATS cluster, R-OPS-6). An
    # existing stream with more replicas keeps them: no service ever lowers the count.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # Messages up to this size are stored inside their delivery record (one fsync, one read);
    # larger ones in the object store. 0 stores every message as a blob.
    inline_body_max_bytes: int = Field(default=64 * 1024, ge=0, le=512 * 1024)
    # Redis replicas that must have the mailbox index's writes before the indexer acks
    # a record (0: no replicas, or do not wait). The chart's Sentinel values set 1.
    redis_wait_replicas: int = Field(default=0, ge=0, le=5)

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> ServiceSettings:
        # A production install must bring its own key: TOTP seeds and uploaded TLS keys are
        # encrypted with it (DESIGN.md "Contracts").
        if self.environment == "prod" and self.secret_key.get_secret_value() == DEV_SECRET_KEY:
            raise ValueError("REMPART_SECRET_KEY must be set outside development")
        return self


class EdgeSettings(ServiceSettings):
    """Settings shared by the services that face mail clients (smtp-edge, imap-pop)."""

    policy_target: str = "127.0.0.1:50051"
    auth_target: str = "127.0.0.1:50052"
    grpc_timeout_seconds: float = 3.0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # One certificate per host name (SNI, R-TLS-3): <dir>/<hostname>/tls.crt and tls.key, the
    # layout of Kubernetes TLS Secrets mounted side by side.
    tls_sni_dir: str = ""
    tls_reload_seconds: float = 10.0
    listen_host: str = "0.0.0.0"
    proxy_protocol_cidrs: str = ""

    def sni_certificates(self) -> dict[str, tuple[str, str]]:
        from pathlib import Path

        if not self.tls_sni_dir:
            return {}
        out = {}
        for entry in sorted(Path(self.tls_sni_dir).iterdir()):
            cert, key = entry / "tls.crt", entry / "tls.key"
            if entry.is_dir() and cert.exists() and key.exists():
                out[entry.name.lower()] = (str(cert), str(key))
        return out

    def proxy_cidrs(self) -> list[str]:
        return [c.strip() for c in self.proxy_protocol_cidrs.split(",") if c.strip()]
