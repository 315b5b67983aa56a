"""Process settings of the auth service (``REMPART_*`` environment variables).

Login and password *policy* (SPEC R-LOG, R-PWD) lives in the versioned settings store and
changes at run time; what is here is how this process runs: ports and hashing cost.
"""

from __future__ import annotations

from pydantic import Field

from rempart.common.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(default=50052, ge=0, le=65535)
    ops_port: int = 9104
    # Argon2id cost (RFC 9106 "second recommended option": t=3, m=64 MiB, p=1). Tests lower it.
    argon2_time_cost: int = Field(default=3, ge=1, le=20)
    argon2_memory_kib: int = Field(default=65536, ge=8, le=4 * 1024 * 1024)
    argon2_parallelism: int = Field(default=1, ge=1, le=16)
    # Each hash holds argon2_memory_kib of RAM: this caps memory and CPU under a password spray.
    max_concurrent_hashes: int = Field(default=4, ge=1, le=256)
    # R-LOG-1 "slow down" mode: each recent failure adds this much delay, up to the cap.
    slow_down_step_ms: int = Field(default=1000, ge=0, le=60000)
    slow_down_max_ms: int = Field(default=15000, ge=0, le=120000)
    # SCRAM-SHA-256 keys (R-TLS-2) are derived with this PBKDF2 count when a password is set;
    # RFC 7677 section 4: at least 4096. The conversation state lives this long in Redis.
    scram_iterations: int = Field(default=4096, ge=4096, le=1_000_000)
    scram_conversation_seconds: int = Field(default=60, ge=5, le=600)
